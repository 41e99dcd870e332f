"""Mixture-of-diagonal-Gaussians log-density kernels, forward and backward.

Every (row n, component c) pair is evaluated directly, in float32:

    logit_nc = log pi_c + log N(z_n; c) = const_c - q_nc / 2,
    q_nc = sum_d (z_nd - m_cd)^2 inv_var_cd,

with inv_var = exp(-logvars) (C, D) and const = log pi - (D log 2pi + sum_d logvars) / 2 (C,)
from the host. Each difference z - m is exact to rounding, so a logit is as accurate as the
naive formula's, however tight the component or far from the origin. The expanded matrix form
(z^2 @ inv_var^T - 2 z @ (m inv_var)^T + ...) is not used: its terms grow like (|z|^2 + |m|^2)
/ s^2 and cancel down to the small q of a tight component near z (errors of nats for s ~ 0.02
at |m| ~ 5), and with input_precision="ieee" (needed: TF32 is worse) tl.dot compiles to plain
FMAs, so it would not be faster either.

q is summed over D in BLOCK_D chunks of a (BLOCK_N, BLOCK_C, BLOCK_D) register tile; no
N x C x D tensor exists in memory. The forward streams a logsumexp over component blocks
(common.logsumexp_fold). The backward writes a_nc = g_n exp(logit_nc - out_n) (N, C) once,
then reads it for grad z (programs over rows) and for the components' sums (programs over
components, rows split). z is read through its (row, column) strides in any float dtype;
offsets are int64.
"""

import triton
import triton.language as tl

from .common import logsumexp_fold, logsumexp_value


@triton.jit
def _z_tile(z_ptr, z_sn, z_sd, rows, cols, N, D):
    """(BLOCK_N, BLOCK_D) float32 tile of z and its mask; zero outside (N, D)."""
    mask = (rows < N)[:, None] & (cols < D)[None, :]
    z = tl.load(z_ptr + rows[:, None] * z_sn + cols[None, :] * z_sd, mask=mask, other=0.0)
    return z.to(tl.float32), mask


