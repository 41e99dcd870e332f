"""The pure-torch math of every op: the CPU path and the test oracle.

Each function takes already-broadcastable tensors, computes in float32 (float64 for float64
inputs) and returns results in the broadcast shape. Formulas: docs/math.md.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch.nn import functional as F

from fastvae._backend import traced
from fastvae._validate import broadcast_shapes

LOG_2PI = math.log(2.0 * math.pi)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic and reductions run in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autograd_records(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records ops on these tensors (grad mode, and one requires grad): where
    it does not, a result may overwrite a buffer that autograd would otherwise keep."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def opmath(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t` in its opmath dtype (itself, without a call into torch, where it is already)."""
    if t is None or t.dtype is torch.float32 or t.dtype is torch.float64:
        return t
    return t.to(opmath_dtype(t.dtype))


def kl_parts(mu, logvar, prior_mu=None, prior_logvar=None):
    """The pieces of KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)) per element.

    Returns (diff, diff_over_pvar, log_var_ratio): mu - m, (mu - m) / s^2 and logvar - log s^2
    (aliases of the inputs where no prior part is given).
    """
    diff = mu if prior_mu is None else mu - prior_mu
    if prior_logvar is None:
        return diff, diff, logvar
    return diff, diff * torch.exp(-prior_logvar), logvar - prior_logvar


def twice_kl_elements(diff, diff_over_pvar, log_var_ratio):
    """Per-element 2 KL = e^r - 1 - r + diff * diff / s^2 with r = log_var_ratio, in the
    broadcast shape (the caller halves it)."""
    twice_kl = torch.exp(log_var_ratio).sub_(1.0).sub_(log_var_ratio)
    shape = twice_kl.shape
    if diff.shape == shape == diff_over_pvar.shape or shape == broadcast_shapes(
        shape, diff.shape, diff_over_pvar.shape
    ):
        return twice_kl.addcmul_(diff, diff_over_pvar)
    return torch.addcmul(twice_kl, diff, diff_over_pvar)


def _at_least(kl: torch.Tensor, floor: float) -> torch.Tensor:
    """max(kl, floor) per element, for free bits (kl < floor is False for NaN: NaN stays)."""
    return torch.where(kl < floor, floor, kl)


def _scale(logvar):
    """exp(logvar / 2) on logvar's compact shape."""
    return torch.mul(compact(logvar), 0.5).exp_()


def sample_kl_forward(mu, logvar, prior_mu, prior_logvar, eps, free_bits, want_kl=True, out=None):
    """z = mu + exp(logvar / 2) * eps (eps None: no z) and the per-row KL (want_kl).

    Shapes: mu, logvar, priors broadcast to (..., D); eps (..., D) or (K, ..., D); `out`, a
    buffer for z (eps itself is allowed). Returns (z or None, kl of shape (...) or None), in
    float32/64. Without a prior autograd can differentiate it (out None).
    """
    mu, logvar = opmath(mu), opmath(logvar)
    if prior_mu is None and prior_logvar is None:
        return _standard_sample_kl(mu, logvar, opmath(eps), free_bits, want_kl, out)
    z = None if eps is None else torch.addcmul(mu, _scale(logvar), opmath(eps), out=out)
    kl = None
    if want_kl:
        parts = kl_parts(mu, logvar, opmath(prior_mu), opmath(prior_logvar))
        twice_kl = twice_kl_elements(*parts)
        if free_bits > 0.0:
            twice_kl = _at_least(twice_kl, 2.0 * free_bits)
        kl = twice_kl.mul_(0.5).sum(-1)  # halved first: a row sum up to float max stays finite
    return z, kl


def _standard_kl_elements(mu, logvar, want_kl=True):
    """(KL_d against N(0, I) or None, s): KL_d = s^2 / 2 - 1/2 - logvar / 2 + mu^2 / 2 from
    s = exp(logvar / 2), z's scale, on the shape of mu and compact(logvar) broadcast; one exp
    pass for both, each term halved (a row sum up to float max stays finite)."""
    half_logvar = torch.mul(compact(logvar), 0.5)
    kl = None if not want_kl else torch.rsub(half_logvar, -0.5)  # -1/2 - logvar / 2
    scale = half_logvar.exp_()
    if want_kl:
        kl = kl.addcmul_(scale, scale, value=0.5)
        add_mu = kl.addcmul_ if kl.shape == mu.shape else kl.addcmul  # in place where it fits
        kl = add_mu(mu, mu, value=0.5)
    return kl, scale


def _standard_sample_kl(mu, logvar, eps, free_bits, want_kl, out):
    """sample_kl_forward against N(0, I), from _standard_kl_elements. Autograd can
    differentiate it (out None)."""
    kl, scale = _standard_kl_elements(mu, logvar, want_kl)
    z = None if eps is None else torch.addcmul(mu, scale, eps, out=out)
    if want_kl:
        kl = (_at_least(kl, free_bits) if free_bits > 0.0 else kl).sum(-1)
        if scale.shape != logvar.shape:  # rows of a broadcast logvar that mu lacks: one each
            kl = kl.expand(broadcast_shapes(mu.shape, logvar.shape)[:-1]).contiguous()
    return z, kl


