"""Priors p(z) over a D-dimensional latent, as modules the VAE, IWAE and GAN modules share.

Each prior gives its fused form to the ops (`op_prior()`: None for N(0, I), a (mu, logvar)
pair, or a (means, logvars, log_weights) mixture), its log-density, its closed-form KL from a
diagonal Gaussian where one exists (`closed_form`), and samples. Sampling goes through the
fused sampler, so the noise is drawn in-kernel on CUDA.
"""

from __future__ import annotations

import torch
from torch import nn

from fastvae import _validate as V
from fastvae.nn._split import split_pair
from fastvae.ops import gaussian_log_prob, mixture_log_prob, reparameterize


def check_dim(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _check_count(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0 (how many samples), got {n!r}")
    return n


def _check_sample_dim(dim: int | None, own: int) -> None:
    if dim is not None and dim != own:
        raise ValueError(f"dim = {dim!r} asked of a prior over {own} dimensions")


def _check_z(z: object, dim: int | None, prior: nn.Module) -> torch.Tensor:
    """z (..., D): a float tensor where the prior lives, of the prior's latent size D."""
    V.check_tensor("z", z)
    V.check_module_device("z", z, prior, "prior")
    if dim is not None and z.shape[-1] != dim:
        raise ValueError(
            f"z must be (..., D) with D = {dim}, the prior's latent size; got {tuple(z.shape)}"
        )
    return z


def _draw(mu: torch.Tensor, logvar: torch.Tensor, n: int, generator) -> torch.Tensor:
    """n draws (n, D) of N(mu, diag exp(logvar)) through the fused sampler; n = 0 gives (0, D).

    The (D,) parameters are read in place as n rows (stride 0), not as one row with n samples:
    the kernel tiles rows over programs but loops over samples within one, and the noise is the
    same either way (keyed by the element's index in z)."""
    rows = (n, mu.shape[-1])
    return reparameterize(mu.expand(rows), logvar.expand(rows), generator=generator)


def _sample_mixture(n, means, logvars, log_weights, generator) -> torch.Tensor:
    """n draws (n, D) from sum_c softmax(log_weights)_c N(means_c, diag exp(logvars_c))."""
    probs = torch.softmax(log_weights.detach().float(), 0)
    if n == 0:
        index = torch.zeros(0, dtype=torch.long, device=probs.device)
    else:
        index = torch.multinomial(probs, n, replacement=True, generator=generator)
    return reparameterize(means[index], logvars[index], generator=generator)


class Prior(nn.Module):
    """A prior p(z). Subclasses set `closed_form` and implement op_prior, log_prob, sample."""

    closed_form = False  # True: op_prior() is None or a (mu, logvar) pair, KL is analytic

    def op_prior(self):
        """The prior in the form the fused ops take (see fastvae.importance_sample)."""
        raise NotImplementedError

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z): (..., D) -> (...)."""
        raise NotImplementedError

    def sample(self, n: int, *, generator: torch.Generator | None = None, dim: int | None = None):
        """n draws, (n, D). dim: the latent size D, checked where the prior knows its own."""
        raise NotImplementedError


class StandardNormal(Prior):
    """N(0, I). dim: the latent size, needed only to sample without a model that knows it."""

    closed_form = True

    def __init__(self, dim: int | None = None):
        super().__init__()
        self.dim = None if dim is None else check_dim("dim", dim)
        self.register_buffer("_zero", torch.zeros(1), persistent=False)

    def op_prior(self):
        return None

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return gaussian_log_prob(_check_z(z, self.dim, self), self._zero, None)

    def sample(self, n: int, *, generator: torch.Generator | None = None, dim: int | None = None):
        if dim is None:
            dim = self.dim
        elif self.dim is not None:
            _check_sample_dim(dim, self.dim)
        if dim is None:
            raise ValueError(
                "StandardNormal() without dim needs sample(n, dim=D) (a VAE knows D once it has "
                "encoded a batch)"
            )
        zeros = self._zero.expand(check_dim("dim", dim))
        return _draw(zeros, zeros, _check_count(n), generator)


class LearnedGaussian(Prior):
    """A trainable diagonal Gaussian N(mu, diag exp(logvar)), starting at N(0, I)."""

    closed_form = True

    def __init__(self, dim: int):
        super().__init__()
        self.dim = check_dim("dim", dim)
        self.mu = nn.Parameter(torch.zeros(dim))
        self.logvar = nn.Parameter(torch.zeros(dim))

    def op_prior(self):
        return self.mu, self.logvar

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return gaussian_log_prob(_check_z(z, self.dim, self), self.mu, self.logvar)

    def sample(self, n: int, *, generator: torch.Generator | None = None, dim: int | None = None):
        _check_sample_dim(dim, self.dim)
        return _draw(self.mu, self.logvar, _check_count(n), generator)


class MixturePrior(Prior):
    """A trainable mixture of `components` diagonal Gaussians in `dim` dimensions.

    Means start at N(0, I) draws (seeded by torch's generator), variances at 1, weights equal.
    """

    def __init__(self, dim: int, components: int):
        super().__init__()
        self.dim = check_dim("dim", dim)
        check_dim("components", components)
        self.means = nn.Parameter(torch.randn(components, dim))
        self.logvars = nn.Parameter(torch.zeros(components, dim))
        self.logits = nn.Parameter(torch.zeros(components))

    def op_prior(self):
        return self.means, self.logvars, self.logits

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return mixture_log_prob(_check_z(z, self.dim, self), self.means, self.logvars, self.logits)

    def sample(self, n: int, *, generator: torch.Generator | None = None, dim: int | None = None):
        _check_sample_dim(dim, self.dim)
        return _sample_mixture(_check_count(n), self.means, self.logvars, self.logits, generator)


class VampPrior(Prior):
    """The VampPrior (Tomczak & Welling 2018): p(z) = 1/C sum_c q(z | u_c).

    encoder: the VAE's encoder (shared, x -> (mu, logvar) or one tensor split in two);
    pseudo_inputs: (C, *x_shape), the initial pseudo-inputs u, trained as a parameter.
    """

    def __init__(self, encoder: nn.Module, pseudo_inputs: torch.Tensor):
        super().__init__()
        if not isinstance(pseudo_inputs, torch.Tensor) or pseudo_inputs.dim() < 2:
            raise ValueError(
                "pseudo_inputs must be a tensor (C, *x_shape) of C >= 1 initial pseudo-inputs"
            )
        if pseudo_inputs.shape[0] < 1:
            raise ValueError("pseudo_inputs must hold at least one pseudo-input (C >= 1)")
        if not pseudo_inputs.is_floating_point():
            raise TypeError(
                f"pseudo_inputs must be a floating-point tensor (they are trained), got "
                f"{pseudo_inputs.dtype}"
            )
        V.check_callable("encoder", encoder)
        V.check_module_device("pseudo_inputs", pseudo_inputs, encoder, "encoder")
        self.encoder = encoder
        self.pseudo_inputs = nn.Parameter(pseudo_inputs.detach().clone())

    def components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(means, logvars), each (C, D): the encoder's posteriors of the pseudo-inputs."""
        return split_pair(self.encoder(self.pseudo_inputs), "encoder(pseudo_inputs)")

    def op_prior(self):
        return (*self.components(), None)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        means, logvars = self.components()
        return mixture_log_prob(_check_z(z, means.shape[-1], self), means, logvars)

    def sample(self, n: int, *, generator: torch.Generator | None = None, dim: int | None = None):
        means, logvars = self.components()
        _check_sample_dim(dim, means.shape[-1])
        uniform = means.new_zeros(means.shape[0])
        return _sample_mixture(_check_count(n), means, logvars, uniform, generator)
