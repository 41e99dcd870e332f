"""Figures on the [-0.5, 0.5)^2 grid: true density | VAE density | IWAE density | GAN samples,
and under them the latent-space picture of the tutorial's Figure 1b: each latent point coloured
by where its decoded point lands (hue: angle, brightness: true density there)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import hsv_to_rgb  # noqa: E402

from fastvae.toy2d import data  # noqa: E402

GRID = 96  # pixels per side of the data-space grid
LATENT_GRID = 96
LATENT_RANGE = 3.0  # the latent picture covers [-3, 3]^2
DENSITY_SAMPLES = 100  # importance samples per grid point for the model densities
TRUE_DENSITY_POINTS = 2_000_000
GAN_POINTS = 2500
EXTENT = (-0.5, 0.5, -0.5, 0.5)


def grid_points(n: int, half_width: float) -> torch.Tensor:
    """Pixel centres (n * n, 2) of [-half_width, half_width)^2, row-major from the bottom."""
    ticks = (torch.arange(n) + 0.5) / n * 2 * half_width - half_width
    y, x = torch.meshgrid(ticks, ticks, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=1)


def true_density(dataset: str, generator: torch.Generator) -> torch.Tensor:
    """(GRID, GRID) histogram density of many samples, rows = y from the bottom."""
    x = data.sample(dataset, TRUE_DENSITY_POINTS, generator).double()
    hist = torch.histogramdd(
        x.flip(1), bins=[GRID, GRID], range=[-0.5, 0.5, -0.5, 0.5], density=True
    ).hist
    return hist.float()


@torch.no_grad()
def model_density(model, device: torch.device) -> torch.Tensor:
    """(GRID, GRID) importance-sampled density of a VAE / IWAE at the grid's pixel centres."""
    log_p = model.log_likelihood(grid_points(GRID, 0.5).to(device), DENSITY_SAMPLES)
    return log_p.exp().reshape(GRID, GRID).cpu()


def _lookup(density: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """The (GRID, GRID) density at points (n, 2); 0 outside [-0.5, 0.5)^2."""
    index = torch.floor((points + 0.5) * GRID).long()
    inside = ((index >= 0) & (index < GRID)).all(1)
    index = index.clamp(0, GRID - 1)
    return torch.where(inside, density[index[:, 1], index[:, 0]], 0.0)


def position_colours(points: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
    """RGB (n, 3): hue from the point's angle, brightness from the true density there."""
    hue = (torch.atan2(points[:, 1], points[:, 0]) / (2 * math.pi)) % 1.0
    value = (_lookup(density, points) / density.quantile(0.99)).clamp(0, 1)
    hsv = torch.stack([hue, torch.full_like(hue, 0.85), value], dim=1)
    return torch.from_numpy(hsv_to_rgb(hsv.numpy()))


@torch.no_grad()
def decoded_points(model, device: torch.device) -> torch.Tensor:
    """Where each latent grid point lands: the decoder's mean, or the GAN generator's output."""
    z = grid_points(LATENT_GRID, LATENT_RANGE).to(device)
    if hasattr(model, "generator"):
        return model.generator(z).cpu()
    return model.decode(z)[0].cpu()


def _panel(ax, title: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def write_figure(
    dataset: str, trained: dict, out_dir: Path, device: torch.device, seed: int, caption: str
) -> Path:
    """<out_dir>/<dataset>.png: densities on top, latent-space pictures below. trained: the
    models by kind ("vae", "iwae", "gan"); panels of missing models stay empty."""
    truth = true_density(dataset, torch.Generator().manual_seed(seed))
    fig, axes = plt.subplots(2, 4, figsize=(13, 6.8))
    vmax = truth.quantile(0.995).item()
    top = {"true density": truth}
    top.update(
        {
            f"{kind.upper()} density": model_density(trained[kind], device)
            for kind in ("vae", "iwae")
            if kind in trained
        }
    )
    for ax, (title, density) in zip(axes[0], top.items()):
        ax.imshow(
            density.numpy(),
            origin="lower",
            extent=EXTENT,
            cmap="viridis",
            vmin=0,
            vmax=vmax,
            interpolation="nearest",
        )
        _panel(ax, title)
    if "gan" in trained:
        samples = trained["gan"].sample(GAN_POINTS).cpu()
        ax = axes[0][3]
        ax.set_facecolor("#440154")  # viridis' zero, like the density panels
        ax.scatter(*samples.T.numpy(), s=1, c="#fde725", alpha=0.5, linewidths=0)
        ax.set_xlim(-0.5, 0.5)
        ax.set_ylim(-0.5, 0.5)
        ax.set_aspect("equal")
        _panel(ax, "GAN samples")

    key = position_colours(grid_points(GRID, 0.5), truth).reshape(GRID, GRID, 3)
    axes[1][0].imshow(key.numpy(), origin="lower", extent=EXTENT, interpolation="nearest")
    _panel(axes[1][0], "data space (colour key)")
    extent = (-LATENT_RANGE, LATENT_RANGE, -LATENT_RANGE, LATENT_RANGE)
    for ax, kind in zip(axes[1][1:], ("vae", "iwae", "gan")):
        if kind in trained:
            decoded = decoded_points(trained[kind], device)
            rgb = position_colours(decoded, truth).reshape(LATENT_GRID, LATENT_GRID, 3)
            ax.imshow(rgb.numpy(), origin="lower", extent=extent, interpolation="nearest")
            _panel(ax, f"{kind.upper()} latent space [-3, 3]^2")
    for ax in axes.flat:
        if not ax.get_title():
            ax.axis("off")
    fig.suptitle(f"{dataset}: {caption}", fontsize=11)
    fig.tight_layout()
    path = out_dir / f"{dataset}.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
