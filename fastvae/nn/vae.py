"""VAE and IWAE modules around the user's encoder and decoder, computed by the fused ops.

encoder(x) -> (mu, logvar), each (B, D), or one (B, 2D) tensor split in two; for a VAE with
posterior="full", (mu (B, D), scale_tril (B, D, D)).
decoder(z) -> the likelihood's parameters for z of shape (N, D): "gaussian": (mean, logvar) or
one tensor split in two on the last dim, each (N, *event), or the mean alone where the modules
get decoder_logvar (a float: every element's fixed log-variance; 0.0 is the unit-variance,
"MSE" decoder, at about the cost of a squared error); "bernoulli": logits (N, *event);
"discretized_logistic": (mean, log_scale) or one tensor split in two, each (N, *event), in x's
units (fastvae.discretized_logistic_log_prob with 256 bins).
x: (B, *event), float; for "bernoulli" also bool or uint8 (0/1), for "discretized_logistic"
8-bit data as k / 256 floats or the integers k (uint8, say). The encoder sees float x: 0/1, or
k / 256. Log-likelihoods sum over the event dims.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import nn

from fastvae import _validate as V
from fastvae.nn._split import split_pair
from fastvae.nn.priors import Prior, StandardNormal
from fastvae.ops import (
    bernoulli_log_prob,
    discretized_logistic_log_prob,
    estimate_log_likelihood,
    gaussian_kl,
    gaussian_log_prob,
    log_mean_exp,
    reparameterize,
    reparameterize_kl,
    reparameterize_kl_tril,
)
from fastvae.ops.iwae import ESTIMATORS, iwae_log_weights

LIKELIHOODS = ("gaussian", "bernoulli", "discretized_logistic")
DATA_DTYPES = {"bernoulli": (torch.bool, torch.uint8), "discretized_logistic": V.INTEGER_DTYPES}
BINS = 256  # "discretized_logistic": 8-bit data
POSTERIORS = ("diagonal", "full")


class VAEOutput(NamedTuple):
    """What VAE / IWAE forward(x) returns (B: batch, K: samples, D: latent size).

    loss: () the objective to minimize, averaged over the batch.
    elbo: (B,) the ELBO (VAE) or the K-sample bound L_K (IWAE), in nats.
    reconstruction: log p(x | z), (B,) (VAE) or (K, B) (IWAE).
    kl: (B,) KL(q(z|x) || p(z)) (VAE; Monte Carlo for priors without a closed form) or
        (K, B) log q(z_k|x) - log p(z_k) (IWAE).
    z: the latent draws, (B, D) or (K, B, D).
    """

    loss: torch.Tensor
    elbo: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor
    z: torch.Tensor


def _check_decoder_logvar(value: object, likelihood: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"decoder_logvar must be a float or None, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"decoder_logvar must be finite, got {value}")
    if likelihood != "gaussian":
        raise ValueError(f"decoder_logvar needs likelihood='gaussian'; got {likelihood!r}")
    return float(value)


def _check_full_posterior(mu, scale_tril, x) -> None:
    """encoder(x) gave mu (B, D) and scale_tril (B, D, D) for x (B, *event)."""
    B = x.shape[0]
    if mu.dim() != 2 or mu.shape[0] != B or scale_tril.shape != (*mu.shape, mu.shape[-1]):
        raise ValueError(
            f"encoder(x) must give mu (B, D) and scale_tril (B, D, D) with B = {B} for "
            f'posterior="full"; got {tuple(mu.shape)} and {tuple(scale_tril.shape)}'
        )


def _discretized_logistic_sample(mean, log_scale, generator) -> torch.Tensor:
    """The bin value k / BINS of y = mean + e^log_scale logit(U), U ~ U(0, 1): bin k holds
    [k / BINS, (k + 1) / BINS), the edge bins everything beyond."""
    mean, log_scale = (p.to(torch.promote_types(p.dtype, torch.float32)) for p in (mean, log_scale))
    u = torch.rand(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    y = mean + torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u))
    return torch.floor(y * BINS).clamp_(0, BINS - 1) / BINS


class _LatentVariableModel(nn.Module):
    """What VAE and IWAE share: encoding, the decoder's likelihood, sampling, log p(x)."""

    posterior = "diagonal"  # q(z | x): N(mu, diag e^logvar), or N(mu, L L^T) ("full", VAE only)

    def __init__(self, encoder: nn.Module, decoder: nn.Module, likelihood: str, prior,
                 decoder_logvar: float | None):  # fmt: skip
        super().__init__()
        V.check_callable("encoder", encoder)
        V.check_callable("decoder", decoder)
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood = V.check_choice("likelihood", likelihood, LIKELIHOODS)
        self.decoder_logvar = _check_decoder_logvar(decoder_logvar, self.likelihood)
        if prior is None:
            prior = StandardNormal()
        if not isinstance(prior, Prior):
            raise TypeError(
                "prior must be a fastvae.nn prior (StandardNormal, LearnedGaussian, "
                f"MixturePrior, VampPrior) or None; got {type(prior).__name__}"
            )
        self.prior = prior
        self.latent_dim = getattr(prior, "dim", None)  # else learned from the first encode
        # What compiled calls check D against: latent_dim as the prior, a checkpoint or an
        # eager call gave it. A compiled call writes latent_dim only: its graph guards on what
        # it reads, and latent_dim goes from None to D in the first call.
        self._known_latent_dim = self.latent_dim

    def get_extra_state(self) -> dict:
        return {"latent_dim": self.latent_dim}

    def set_extra_state(self, state: dict) -> None:
        self.latent_dim = self._known_latent_dim = state["latent_dim"]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | x)'s (mu, logvar), each (B, D), for x (B, *event); (mu, scale_tril (B, D, D))
        with posterior="full"."""
        if self.likelihood in DATA_DTYPES:
            V.check_data_tensor("x", x, DATA_DTYPES[self.likelihood])
        else:
            V.check_tensor("x", x)
        if x.dim() < 2:
            raise ValueError(f"x must be (B, *event) with a batch dim first; got {tuple(x.shape)}")
        V.check_module_device("x", x, self.encoder, "encoder")
        if not x.is_floating_point():  # 0 / 1, or bin k: the encoder sees k / 256
            x = x.to(V.module_float_dtype(self.encoder))
            x = x / BINS if self.likelihood == "discretized_logistic" else x
        mu, logvar = split_pair(self.encoder(x), "encoder(x)")
        if self.posterior == "full":
            _check_full_posterior(mu, logvar, x)
        elif mu.shape != logvar.shape or mu.shape[:1] != x.shape[:1] or mu.dim() != 2:
            raise ValueError(
                f"encoder(x) must give mu and logvar of shape (B, D) = ({x.shape[0]}, D); got "
                f"{tuple(mu.shape)} and {tuple(logvar.shape)}"
            )
        self._learn_latent_dim(mu.shape[-1])
        return mu, logvar

    def _learn_latent_dim(self, D: int) -> None:
        """Record the encoder's D as latent_dim, or check it against the one known."""
        if torch.compiler.is_compiling():
            known = self._known_latent_dim
            if known is None:
                self.latent_dim = known = D
        else:
            known = self.latent_dim
            if known is None:
                self.latent_dim = self._known_latent_dim = known = D
        if known != D:
            raise ValueError(f"encoder(x) gave D = {D}; the prior has {known}")

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The decoder's parameters for z (..., D), each (..., *event)."""
        V.check_tensor("z", z)
        V.check_module_device("z", z, self.decoder, "decoder")
        if self.latent_dim is not None and z.shape[-1] != self.latent_dim:
            raise ValueError(
                f"z must be (..., D) with D = {self.latent_dim}, the latent size; "
                f"got {tuple(z.shape)}"
            )
        flat = z.reshape(-1, z.shape[-1])  # decoders see (N, D), whatever the sample dims
        out = self.decoder(flat)
        pair = self.likelihood == "discretized_logistic" or (
            self.likelihood == "gaussian" and self.decoder_logvar is None
        )
        params = split_pair(out, "decoder(z)") if pair else (out,)
        for p in params:
            if not isinstance(p, torch.Tensor) or p.shape[:1] != flat.shape[:1]:
                got = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
                raise ValueError(f"decoder(z) for z (N, D) = {tuple(flat.shape)} gave {got}")
        return tuple(p.reshape(*z.shape[:-1], *p.shape[1:]) for p in params)

    def log_px(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x | z) summed over the event dims: x (B, *event), z (..., B, D) -> (..., B)."""
        params = self.decode(z)
        event = x.shape[1:]
        for p in params:
            if p.shape[z.dim() - 1 :] != event:
                raise ValueError(
                    f"decoder(z) must give parameters of x's event shape {tuple(event)}; got "
                    f"{tuple(p.shape[z.dim() - 1 :])}"
                )
        flat = [p.flatten(z.dim() - 1) for p in params]  # (..., B, E)
        x_flat = x.flatten(1)
        if self.likelihood == "gaussian":
            logvar = flat[1] if self.decoder_logvar is None else self.decoder_logvar
            return gaussian_log_prob(x_flat, flat[0], logvar)
        if self.likelihood == "bernoulli":
            return bernoulli_log_prob(x_flat, flat[0])
        return discretized_logistic_log_prob(x_flat, *flat, bins=BINS)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws from the model's p(x) = E_p(z) p(x | z), (n, *event), without gradients.

        Gaussian: mean + sigma * eps; Bernoulli: 0/1 draws (reconstruct gives probabilities);
        discretized logistic: the bin values k / 256 of logistic draws.
        """
        z = self.prior.sample(n, generator=generator, dim=self.latent_dim)
        params = self.decode(z)
        if self.likelihood == "discretized_logistic":
            return _discretized_logistic_sample(*params, generator)
        if self.likelihood == "gaussian":
            mean, fixed = params[0], self.decoder_logvar
            logvar = params[1] if fixed is None else mean.new_full((1,), fixed)
            return reparameterize(mean, logvar, generator=generator)
        return torch.bernoulli(torch.sigmoid(params[0]), generator=generator)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's mean at z = mu(x), shaped like x, without gradients."""
        mu, _ = self.encode(x)
        first = self.decode(mu)[0]
        return torch.sigmoid(first) if self.likelihood == "bernoulli" else first

    @torch.no_grad()
    def log_likelihood(
        self, x: torch.Tensor, num_samples: int = 250, chunk_size: int | None = None
    ):
        """Importance-sampled log p(x) per example, (B,) in nats, streamed over chunks of
        samples (see fastvae.estimate_log_likelihood). Needs a diagonal posterior."""
        if self.posterior == "full":
            raise ValueError('log_likelihood needs a diagonal posterior; posterior="full" has none')
        return estimate_log_likelihood(
            self.encode,
            self.log_px,
            x,
            num_samples,
            chunk_size=chunk_size,
            prior=self.prior.op_prior(),
        )


