"""A GAN from the same Gaussian base: x = generator(z), z ~ N(0, I) drawn by the fused sampler."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fastvae import _validate as V
from fastvae.nn.priors import StandardNormal, check_dim

LOSSES = ("nonsaturating", "hinge")


class GAN(nn.Module):
    """generator: (n, latent_dim) -> (n, *x_shape); discriminator: (n, *x_shape) -> (n,) or (n, 1)
    logits. loss: "nonsaturating" (softplus form of -log D(G(z)) and the usual discriminator
    cross-entropy, stable for any logit) or "hinge". r1: weight gamma of the R1 penalty
    gamma / 2 * E ||grad_x D(x)||^2 on real data added to the discriminator's loss (Mescheder et
    al. 2018), which keeps the discriminator from growing steep around the modes the generator
    has found and so keeps it from collapsing onto them; 0 (default) for none.
    """

    def __init__(self, generator: nn.Module, discriminator: nn.Module, latent_dim: int, *,
                 loss: str = "nonsaturating", r1: float = 0.0):  # fmt: skip
        super().__init__()
        V.check_choice("loss", loss, LOSSES)
        V.check_callable("generator", generator)
        V.check_callable("discriminator", discriminator)
        self.generator = generator
        self.discriminator = discriminator
        self.base = StandardNormal(check_dim("latent_dim", latent_dim))
        self.latent_dim = self.base.dim
        self.loss = loss
        self.r1 = V.check_nonnegative_float("r1", r1)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.discriminator(x)
        if not isinstance(out, torch.Tensor) or out.reshape(-1).shape[0] != x.shape[0]:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"discriminator(x) must give one logit per row, ({x.shape[0]},); got {got}"
            )
        return out.reshape(-1).float()

    def _batch_size(self, batch) -> int:
        if isinstance(batch, torch.Tensor) and batch.dim() and batch.shape[0]:
            return batch.shape[0]
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an int >= 1 or a batch of real data; got {batch!r}")
        return batch

    def generate(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """generator(z) for n base draws z ~ N(0, I), with gradients: (n, *x_shape)."""
        return self.generator(self.base.sample(n, generator=generator))

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """n generated points, (n, *x_shape), without gradients."""
        return self.generate(n, generator=generator)

    def generator_loss(self, batch) -> torch.Tensor:
        """The generator's loss on a fresh batch of fakes; batch: its size, or a real batch."""
        logits = self._logits(self.generate(self._batch_size(batch)))
        if self.loss == "hinge":
            return -logits.mean()
        return F.softplus(-logits).mean()  # -log sigmoid(D(G(z)))

    def discriminator_loss(self, real: torch.Tensor) -> torch.Tensor:
        """The discriminator's loss on real (B, *x_shape) and B fakes (no generator gradient)."""
        V.check_tensor("real", real)
        if real.dim() < 1 or real.shape[0] < 1:
            raise ValueError(
                f"real must be a non-empty batch (B, *x_shape); got {tuple(real.shape)}"
            )
        V.check_module_device("real", real, self.discriminator, "discriminator")
        with torch.no_grad():
            fake = self.generate(real.shape[0])
        real_logits, penalty = self._real_logits_and_r1(real)
        fake_logits = self._logits(fake)
        if self.loss == "hinge":
            loss = F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
        else:
            loss = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
        return loss + penalty

    def _real_logits_and_r1(self, real: torch.Tensor):
        """D(real), (B,), and the R1 penalty r1 / 2 * mean ||grad_x D(real)||^2 (0 without r1)."""
        if not self.r1:
            return self._logits(real), 0.0
        differentiable = torch.is_grad_enabled()
        with torch.enable_grad():  # the penalty is a gradient, also when evaluated under no_grad
            real = real.detach().requires_grad_(True)
            logits = self._logits(real)
            (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=differentiable)
        return logits, 0.5 * self.r1 * grad.float().pow(2).flatten(1).sum(1).mean()