def _prior_logvar_grad(g, diff, diff_over_pvar, var_ratio_minus_1, log_var_ratio, prior_logvar):
    """d kl / d prior_logvar = -g (e^r - 1 + diff^2 / s^2) / 2, in float64 where it will be
    summed over broadcast copies of a smaller prior_logvar, so that terms beyond float32 of both
    signs add up to the sum's +-inf (or a finite value) rather than to NaN."""
    shape = broadcast_shapes(g.shape, diff.shape, log_var_ratio.shape)
    if prior_logvar.numel() < shape.numel() and var_ratio_minus_1.dtype != torch.float64:
        diff = diff.double()
        var_ratio_minus_1 = torch.exp(log_var_ratio.double()).sub_(1.0)
        diff_over_pvar = diff * torch.exp(-prior_logvar.double())
    return torch.addcmul(var_ratio_minus_1, diff_over_pvar, diff).mul_(g * -0.5)


def sample_kl_backward(grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, deviation,
                       free_bits):  # fmt: skip
    """Gradients of (z, kl) for (mu, logvar, prior_mu, prior_logvar), in the broadcast shape.

    grad_z (shape of z) or grad_kl (shape of kl) may be None; deviation = z - mu =
    exp(logvar / 2) * eps is needed with grad_z and is overwritten (it becomes grad_logvar).
    A prior that is None gets None.
    """
    mu, logvar = opmath(mu), opmath(logvar)
    prior_mu, prior_logvar = opmath(prior_mu), opmath(prior_logvar)
    grad_mu = grad_logvar = grad_pmu = grad_plogvar = None
    if grad_z is not None:
        grad_mu = opmath(grad_z)
        grad_logvar = deviation.mul_(grad_mu)  # 2 dz/dlogvar = z - mu; halved below
    if grad_kl is not None:
        diff, diff_over_pvar, log_var_ratio = kl_parts(mu, logvar, prior_mu, prior_logvar)
        g = opmath(grad_kl).unsqueeze(-1)
        if free_bits > 0.0:  # the forward's elements, so that both clamp the same ones
            if prior_mu is None and prior_logvar is None:
                kl = _standard_kl_elements(mu, logvar)[0]
            else:
                kl = twice_kl_elements(diff, diff_over_pvar, log_var_ratio).mul_(0.5)
            g = torch.where(kl < free_bits, 0.0, g)
        var_ratio_minus_1 = torch.exp(log_var_ratio).sub_(1.0)
        if prior_logvar is not None:
            grad_plogvar = _prior_logvar_grad(
                g, diff, diff_over_pvar, var_ratio_minus_1, log_var_ratio, prior_logvar
            )
        if grad_logvar is None:
            grad_logvar = torch.mul(var_ratio_minus_1, g)
        else:
            grad_logvar.addcmul_(var_ratio_minus_1, g)
        grad_mu = (
            g * diff_over_pvar if grad_mu is None else torch.addcmul(grad_mu, g, diff_over_pvar)
        )
        if prior_mu is not None:
            grad_pmu = -g * diff_over_pvar
    grads = (grad_mu, grad_logvar.mul_(0.5), grad_pmu, grad_plogvar)
    # some are still in an input's own shape (e.g. (..., 1) against D): give each element its own
    shape = broadcast_shapes(mu.shape, logvar.shape, *(g.shape for g in grads if g is not None))
    return tuple(g if g is None or g.shape == shape else g.expand(shape) for g in grads)


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
    z = torch.addcmul(mu, _scale(logvar), eps, out=out)
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
    prior_logvar), in z's shape. grad_z or grad_row may be None; deviation = z - mu is
    overwritten (it becomes grad_logvar)."""
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
    grad_logvar = deviation.mul_(g_z).mul_(0.5)
    if grad_lv is not None:
        grad_logvar.add_(grad_lv)
    return g_z, grad_logvar, grad_pmu, grad_plogvar


# -- full-covariance Gaussian ----------------------------------------------------------------


def tril_sample_kl_forward(mu, scale_tril, eps):
    """z = mu + L eps and KL(N(mu, L L^T) || N(0, I)) per row, L = tril(scale_tril).

    Shapes: mu, eps (..., D); scale_tril (..., D, D), its upper triangle ignored. Returns
    (z (..., D), kl (...)), float32/64: kl = (|mu|^2 + |L|_F^2 - D - 2 sum_d log|L_dd|) / 2.
    """
    mu, L = opmath(mu), torch.tril(opmath(scale_tril))
    z = torch.matmul(L, opmath(eps).unsqueeze(-1)).squeeze(-1).add_(mu)
    log_det = L.diagonal(dim1=-2, dim2=-1).abs().log_().sum(-1)
    squares = torch.linalg.vector_norm(L, dim=(-2, -1)).square_().add_(mu.square().sum(-1))
    return z, squares.sub_(mu.shape[-1]).sub_(log_det, alpha=2.0).mul_(0.5)


def tril_sample_kl_backward(grad_z, grad_kl, mu, scale_tril, eps, needs=(True,) * 3):
    """Gradients of tril_sample_kl_forward's (z, kl) for (mu, scale_tril, eps), float32/64:
    g_z + g mu; tril(g_z eps^T + g (L - diag(1 / L_dd))) (0 above the diagonal); L^T g_z.
    grad_z or grad_kl may be None (eps is needed with grad_z); None where needs (3 bools) is
    False or nothing flows."""
    L = opmath(scale_tril)  # what lies above its diagonal is zeroed in g_L by tril_ below
    grad_mu = grad_L = grad_eps = None
    if grad_kl is not None:
        g = opmath(grad_kl).unsqueeze(-1)
        grad_mu = g * opmath(mu)
        if needs[1]:
            grad_L = torch.mul(L, g.unsqueeze(-1))
            grad_L.diagonal(dim1=-2, dim2=-1).sub_(g / L.diagonal(dim1=-2, dim2=-1))
    if grad_z is not None:
        g_z = opmath(grad_z)
        grad_mu = g_z if grad_mu is None else grad_mu.add_(g_z)
        if needs[1]:
            outer = (g_z.unsqueeze(-1), opmath(eps).unsqueeze(-2))
            grad_L = torch.mul(*outer) if grad_L is None else grad_L.addcmul_(*outer)
        if needs[2]:
            grad_eps = torch.matmul(g_z.unsqueeze(-2), torch.tril(L)).squeeze(-2)
    return grad_mu if needs[0] else None, None if grad_L is None else grad_L.tril_(), grad_eps


def compact(t: torch.Tensor) -> torch.Tensor:
    """t with each broadcast (stride-0) leading dim cut to size 1: the same values under
    broadcasting, without computing on the repeats (the last dim is kept: it is summed)."""
    if 0 not in t.stride():
        return t
    for dim, (size, stride) in enumerate(zip(t.shape[:-1], t.stride()[:-1])):
        if stride == 0 and size > 1:
            t = t.narrow(dim, 0, 1)
    return t


def log_prob_forward(x, mu, logvar):
    """log N(x; mu, diag exp(logvar)) summed over the last dim: shape (...), float32/64."""
    shape = broadcast_shapes(x.shape, mu.shape, logvar.shape)
    x, mu, logvar = (opmath(compact(t)) for t in (x, mu, logvar))
    quad = (x - mu).square_().mul(torch.exp(-logvar)).sum(-1)
    log_det = logvar.expand(*logvar.shape[:-1], shape[-1]).sum(-1)
    out = quad.add(log_det).add_(shape[-1] * LOG_2PI).mul_(-0.5)
    return out.expand(shape[:-1])


def log_prob_backward(grad, x, mu, logvar, needs=(True, True, True)):
    """Gradients of log_prob_forward for (x, mu, logvar), in the broadcast shape; None where
    needs (3 bools) is False."""
    x, mu, logvar = (opmath(compact(t)) for t in (x, mu, logvar))
    g = opmath(grad).unsqueeze(-1)
    diff = x - mu
    scaled = diff * torch.exp(-logvar)  # -d/dx, d/dmu of the log-density
    grad_logvar = torch.mul(diff, scaled).sub_(1.0).mul(0.5 * g) if needs[2] else None
    g_scaled = scaled * g
    grad_x = -g_scaled if needs[0] else None
    return grad_x, (g_scaled if needs[1] else None), grad_logvar


def fixed_variance_log_prob(x, mu, logvar, shape: torch.Size):
    """log N(x; mu, exp(logvar) I) summed over the last dim for one logvar value (a float, or a
    0-dim tensor): -(|x - mu|^2 / var + D (logvar + log 2pi)) / 2, shape[:-1], float32/64, for
    x and mu that broadcast together to `shape` (..., D).

    Plain differentiable torch: the torch path runs it under autograd, whose backward is then
    the squared error's (and, for a 0-dim tensor, its gradient too). The squares are
    F.mse_loss's: one pass each way, where (x - mu).square() takes two and keeps x - mu.
    """
    dtype = torch.promote_types(x.dtype, mu.dtype)
    if isinstance(logvar, float):
        inv_var = math.exp(-logvar)
    else:
        dtype = torch.promote_types(dtype, logvar.dtype)
        logvar = logvar.to(opmath_dtype(dtype))
        inv_var = torch.exp(-logvar)
    dtype = opmath_dtype(dtype)
    x, mu = x.to(dtype), mu.to(dtype)
    if x.shape != shape:
        x = x.expand(shape)
    if mu.shape != shape:
        mu = mu.expand(shape)
    squared = F.mse_loss(mu, x, reduction="none").sum(-1)
    return squared.mul(-0.5 * inv_var).add_(-0.5 * shape[-1] * (logvar + LOG_2PI))


def log_mean_exp_forward(x, dim):
    """log((1/K) sum_k exp(x_k)) along `dim` (K = x.shape[dim]): x's shape without `dim`,
    float32/64. All -inf gives -inf, any +inf gives +inf, any NaN gives NaN."""
    return torch.logsumexp(opmath(x), dim).sub(math.log(x.shape[dim]))  # autograd keeps the sum


def log_mean_exp_backward(grad, x, out, dim):
    """grad * softmax(x, dim) = grad * exp(x - (out + log K)), in x's shape; 0 along `dim`
    where out is -inf (all inputs -inf), where torch.logsumexp's own backward gives NaN."""
    log_sum_exp = (opmath(out) + math.log(x.shape[dim])).unsqueeze(dim)
    # exp(-inf - (+inf)) = 0: the all -inf columns get 0 without masking all of x.
    log_sum_exp.masked_fill_(log_sum_exp == -math.inf, math.inf)
    return torch.sub(opmath(x), log_sum_exp).exp_().mul_(opmath(grad).unsqueeze(dim))


