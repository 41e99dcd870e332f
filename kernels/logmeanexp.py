"""log-mean-exp kernels: log((1/K) sum_k exp(x_k)) over rows of K values, forward and backward.

x is read in place as rows of an (R1, R2, K) layout (see kernels/gaussian.py): row r starts at
(r // R2) * s1 + (r % R2) * s2 and its k-th value sits at k * sk. Each program takes BLOCK_R
rows and streams over K in chunks of BLOCK_K, keeping a running max m and a running sum
s = sum exp(x - m) (logsumexp_fold, shared with kernels/mixture.py), so any K fits in bounded
memory. Arithmetic is float32; offsets are int64 (k * sk passes 2**31 for a reduced dim of
large stride, e.g. dim 0 of a big (K, B) tensor).
"""

import triton
import triton.language as tl

from .gaussian import _load_tile, _row_offsets

INF = tl.constexpr(float("inf"))
NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _finite_or_zero(m):
    """The shift subtracted before exp: m, or 0 where m is +-inf (so that -inf - -inf and
    inf - inf never make NaN; the sum then carries the infinity)."""
    return tl.where(tl.abs(m) == INF, 0.0, m)


@triton.jit
def logsumexp_fold(m, s, x):
    """Fold a (rows, cols) tile x into each row's running max m and sum s = sum exp(x - m)
    (rows,): s' = s * exp(m - m') + sum exp(x - m'), m' = max(m, max x). Starts from m = -inf,
    s = 0; safe while every value seen is -inf (or +inf); a NaN in x reaches s."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    shift = _finite_or_zero(m_new)
    s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
    return m_new, s


@triton.jit
def logsumexp_value(m, s):
    """log sum exp of every value folded into (m, s) by logsumexp_fold: -inf when all were."""
    return _finite_or_zero(m) + tl.log(s)


@triton.jit
def log_mean_exp_fwd_kernel(
    x_ptr, x_s1, x_s2, x_sk,
    out_ptr, n_rows, R2, K, log_k,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out = m + log s - log K per row: (n_rows,) float32."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    x_row = _row_offsets(rows, R2, x_s1, x_s2)
    m = tl.full([BLOCK_R], NEG_INF, tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask = row_mask[:, None] & (cols < K)[None, :]
        x = tl.where(mask, _load_tile(x_ptr, x_row, cols, x_sk, mask, True), NEG_INF)
        m, s = logsumexp_fold(m, s, x)
    out = logsumexp_value(m, s) - log_k
    tl.store(out_ptr + rows, out, mask=row_mask)


@triton.jit
def log_mean_exp_bwd_kernel(
    x_ptr, x_s1, x_s2, x_sk,
    g_ptr, g_s1, g_s2,
    gx_ptr, gx_s1, gx_s2, gx_sk,
    out_ptr, n_rows, R2, K, log_k,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """grad x = g * softmax(x) = g * exp(x - (out + log K)), 0 on rows that are all -inf;
    written in gx's (R1, R2, K) layout."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    x_row = _row_offsets(rows, R2, x_s1, x_s2)
    gx_row = _row_offsets(rows, R2, gx_s1, gx_s2)
    g = tl.load(g_ptr + _row_offsets(rows, R2, g_s1, g_s2), mask=row_mask).to(tl.float32)
    out = tl.load(out_ptr + rows, mask=row_mask, other=0.0)
    # Rows of all -inf: subtracting 0 instead of -inf makes exp(x - .) exactly 0, not NaN.
    log_sum_exp = tl.where(out == NEG_INF, 0.0, out + log_k)[:, None]
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask = row_mask[:, None] & (cols < K)[None, :]
        x = _load_tile(x_ptr, x_row, cols, x_sk, mask, True)
        g_x = g[:, None] * tl.exp(x - log_sum_exp)
        gx_offs = gx_row[:, None] + cols[None, :] * gx_sk
        tl.store(gx_ptr + gx_offs, g_x.to(gx_ptr.dtype.element_ty), mask=mask)