@triton.jit
def _component_tile(ptr, comps, cols, C, D):
    """(BLOCK_C, BLOCK_D) tile of a contiguous (C, D) float32 tensor; zero outside it."""
    mask = (comps < C)[:, None] & (cols < D)[None, :]
    return tl.load(ptr + comps[:, None] * D + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _a_tile(a_ptr, rows, comps, N, C):
    """(BLOCK_N, BLOCK_C) tile of the contiguous (N, C) float32 a; zero outside it."""
    mask = (rows < N)[:, None] & (comps < C)[None, :]
    return tl.load(a_ptr + rows[:, None] * C + comps[None, :], mask=mask, other=0.0)


@triton.jit
def _live_diff(a, diff):
    """diff, 0 where a is 0: a pair of no weight contributes 0, though its z - m may be inf
    (an infinite z) or its (z - m) / s^2 overflow (a far, tight component)."""
    return tl.where(a == 0.0, 0.0, diff)


@triton.jit
def _logits_tile(
    z_ptr, z_sn, z_sd, means_ptr, inv_var_ptr, const_ptr, rows, comps, N, C, D,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """(BLOCK_N, BLOCK_C) logits const_c - q_nc / 2, directly; -inf for comps >= C."""
    q = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        z, _ = _z_tile(z_ptr, z_sn, z_sd, rows, cols, N, D)
        means = _component_tile(means_ptr, comps, cols, C, D)
        inv_var = _component_tile(inv_var_ptr, comps, cols, C, D)
        # (BLOCK_D, BLOCK_N, BLOCK_C): D leading, so that each thread holds whole D columns
        # and the sum over D needs no shuffles.
        diff = tl.trans(z)[:, :, None] - tl.trans(means)[:, None, :]
        q += tl.sum(diff * diff * tl.trans(inv_var)[:, None, :], axis=0)
    const = tl.load(const_ptr + comps, mask=comps < C, other=float("-inf"))
    # not const - q / 2 alone: a padding component's q is inf * 0 = NaN at an infinite z
    return tl.where((comps < C)[None, :], const[None, :] - 0.5 * q, float("-inf"))


@triton.jit
def mixture_log_prob_fwd_kernel(
    z_ptr, z_sn, z_sd, means_ptr, inv_var_ptr, const_ptr, out_ptr, N, C, D,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out_n = logsumexp_c logit_nc (N,) float32, for BLOCK_N rows over C in BLOCK_C blocks."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    running_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_N], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        comps = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        logits = _logits_tile(
            z_ptr, z_sn, z_sd, means_ptr, inv_var_ptr, const_ptr, rows, comps, N, C, D,
            BLOCK_N, BLOCK_C, BLOCK_D,
        )  # fmt: skip
        running_max, running_sum = logsumexp_fold(running_max, running_sum, logits)
    tl.store(out_ptr + rows, logsumexp_value(running_max, running_sum), mask=rows < N)


@triton.jit
def mixture_a_kernel(
    z_ptr, z_sn, z_sd, means_ptr, inv_var_ptr, const_ptr, out_ptr, grad_ptr, grad_sn, a_ptr,
    N, C, D,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """a_nc = g_n r_nc = g_n exp(logit_nc - out_n) for a (BLOCK_N, BLOCK_C) tile of the
    (N, C) float32 a; 0 on rows whose out is -inf."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    comps = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    logits = _logits_tile(
        z_ptr, z_sn, z_sd, means_ptr, inv_var_ptr, const_ptr, rows, comps, N, C, D,
        BLOCK_N, BLOCK_C, BLOCK_D,
    )  # fmt: skip
    row_mask = rows < N
    out = tl.load(out_ptr + rows, mask=row_mask, other=0.0)[:, None]
    grad = tl.load(grad_ptr + rows * grad_sn, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    a = tl.where(out == float("-inf"), 0.0, grad * tl.exp(logits - out))
    mask = row_mask[:, None] & (comps < C)[None, :]
    tl.store(a_ptr + rows[:, None] * C + comps[None, :], a, mask=mask)


@triton.jit
def mixture_grad_z_kernel(
    a_ptr, z_ptr, z_sn, z_sd, means_ptr, inv_var_ptr, grad_z_ptr, N, C, D,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """grad_z_nd = -sum_c a_nc (z_nd - m_cd) inv_var_cd for a (BLOCK_N, BLOCK_D) tile of the
    (N, D) float32 grad_z, over C in BLOCK_C blocks."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    z, mask = _z_tile(z_ptr, z_sn, z_sd, rows, cols, N, D)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        comps = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        a = _a_tile(a_ptr, rows, comps, N, C)
        means = _component_tile(means_ptr, comps, cols, C, D)
        inv_var = _component_tile(inv_var_ptr, comps, cols, C, D)
        # (BLOCK_C, BLOCK_N, BLOCK_D): C leading, summed within each thread.
        a = tl.trans(a)[:, :, None]
        scaled = _live_diff(a, z[None, :, :] - means[:, None, :]) * inv_var[:, None, :]
        acc += tl.sum(a * scaled, axis=0)
    tl.store(grad_z_ptr + rows[:, None] * D + cols[None, :], -acc, mask=mask)


@triton.jit
def mixture_component_sums_kernel(
    a_ptr, z_ptr, z_sn, z_sd, means_ptr, inv_var_ptr, grad_means_ptr, spread_ptr,
    N, C, D, rows_per_split,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """For a (BLOCK_C, BLOCK_D) tile, sums over split s's rows [s * rows_per_split,
    (s + 1) * rows_per_split): grad_means = inv_var sum_n a_nc (z_nd - m_cd) and spread =
    inv_var sum_n a_nc (z_nd - m_cd)^2, into [s] of (splits, C, D) float32 each."""
    comps = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(2).to(tl.int64)
    means = _component_tile(means_ptr, comps, cols, C, D)
    weighted = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    weighted_sq = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    for n0 in range(0, rows_per_split, BLOCK_N):
        rows = split * rows_per_split + n0 + tl.arange(0, BLOCK_N)
        a = _a_tile(a_ptr, rows, comps, N, C)
        z, _ = _z_tile(z_ptr, z_sn, z_sd, rows, cols, N, D)
        a = a[:, :, None]
        diff = _live_diff(a, z[:, None, :] - means[None, :, :])
        a_diff = a * diff
        weighted += tl.sum(a_diff, axis=0)
        weighted_sq += tl.sum(a_diff * diff, axis=0)
    inv_var = _component_tile(inv_var_ptr, comps, cols, C, D)
    mask = (comps < C)[:, None] & (cols < D)[None, :]
    offs = split * C * D + comps[:, None] * D + cols[None, :]
    tl.store(grad_means_ptr + offs, weighted * inv_var, mask=mask)
    tl.store(spread_ptr + offs, weighted_sq * inv_var, mask=mask)
