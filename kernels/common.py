"""Device helpers shared by the kernels: strided row tiles and the streaming log-sum-exp.

Operands are read as (rows, columns) tiles of a broadcast (R1, R2, columns) layout: row r starts
at (r // R2) * s1 + (r % R2) * s2 and column c sits at c * sc (stride 0 is broadcasting).
"""

import triton
import triton.language as tl

INF = tl.constexpr(float("inf"))
NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def row_offsets(rows, R2, s1, s2):
    return (rows // R2) * s1 + (rows % R2) * s2


@triton.jit
def load_tile(ptr, row_off, cols, sd, mask, PRESENT: tl.constexpr):
    """A (BLOCK_R, BLOCK_D) float32 tile; zeros when the operand is absent."""
    if PRESENT:
        tile = tl.load(ptr + row_off[:, None] + cols[None, :] * sd, mask=mask, other=0.0)
        tile = tile.to(tl.float32)
    else:
        tile = tl.zeros(mask.shape, tl.float32)
    return tile


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