# -- mixture of diagonal Gaussians -----------------------------------------------------------


def mixture_dtype(*tensors) -> torch.dtype:
    """The opmath dtype of the mixture ops' inputs taken together (None entries skipped)."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return opmath_dtype(dtype)


MIXTURE_BLOCK = 1 << 19  # elements of one (rows, components, D) block on the torch path
# ... and under a trace, where inductor fuses a block's passes: its forward stores nothing of a
# block's size and its backward one buffer, so that fewer, larger blocks win (the VampPrior
# step with C = 500 ran 6% slower in blocks of 2^19 than compiled torch.distributions, which
# stores all N x C x D).
MIXTURE_TRACED_BLOCK = 1 << 22


class MixtureComponents:
    """Per-component tensors of a diagonal-Gaussian mixture, contiguous, in `dtype`.

    From means, logvars (C, D) and log_weights (C,) (None: pi = 1/C): means, inv_var =
    exp(-logvars) (C, D) and const = log pi - (D log 2pi + sum_d logvars) / 2 (C,), so that
    every pair's logit is, directly (no expanded square, which cancels for tight components):
        log pi_c + log N(z; c) = const_c - sum_d (z_d - m_cd)^2 inv_var_cd / 2.
    """

    def __init__(self, means, logvars, log_weights, dtype):
        C, D = means.shape
        logvars = logvars.to(dtype)
        self.means = means.to(dtype).contiguous()
        self.inv_var = torch.exp(-logvars).contiguous()
        if log_weights is None:
            log_pi = torch.full((C,), -math.log(C), dtype=dtype, device=means.device)
        else:
            log_pi = torch.log_softmax(log_weights.to(dtype), 0)
        self.const = (log_pi - 0.5 * (D * LOG_2PI + logvars.sum(1))).contiguous()


def mixture_block_sizes(z: torch.Tensor, C: int) -> tuple[int, int]:
    """(rows, components) of the torch path's blocks over rows z (N, D): rows * components *
    D at most MIXTURE_BLOCK where possible (about L2-sized: 4x faster than one N x C x D block
    at N = 4096, C = 128, D = 16), or MIXTURE_TRACED_BLOCK under a trace; all C components
    where they fit."""
    (N, D), block = z.shape, MIXTURE_TRACED_BLOCK if traced((z,)) else MIXTURE_BLOCK
    per_pair = max(D, 1)
    comps = max(1, min(C, block // per_pair))
    return max(1, min(N, block // (comps * per_pair))), comps


def mixture_logits(z, components, comps):
    """log pi_c + log N(z_n; c) (n, c) of rows z (n, D) and components[comps], directly,
    with diff = z_n - m_c and scaled = diff / s_c^2 (n, c, D). The forward and the backward
    both compute them here, in the same blocks, so that the backward's responsibilities
    exp(logit - out) are those of the forward's out (exactly 1 for a lone component)."""
    diff = z[:, None, :] - components.means[comps]
    scaled = diff * components.inv_var[comps]
    quad = (scaled * diff).sum(-1)
    return torch.add(components.const[comps], quad, alpha=-0.5), diff, scaled


