"""log-mean-exp kernels: log((1/K) sum_k exp(x_k)) over rows of K values, forward and backward.

x is read in place as rows of an (R1, R2, K) layout (see kernels/common.py): row r starts at
(r // R2) * s1 + (r % R2) * s2 and its k-th value sits at k * sk. Each program takes BLOCK_R
rows and streams over K in chunks of BLOCK_K, keeping a running max m and a running sum
s = sum exp(x - m) (logsumexp_fold, shared with kernels/mixture.py), so any K fits in bounded
memory. Arithmetic is float32; offsets are int64 (k * sk passes 2**31 for a reduced dim of
large stride, e.g. dim 0 of a big (K, B) tensor).
"""

import triton
import triton.language as tl

from .common import NEG_INF, load_tile, logsumexp_fold, logsumexp_value, row_offsets


@triton.jit
def log_mean_exp_fwd_kernel(
    x_ptr, x_s1, x_s2, x_sk,
    out_ptr, n_rows, R2, K, log_k,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out = m + log s - log K per row: (n_rows,) float32."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    x_row = row_offsets(rows, R2, x_s1, x_s2)
    m = tl.full([BLOCK_R], NEG_INF, tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask = row_mask[:, None] & (cols < K)[None, :]
        x = tl.where(mask, load_tile(x_ptr, x_row, cols, x_sk, mask, True), NEG_INF)
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
    x_row = row_offsets(rows, R2, x_s1, x_s2)
    gx_row = row_offsets(rows, R2, gx_s1, gx_s2)
    g = tl.load(g_ptr + row_offsets(rows, R2, g_s1, g_s2), mask=row_mask).to(tl.float32)
    out = tl.load(out_ptr + rows, mask=row_mask, other=0.0)
    # Rows of all -inf: subtracting 0 instead of -inf makes exp(x - .) exactly 0, not NaN.
    log_sum_exp = tl.where(out == NEG_INF, 0.0, out + log_k)[:, None]
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask = row_mask[:, None] & (cols < K)[None, :]
        x = load_tile(x_ptr, x_row, cols, x_sk, mask, True)
        g_x = g[:, None] * tl.exp(x - log_sum_exp)
        gx_offs = gx_row[:, None] + cols[None, :] * gx_sk
        tl.store(gx_ptr + gx_offs, g_x.to(gx_ptr.dtype.element_ty), mask=mask)