class VAE(_LatentVariableModel):
    """A VAE: loss = mean over the batch of beta * KL - log p(x | z), z ~ q(z | x).

    The KL is closed-form and fused with the sampling for StandardNormal and LearnedGaussian
    priors (free_bits: each latent dim's KL is at least this, in nats), Monte Carlo through the
    fused log-densities for MixturePrior and VampPrior. beta may be changed between steps (KL
    warm-up). decoder_logvar: a float fixes the Gaussian decoder's log-variance, and the decoder
    returns the mean alone (0.0: unit variance). posterior="full": the encoder gives (mu,
    scale_tril), q(z | x) = N(mu, L L^T) with L = tril(scale_tril), through
    reparameterize_kl_tril (the standard-normal prior only).
    """

    def __init__(self, encoder, decoder, *, likelihood="gaussian", prior=None, beta=1.0,
                 free_bits=0.0, decoder_logvar=None, posterior="diagonal"):  # fmt: skip
        super().__init__(encoder, decoder, likelihood, prior, decoder_logvar)
        self.beta = V.check_nonnegative_float("beta", beta)
        self.free_bits = V.check_nonnegative_float("free_bits", free_bits)
        if self.free_bits and not self.prior.closed_form:
            raise ValueError(
                f"free_bits needs a prior with a closed-form KL (StandardNormal, "
                f"LearnedGaussian); {type(self.prior).__name__} has none"
            )
        self.posterior = V.check_choice("posterior", posterior, POSTERIORS)
        if self.posterior == "full" and type(self.prior) is not StandardNormal:
            raise ValueError(
                f'posterior="full" needs the StandardNormal prior (or None); got '
                f"{type(self.prior).__name__}"
            )
        if self.posterior == "full" and self.free_bits:
            raise ValueError('free_bits is per dimension of a diagonal posterior; posterior="full" '
                             "takes none")  # fmt: skip

    def forward(self, x: torch.Tensor) -> VAEOutput:
        mu, logvar = self.encode(x)  # logvar: scale_tril (B, D, D) with posterior="full"
        if self.posterior == "full":
            z, kl = reparameterize_kl_tril(mu, logvar)
            kl_loss = kl
        elif self.prior.closed_form:
            pair = self.prior.op_prior() or (None, None)
            z, kl_loss = reparameterize_kl(mu, logvar, *pair, free_bits=self.free_bits)
            kl = gaussian_kl(mu, logvar, *pair) if self.free_bits else kl_loss
        else:
            z = reparameterize(mu, logvar)
            kl = kl_loss = gaussian_log_prob(z, mu, logvar) - self.prior.log_prob(z)
        reconstruction = self.log_px(x, z)
        loss = (self.beta * kl_loss - reconstruction).mean()
        return VAEOutput(loss, reconstruction - kl, reconstruction, kl, z)