class ExpandedMixture:
    """The pairs' logits by the expanded square, in float64, for float32 inputs on the CPU:

        q_nc = sum_d z_nd^2 iv_cd - 2 sum_d z_nd m_cd iv_cd + sum_d m_cd^2 iv_cd = P - 2Q + M,

    matrix products over D instead of the direct form's passes over (rows, components, D)
    blocks: 1.4-2x faster at 32k pairs, 7x (forward) and 15x (backward) at 1300 rows by 500
    components of D = 50, on one core of this project's CPU; from MIN_PAIRS pairs up. The
    sum cancels where z is near a tight component far from the origin; in float64 its error
    stays below about 2D 2^-52 (P + M).
    A block of rows takes it only where that is at most a quarter of float32's rounding of
    every logit, 2^-24 (q + |const|); anywhere else (extreme scales, non-finite values) the
    block takes the direct form."""

    MIN_PAIRS = 8192  # below it the direct form is as fast (and the extra ops cost more)
    ERROR_SHARE = 2.0**-26  # of a logit's q + |const|: a quarter of float32's rounding

    def __init__(self, components: MixtureComponents):
        C, D = components.means.shape
        self.inv_var = components.inv_var.double()
        self.means = components.means.double()
        self.means_inv_var = self.means * self.inv_var
        self.means_sq = (self.means_inv_var * self.means).sum(1)  # M (C,)
        self.const = components.const.double()
        self.const_abs = self.const.abs()
        self.margin = 2 * D * 2.0**-52 / self.ERROR_SHARE
        self.rows = max(1, MIXTURE_BLOCK // (4 * C))  # a block: about MIXTURE_BLOCK / 4 pairs

    @staticmethod
    def of(z: torch.Tensor, components: MixtureComponents) -> ExpandedMixture | None:
        """The expanded form for rows z (N, D) where it applies, else None."""
        if (
            components.means.dtype != torch.float32 or z.device.type != "cpu"
            or z.shape[0] * components.const.shape[0] < ExpandedMixture.MIN_PAIRS
            or traced((z,))
        ):  # fmt: skip
            return None
        return ExpandedMixture(components)

    def logits(self, z64: torch.Tensor) -> torch.Tensor | None:
        """float32 logits (n, C) of rows z64 (n, D) float64; None where the bound fails."""
        p = (z64 * z64) @ self.inv_var.T
        q = torch.addmm(self.means_sq, z64, self.means_inv_var.T, alpha=-2.0).add_(p)
        error = p.add_(self.means_sq).mul_(self.margin)
        if not bool((error <= q + self.const_abs).all()):  # NaN fails too
            return None
        return torch.add(self.const, q, alpha=-0.5).float()

    def add_grads(self, a: torch.Tensor, z64: torch.Tensor, rows: slice, acc: MixtureGrads):
        """Adds the gradients of a block of rows to acc, from its a (n, C) = grad r."""
        a = a.double()
        if acc.grad_z is not None:  # -sum_c a (z - m) iv = a @ (m iv) - z (a @ iv)
            grad_z = torch.addcmul(a @ self.means_inv_var, z64, a @ self.inv_var, value=-1)
            acc.grad_z[rows] += grad_z
        if acc.grad_means is None and acc.spread is None:
            return
        a_z, m_mass = a.T @ z64, self.means * a.sum(0)[:, None]
        if acc.grad_means is not None:  # iv sum_n a (z - m)
            acc.grad_means.add_((a_z - m_mass).mul_(self.inv_var))
        if acc.spread is not None:  # iv sum_n a (z - m)^2 = iv (a^T z^2 - 2 m a^T z + m^2 mass)
            spread = (a.T @ (z64 * z64)).addcmul_(self.means, a_z.sub_(m_mass, alpha=0.5), value=-2)
            acc.spread.add_(spread.mul_(self.inv_var))


def _row_blocks(stop: int, rows: int, start: int = 0):
    """Slices of `rows` rows covering [start, stop)."""
    return (slice(r, min(r + rows, stop)) for r in range(start, stop, rows))


def mixture_log_prob_forward(z, means, logvars, log_weights):
    """log sum_c pi_c N(z_n; m_c, diag exp(logvars_c)), pi = softmax(log_weights) (None: 1/C).

    z: (N, D); means, logvars: (C, D); log_weights: (C,) or None. Returns out (N,),
    float32/64. Every pair's log-density is computed directly, in blocks of rows and
    components (mixture_block_sizes), or for float32 on the CPU by ExpandedMixture where its
    error bound holds; memory: a block, and one block of rows by all C.
    """
    dtype = mixture_dtype(z, means, logvars, log_weights)
    components = MixtureComponents(means, logvars, log_weights, dtype)
    z = z.to(dtype)
    N, C = z.shape[0], means.shape[0]
    expanded = ExpandedMixture.of(z, components)
    rows, comps = mixture_block_sizes(z, C)
    out = torch.empty(N, dtype=dtype, device=z.device)
    for block in _row_blocks(N, rows if expanded is None else expanded.rows):
        logits = None if expanded is None else expanded.logits(z[block].double())
        if logits is not None:
            torch.logsumexp(logits, 1, out=out[block])
            continue
        for r in _row_blocks(block.stop, rows, block.start):
            direct = [
                mixture_logits(z[r], components, slice(c, c + comps))[0] for c in range(0, C, comps)
            ]
            logits = direct[0] if len(direct) == 1 else torch.cat(direct, 1)
            torch.logsumexp(logits, 1, out=out[r])
    return out


def mixture_logvars_grad(spread, mass):
    """d/dlogvars (C, D) from spread_cd = sum_n a_nc (z_nd - m_cd)^2 / s_cd^2 (C, D) and
    mass_c = sum_n a_nc (C,): (spread - mass) / 2."""
    return 0.5 * (spread - mass.unsqueeze(1))


def mixture_log_weights_grad(mass, log_weights):
    """d/dlog_weights of sum_n grad_n out_n = mass - softmax(log_weights) * sum_n grad_n, from
    mass_c = sum_n grad_n r_nc (r: the responsibilities); sum_n grad_n is taken as sum_c mass_c,
    equal since sum_c r_nc = 1, so that rounding in r cancels (0 exactly for one component).
    None when log_weights is None."""
    if log_weights is None:
        return None
    return mass - torch.softmax(log_weights.to(mass.dtype), 0) * mass.sum()


class MixtureGrads(NamedTuple):
    """The backward's accumulators, None where not wanted: grad_z (N, D), grad_means (C, D),
    spread (C, D) and mass (C,) (see mixture_log_prob_backward)."""

    grad_z: torch.Tensor | None
    grad_means: torch.Tensor | None
    spread: torch.Tensor | None
    mass: torch.Tensor | None


def _direct_grads(z, components, grad, shift, rows: slice, comps: slice, acc: MixtureGrads):
    """Adds the gradients of one (rows, comps) block to acc by the direct form."""
    logits, diff, scaled = mixture_logits(z[rows], components, comps)
    a = torch.exp(logits.sub_(shift[rows, None])).mul_(grad[rows, None])
    if acc.mass is not None:
        acc.mass[comps] += a.sum(0)
    idle = (a == 0).unsqueeze(2)  # (n, c, 1)
    a_scaled = scaled.mul_(a.unsqueeze(2)).masked_fill_(idle, 0.0)  # a (z - m) / s^2
    if acc.grad_z is not None:
        acc.grad_z[rows] -= a_scaled.sum(1)
    if acc.grad_means is not None:
        acc.grad_means[comps] += a_scaled.sum(0)
    if acc.spread is not None:
        acc.spread[comps] += a_scaled.mul_(diff.masked_fill_(idle, 0.0)).sum(0)


def mixture_log_prob_backward(grad, z, means, logvars, log_weights, out, needs=(True,) * 4):
    """Gradients of mixture_log_prob_forward (output out (N,), incoming grad (N,)) for
    (z, means, logvars, log_weights), float32/64, None where needs (4 bools) is False.

    With a_nc = grad_n r_nc = grad_n exp(logit_nc - out_n), recomputed block by block as in
    the forward (rows whose out is -inf get none; a pair whose a_nc is 0 contributes exactly
    0, even where its z - m is inf or its (z - m) / s^2 overflows):
        d/dz_n = -sum_c a_nc (z_n - m_c) / s_c^2,  d/dm_c = sum_n a_nc (z_n - m_c) / s_c^2,
        d/dlogvars_c = sum_n a_nc ((z_n - m_c)^2 / s_c^2 - 1) / 2,
        d/dlog_weights_c = sum_n a_nc - pi_c sum_n grad_n.
    """
    dtype = mixture_dtype(z, means, logvars, log_weights)
    components = MixtureComponents(means, logvars, log_weights, dtype)
    z, out = z.to(dtype), out.to(dtype)
    dead = out == -math.inf  # every density 0: no gradient
    grad, shift = torch.where(dead, 0.0, grad.to(dtype)), torch.where(dead, 0.0, out)
    (N, D), C = z.shape, means.shape[0]
    want_z, want_means, want_logvars, want_weights = needs
    acc = MixtureGrads(
        z.new_zeros((N, D)) if want_z else None,
        z.new_zeros((C, D)) if want_means else None,
        z.new_zeros((C, D)) if want_logvars else None,
        z.new_zeros(C) if want_logvars or want_weights else None,
    )
    expanded = ExpandedMixture.of(z, components)
    rows, comps = mixture_block_sizes(z, C)
    for block in _row_blocks(N, rows if expanded is None else expanded.rows):
        z64 = None if expanded is None else z[block].double()
        logits = None if expanded is None else expanded.logits(z64)
        if logits is not None:
            a = torch.exp(logits.sub_(shift[block, None])).mul_(grad[block, None])
            if acc.mass is not None:
                acc.mass.add_(a.sum(0))
            expanded.add_grads(a, z64, block, acc)
            continue
        for r in _row_blocks(block.stop, rows, block.start):
            for c in range(0, C, comps):
                _direct_grads(z, components, grad, shift, r, slice(c, c + comps), acc)
    grad_logvars = mixture_logvars_grad(acc.spread, acc.mass) if want_logvars else None
    log_weights_grad = mixture_log_weights_grad(acc.mass, log_weights) if want_weights else None
    return acc.grad_z, acc.grad_means, grad_logvars, log_weights_grad


# -- data likelihoods: Bernoulli, discretized logistic ------------------------------------------


def likelihood_dtype(x, *params) -> torch.dtype:
    """The opmath dtype of a data likelihood: of its parameters and of x where x is floating
    (integer and bool data do not widen it)."""
    dtype = torch.float32
    for t in (*params, x if x.is_floating_point() else None):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return opmath_dtype(dtype)


def _bernoulli_split(x, logits):
    """x and logits in likelihood_dtype, and x = b + r with b = [x > 1/2] in {0, 1}, as the
    sign s = 2b - 1 and the remainder r (0 for binary x; NaN for NaN x): computed on x's own
    (usually smaller) shape. r is None where it is known to be 0: bool x, and binary uint8 or
    float x in CPU tensors (checked on x's shape: it spares r l's pass over the broadcast one,
    and the NaN of r = 0 times an infinite logit)."""
    dtype = likelihood_dtype(x, logits)
    x, logits = compact(x), compact(logits).to(dtype)
    integers = not x.is_floating_point()  # bool, or uint8 (>= 0)
    if x.dtype == torch.bool or integers and _known_within(x, 0, 1):  # b = x, r = 0
        return logits, x.to(dtype).mul_(2).sub_(1), None
    x = x.to(dtype)
    # b without a bool mask, slower to make: min(x, 1) for integers, else 0 for NaN
    b = x.clamp(max=1.0) if integers else torch.sub(x, 0.5).sign_().clamp_(min=0.0)
    rest = x - b
    # integers here are not binary, or not checked
    spared = not integers and _known_within(rest, 0, 0)
    return logits, b.mul_(2).sub_(1), None if spared else rest


def _known_within(t: torch.Tensor, low: float, high: float) -> bool:
    """Whether every element of t lies in [low, high] (NaN does not), read only where that costs
    no wait for a device or a trace: for plain CPU tensors outside a compiler's trace (False
    elsewhere)."""
    if traced((t,)) or t.device.type != "cpu":
        return False
    if t.numel() == 0:
        return True
    least, most = torch.aminmax(t)  # (faster than any())
    return least.item() >= low and most.item() <= high


def bernoulli_log_prob_forward(x, logits):
    """sum_d [x_d l_d - softplus(l_d)] for x and logits broadcast to (..., D), as
    -softplus(-s l) + r l (x = b + r, s = 2b - 1): exact for x in {0, 1}, where r = 0, so a
    tiny log p (x agreeing with a large logit) keeps its relative accuracy. Three passes over
    the broadcast shape (four where r is not known to be 0), one buffer. Shape (...),
    float32/64."""
    shape = broadcast_shapes(x.shape, logits.shape)
    logits, sign, rest = _bernoulli_split(x, logits)
    neg_log_p = torch.mul(logits, sign.neg_())
    if autograd_records(neg_log_p):  # it keeps softplus's input
        neg_log_p = torch._C._nn.softplus(neg_log_p, 1, 20)
    else:
        torch._C._nn.softplus(neg_log_p, 1, 20, out=neg_log_p)
    if rest is not None:
        neg_log_p.addcmul_(rest, logits, value=-1)
    return neg_log_p.sum(-1).neg_().expand(shape[:-1])


def bernoulli_log_prob_backward(grad, x, logits, needs=(True, True)):
    """Gradients of bernoulli_log_prob_forward for (x, logits): g l and g (x - sigmoid(l)), the
    latter as g (s sigmoid(-s l) + r) (no 1 - sigmoid(l) that rounds to 0); None where needs (2
    bools) is False."""
    logits, sign, rest = _bernoulli_split(x, logits)
    g = grad.to(logits.dtype).unsqueeze(-1)
    shape = broadcast_shapes(sign.shape, logits.shape, g.shape)
    grad_x = (logits * g).expand(shape) if needs[0] else None  # x's own shape: summed down
    grad_logits = None
    if needs[1]:
        slope = torch.mul(logits, torch.neg(sign)).sigmoid_().mul_(sign)
        if rest is not None:
            slope.add_(rest)
        grad_logits = slope.mul_(g) if slope.shape == shape else slope * g
    return grad_x, grad_logits


def _bin_edges_table(bins: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(2, bins + 1): bin k's lower and upper edges k / bins and (k + 1) / bins (-inf for the
    first bin's lower edge, +inf for the last's upper edge); column bins, the bin of a NaN x, is
    NaN."""
    k = torch.arange(bins + 1, dtype=torch.float64)
    table = torch.stack((k, k + 1)).div_(bins)
    table[0, 0], table[1, bins - 1] = -math.inf, math.inf
    table[:, bins] = math.nan
    return table.to(device=device, dtype=dtype)


_cached_bin_edges_table = functools.lru_cache(maxsize=16)(_bin_edges_table)
CACHED_BINS = 1 << 16  # the tables of up to this many bins are kept (about 1 MiB each)


def _bin_index(x, bins, dtype):
    """x's bin as int64 indices of x's shape: k = x (integers) or round(x * bins) (floats),
    clamped to [0, bins - 1]; bins for a NaN x."""
    if not x.is_floating_point():  # clamped in int64: bins - 1 need not fit x's dtype
        return x.to(torch.long, copy=True).clamp_(0, bins - 1)
    k = torch.mul(x.to(dtype), bins).add_(0.5).floor_().clamp_(0, bins - 1)
    return k.nan_to_num_(nan=bins).long()


def _bin_offsets(x, mean, bins, dtype):
    """(below, above, span): lower - mean and upper - mean for x's bin [lower, upper), -inf and
    +inf at the open edges of the first and last bins, and span = (above - below) bins: 1 for an
    interior bin, inf for the edge bins. The edges are looked up in a table on x's own shape; an
    infinite mean counts as float max, so that an open edge stays infinite."""
    index = _bin_index(x, bins, dtype).reshape(-1)
    cached = bins <= CACHED_BINS and not traced((index,))
    table = (_cached_bin_edges_table if cached else _bin_edges_table)(bins, dtype, mean.device)
    lower, upper = table.index_select(1, index).view(2, *x.shape).unbind(0)
    big = torch.finfo(dtype).max
    mean = mean.to(dtype).clamp(-big, big)  # NaN stays NaN
    return lower - mean, upper - mean, torch.sub(upper, lower).mul_(bins)


class BinTerms(NamedTuple):
    """x's bin [lower, upper) under a logistic of location mean and scale s: inv_scale = 1 / s,
    the standardized edges u = (lower - mean) / s and v = (upper - mean) / s (-inf and +inf at
    the open edges of the first and last bins), sigmoid(u), sigmoid(-v), span (1 for an
    interior bin, inf for the edge bins) and, when asked for, w = u + v."""

    inv_scale: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    sig_u: torch.Tensor
    sig_neg_v: torch.Tensor
    span: torch.Tensor
    w: torch.Tensor | None


def bin_terms(x, mean, log_scale, bins, *, want_w=False) -> BinTerms:
    """The BinTerms of x, in likelihood_dtype (NaN in x, mean or log_scale gives NaN terms)."""
    dtype = likelihood_dtype(x, mean, log_scale)
    x, mean, log_scale = (compact(t) for t in (x, mean, log_scale))
    below, above, span = _bin_offsets(x, mean, bins, dtype)
    # e^-log_scale, kept above 0 (past log_scale 103) so that the open edges stay infinite
    inv_scale = torch.neg(log_scale.to(dtype)).exp_().clamp_(min=_smallest_subnormal(dtype))
    u, v = below * inv_scale, above * inv_scale
    w = torch.mul(below.add_(above), inv_scale) if want_w else None  # no u + v that cancels
    return BinTerms(inv_scale, u, v, torch.sigmoid(u), torch.sigmoid(-v), span, w)


def _smallest_subnormal(dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def expm1(t: torch.Tensor) -> torch.Tensor:
    """e^t - 1, relatively accurate for small t where inductor compiles it for a CPU too: its
    vectorized expm1 there is exp(t) - 1 (torch 2.13), all rounding error at t ~ 1e-6. Traced
    CPU code takes 2 sinh(h) e^h, h = t / 2, with sinh's series (to h^9: the rest < 1e-12 of
    it) for |t| <= ln 2, and (e^h)^2 - 1 beyond: one exp."""
    if t.device.type == "cpu" and traced((t,)):
        half = 0.5 * t
        e = torch.exp(half)
        h2 = half * half
        sinh = half * (1.0 + h2 * (1.0 / 6 + h2 * (1.0 / 120 + h2 * (1.0 / 5040 + h2 / 362880))))
        return torch.where(t.abs() <= 0.6931471805599453, 2.0 * sinh * e, e * e - 1.0)
    return torch.expm1(t)


def _one_minus_exp_neg_(t):
    """1 - e^-t, in t's buffer (eager)."""
    if traced((t,)):
        return expm1(-t).neg_()
    return t.neg_().expm1_().neg_()


