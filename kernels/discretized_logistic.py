"""Discretized-logistic log-likelihood kernels: sum_d log P(bin of x_d), and its gradients.

Bin k of `bins` is [k / bins, (k + 1) / bins), the first reaching down to -inf and the last up
to +inf. With the bin's edges standardized, u = (lower - mean) e^-log_scale and
v = (upper - mean) e^-log_scale, and d = v - u = e^-log_scale / bins,

    P = sigmoid(v) - sigmoid(u) = sigmoid(v) sigmoid(-u) (1 - e^-d),
    log P = -softplus(u) - softplus(-v) + log(1 - e^-d),

three terms of one sign, each accurate in float32 in either tail and at any scale (no
difference of sigmoids that cancels); the edge bins drop the terms of their infinite edge.
Operands are (rows, D) tiles of a broadcast (R1, R2, D) layout (kernels/common.py); x is loaded
in its own dtype: bin values k / bins (float) or the integers k.
"""

import triton
import triton.language as tl

from .common import (
    FLOAT_MAX,
    load_tile,
    log1mexp,
    one_minus_exp_neg,
    row_offsets,
    sigmoid,
    softplus,
)


@triton.jit
def _edges(x, mean, log_scale, bins, inv_bins, X_IS_INT: tl.constexpr):
    """(u, v, w, d, has_lower, has_upper) of x's bin: k = x or round(x * bins), clamped to
    [0, bins - 1]; w = u + v computed from the bin's middle, (2k + 1) / bins - 2 mean (exact
    for a mean near it), not as u + v, which cancels there. A NaN k has both edges, so that it
    reaches the result."""
    k = x if X_IS_INT else tl.floor(x * bins + 0.5)
    last = bins - 1.0
    k = tl.where(k < 0.0, 0.0, tl.where(k > last, last, k))  # NaN stays NaN
    inv_scale = tl.exp(-log_scale)
    u = (k * inv_bins - mean) * inv_scale
    v = ((k + 1.0) * inv_bins - mean) * inv_scale
    w = ((2.0 * k + 1.0) * inv_bins - 2.0 * mean) * inv_scale
    is_nan = k != k
    return u, v, w, inv_bins * inv_scale, (k >= 1.0) | is_nan, (k < last) | is_nan


@triton.jit
def _log_p(u, v, d, has_lower, has_upper):
    """log P of the bin from its standardized edges (see the module docstring)."""
    log_p = -tl.where(has_lower, softplus(u), 0.0) - tl.where(has_upper, softplus(-v), 0.0)
    width = log1mexp(d, one_minus_exp_neg(d))
    return tl.where(has_lower & has_upper, log_p + width, log_p)


@triton.jit
def _mean_slope(u, v, w, has_lower, has_upper):
    """a = sigmoid(u) - sigmoid(-v) (d log P / d mean = a e^-log_scale), edge bins without the
    term of their infinite edge. An interior bin's a is a product, never a difference that
    cancels (for a mean near the bin's middle, at any scale): sigmoid(u) sigmoid(v) (1 - e^-w)
    for w = u + v >= 0 (then v >= 0), -sigmoid(-u) sigmoid(-v) (1 - e^w) for w < 0 (then u < 0),
    the factors >= 1/2 taken as 1 - sigmoid."""
    sig_u = sigmoid(u)
    sig_nv = sigmoid(-v)
    side = tl.where(w >= 0.0, sig_u * (1.0 - sig_nv), -sig_nv * (1.0 - sig_u))
    interior = side * one_minus_exp_neg(tl.abs(w))
    edge = tl.where(has_lower, sig_u, 0.0) - tl.where(has_upper, sig_nv, 0.0)
    return tl.where(has_lower & has_upper, interior, edge)


