"""fastvae: fused Triton kernels for VAE / IWAE / GAN training in PyTorch.

The ops are the names below; the modules (VAE, IWAE, GAN, priors) are in fastvae.nn, imported
here too (it needs nothing the ops do not already import).
"""

from fastvae._backend import get_backend, set_backend, use_backend
from fastvae.ops import (
    bernoulli_log_prob,
    discretized_logistic_log_prob,
    estimate_log_likelihood,
    gaussian_kl,
    gaussian_log_prob,
    importance_sample,
    iwae_loss,
    log_mean_exp,
    mixture_log_prob,
    reparameterize,
    reparameterize_kl,
    reparameterize_kl_tril,
)

# isort: split
from fastvae import nn as nn  # after the ops: it imports nothing they have not imported

__version__ = "0.1.0"

__all__ = [
    "bernoulli_log_prob",
    "discretized_logistic_log_prob",
    "estimate_log_likelihood",
    "gaussian_kl",
    "gaussian_log_prob",
    "get_backend",
    "importance_sample",
    "iwae_loss",
    "log_mean_exp",
    "mixture_log_prob",
    "reparameterize",
    "reparameterize_kl",
    "reparameterize_kl_tril",
    "set_backend",
    "use_backend",
]