def _sigmoid_abs_(sig):
    """sigmoid(|t|) = max(sigmoid(t), 1 - sigmoid(t)) from sig = sigmoid(t), in sig's buffer."""
    return sig.sub_(0.5).abs_().add_(0.5)


def discretized_logistic_log_prob_forward(x, mean, log_scale, bins):
    """sum_d log P(bin of x_d), shape (...), float32/64: where P > 1/2, log P =
    log1p(-(sigmoid(u) + sigmoid(-v))); elsewhere log P = min(v, 0) - max(u, 0) +
    log(sigmoid(|u|) sigmoid(|v|) (1 - e^-d)), d = v - u (docs/math.md)."""
    shape = broadcast_shapes(x.shape, mean.shape, log_scale.shape)
    t = bin_terms(x, mean, log_scale, bins)
    tails = t.sig_u + t.sig_neg_v  # 1 - P
    far = _sigmoid_abs_(t.sig_u).mul_(_sigmoid_abs_(t.sig_neg_v))
    width = torch.mul(t.inv_scale, t.span).mul_(1.0 / bins)  # d = v - u: inf in the edge bins
    far = far.mul_(_one_minus_exp_neg_(width)).log_()
    far = far.add_(t.v.clamp_(max=0.0)).sub_(t.u.clamp_(min=0.0))
    return _near_one_or_(far, tails).sum(-1).expand(shape[:-1])


