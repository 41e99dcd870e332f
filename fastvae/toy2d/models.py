"""The toy-2D models: the tutorial's "typical VAE" (latent 2, Gaussian decoder with learned
variance) trained as a VAE and an IWAE, and a GAN from the same N(0, I) base, all MLPs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastvae._validate import check_choice
from fastvae.nn import GAN, IWAE, VAE, LearnedGaussian, MixturePrior, StandardNormal, VampPrior

PRIOR_CLASSES = {
    "standard": StandardNormal,
    "learned": LearnedGaussian,
    "mixture": MixturePrior,
    "vamp": VampPrior,
}
PRIORS = tuple(PRIOR_CLASSES)
ESTIMATORS = ("iwae", "stl", "dreg")
LATENT_DIM = 2
MIXTURE_COMPONENTS = 16


@dataclass(frozen=True)
class Recipe:
    """Network size and training schedule of one model."""

    steps: int
    batch: int
    width: int = 256
    depth: int = 3
    lr: float = 1e-3
    kl_warmup: float = 0.0  # share of the steps over which the VAE's KL weight ramps 0 -> 1
    free_bits: float = 0.0  # the VAE's KL per latent dim counts as at least this (nats);
    # priors with a closed_form KL only: the Monte Carlo KL of the others has no dims
    r1: float = 0.0  # the GAN discriminator's R1 gradient penalty weight
    # Start the decoder narrow: a broad Gaussian traps it, and lets a latent unit collapse.
    decoder_logvar_bias: float = -4.0


def mlp(n_in: int, n_out: int, width: int, depth: int) -> nn.Sequential:
    """depth hidden layers of `width` SiLU units."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(n_in if i == 0 else width, width), nn.SiLU()]
    return nn.Sequential(*layers, nn.Linear(width, n_out))


def make_prior(name: str, encoder: nn.Module):
    check_choice("prior", name, PRIORS)
    if name == "standard":
        return StandardNormal(LATENT_DIM)
    if name == "learned":
        return LearnedGaussian(LATENT_DIM)
    if name == "mixture":
        return MixturePrior(LATENT_DIM, MIXTURE_COMPONENTS)
    return VampPrior(encoder, 0.25 * torch.randn(MIXTURE_COMPONENTS, 2))


def make_latent_model(
    kind: str,
    recipe: Recipe,
    prior: str = "standard",
    estimator: str = "iwae",
    num_samples: int = 10,
):
    """A VAE ("vae") or IWAE ("iwae") on 2D points with a 2D latent."""
    encoder = mlp(2, 2 * LATENT_DIM, recipe.width, recipe.depth)
    decoder = mlp(LATENT_DIM, 4, recipe.width, recipe.depth)
    with torch.no_grad():
        decoder[-1].bias[2:] = recipe.decoder_logvar_bias
    prior_module = make_prior(prior, encoder)
    if kind == "vae":
        return VAE(encoder, decoder, prior=prior_module, free_bits=recipe.free_bits)
    return IWAE(encoder, decoder, prior=prior_module, num_samples=num_samples, estimator=estimator)


def make_gan(recipe: Recipe) -> GAN:
    generator = mlp(LATENT_DIM, 2, recipe.width, recipe.depth)
    discriminator = mlp(2, 1, recipe.width, recipe.depth)
    return GAN(generator, discriminator, LATENT_DIM, r1=recipe.r1)
