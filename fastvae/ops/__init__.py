"""Host functions and autograd.Functions of every fused op."""

from fastvae.ops.gaussian import gaussian_kl, gaussian_log_prob, reparameterize, reparameterize_kl

__all__ = ["gaussian_kl", "gaussian_log_prob", "reparameterize", "reparameterize_kl"]
