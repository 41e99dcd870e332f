"""The pure-torch math of every op: the CPU path and the test oracle.

Each function takes already-broadcastable tensors, computes in float32 (float64 for float64
inputs) and returns results in the broadcast shape. Formulas: shared/reference/math.md.
"""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2.0 * math.pi)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic and reductions run in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def opmath(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t` in its opmath dtype."""
    return None if t is None else t.to(opmath_dtype(t.dtype))


def kl_parts(mu, logvar, prior_mu=None, prior_logvar=None):
    """The pieces of KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)) per element.

    Returns (diff, diff_over_pvar, var_ratio, log_ratio): mu - m, (mu - m) / s^2,
    sigma^2 / s^2 and log s^2 - logvar.
    """
    diff = mu if prior_mu is None else mu - prior_mu
    if prior_logvar is None:
        return diff, diff, torch.exp(logvar), -logvar
    return (
        diff,
        diff * torch.exp(-prior_logvar),
        torch.exp(logvar - prior_logvar),
        (prior_logvar - logvar),
    )


def kl_elements(diff, diff_over_pvar, var_ratio, log_ratio):
    """Per-element KL = (var_ratio + diff * diff_over_pvar - 1 + log_ratio) / 2."""
    kl_d = torch.addcmul(var_ratio + log_ratio, diff, diff_over_pvar)
    return kl_d.sub_(1.0).mul_(0.5)


def _free_bits(kl_d: torch.Tensor, free_bits: float) -> torch.Tensor:
    # kl_d < free_bits is False for NaN, so NaN stays NaN.
    return torch.where(kl_d < free_bits, free_bits, kl_d)


def sample_kl_forward(mu, logvar, prior_mu, prior_logvar, eps, free_bits, want_kl=True):
    """z = mu + exp(logvar / 2) * eps (eps None: no z) and the per-row KL (want_kl).

    Shapes: mu, logvar, priors broadcast to (..., D); eps (..., D) or (K, ..., D).
    Returns (z in eps's broadcast shape or None, kl of shape (...) or None), float32/64.
    """
    mu, logvar = opmath(mu), opmath(logvar)
    z = kl = None
    if eps is not None:
        z = torch.addcmul(mu, torch.exp(0.5 * logvar), opmath(eps))
    if want_kl:
        parts = kl_parts(mu, logvar, opmath(prior_mu), opmath(prior_logvar))
        kl_d = kl_elements(*parts)
        if free_bits > 0.0:
            kl_d = _free_bits(kl_d, free_bits)
        kl = kl_d.sum(-1)
    return z, kl


def sample_kl_backward(grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, eps, free_bits):
    """Gradients of (z, kl) for (mu, logvar, prior_mu, prior_logvar), in the broadcast shape.

    grad_z (shape of z) or grad_kl (shape of kl) may be None. A prior that is None gets None.
    """
    mu, logvar = opmath(mu), opmath(logvar)
    prior_mu, prior_logvar = opmath(prior_mu), opmath(prior_logvar)
    grad_mu = grad_logvar = grad_pmu = grad_plogvar = None
    if grad_z is not None:
        grad_z = opmath(grad_z)
        grad_mu = grad_z
        # dz/dlogvar = eps * sigma / 2, with eps regenerated rather than stored.
        grad_logvar = (grad_z * opmath(eps)).mul_(torch.exp(0.5 * logvar)).mul_(0.5)
    if grad_kl is not None:
        diff, diff_over_pvar, var_ratio, log_ratio = kl_parts(mu, logvar, prior_mu, prior_logvar)
        g = opmath(grad_kl).unsqueeze(-1)
        if free_bits > 0.0:
            kl_d = kl_elements(diff, diff_over_pvar, var_ratio, log_ratio)
            g = torch.where(kl_d < free_bits, 0.0, g)
        kl_mu = g * diff_over_pvar
        kl_logvar = torch.mul(var_ratio - 1.0, g).mul_(0.5)
        grad_mu = kl_mu if grad_mu is None else grad_mu + kl_mu
        grad_logvar = kl_logvar if grad_logvar is None else grad_logvar.add_(kl_logvar)
        if prior_mu is not None:
            grad_pmu = -kl_mu
        if prior_logvar is not None:
            grad_plogvar = g * 0.5 * (1.0 - var_ratio - diff_over_pvar * diff)
    return grad_mu, grad_logvar, grad_pmu, grad_plogvar


def log_prob_forward(x, mu, logvar):
    """log N(x; mu, diag exp(logvar)) summed over the last dim: shape (...), float32/64."""
    x, mu, logvar = opmath(x), opmath(mu), opmath(logvar)
    diff = x - mu
    return -0.5 * (LOG_2PI + logvar + diff * diff * torch.exp(-logvar)).sum(-1)


def log_prob_backward(grad, x, mu, logvar):
    """Gradients of log_prob_forward for (x, mu, logvar), in the broadcast shape."""
    x, mu, logvar = opmath(x), opmath(mu), opmath(logvar)
    g = opmath(grad).unsqueeze(-1)
    diff = x - mu
    scaled = diff * torch.exp(-logvar)
    grad_x = -g * scaled
    return grad_x, -grad_x, g * 0.5 * (diff * scaled - 1.0)
