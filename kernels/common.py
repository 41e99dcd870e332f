"""Device helpers shared by the kernels: strided row tiles, the streaming log-sum-exp, and
softplus, sigmoid and log(1 - e^-d) accurate to float32 in both tails.

Operands are read as (rows, columns) tiles of a broadcast (R1, R2, columns) layout: row r starts
at (r // R2) * s1 + (r % R2) * s2 and column c sits at c * sc (stride 0 is broadcasting).
"""

import triton
import triton.language as tl

FLOAT_MAX = tl.constexpr(3.4028234663852886e38)
INF = tl.constexpr(float("inf"))
LN2 = tl.constexpr(0.6931471805599453)
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


# Without libdevice (Triton's interpreter cannot call it) there is no log1p or expm1, and a GPU's
# fast log loses relative accuracy near 1: the small-argument pieces below are short series.


@triton.jit
def log1p_small(y):
    """log(1 + y) for y in [-1/2, 1], to float32 accuracy: 2 atanh(s), s = y / (2 + y), by its
    series 2 (s + s^3/3 + ... + s^15/15); |s| <= 1/3, so the terms left out are < 2e-8 s."""
    s = y / (2.0 + y)
    s2 = s * s
    p = 1.0 / 15.0
    p = p * s2 + 1.0 / 13.0
    p = p * s2 + 1.0 / 11.0
    p = p * s2 + 1.0 / 9.0
    p = p * s2 + 1.0 / 7.0
    p = p * s2 + 1.0 / 5.0
    p = p * s2 + 1.0 / 3.0
    p = p * s2 + 1.0
    return 2.0 * s * p


@triton.jit
def softplus(t):
    """log(1 + e^t) for any t: max(t, 0) + log1p(e^-|t|). NaN gives NaN."""
    return tl.maximum(t, 0.0) + log1p_small(tl.exp(-tl.abs(t)))


@triton.jit
def sigmoid(t):
    """1 / (1 + e^-t) for any t, from e^-|t|: no overflow, relative accuracy in both tails."""
    e = tl.exp(-tl.abs(t))
    return tl.where(t >= 0.0, 1.0, e) / (1.0 + e)


@triton.jit
def one_minus_exp_neg(d):
    """1 - e^-d for d >= 0, relative accuracy for small d too: 2 sinh(d/2) e^(-d/2) with sinh's
    series (to h^9, h = d/2 <= ln 2 / 2: the rest < 1e-12) up to d = ln 2, 1 - e^-d beyond."""
    h = 0.5 * d
    h2 = h * h
    sinh = h * (1.0 + h2 * (1.0 / 6.0 + h2 * (1.0 / 120.0 + h2 * (1.0 / 5040.0 + h2 / 362880.0))))
    return tl.where(d <= LN2, 2.0 * sinh * tl.exp(-h), 1.0 - tl.exp(-d))


@triton.jit
def log1mexp(d, q):
    """log(1 - e^-d) for d >= 0, given q = one_minus_exp_neg(d): log q up to d = ln 2 (q <= 1/2,
    far from 1), log1p(-e^-d) beyond."""
    return tl.where(d <= LN2, tl.log(q), log1p_small(-tl.exp(-d)))
