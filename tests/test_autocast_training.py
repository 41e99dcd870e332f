"""Autocast: the toy-2D VAE trained under torch.autocast("cpu", dtype=torch.bfloat16) tracks
the same run in float32, and the modules' outputs have the documented dtypes under autocast.

Under autocast the encoder's and decoder's Linear layers run in bfloat16, so mu, logvar, z and
the decoder's parameters are bfloat16; fastvae's ops compute in float32 and return the
per-row terms (KL, log-densities) in float32, so the loss is float32. Both runs draw the same
noise (the same seed; the ops draw eps in float32 whatever z's dtype), so the only difference
between them is bfloat16 rounding.
"""

from __future__ import annotations

import pytest
import torch

from fastvae.nn import VAEOutput
from fastvae.toy2d import data
from fastvae.toy2d.models import PRIORS, Recipe, make_gan, make_latent_model

# The toy-2D recipe (fastvae.toy2d.models), scaled down: 2 x 64 SiLU MLPs, Adam 2e-3 with
# cosine decay, KL weight ramped over the first 30%, decoder log-variance bias -4.
RECIPE = Recipe(steps=400, batch=256, width=64, depth=2, lr=2e-3, kl_warmup=0.3)
WINDOW = 50  # steps per averaged window of the training loss
TOLERANCE = 0.05  # nats: |bf16 - fp32| of every window's mean -ELBO


def _train(seed: int, autocast: bool) -> tuple[torch.Tensor, set[torch.dtype]]:
    """(-ELBO per step in nats, the dtypes z had) of one training run."""
    torch.manual_seed(seed)
    model = make_latent_model("vae", RECIPE)
    optimizer = torch.optim.Adam(model.parameters(), lr=RECIPE.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, RECIPE.steps)
    points = torch.Generator().manual_seed(seed)
    losses, z_dtypes = [], set()
    for step in range(RECIPE.steps):
        model.beta = min(1.0, (step + 1) / (RECIPE.kl_warmup * RECIPE.steps))
        x = data.sample("8gaussians", RECIPE.batch, points)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()  # outside autocast, as torch recommends
        optimizer.step()
        schedule.step()
        losses.append((out.kl - out.reconstruction).detach().mean())  # -ELBO at any beta
        z_dtypes.add(out.z.dtype)
    return torch.stack(losses), z_dtypes


def _windows(losses: torch.Tensor) -> torch.Tensor:
    return losses.view(-1, WINDOW).mean(1)


@pytest.fixture(scope="module")
def runs():
    return {
        "fp32": _train(0, autocast=False),
        "bf16": _train(0, autocast=True),
        "fp32, another seed": _train(1, autocast=False),
    }


def test_bf16_training_tracks_fp32(runs):
    (fp32, fp32_dtypes), (bf16, bf16_dtypes) = runs["fp32"], runs["bf16"]
    assert fp32_dtypes == {torch.float32} and bf16_dtypes == {torch.bfloat16}
    assert fp32.dtype == bf16.dtype == torch.float32
    assert torch.isfinite(bf16).all()
    assert not torch.equal(fp32, bf16)  # autocast did change the arithmetic
    for name, losses in (("fp32", fp32), ("bf16", bf16)):
        start, end = losses[:10].mean().item(), losses[-WINDOW:].mean().item()
        assert end < start - 1.0, f"{name}: -ELBO {start:.3f} -> {end:.3f} nats"
    gap = (_windows(bf16) - _windows(fp32)).abs()
    assert gap.max() < TOLERANCE, f"bf16 - fp32 per {WINDOW}-step window: {gap.tolist()}"
    final = bf16[-2 * WINDOW :].mean() - fp32[-2 * WINDOW :].mean()
    assert final.abs() < TOLERANCE / 2, f"final -ELBO: bf16 - fp32 = {final.item():.4f} nats"


def test_tolerance_is_tighter_than_seed_to_seed_spread(runs):
    """Control: another seed's fp32 run leaves the band the bf16 run stays in."""
    gap = (_windows(runs["fp32, another seed"][0]) - _windows(runs["fp32"][0])).abs()
    assert gap.max() > 2 * TOLERANCE, gap.tolist()


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("kind", ["vae", "iwae"])
def test_output_dtypes_under_autocast(path, kind, prior):
    """z in the dtype of the encoder's output (bfloat16 under autocast), every per-row term and
    the loss float32, float32 gradients for the float32 parameters."""
    device = path[1]
    torch.manual_seed(0)
    model = make_latent_model(kind, Recipe(steps=1, batch=8, width=16, depth=1), prior=prior)
    model = model.to(device)
    x = torch.randn(8, 2, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        mu, logvar = model.encode(x)
        out = model(x)
        log_px = model.log_likelihood(x, num_samples=20)
    assert mu.dtype == logvar.dtype == torch.bfloat16
    assert out.z.dtype == torch.bfloat16
    assert out.z.shape == ((8, 2) if kind == "vae" else (10, 8, 2))
    for name in VAEOutput._fields:
        if name != "z":
            assert getattr(out, name).dtype == torch.float32, name
    assert log_px.dtype == torch.float32 and torch.isfinite(log_px).all()
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name


def test_gan_dtypes_under_autocast(path):
    device = path[1]
    torch.manual_seed(0)
    gan = make_gan(Recipe(steps=1, batch=8, width=16, depth=1)).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        fake = gan.generate(8)
        g_loss, d_loss = gan.generator_loss(8), gan.discriminator_loss(fake.detach().float())
    assert fake.dtype == torch.bfloat16
    assert g_loss.dtype == d_loss.dtype == torch.float32
    (g_loss + d_loss).backward()
    assert all(p.grad.dtype == torch.float32 for p in gan.parameters())
