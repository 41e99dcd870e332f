"""Evaluation in bits per point: -ELBO, the IWAE K = 10 loss, the K = 250 NLL (streamed), and a
GAN's mode coverage on 8 Gaussians (shared/reference/toy2d.md)."""

from __future__ import annotations

import math

import torch

from fastvae.toy2d import data

BITS = 1 / math.log(2)
NLL_BATCH = 1000  # points per log_likelihood call: 250 x 1000 decoder rows per chunk


@torch.no_grad()
def nll_bits(model, x: torch.Tensor, num_samples: int = 250) -> float:
    """-mean log p(x) in bits, importance-sampled with num_samples samples per point."""
    total = sum(
        model.log_likelihood(chunk, num_samples).sum().item() for chunk in x.split(NLL_BATCH)
    )
    return -total / x.shape[0] * BITS


@torch.no_grad()
def bound_bits(model, x: torch.Tensor) -> float:
    """-mean of the model's training bound in bits: -ELBO (VAE) or the K-sample loss (IWAE)."""
    total = sum(model(chunk).elbo.sum().item() for chunk in x.split(NLL_BATCH * 10))
    return -total / x.shape[0] * BITS


def mode_coverage(samples: torch.Tensor) -> tuple[int, float]:
    """(modes captured of 8, share of high-quality samples): a sample is high quality within
    3 std of a centre; a mode is captured when one sample is."""
    centres = data.gaussian_centres().to(samples)
    near = torch.cdist(samples.float(), centres) < 3 * data.GAUSSIAN_STD  # (n, 8)
    return int(near.any(0).sum()), near.any(1).float().mean().item()
