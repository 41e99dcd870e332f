"""Mixture-of-diagonal-Gaussians log-density kernels, forward and backward.

With z' = z - center and per-component tensors precomputed on the host (float32, contiguous):
inv_var = 1/s^2 (C, D), mean_scaled = (m - center)/s^2 (C, D), const (C,), every pair's
log-density is two matrix products per D chunk, so no N x C x D tensor is formed:

    log pi_c + log N(z_n; c) = const_c - (z'^2 @ inv_var^T)_nc / 2 + (z' @ mean_scaled^T)_nc

The expanded square cancels when |z'| >> s, so every tl.dot runs in IEEE float32
(input_precision="ieee", never TF32), and each row's dominant component (argmax of the above)
is recomputed directly from (z - m)^2 / s^2 with log_norm = log pi - (D log 2pi + sum log s^2)/2.
The backward kernels leave that dominant pair out of their products; the host adds it exactly,
and turns the reductions over rows into the components' gradients (O(C D)).
z is read through its (row, column) strides in any float dtype; arithmetic is float32.
"""

import triton
import triton.language as tl


@triton.jit
def _z_tile(z_ptr, z_sn, z_sd, rows, cols, N, D):
    """(BLOCK_N, BLOCK_D) float32 tile of z and its mask; zero outside (N, D)."""
    mask = (rows < N)[:, None] & (cols < D)[None, :]
    z = tl.load(z_ptr + rows[:, None] * z_sn + cols[None, :] * z_sd, mask=mask, other=0.0)
    return z.to(tl.float32), mask


@triton.jit
def _centered_z(z_ptr, z_sn, z_sd, center_ptr, rows, cols, N, D):
    """(BLOCK_N, BLOCK_D) float32 tile of z - center; zero outside (N, D)."""
    z, mask = _z_tile(z_ptr, z_sn, z_sd, rows, cols, N, D)
    center = tl.load(center_ptr + cols, mask=cols < D, other=0.0)
    return tl.where(mask, z - center[None, :], 0.0)