@triton.jit
def _scale_slope(u, v, d, has_lower, has_upper):
    """b = d log P / d log_scale = u sigmoid(u) - v sigmoid(-v) - d / (e^d - 1), edge bins
    without the terms of their infinite edge."""
    q = one_minus_exp_neg(d)
    width = tl.where(q > 0.0, d * tl.exp(-d) / q, 1.0)  # d / (e^d - 1), 1 at d = 0
    # u sigmoid(u) is 0, not NaN, at u = -inf (an infinite mean): u taken as -float max
    u_finite = tl.where(u < -FLOAT_MAX, -FLOAT_MAX, u)
    v_finite = tl.where(v > FLOAT_MAX, FLOAT_MAX, v)
    b = tl.where(has_lower, u_finite * sigmoid(u), 0.0)
    b -= tl.where(has_upper, v_finite * sigmoid(-v), 0.0)
    return tl.where(has_lower & has_upper, b - width, b)


@triton.jit
def discretized_logistic_fwd_kernel(
    x_ptr, x_s1, x_s2, x_sd,
    m_ptr, m_s1, m_s2, m_sd,
    s_ptr, s_s1, s_s2, s_sd,
    out_ptr, bins, inv_bins, n_rows, R2, D,
    X_IS_INT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """sum_d log P(bin of x_d | mean_d, log_scale_d): (n_rows,) float32."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    x_row = row_offsets(rows, R2, x_s1, x_s2)
    m_row = row_offsets(rows, R2, m_s1, m_s2)
    s_row = row_offsets(rows, R2, s_s1, s_s2)
    acc = tl.zeros([BLOCK_R], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = row_mask[:, None] & (cols < D)[None, :]
        x = load_tile(x_ptr, x_row, cols, x_sd, mask, True)
        mean = load_tile(m_ptr, m_row, cols, m_sd, mask, True)
        log_scale = load_tile(s_ptr, s_row, cols, s_sd, mask, True)
        u, v, _, d, has_lower, has_upper = _edges(x, mean, log_scale, bins, inv_bins, X_IS_INT)
        log_p = _log_p(u, v, d, has_lower, has_upper)
        acc += tl.sum(tl.where(mask, log_p, 0.0), axis=1)
    tl.store(out_ptr + rows, acc, mask=row_mask)


@triton.jit
def discretized_logistic_bwd_kernel(
    x_ptr, x_s1, x_s2, x_sd,
    m_ptr, m_s1, m_s2, m_sd,
    s_ptr, s_s1, s_s2, s_sd,
    g_ptr, g_s1, g_s2,
    gm_ptr, gs_ptr, bins, inv_bins, n_rows, R2, D,
    X_IS_INT: tl.constexpr, WANT_GM: tl.constexpr, WANT_GS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Gradients for mean and log_scale, each written as (n_rows, D)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    x_row = row_offsets(rows, R2, x_s1, x_s2)
    m_row = row_offsets(rows, R2, m_s1, m_s2)
    s_row = row_offsets(rows, R2, s_s1, s_s2)
    g = tl.load(g_ptr + row_offsets(rows, R2, g_s1, g_s2), mask=row_mask).to(tl.float32)
    g = g[:, None]
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = row_mask[:, None] & (cols < D)[None, :]
        offs = rows[:, None] * D + cols[None, :]
        x = load_tile(x_ptr, x_row, cols, x_sd, mask, True)
        mean = load_tile(m_ptr, m_row, cols, m_sd, mask, True)
        log_scale = load_tile(s_ptr, s_row, cols, s_sd, mask, True)
        u, v, w, d, has_lower, has_upper = _edges(x, mean, log_scale, bins, inv_bins, X_IS_INT)
        if WANT_GM:
            g_m = g * _mean_slope(u, v, w, has_lower, has_upper) * tl.exp(-log_scale)
            tl.store(gm_ptr + offs, g_m.to(gm_ptr.dtype.element_ty), mask=mask)
        if WANT_GS:
            g_s = g * _scale_slope(u, v, d, has_lower, has_upper)
            tl.store(gs_ptr + offs, g_s.to(gs_ptr.dtype.element_ty), mask=mask)