class IWAE(_LatentVariableModel):
    """An IWAE: loss = mean over the batch of -L_K, L_K = log 1/K sum_k p(x, z_k) / q(z_k | x).

    num_samples: K; estimator: the encoder's gradient, "iwae", "stl" or "dreg" (see
    fastvae.iwae_loss). K = 1 with "iwae" is a VAE with a Monte Carlo KL. decoder_logvar: as in
    VAE.
    """

    def __init__(self, encoder, decoder, *, likelihood="gaussian", prior=None, num_samples=10,
                 estimator="iwae", decoder_logvar=None):  # fmt: skip
        super().__init__(encoder, decoder, likelihood, prior, decoder_logvar)
        self.num_samples = V.check_num_samples(num_samples, required=True)
        self.estimator = V.check_choice("estimator", estimator, ESTIMATORS)

    def forward(self, x: torch.Tensor) -> VAEOutput:
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar, num_samples=self.num_samples)
        reconstruction = self.log_px(x, z)
        log_w = iwae_log_weights(
            reconstruction, z, mu, logvar, estimator=self.estimator, prior=self.prior.op_prior()
        )
        bound = log_mean_exp(log_w, dim=0)
        return VAEOutput(-bound.mean(), bound, reconstruction, reconstruction - log_w, z)
