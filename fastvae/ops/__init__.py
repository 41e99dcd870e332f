"""Host functions and torch.library operators (with registered autograd) of every fused op."""

from fastvae.ops.bernoulli import bernoulli_log_prob
from fastvae.ops.discretized_logistic import discretized_logistic_log_prob
from fastvae.ops.gaussian import gaussian_kl, gaussian_log_prob, reparameterize, reparameterize_kl
from fastvae.ops.iwae import importance_sample, iwae_loss
from fastvae.ops.likelihood import estimate_log_likelihood
from fastvae.ops.logmeanexp import log_mean_exp
from fastvae.ops.mixture import mixture_log_prob
from fastvae.ops.tril import reparameterize_kl_tril

__all__ = [
    "bernoulli_log_prob",
    "discretized_logistic_log_prob",
    "estimate_log_likelihood",
    "gaussian_kl",
    "gaussian_log_prob",
    "importance_sample",
    "iwae_loss",
    "log_mean_exp",
    "mixture_log_prob",
    "reparameterize",
    "reparameterize_kl",
    "reparameterize_kl_tril",
]
