"""The three 2D datasets of the seed tutorial (shared/reference/toy2d.md), all in [-0.5, 0.5)^2,
with their true entropies and the tutorial's published numbers (bits per point)."""

from __future__ import annotations

import math

import torch

from fastvae._validate import check_choice

DATASETS = ("8gaussians", "checkerboard", "2spirals")

ENTROPY_BITS = {"8gaussians": -1.917, "checkerboard": -1.000, "2spirals": -2.336}

# The tutorial's Tables 1-2: 6 x 1024 MLP, 60,000 iterations (IWAE: 30,000, K = 10).
PUBLISHED_BITS = {
    "8gaussians": {"vae_elbo": -1.83, "vae_nll": -1.87, "iwae_loss": -1.84, "iwae_nll": -1.91},
    "checkerboard": {"vae_elbo": -0.72, "vae_nll": -0.81, "iwae_loss": -0.81, "iwae_nll": -0.87},
    "2spirals": {"vae_elbo": -1.99, "vae_nll": -2.15, "iwae_loss": -2.24, "iwae_nll": -2.29},
}

GAUSSIAN_RADIUS = 4 / (1.414 * 8)
GAUSSIAN_STD = 0.5 / (1.414 * 8)


def gaussian_centres() -> torch.Tensor:
    """The 8 centres (8, 2) on a circle, at 0, 45, ..., 315 degrees."""
    angles = torch.arange(8) * (math.pi / 4)
    return GAUSSIAN_RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)


def _eight_gaussians(n: int, g: torch.Generator) -> torch.Tensor:
    centres = gaussian_centres()[torch.randint(0, 8, (n,), generator=g)]
    return centres + GAUSSIAN_STD * torch.randn(n, 2, generator=g)


def _checkerboard(n: int, g: torch.Generator) -> torch.Tensor:
    x1 = torch.rand(n, generator=g) * 4 - 2
    x2 = torch.rand(n, generator=g) - 2 * torch.randint(0, 2, (n,), generator=g)
    x2 = x2 + torch.floor(x1) % 2
    return torch.stack([x1, x2], dim=1) * (2 / 8)


def _two_spirals(n: int, g: torch.Generator) -> torch.Tensor:
    t = torch.sqrt(torch.rand(n, generator=g)) * 3 * math.pi
    sign = torch.randint(0, 2, (n, 1), generator=g) * 2 - 1
    points = torch.stack([-torch.cos(t) * t, torch.sin(t) * t], dim=1) / 3 * sign
    return (points + 0.1 * torch.randn(n, 2, generator=g)) / 8


_SAMPLERS = {
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "2spirals": _two_spirals,
}


def sample(name: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """n points (n, 2), float32 on the CPU, drawn with `generator`."""
    return _SAMPLERS[check_choice("dataset", name, DATASETS)](n, generator).float()
