"""Train a small VAE on 2D data (8 Gaussians) through fastvae's fused ops, on CPU in ~1 min.

The encoder and decoder are plain MLPs; the loss lines are fastvae's:
    z, kl = fastvae.reparameterize_kl(mu, logvar)            # sample + KL, one pass
    log_px = fastvae.gaussian_log_prob(x, x_mu, x_logvar)    # Gaussian decoder likelihood
Run: python examples/train_vae.py [--steps N] [--seed S] [--device cuda]

Outcomes are bimodal over seeds: most runs reach an NLL of about -1.0 to -1.1 bits, some stall
near -0.45 bits in a broad-Gaussian optimum (seeds 0 and 1 here; plain torch stalls on other
seeds too), so the default seed is one that does not.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import fastvae


def eight_gaussians(n: int, generator: torch.Generator) -> torch.Tensor:
    """Points from 8 Gaussians on a circle of radius 0.354 inside [-0.5, 0.5)^2, std 0.0442."""
    angles = torch.randint(0, 8, (n,), generator=generator) * (math.pi / 4)
    centres = 0.353553 * torch.stack([angles.cos(), angles.sin()], dim=1)
    return centres + 0.0442 * torch.randn(n, 2, generator=generator)


def mlp(n_in: int, n_out: int, width: int = 256) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(n_in, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
        nn.Linear(width, width), nn.SiLU(), nn.Linear(width, n_out),
    )  # fmt: skip


def negative_elbo_bits(encoder, decoder, x: torch.Tensor, kl_weight: float = 1.0):
    """(loss, -ELBO in bits per point) for a batch x of shape (B, 2)."""
    mu, logvar = encoder(x).chunk(2, dim=-1)
    z, kl = fastvae.reparameterize_kl(mu, logvar)
    x_mu, x_logvar = decoder(z).chunk(2, dim=-1)
    log_px = fastvae.gaussian_log_prob(x, x_mu, x_logvar)
    loss = (kl_weight * kl - log_px).mean()
    return loss, (kl - log_px).mean().item() / math.log(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    data = torch.Generator().manual_seed(args.seed)
    encoder, decoder = mlp(2, 4).to(args.device), mlp(2, 4).to(args.device)
    with torch.no_grad():  # start the decoder narrow: a broad Gaussian is a deep local optimum
        decoder[-1].bias[2:].fill_(-4.0)
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    print(f"fastvae {fastvae.__version__}, backend {fastvae.get_backend()}, device {args.device}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x = eight_gaussians(args.batch, data).to(args.device)
        kl_weight = min(1.0, step / (0.3 * args.steps))  # KL warm-up over the first 30%
        loss, _ = negative_elbo_bits(encoder, decoder, x, kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % max(1, args.steps // 10) == 0:
            print(
                f"step {step:5d}  loss {loss.item():8.4f}  ({time.perf_counter() - start:5.1f} s)"
            )

    x = eight_gaussians(5_000, data).to(args.device)
    with torch.no_grad():
        _, elbo_bits = negative_elbo_bits(encoder, decoder, x)
    log_px = fastvae.estimate_log_likelihood(
        lambda x: encoder(x).chunk(2, dim=-1),
        lambda x, z: fastvae.gaussian_log_prob(x, *decoder(z).chunk(2, dim=-1)),
        x,
        num_samples=100,
    )
    nll_bits = -log_px.mean().item() / math.log(2)
    print(
        f"On 5,000 fresh points: -ELBO {elbo_bits:.3f} bits/point, NLL (K = 100) "
        f"{nll_bits:.3f} bits/point; the data's entropy is -1.917 bits/point"
    )


if __name__ == "__main__":
    main()