@triton.jit
def _component_tile(ptr, comps, cols, C, D):
    """(BLOCK_C, BLOCK_D) tile of a contiguous (C, D) float32 tensor; zero outside it."""
    mask = (comps < C)[:, None] & (cols < D)[None, :]
    return tl.load(ptr + comps[:, None] * D + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _weights_tile(weights_ptr, rows, comps, N, C):
    """(BLOCK_N, BLOCK_C) tile of the contiguous (N, C) float32 weights; zero outside it."""
    mask = (rows < N)[:, None] & (comps < C)[None, :]
    return tl.load(weights_ptr + rows[:, None] * C + comps[None, :], mask=mask, other=0.0)


@triton.jit
def _log_density_tile(
    z_ptr, z_sn, z_sd, center_ptr, inv_var_ptr, mean_scaled_ptr, const_ptr,
    rows, comps, N, C, D,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """(BLOCK_N, BLOCK_C) log pi_c + log N(z_n; c) by matrix products; -inf for comps >= C."""
    acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        z = _centered_z(z_ptr, z_sn, z_sd, center_ptr, rows, cols, N, D)
        inv_var = _component_tile(inv_var_ptr, comps, cols, C, D)
        mean_scaled = _component_tile(mean_scaled_ptr, comps, cols, C, D)
        acc = tl.dot(-0.5 * z * z, tl.trans(inv_var), acc, input_precision="ieee")
        acc = tl.dot(z, tl.trans(mean_scaled), acc, input_precision="ieee")
    comp_mask = comps < C
    const = tl.load(const_ptr + comps, mask=comp_mask, other=0.0)
    return tl.where(comp_mask[None, :], acc + const[None, :], float("-inf"))


@triton.jit
def _top_log_density(
    z_ptr, z_sn, z_sd, means_ptr, inv_var_ptr, log_norm_ptr, rows, best, N, D,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """log pi_b + log N(z_n; b) for each row's component b = best_n, directly: (BLOCK_N,)."""
    quad = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        z, mask = _z_tile(z_ptr, z_sn, z_sd, rows, cols, N, D)
        offs = best[:, None] * D + cols[None, :]
        diff = z - tl.load(means_ptr + offs, mask=mask, other=0.0)
        quad += tl.sum(diff * diff * tl.load(inv_var_ptr + offs, mask=mask, other=0.0), axis=1)
    return tl.load(log_norm_ptr + best, mask=rows < N, other=0.0) - 0.5 * quad


@triton.jit
def _online_logsumexp(running_max, running_sum, best, tile, c0):
    """Fold a (BLOCK_N, BLOCK_C) tile whose first column is component c0 into each row's max,
    its argmax and sum of exp(x - max); safe while every value seen so far is -inf."""
    tile_max, tile_best = tl.max(tile, axis=1, return_indices=True)
    best = tl.where(tile_max > running_max, c0 + tile_best.to(tl.int64), best)
    new_max = tl.maximum(running_max, tile_max)
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    running_sum = running_sum * tl.exp(running_max - shift)
    running_sum += tl.sum(tl.exp(tile - shift[:, None]), axis=1)
    return new_max, running_sum, best


@triton.jit
def _log_add_exp(a, b):
    """log(exp(a) + exp(b)); -inf when both are."""
    high = tl.maximum(a, b)
    low = tl.minimum(a, b)
    return tl.where(high == float("-inf"), high, high + tl.log(1.0 + tl.exp(low - high)))


@triton.jit
def mixture_log_prob_fwd_kernel(
    z_ptr, z_sn, z_sd, center_ptr, means_ptr, inv_var_ptr, mean_scaled_ptr, log_norm_ptr,
    const_ptr, out_ptr, best_ptr, top_ptr,
    N, C, D,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out = log sum_c pi_c N(z_n; m_c, s_c^2) (N,), the dominant component best_n (N,) int64
    and its exact log pi + log N, top (N,), for BLOCK_N rows, over C in BLOCK_C blocks. The
    other components add sum - 1 of the online logsumexp, which holds exp(0) = 1 for best."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    running_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_N], tl.float32)
    best = tl.zeros([BLOCK_N], tl.int64)
    for c0 in range(0, C, BLOCK_C):
        comps = c0 + tl.arange(0, BLOCK_C)
        log_density = _log_density_tile(
            z_ptr, z_sn, z_sd, center_ptr, inv_var_ptr, mean_scaled_ptr, const_ptr,
            rows, comps, N, C, D, BLOCK_N, BLOCK_C, BLOCK_D,
        )  # fmt: skip
        running_max, running_sum, best = _online_logsumexp(
            running_max, running_sum, best, log_density, c0
        )
    top = _top_log_density(
        z_ptr, z_sn, z_sd, means_ptr, inv_var_ptr, log_norm_ptr, rows, best, N, D,
        BLOCK_N, BLOCK_D,
    )  # fmt: skip
    rest_sum = running_sum - 1.0
    log_rest = running_max + tl.log(tl.maximum(rest_sum, 1e-30))
    rest = tl.where(rest_sum > 0.0, log_rest, float("-inf"))
    row_mask = rows < N
    tl.store(out_ptr + rows, _log_add_exp(top, rest), mask=row_mask)
    tl.store(best_ptr + rows, best, mask=row_mask)
    tl.store(top_ptr + rows, top, mask=row_mask)


@triton.jit
def mixture_weights_kernel(
    z_ptr, z_sn, z_sd, center_ptr, inv_var_ptr, mean_scaled_ptr, const_ptr,
    out_ptr, best_ptr, grad_ptr, grad_sn, weights_ptr,
    N, C, D,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """weights_nc = grad_n * exp(log pi_c N(z_n; c) - out_n) (grad times responsibility) for
    a (BLOCK_N, BLOCK_C) tile: (N, C) float32; 0 at c = best_n and where out_n is -inf."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    comps = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    log_density = _log_density_tile(
        z_ptr, z_sn, z_sd, center_ptr, inv_var_ptr, mean_scaled_ptr, const_ptr,
        rows, comps, N, C, D, BLOCK_N, BLOCK_C, BLOCK_D,
    )  # fmt: skip
    row_mask = rows < N
    out = tl.load(out_ptr + rows, mask=row_mask, other=0.0)[:, None]
    best = tl.load(best_ptr + rows, mask=row_mask, other=-1)[:, None]
    grad = tl.load(grad_ptr + rows * grad_sn, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    weights = grad * tl.exp(tl.minimum(log_density - out, 0.0))  # r <= 1, even if inexact
    weights = tl.where((comps[None, :] == best) | (out == float("-inf")), 0.0, weights)
    mask = row_mask[:, None] & (comps < C)[None, :]
    tl.store(weights_ptr + rows[:, None] * C + comps[None, :], weights, mask=mask)


@triton.jit
def mixture_grad_z_kernel(
    weights_ptr, z_ptr, z_sn, z_sd, center_ptr, inv_var_ptr, mean_scaled_ptr, grad_z_ptr,
    N, C, D,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """grad_z = weights @ mean_scaled - z' * (weights @ inv_var) for a (BLOCK_N, BLOCK_D)
    tile, over C in BLOCK_C blocks: (N, D) float32."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    weighted_inv_var = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    weighted_mean_scaled = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        comps = c0 + tl.arange(0, BLOCK_C)
        weights = _weights_tile(weights_ptr, rows, comps, N, C)
        inv_var = _component_tile(inv_var_ptr, comps, cols, C, D)
        mean_scaled = _component_tile(mean_scaled_ptr, comps, cols, C, D)
        weighted_inv_var = tl.dot(weights, inv_var, weighted_inv_var, input_precision="ieee")
        weighted_mean_scaled = tl.dot(
            weights, mean_scaled, weighted_mean_scaled, input_precision="ieee"
        )
    z = _centered_z(z_ptr, z_sn, z_sd, center_ptr, rows, cols, N, D)
    mask = (rows < N)[:, None] & (cols < D)[None, :]
    offs = rows[:, None] * D + cols[None, :]
    tl.store(grad_z_ptr + offs, weighted_mean_scaled - z * weighted_inv_var, mask=mask)


@triton.jit
def mixture_weighted_z_kernel(
    weights_ptr, z_ptr, z_sn, z_sd, center_ptr, weighted_z_ptr, weighted_z_sq_ptr, mass_ptr,
    N, C, D, rows_per_split,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Sums over split s's rows [s * rows_per_split, (s + 1) * rows_per_split), W = weights,
    for a (BLOCK_C, BLOCK_D) tile: W^T @ z' and W^T @ z'^2 into [s] of (splits, C, D), and
    mass = sum_n W into [s] of (splits, C) by the first column block's programs. float32."""
    comps = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(2).to(tl.int64)
    weighted_z = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    weighted_z_sq = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    mass = tl.zeros([BLOCK_C], tl.float32)
    for n0 in range(0, rows_per_split, BLOCK_N):
        rows = split * rows_per_split + n0 + tl.arange(0, BLOCK_N)
        weights = _weights_tile(weights_ptr, rows, comps, N, C)
        z = _centered_z(z_ptr, z_sn, z_sd, center_ptr, rows, cols, N, D)
        weights_t = tl.trans(weights)
        weighted_z = tl.dot(weights_t, z, weighted_z, input_precision="ieee")
        weighted_z_sq = tl.dot(weights_t, z * z, weighted_z_sq, input_precision="ieee")
        mass += tl.sum(weights, axis=0)
    comp_mask = comps < C
    mask = comp_mask[:, None] & (cols < D)[None, :]
    offs = split * C * D + comps[:, None] * D + cols[None, :]
    tl.store(weighted_z_ptr + offs, weighted_z, mask=mask)
    tl.store(weighted_z_sq_ptr + offs, weighted_z_sq, mask=mask)
    if tl.program_id(1) == 0:
        tl.store(mass_ptr + split * C + comps, mass, mask=comp_mask)