def _near_one_or_(far, tails):
    """log P: log1p(-tails) where tails < 1/2, else far, in far's buffer. A where whose mask
    is mixed costs several passes, so this is a lerp by a 0/1 weight between finite values,
    plus far's -inf (where P underflows: there tails ~ 1, the weight is 0); NaN stays NaN."""
    tails = tails.clamp_(max=0.5)
    near_one = torch.neg(tails).log1p_()  # finite
    near = tails.neg_().add_(0.5).sign_()  # 1 where tails < 1/2, else 0 (NaN: 0)
    big = torch.finfo(far.dtype).max
    finite = far.clamp(min=-big)
    return finite.lerp_(near_one, near).add_(far.add_(big).clamp_(max=0.0))  # + (far - finite)


def discretized_logistic_log_prob_backward(grad, x, mean, log_scale, bins, needs=(True, True)):
    """Gradients of discretized_logistic_log_prob_forward for (mean, log_scale): g a / s and
    g b with a = sigmoid(u) - sigmoid(-v), b = u sigmoid(u) - v sigmoid(-v) - d / (e^d - 1)
    (the edge bins without the terms of their infinite edge); None where needs is False."""
    t = bin_terms(x, mean, log_scale, bins, want_w=needs[0])
    g = grad.to(t.u.dtype).unsqueeze(-1)
    grad_mean = _mean_slope_(t).mul_(t.inv_scale) * g if needs[0] else None
    grad_log_scale = _scale_slope_(t, bins) * g if needs[1] else None
    return grad_mean, grad_log_scale


