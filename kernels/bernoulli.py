"""Bernoulli log-likelihood kernels: sum_d [x_d l_d - softplus(l_d)] per row, and its gradients.

Operands are (rows, D) tiles of a broadcast (R1, R2, D) layout (kernels/common.py), so one x
(B, D) is read in place against K samples of logits (K, B, D). x is loaded in its own dtype
(float, bool or uint8) and converted in registers. Arithmetic is float32.
"""

import triton
import triton.language as tl

from .common import load_tile, log1p_small, row_offsets


@triton.jit
def _offset(x, logits):
    """x - [l > 0]: exact for x in {0, 1}, and for x in [1/2, 1] where l > 0."""
    return x - tl.where(logits > 0.0, 1.0, 0.0)


@triton.jit
def _log_p(x, logits):
    """x l - softplus(l) = l (x - [l > 0]) - log1p(e^-|l|): no cancellation for binary x; the
    product is 0 where x - [l > 0] is (an infinite logit that x agrees with: not NaN)."""
    offset = _offset(x, logits)
    bracket = tl.where(offset == 0.0, 0.0, logits * offset)
    return bracket - log1p_small(tl.exp(-tl.abs(logits)))


@triton.jit
def _slope(x, logits):
    """d log p / d l = x - sigmoid(l) = (x - [l > 0]) +- sigmoid(-|l|) (+ where l > 0): no
    1 - sigmoid(l) that rounds to 0."""
    e = tl.exp(-tl.abs(logits))
    tail = e / (1.0 + e)
    return _offset(x, logits) + tl.where(logits > 0.0, tail, -tail)


@triton.jit
def bernoulli_log_prob_fwd_kernel(
    x_ptr, x_s1, x_s2, x_sd,
    l_ptr, l_s1, l_s2, l_sd,
    out_ptr, n_rows, R2, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """log p(x | logits) summed over D: (n_rows,) float32."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    x_row = row_offsets(rows, R2, x_s1, x_s2)
    l_row = row_offsets(rows, R2, l_s1, l_s2)
    acc = tl.zeros([BLOCK_R], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = row_mask[:, None] & (cols < D)[None, :]
        x = load_tile(x_ptr, x_row, cols, x_sd, mask, True)
        logits = load_tile(l_ptr, l_row, cols, l_sd, mask, True)
        acc += tl.sum(tl.where(mask, _log_p(x, logits), 0.0), axis=1)
    tl.store(out_ptr + rows, acc, mask=row_mask)


@triton.jit
def bernoulli_log_prob_bwd_kernel(
    x_ptr, x_s1, x_s2, x_sd,
    l_ptr, l_s1, l_s2, l_sd,
    g_ptr, g_s1, g_s2,
    gx_ptr, gl_ptr, n_rows, R2, D,
    WANT_GX: tl.constexpr, WANT_GL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Gradients for x (g l) and logits (g (x - sigmoid(l))), each written as (n_rows, D)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    x_row = row_offsets(rows, R2, x_s1, x_s2)
    l_row = row_offsets(rows, R2, l_s1, l_s2)
    g = tl.load(g_ptr + row_offsets(rows, R2, g_s1, g_s2), mask=row_mask).to(tl.float32)
    g = g[:, None]
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = row_mask[:, None] & (cols < D)[None, :]
        offs = rows[:, None] * D + cols[None, :]
        logits = load_tile(l_ptr, l_row, cols, l_sd, mask, True)
        if WANT_GX:
            tl.store(gx_ptr + offs, (g * logits).to(gx_ptr.dtype.element_ty), mask=mask)
        if WANT_GL:
            x = load_tile(x_ptr, x_row, cols, x_sd, mask, True)
            g_l = g * _slope(x, logits)
            tl.store(gl_ptr + offs, g_l.to(gl_ptr.dtype.element_ty), mask=mask)
