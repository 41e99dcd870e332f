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

    Returns (diff, diff_over_pvar, log_var_ratio): mu - m, (mu - m) / s^2 and logvar - log s^2
    (aliases of the inputs where no prior part is given).
    """
    diff = mu if prior_mu is None else mu - prior_mu
    if prior_logvar is None:
        return diff, diff, logvar
    return diff, diff * torch.exp(-prior_logvar), logvar - prior_logvar


def kl_elements(diff, diff_over_pvar, log_var_ratio, shape):
    """Per-element KL (e^r - r + diff * diff / s^2 - 1) / 2 with r = log_var_ratio, of the
    broadcast `shape`, accumulated in one buffer."""
    kl = torch.exp(log_var_ratio.expand(shape)).sub_(log_var_ratio)
    return kl.addcmul_(diff, diff_over_pvar).sub_(1.0).mul_(0.5)


def _free_bits(kl_d: torch.Tensor, free_bits: float) -> torch.Tensor:
    # kl_d < free_bits is False for NaN, so NaN stays NaN.
    return torch.where(kl_d < free_bits, free_bits, kl_d)


def _sample_z(mu, logvar, eps, out):
    """z = mu + exp(logvar / 2) * eps, into `out` (which may be eps itself) when given."""
    return torch.addcmul(mu, torch.mul(logvar, 0.5).exp_(), eps, out=out)


def sample_kl_forward(mu, logvar, prior_mu, prior_logvar, eps, free_bits, want_kl=True, out=None):
    """z = mu + exp(logvar / 2) * eps (eps None: no z) and the per-row KL (want_kl).

    Shapes: mu, logvar, priors broadcast to (..., D); eps (..., D) or (K, ..., D); `out`, a
    buffer for z (eps itself is allowed). Returns (z or None, kl of shape (...) or None), in
    float32/64.
    """
    mu, logvar = opmath(mu), opmath(logvar)
    z = None if eps is None else _sample_z(mu, logvar, opmath(eps), out)
    kl = None
    if want_kl:
        shape = torch.broadcast_shapes(mu.shape, logvar.shape)
        parts = kl_parts(mu, logvar, opmath(prior_mu), opmath(prior_logvar))
        kl_d = kl_elements(*parts, shape)
        if free_bits > 0.0:
            kl_d = _free_bits(kl_d, free_bits)
        kl = kl_d.sum(-1)
    return z, kl


def sample_kl_backward(grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, deviation,
                       free_bits):  # fmt: skip
    """Gradients of (z, kl) for (mu, logvar, prior_mu, prior_logvar), in the broadcast shape.

    grad_z (shape of z) or grad_kl (shape of kl) may be None; deviation = z - mu =
    exp(logvar / 2) * eps is needed with grad_z. A prior that is None gets None.
    """
    mu, logvar = opmath(mu), opmath(logvar)
    prior_mu, prior_logvar = opmath(prior_mu), opmath(prior_logvar)
    grad_mu = grad_logvar = grad_pmu = grad_plogvar = None
    if grad_z is not None:
        grad_mu = opmath(grad_z)
        grad_logvar = torch.mul(grad_mu, deviation).mul_(0.5)  # dz/dlogvar = (z - mu) / 2
    if grad_kl is not None:
        diff, diff_over_pvar, log_var_ratio = kl_parts(mu, logvar, prior_mu, prior_logvar)
        g = opmath(grad_kl).unsqueeze(-1)
        if free_bits > 0.0:
            shape = torch.broadcast_shapes(mu.shape, logvar.shape)
            kl_d = kl_elements(diff, diff_over_pvar, log_var_ratio, shape)
            g = torch.where(kl_d < free_bits, 0.0, g)
        var_ratio = torch.exp(log_var_ratio)
        kl_logvar = torch.mul(var_ratio - 1.0, g).mul_(0.5)
        grad_mu = (
            g * diff_over_pvar if grad_mu is None else torch.addcmul(grad_mu, g, diff_over_pvar)
        )
        grad_logvar = kl_logvar if grad_logvar is None else grad_logvar.add_(kl_logvar)
        if prior_mu is not None:
            grad_pmu = -g * diff_over_pvar
        if prior_logvar is not None:
            grad_plogvar = g * 0.5 * (1.0 - var_ratio - diff_over_pvar * diff)
    return grad_mu, grad_logvar, grad_pmu, grad_plogvar


def _prior_slope(z, prior_mu, prior_logvar):
    """diff = z - prior_mu and t = diff / prior_var (log p(z)'s slope is -t)."""
    diff = z if prior_mu is None else z - prior_mu
    return diff, (diff if prior_logvar is None else diff * torch.exp(-prior_logvar))


def sample_log_ratio_forward(mu, logvar, prior_mu, prior_logvar, eps, with_log_p, out=None):
    """z = mu + exp(logvar / 2) * eps and, per row, log p(z) - log q(z | x) for the diagonal
    Gaussian prior (None parts: 0), or -log q(z | x) alone when not with_log_p.

    Shapes: mu, logvar, priors broadcast to (..., D); eps (K, ..., D); `out` as in
    sample_kl_forward. Returns z (K, ..., D) and the row term (K, ...), float32/64.
    """
    mu, logvar, eps = opmath(mu), opmath(logvar), opmath(eps)
    term = torch.mul(eps, eps)
    z = _sample_z(mu, logvar, eps, out)
    if with_log_p:
        diff, t = _prior_slope(z, opmath(prior_mu), opmath(prior_logvar))
        log_var_ratio = logvar if prior_logvar is None else logvar - opmath(prior_logvar)
        term.add_(log_var_ratio).sub_(diff * t)  # log 2pi cancels
    else:
        term.add_(logvar).add_(LOG_2PI)
    return z, term.sum(-1).mul_(0.5)


def sample_log_ratio_backward(grad_z, grad_row, mu, logvar, prior_mu, prior_logvar, deviation,
                              with_log_p):  # fmt: skip
    """Gradients of sample_log_ratio_forward's (z, row term) for (mu, logvar, prior_mu,
    prior_logvar), in z's shape. grad_z or grad_row may be None; deviation = z - mu."""
    mu, prior_mu, prior_logvar = opmath(mu), opmath(prior_mu), opmath(prior_logvar)
    g_z = torch.zeros_like(deviation) if grad_z is None else opmath(grad_z)  # total at z
    grad_lv = grad_pmu = grad_plogvar = None
    if grad_row is not None:
        g = opmath(grad_row).unsqueeze(-1)
        if with_log_p:
            diff, t = _prior_slope(mu + deviation, prior_mu, prior_logvar)
            g_t = g * t
            g_z = g_z - g_t
            if prior_mu is not None:
                grad_pmu = g_t
            if prior_logvar is not None:
                grad_plogvar = torch.mul(t * diff - 1.0, g).mul_(0.5)
        grad_lv = 0.5 * g  # -log q(z|x) holds logvar / 2 at fixed eps
    grad_logvar = torch.mul(g_z, deviation).mul_(0.5)
    if grad_lv is not None:
        grad_logvar.add_(grad_lv)
    return g_z, grad_logvar, grad_pmu, grad_plogvar


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


def log_mean_exp_forward(x, dim):
    """log((1/K) sum_k exp(x_k)) along `dim` (K = x.shape[dim]): x's shape without `dim`,
    float32/64. All -inf gives -inf, any +inf gives +inf, any NaN gives NaN."""
    return torch.logsumexp(opmath(x), dim) - math.log(x.shape[dim])


def log_mean_exp_backward(grad, x, out, dim):
    """grad * softmax(x, dim) = grad * exp(x - (out + log K)), in x's shape; 0 along `dim`
    where out is -inf (all inputs -inf), where torch.logsumexp's own backward gives NaN."""
    log_sum_exp = (opmath(out) + math.log(x.shape[dim])).unsqueeze(dim)
    softmax = torch.where(log_sum_exp == -math.inf, 0.0, torch.exp(opmath(x) - log_sum_exp))
    return opmath(grad).unsqueeze(dim) * softmax


# -- mixture of diagonal Gaussians -----------------------------------------------------------


def mixture_dtype(*tensors) -> torch.dtype:
    """The opmath dtype of the mixture ops' inputs taken together (None entries skipped)."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return opmath_dtype(dtype)


class MixtureComponents:
    """Per-component tensors of a diagonal-Gaussian mixture, contiguous, in `dtype`.

    From means, logvars (C, D) and log_weights (C,) (None: pi = 1/C): means, inv_var = 1/s^2
    (C, D), log_norm = log pi - (D log 2pi + sum_d log s^2) / 2 (C,), and for the
    matrix-product form center = the per-dim median of the means (D,), mean_scaled =
    (means - center) / s^2 (C, D), const = log_norm - sum_d (means - center)^2 / s^2 / 2 (C,):
        log pi_c + log N(z; c) = const_c + z' . mean_scaled_c - z'^2 . inv_var_c / 2.
    z' = z - center is exact in real arithmetic and shrinks the expanded square's cancellation.
    """

    def __init__(self, means, logvars, log_weights, dtype):
        C, D = means.shape
        logvars = logvars.to(dtype)
        self.means = means.to(dtype).contiguous()
        self.center = self.means.median(0).values.contiguous()
        centered = self.means - self.center
        self.inv_var = torch.exp(-logvars).contiguous()
        self.mean_scaled = centered * self.inv_var
        if log_weights is None:
            log_pi = torch.full((C,), -math.log(C), dtype=dtype, device=means.device)
        else:
            log_pi = torch.log_softmax(log_weights.to(dtype), 0)
        self.log_norm = log_pi - 0.5 * (D * LOG_2PI + logvars.sum(1))
        self.const = self.log_norm - 0.5 * (centered * self.mean_scaled).sum(1)


def mixture_log_density(z, components):
    """log pi_c + log N(z_n; c) of every pair by the matrix-product form: (N, C) from (N, D)."""
    z = z - components.center
    return torch.addmm(components.const, z, components.mean_scaled.T).addmm_(
        z * z, components.inv_var.T, alpha=-0.5
    )


def mixture_top_diff(z, components, best):
    """diff = z_n - m_b (N, D) and diff / s_b^2 (N, D) for each row's dominant component
    b = best_n, directly."""
    diff = z - components.means[best]
    return diff, diff * components.inv_var[best]


def mixture_log_prob_forward(z, means, logvars, log_weights):
    """log sum_c pi_c N(z_n; m_c, diag exp(logvars_c)), pi = softmax(log_weights) (None: 1/C).

    z: (N, D); means, logvars: (C, D); log_weights: (C,) or None. Every pair's log-density
    comes from the matrix-product form, then each row's dominant one is recomputed directly.
    Returns out (N,), best (N,) int64 (the dominant components) and top (N,) (their exact
    log pi + log N), float32/64. Memory: (N, C).
    """
    dtype = mixture_dtype(z, means, logvars, log_weights)
    components = MixtureComponents(means, logvars, log_weights, dtype)
    z = z.to(dtype)
    log_density = mixture_log_density(z, components)
    best = log_density.argmax(1)
    diff, scaled = mixture_top_diff(z, components, best)
    top = components.log_norm[best] - 0.5 * (diff * scaled).sum(1)
    rest = torch.logsumexp(log_density.scatter_(1, best[:, None], -math.inf), 1)
    return torch.logaddexp(top, rest), best, top


def mixture_component_grads(weighted_z, weighted_z_sq, mass, components):
    """grad_means, grad_logvars (C, D) of sum_nc W_nc log N(z_n; c) from W^T @ z', W^T @ z'^2
    (C, D) and mass = sum_n W (C,), with z' = z - center, m' = means - center:
        grad_means = (W^T z' - mass m') / s^2
        grad_logvars = ((W^T z'^2 - 2 m' W^T z' + mass m'^2) / s^2 - mass) / 2."""
    centered = components.means - components.center
    mass_col = mass[:, None]
    grad_means = weighted_z * components.inv_var - mass_col * components.mean_scaled
    spread = weighted_z_sq - centered * (2.0 * weighted_z - centered * mass_col)
    return grad_means, 0.5 * (spread * components.inv_var - mass_col)


def mixture_matmul_grads(weights, z, components):
    """Gradients of sum_nc W_nc log N(z_n; c) by the matrix-product form, for W = weights
    (N, C): grad_z (N, D), grad_means (C, D), grad_logvars (C, D) and mass = sum_n W (C,)."""
    z = z - components.center
    grad_z = weights @ components.mean_scaled - z * (weights @ components.inv_var)
    mass = weights.sum(0)
    grad_means, grad_logvars = mixture_component_grads(
        weights.T @ z, weights.T @ (z * z), mass, components
    )
    return grad_z, grad_means, grad_logvars, mass


def mixture_add_top_grads(grads, grad, out, top, z, components, best):
    """Add each row's dominant pair (z_n, best_n) directly, weighted by grad_n times its
    responsibility exp(top - out) (the forward's values, so responsibilities sum to 1), to
    grads = (grad_z (N, D), grad_means (C, D), grad_logvars (C, D), mass (C,)) in place.
    None entries are skipped; rows whose out is -inf add nothing."""
    grad_z, grad_means, grad_logvars, mass = grads
    z = z.to(components.means.dtype)
    diff, scaled = mixture_top_diff(z, components, best)
    top_weight = torch.where(out == -math.inf, 0.0, grad * torch.exp(top - out))[:, None]
    weighted = top_weight * scaled
    if grad_z is not None:
        grad_z.sub_(weighted)
    if grad_means is not None:
        grad_means.index_add_(0, best, weighted)
        grad_logvars.index_add_(0, best, (weighted * diff).sub_(top_weight).mul_(0.5))
        mass.index_add_(0, best, top_weight[:, 0])


def mixture_log_weights_grad(mass, grad, log_weights):
    """d/dlog_weights of sum_n grad_n out_n = mass - softmax(log_weights) * sum(grad), where
    mass_c = sum_n grad_n r_nc (r: the responsibilities); None when log_weights is None."""
    if log_weights is None:
        return None
    return mass - torch.softmax(log_weights.to(mass.dtype), 0) * grad.sum()


def mixture_log_prob_backward(grad, z, means, logvars, log_weights, out, best, top):
    """Gradients of mixture_log_prob_forward (outputs out, best, top; incoming grad (N,)) for
    (z, means, logvars, log_weights), float32/64; rows whose out is -inf get none."""
    dtype = mixture_dtype(z, means, logvars, log_weights)
    components = MixtureComponents(means, logvars, log_weights, dtype)
    z, grad = z.to(dtype), grad.to(dtype)
    log_r = mixture_log_density(z, components).sub_(out[:, None]).clamp_max_(0.0)  # r <= 1
    weights = torch.where(out[:, None] == -math.inf, 0.0, torch.exp(log_r).mul_(grad[:, None]))
    grads = mixture_matmul_grads(weights.scatter_(1, best[:, None], 0.0), z, components)
    mixture_add_top_grads(grads, grad, out, top, z, components, best)
    grad_z, grad_means, grad_logvars, mass = grads
    return grad_z, grad_means, grad_logvars, mixture_log_weights_grad(mass, grad, log_weights)
