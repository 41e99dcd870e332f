"""Training loops with a progress bar (steps, loss in bits, ETA). Fresh data every step.

tqdm (the "demo" extra) is imported only when a bar is shown.
"""

from __future__ import annotations

import math

import torch

from fastvae._jobs import progress as progress_bar
from fastvae.nn import GAN, VAE
from fastvae.toy2d import data
from fastvae.toy2d.models import Recipe

BITS = 1 / math.log(2)
POSTFIX_EVERY = 50  # steps between progress-bar loss updates (each costs a host sync)


def _adam(params, recipe: Recipe, betas=(0.9, 0.999)):
    optimizer = torch.optim.Adam(params, lr=recipe.lr, betas=betas, fused=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, recipe.steps)
    return optimizer, schedule


def train_latent_model(
    model,
    dataset: str,
    recipe: Recipe,
    *,
    generator: torch.Generator,
    device: torch.device,
    desc: str,
    progress: bool = True,
):
    """Train a VAE or IWAE for recipe.steps; a VAE's KL weight ramps over recipe.kl_warmup.
    Returns the last logged training loss in bits."""
    optimizer, schedule = _adam(model.parameters(), recipe)
    warmup_steps = recipe.kl_warmup * recipe.steps
    loss_bits = math.nan
    bar = progress_bar(recipe.steps, desc, progress)
    for step in bar:
        if isinstance(model, VAE) and warmup_steps:
            model.beta = min(1.0, (step + 1) / warmup_steps)
        x = data.sample(dataset, recipe.batch, generator).to(device)
        loss = model(x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % POSTFIX_EVERY == 0 or step == recipe.steps - 1:
            loss_bits = loss.item() * BITS
            bar.set_postfix(loss_bits=f"{loss_bits:.3f}", refresh=False)
    if isinstance(model, VAE):
        model.beta = 1.0
    return loss_bits


def train_gan(
    gan: GAN,
    dataset: str,
    recipe: Recipe,
    *,
    generator: torch.Generator,
    device: torch.device,
    desc: str,
    progress: bool = True,
) -> float:
    """Alternate one discriminator and one generator step. Returns the last generator loss."""
    d_opt, d_schedule = _adam(gan.discriminator.parameters(), recipe, betas=(0.5, 0.999))
    g_opt, g_schedule = _adam(gan.generator.parameters(), recipe, betas=(0.5, 0.999))
    g_loss_value = math.nan
    bar = progress_bar(recipe.steps, desc, progress)
    for step in bar:
        real = data.sample(dataset, recipe.batch, generator).to(device)
        d_loss = gan.discriminator_loss(real)
        d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        d_opt.step()
        g_loss = gan.generator_loss(recipe.batch)
        g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        g_opt.step()
        d_schedule.step()
        g_schedule.step()
        if step % POSTFIX_EVERY == 0 or step == recipe.steps - 1:
            g_loss_value = g_loss.item()
            bar.set_postfix(
                d_loss=f"{d_loss.item():.3f}", g_loss=f"{g_loss_value:.3f}", refresh=False
            )
    return g_loss_value
