"""Thin modules over the fused ops: VAE, IWAE, GAN and the priors they share."""

from fastvae.nn.gan import GAN
from fastvae.nn.priors import LearnedGaussian, MixturePrior, Prior, StandardNormal, VampPrior
from fastvae.nn.vae import IWAE, VAE, VAEOutput

__all__ = [
    "GAN",
    "IWAE",
    "LearnedGaussian",
    "MixturePrior",
    "Prior",
    "StandardNormal",
    "VAE",
    "VAEOutput",
    "VampPrior",
]
