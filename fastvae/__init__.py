"""fastvae: fused Triton kernels for VAE / IWAE / GAN training in PyTorch."""

from fastvae._backend import get_backend, set_backend, use_backend
from fastvae.ops import gaussian_kl, gaussian_log_prob, reparameterize, reparameterize_kl

__version__ = "0.1.0"

__all__ = [
    "gaussian_kl",
    "gaussian_log_prob",
    "get_backend",
    "reparameterize",
    "reparameterize_kl",
    "set_backend",
    "use_backend",
]
