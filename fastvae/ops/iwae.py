"""Importance weighting: K-sample latents with their log weights, and the IWAE bound's loss
with the standard, STL and DReG gradient estimators (docs/math.md)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastvae import _validate as V
from fastvae.kernels.modes import ROW_LOG_RATIO, ROW_NEG_LOG_Q
from fastvae.ops.gaussian import gaussian_log_prob, sample
from fastvae.ops.logmeanexp import log_mean_exp
from fastvae.ops.mixture import mixture_log_prob

ESTIMATORS = ("iwae", "stl", "dreg")
REDUCTIONS = ("mean", "sum", "none")

PRIOR_FORMS = (
    "None (N(0, I)), a (mu, logvar) pair, a (means, logvars, log_weights) mixture, "
    "or an object with log_prob(z)"
)


def resolve_prior(prior) -> tuple[torch.Tensor | None, torch.Tensor | None, Callable | None]:
    """(prior_mu, prior_logvar, log_prob) of a prior: a diagonal Gaussian's parameters, which
    the kernels fuse (None parts: 0), or a log-density to call on z (K, ..., D) -> (K, ...)."""
    if prior is None:
        return None, None, None
    if isinstance(prior, tuple | list):
        if len(prior) == 2:
            return prior[0], prior[1], None
        if len(prior) == 3:
            means, logvars, log_weights = prior
            return None, None, lambda z: mixture_log_prob(z, means, logvars, log_weights)
    elif callable(getattr(prior, "log_prob", None)):
        return None, None, prior.log_prob
    raise TypeError(f"prior must be {PRIOR_FORMS}; got {type(prior).__name__}")


def _prior_log_prob(log_prob: Callable, z: torch.Tensor) -> torch.Tensor:
    out = log_prob(z)
    if not isinstance(out, torch.Tensor) or out.shape != z.shape[:-1]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"prior.log_prob(z) must return z.shape[:-1] = {tuple(z.shape[:-1])}; got {got}"
        )
    return out


def importance_sample_chunk(mu, logvar, num_samples, prior=None, **noise):
    """importance_sample with the noise given as generator=, or seed= and first_sample=."""
    V.check_num_samples(num_samples, required=True)
    prior_mu, prior_logvar, log_prob = resolve_prior(prior)
    z, log_ratio = sample(
        mu, logvar, prior_mu, prior_logvar, num_samples=num_samples,
        row_term=ROW_LOG_RATIO if log_prob is None else ROW_NEG_LOG_Q, **noise,
    )  # fmt: skip
    if log_prob is not None:  # the kernel gave -log q(z|x)
        log_ratio = log_ratio + _prior_log_prob(log_prob, z)
    return z, log_ratio


def importance_sample(mu, logvar, num_samples, *, prior=None, generator=None):
    """K reparameterized samples and their log importance ratios, in one pass over mu, logvar.

    mu, logvar: (..., D). Returns z (K, ..., D) in the inputs' dtype and log_ratio =
    log p(z) - log q(z | x) of shape (K, ...), float32 (float64 for float64). The noise is drawn
    in-kernel (see reparameterize); prior: None (N(0, I)), (mu, logvar) of a diagonal Gaussian
    (fused, possibly learnable), (means, logvars, log_weights) of a mixture, or any object with
    log_prob(z).
    """
    return importance_sample_chunk(mu, logvar, num_samples, prior, generator=generator)


def normalized_weights(log_w: torch.Tensor) -> torch.Tensor:
    """softmax over dim 0, with 0 (not NaN) where every log weight is -inf."""
    all_neg_inf = torch.isneginf(log_w).all(0, keepdim=True)
    return torch.softmax(log_w, 0).masked_fill(all_neg_inf, 0.0)


def _check_iwae_shapes(log_px_given_z, z, mu, logvar) -> None:
    named = {"log_px_given_z": log_px_given_z, "z": z, "mu": mu, "logvar": logvar}
    for name, value in named.items():
        V.check_tensor(name, value)
    V.check_same_device(named)
    if z.dim() < 2:
        raise ValueError(f"z must be (K, ..., D) with a sample dim first; got {tuple(z.shape)}")
    if log_px_given_z.shape[:1] != z.shape[:1]:
        raise ValueError(
            f"log_px_given_z has {log_px_given_z.shape[0]} samples (dim 0) but z has {z.shape[0]}"
        )
    if log_px_given_z.shape != z.shape[:-1]:
        raise ValueError(
            f"log_px_given_z of shape {tuple(log_px_given_z.shape)} must be z.shape[:-1] = "
            f"{tuple(z.shape[:-1])} (samples, then the batch)"
        )
    for name, value in {"mu": mu, "logvar": logvar}.items():
        V.check_broadcasts_to(name, value, z.shape[1:], "the shape of one sample of z")


def _rescale_gradient_at_z(z: torch.Tensor, weights: torch.Tensor) -> None:
    """DReG: multiply the whole gradient reaching z (decoder, prior and log q paths) by w~_k.

    The hook sees that gradient only on the tensor the decoder consumed, and a second hook on
    the same z would rescale twice: both are refused rather than giving wrong gradients (the
    second only in eager mode: torch.compile cannot mark a tensor).
    """
    if z.is_leaf or z._base is not None:
        raise ValueError(
            "estimator='dreg' needs z exactly as reparameterize or importance_sample returned "
            "it (not a leaf, not a view), so that the decoder's gradient reaches the same tensor"
        )
    if torch.compiler.is_compiling():
        z.register_hook(lambda grad: grad * weights)
        return
    if getattr(z, "_fastvae_dreg", False):
        raise ValueError(
            "z already feeds an iwae_loss with estimator='dreg'; compute one such loss per z "
            "(reduction='none' gives the per-row values)"
        )
    z.register_hook(lambda grad: grad * weights)
    z._fastvae_dreg = True


def iwae_log_weights(log_px_given_z, z, mu, logvar, *, estimator="iwae", prior=None):
    """The log importance weights log w_k (K, ...) of iwae_loss, with `estimator`'s gradients.

    -log_mean_exp(log_w, dim=0) is the per-row loss; with "dreg" a hook on z rescales the
    gradient reaching it by w~_k, so z must feed one such call only.
    """
    _check_iwae_shapes(log_px_given_z, z, mu, logvar)
    V.check_choice("estimator", estimator, ESTIMATORS)
    if estimator != "iwae":  # keep only the path through z in log q
        mu, logvar = mu.detach(), logvar.detach()
    prior_mu, prior_logvar, log_prob = resolve_prior(prior)
    for name, value in {"prior's mu": prior_mu, "prior's logvar": prior_logvar}.items():
        if value is not None:
            V.check_tensor(name, value)
            V.check_broadcasts_to(name, value, z.shape, "z's shape")
    if log_prob is None:  # a logvar of None: unit variance, at the cost of a squared error
        log_p = gaussian_log_prob(z, z.new_zeros(1) if prior_mu is None else prior_mu, prior_logvar)
    else:
        log_p = _prior_log_prob(log_prob, z)
    log_w = log_px_given_z + log_p - gaussian_log_prob(z, mu, logvar)
    if estimator == "dreg" and z.requires_grad and torch.is_grad_enabled():
        _rescale_gradient_at_z(z, normalized_weights(log_w.detach()).unsqueeze(-1).to(z.dtype))
    return log_w


def iwae_loss(log_px_given_z, z, mu, logvar, *, estimator="iwae", prior=None, reduction="mean"):
    """The negative IWAE bound -L_K, L_K = log (1/K) sum_k w_k, w_k = p(x|z_k) p(z_k) / q(z_k|x).

    log_px_given_z: (K, ...) decoder log-likelihoods of z: (K, ..., D), which came from
    reparameterize(mu, logvar, num_samples=K) or importance_sample. mu, logvar: (..., D).
    The decoder's parameters get the standard gradient sum_k w~_k grad log p(x|z_k); the
    encoder's follows `estimator`: "iwae" (standard), "stl" (log q's parameters held fixed),
    "dreg" (also w~_k^2 weights, Tucker et al. 2018). reduction: "mean", "sum" or "none" (per
    row, shape (...)). With "dreg" the loss rescales the gradient reaching z by w~_k (a hook on
    z), so z must feed this loss only. K = 1 gives the negative ELBO with a Monte Carlo KL.
    """
    V.check_choice("reduction", reduction, REDUCTIONS)
    log_w = iwae_log_weights(log_px_given_z, z, mu, logvar, estimator=estimator, prior=prior)
    loss = -log_mean_exp(log_w, dim=0)
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss
