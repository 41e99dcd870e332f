"""Burda et al.'s model with 2 stochastic layers, through fastvae's ops.

q(h1 | x): 784-200-200-(100 mu, 100 logvar), q(h2 | h1): 100-100-100-(50, 50); p(h2) = N(0, I),
p(h1 | h2): 50-100-100-(100, 100), p(x | h1): 100-200-200-784 Bernoulli logits; tanh between
layers. A sample's log-weight is log p(x | h1) + log p(h1 | h2) + log p(h2) - log q(h1 | x)
- log q(h2 | h1).
"""

from __future__ import annotations

import torch
from torch import nn

from fastvae.mnist import data
from fastvae.mnist.models import mlp
from fastvae.nn import StandardNormal
from fastvae.nn.vae import VAEOutput
from fastvae.ops import (
    bernoulli_log_prob,
    estimate_log_likelihood,
    gaussian_log_prob,
    log_mean_exp,
    reparameterize,
)

LATENTS = (100, 50)
HIDDEN = ((200, 200), (100, 100))


def _pair(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return out.chunk(2, dim=-1)


class _UpperLayers:
    """p(h1) = E_q(h2 | h1)[p(h1 | h2) p(h2) / q(h2 | h1)] estimated with one h2 draw: the
    `prior` of the first layer that fastvae.estimate_log_likelihood takes (log_prob(h1))."""

    def __init__(self, model: TwoLayerModel):
        self.model = model

    def log_prob(self, h1: torch.Tensor) -> torch.Tensor:
        return self.model.upper_log_ratio(h1)


class TwoLayerModel(nn.Module):
    """The 2-layer model trained with k samples; forward(x) gives a VAEOutput whose
    reconstruction - kl is each sample's log-weight (k, B) and whose loss is -L_k."""

    likelihood = "bernoulli"

    def __init__(self, num_samples: int, mean_image: torch.Tensor):
        super().__init__()
        (d1, d2), (wide, narrow) = LATENTS, HIDDEN
        self.encoder = mlp((data.PIXELS, *wide, 2 * d1))  # q(h1 | x)
        self.upper_encoder = mlp((d1, *narrow, 2 * d2))  # q(h2 | h1)
        self.upper_decoder = mlp((d2, *narrow, 2 * d1))  # p(h1 | h2)
        self.decoder = mlp((d1, *wide[::-1], data.PIXELS))  # p(x | h1)
        p = mean_image.clamp(1e-3, 1 - 1e-3)
        with torch.no_grad():
            self.decoder[-1].bias.copy_(torch.log(p) - torch.log1p(-p))
        self.prior = StandardNormal(d2)
        self.num_samples = num_samples
        self.latent_dim = d2

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(h1 | x)'s (mu, logvar), each (B, 100)."""
        return _pair(self.encoder(x.float()))

    def upper_log_ratio(self, h1: torch.Tensor) -> torch.Tensor:
        """log p(h1 | h2) + log p(h2) - log q(h2 | h1) for one h2 ~ q(h2 | h1), (..., 100) -> (...)
        (the log-ratio of the upper layers: an unbiased estimate of p(h1) once exponentiated)."""
        mu2, logvar2 = _pair(self.upper_encoder(h1))
        h2 = reparameterize(mu2, logvar2)
        mean1, logvar1 = _pair(self.upper_decoder(h2))
        return (
            gaussian_log_prob(h1, mean1, logvar1)
            + self.prior.log_prob(h2)
            - gaussian_log_prob(h2, mu2, logvar2)
        )

    def log_px(self, x: torch.Tensor, h1: torch.Tensor) -> torch.Tensor:
        """log p(x | h1): x (B, 784), h1 (k, B, 100) -> (k, B)."""
        return bernoulli_log_prob(x, self.decoder(h1))

    def forward(self, x: torch.Tensor) -> VAEOutput:
        mu1, logvar1 = self.encode(x)
        h1 = reparameterize(mu1, logvar1, num_samples=self.num_samples)
        reconstruction = self.log_px(x, h1)
        log_w = reconstruction + self.upper_log_ratio(h1) - gaussian_log_prob(h1, mu1, logvar1)
        bound = log_mean_exp(log_w, dim=0)
        return VAEOutput(-bound.mean(), bound, reconstruction, reconstruction - log_w, h1)

    @torch.no_grad()
    def log_likelihood(self, x: torch.Tensor, num_samples: int = 250) -> torch.Tensor:
        """Importance-sampled log p(x) (B,) with proposal q(h1 | x) q(h2 | h1), streamed."""
        return estimate_log_likelihood(
            self.encode, self.log_px, x, num_samples, prior=_UpperLayers(self)
        )

    def decode(self, h2: torch.Tensor) -> tuple[torch.Tensor]:
        """The logits of x at h1 = the mean of p(h1 | h2), for the figures."""
        return (self.decoder(_pair(self.upper_decoder(h2))[0]),)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(self.encode(x)[0]))

    @torch.no_grad()
    def upper_mean(self, x: torch.Tensor) -> torch.Tensor:
        """E_q[h2 | x] with h1 at its mean: the second layer's activity."""
        return _pair(self.upper_encoder(self.encode(x)[0]))[0]
