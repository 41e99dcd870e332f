"""Figures: per run, samples from the model and reconstructions of test digits; one figure
comparing the runs' test NLL with the paper's."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from fastvae.mnist import data  # noqa: E402

GRID = 8  # samples: GRID x GRID digits
RECONSTRUCTED = 16  # test digits shown with their reconstructions


def _tile(images: torch.Tensor, columns: int) -> torch.Tensor:
    """(n, 784) in [0, 1] -> one (rows * 28, columns * 28) picture."""
    n = images.shape[0]
    rows = -(-n // columns)
    padded = torch.zeros(rows * columns, 28, 28)
    padded[:n] = images.reshape(n, 28, 28).float().cpu()
    return padded.reshape(rows, columns, 28, 28).permute(0, 2, 1, 3).reshape(rows * 28, -1)


@torch.no_grad()
def _means(model, n: int, generator: torch.Generator) -> torch.Tensor:
    """The decoder's mean image of n prior draws, (n, 784) in [0, 1]."""
    z = model.prior.sample(n, generator=generator, dim=model.latent_dim)
    first = model.decode(z.to(next(model.parameters()).device))[0]
    return torch.sigmoid(first) if model.likelihood == "bernoulli" else first.clamp(0, 1)


def run_figure(key: str, model, test_x: torch.Tensor, path: Path, seed: int) -> None:
    """Samples (decoder means of prior draws) | test digits over their reconstructions."""
    generator = torch.Generator().manual_seed(seed)
    samples = _means(model, GRID * GRID, generator)
    digits = test_x[:RECONSTRUCTED]
    shown = data.intensities(digits) if model.likelihood != "bernoulli" else digits.float()
    recon = model.reconstruct(digits).clamp(0, 1).cpu()
    fig, axes = plt.subplots(1, 2, figsize=(9, 5.0), gridspec_kw={"width_ratios": [1, 1]})
    axes[0].imshow(_tile(samples, GRID), cmap="gray", vmin=0, vmax=1)
    axes[0].set_title(f"{key}: samples (decoder means)", fontsize=10)
    pairs = torch.cat([shown[:8].cpu(), recon[:8], shown[8:].cpu(), recon[8:]])
    axes[1].imshow(_tile(pairs, 8), cmap="gray", vmin=0, vmax=1)
    axes[1].set_title("test digits (rows 1, 3) and reconstructions (2, 4)", fontsize=10)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def comparison_figure(results: dict, path: Path) -> None:
    """Each Bernoulli run's test NLL beside the paper's, as bars."""
    published = results["published"]["nats"]
    keys = [k for k, e in results["models"].items() if "bits_per_dim" not in e]
    fig, ax = plt.subplots(figsize=(1.2 * len(keys) + 2, 3.6))
    positions = torch.arange(len(keys)).float()
    ours = [results["models"][k]["nll_nats"] for k in keys]
    bars = ax.bar(positions - 0.2, ours, width=0.4, label="fastvae (this run)")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    paper = [published.get(k, float("nan")) for k in keys]
    bars = ax.bar(positions + 0.2, paper, width=0.4, label="Burda et al. 2015")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    low = min([v for v in ours + paper if v == v] or [0.0])
    ax.set_ylim(low - 5, max(ours + [low]) + 3)
    ax.set_xticks(positions.tolist(), keys, rotation=20, fontsize=9)
    ax.set_ylabel("test NLL (nats)")
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
