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
    cross-entropy, stable for any logit) or "hinge".
    """

    def __init__(self, generator: nn.Module, discriminator: nn.Module, latent_dim: int, *,
                 loss: str = "nonsaturating"):  # fmt: skip
        super().__init__()
        V.check_choice("loss", loss, LOSSES)
        V.check_callable("generator", generator)
        V.check_callable("discriminator", discriminator)
        self.generator = generator
        self.discriminator = discriminator
        self.base = StandardNormal(check_dim("latent_dim", latent_dim))
        self.latent_dim = self.base.dim
        self.loss = loss

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
        real_logits, fake_logits = self._logits(real), self._logits(fake)
        if self.loss == "hinge":
            return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