def _mean_slope_(t: BinTerms):
    """a = sigmoid(u) - sigmoid(-v) without the difference, in w's buffer: sigmoid(u) sigmoid(v)
    (1 - e^-w) for w = u + v >= 0, -sigmoid(-u) sigmoid(-v) (1 - e^w) for w < 0 (1 - sigmoid
    gives the factors >= 1/2 on that side)."""
    up = torch.rsub(t.sig_neg_v, 1.0).mul_(t.sig_u)
    down = torch.rsub(t.sig_u, 1.0).mul_(t.sig_neg_v)
    pick = down.neg_().lerp_(up, torch.sign(t.w).add_(1.0).mul_(0.5))  # up, or -down if w < 0
    return _one_minus_exp_neg_(t.w.abs_()).mul_(pick)


def _scale_slope_(t: BinTerms, bins: int):
    """b = u sigmoid(u) - v sigmoid(-v) - d / (e^d - 1), the edge bins without the terms of
    their infinite edge, in u's buffer (v's is used too)."""
    big = torch.finfo(t.u.dtype).max
    slope = t.u.clamp_(min=-big).mul_(t.sig_u)
    slope = slope.sub_(t.v.clamp_(max=big).mul_(t.sig_neg_v))
    d = torch.mul(t.inv_scale, 1.0 / bins).clamp_(min=_smallest_subnormal(t.u.dtype))
    return slope.sub_(d.div_(expm1(d)) / t.span)
