"""Mixture-of-Gaussians prior: mixture_log_prob (math.md, "Mixture (adaptive) priors").

One autograd.Function runs the Triton kernels in fastvae.kernels.mixture (CUDA, or the
interpreter) or the torch math in fastvae.reference; both compute the same way: every
(row, component) log-density by the matrix-product form, no N x C x D tensor, then each row's
dominant component directly. See mixture_log_prob for precision and memory.
"""

from __future__ import annotations

import torch

from fastvae import _validate as V
from fastvae import reference
from fastvae._backend import interpreting, use_triton
from fastvae.ops._launch import _next_power_of_2, mixture_kernels

_REDUCTION_PROGRAMS = 512  # a few waves of a large GPU; the partial sums are (splits, C, D)


def _blocks(N: int, C: int, D: int) -> dict:
    """Tile sizes: tl.dot needs every block dim >= 16; larger tiles in the interpreter, whose
    cost is per program."""
    cap = 128 if interpreting() else 64

    def size(n: int, most: int) -> int:
        return min(most, max(16, _next_power_of_2(n)))

    return {
        "BLOCK_N": size(N, cap),
        "BLOCK_C": size(C, cap),
        "BLOCK_D": size(D, cap // 2),
        "num_warps": 4,
    }


def _cdiv(n: int, block: int) -> int:
    return (n + block - 1) // block


def _rows_per_split(N: int, block_n: int, tiles: int) -> int:
    """Rows each program of the components' reduction sums over: a multiple of block_n, so
    that the (C, D) tiles times the row splits make about _REDUCTION_PROGRAMS programs."""
    n_blocks = _cdiv(N, block_n)
    splits = min(n_blocks, max(1, _REDUCTION_PROGRAMS // tiles))
    return _cdiv(n_blocks, splits) * block_n


def _z_args(z, components) -> tuple:
    """Kernel arguments that read z - center: (z, row stride, column stride, center)."""
    return z, z.stride(0), z.stride(1), components.center


def _products(components) -> tuple:
    return components.inv_var, components.mean_scaled


def _triton_forward(z, components):
    """(out, best, top) of reference.mixture_log_prob_forward: (N,) float32, int64, float32."""
    (N, D), C = z.shape, components.const.shape[0]
    out = torch.empty(N, dtype=torch.float32, device=z.device)
    best = torch.empty(N, dtype=torch.int64, device=z.device)
    top = torch.empty_like(out)
    blocks = _blocks(N, C, D)
    mixture_kernels().mixture_log_prob_fwd_kernel[(_cdiv(N, blocks["BLOCK_N"]),)](
        *_z_args(z, components), components.means, *_products(components),
        components.log_norm, components.const, out, best, top, N, C, D, **blocks,
    )  # fmt: skip
    return out, best, top


def _triton_weights(grad, z, components, out, best, blocks):
    """grad_n * r_nc (N, C) float32, 0 at each row's dominant component."""
    (N, D), C = z.shape, components.const.shape[0]
    weights = torch.empty((N, C), dtype=torch.float32, device=z.device)
    grid = (_cdiv(N, blocks["BLOCK_N"]), _cdiv(C, blocks["BLOCK_C"]))
    mixture_kernels().mixture_weights_kernel[grid](
        *_z_args(z, components), *_products(components), components.const, out, best,
        grad, grad.stride(0), weights, N, C, D, **blocks,
    )  # fmt: skip
    return weights


def _triton_grad_z(weights, z, components, blocks):
    (N, D), C = z.shape, weights.shape[1]
    grad_z = torch.empty((N, D), dtype=torch.float32, device=z.device)
    grid = (_cdiv(N, blocks["BLOCK_N"]), _cdiv(D, blocks["BLOCK_D"]))
    mixture_kernels().mixture_grad_z_kernel[grid](
        weights, *_z_args(z, components), *_products(components), grad_z, N, C, D, **blocks
    )
    return grad_z


def _triton_component_grads(weights, z, components, blocks):
    """(grad_means, grad_logvars, mass) from the kernel's sums over row splits."""
    (N, D), C = z.shape, weights.shape[1]
    tiles = (_cdiv(C, blocks["BLOCK_C"]), _cdiv(D, blocks["BLOCK_D"]))
    rows_per_split = _rows_per_split(N, blocks["BLOCK_N"], tiles[0] * tiles[1])
    splits = _cdiv(N, rows_per_split)
    weighted_z, weighted_z_sq = (
        torch.empty((splits, C, D), dtype=torch.float32, device=z.device) for _ in range(2)
    )
    mass = torch.empty((splits, C), dtype=torch.float32, device=z.device)
    mixture_kernels().mixture_weighted_z_kernel[(*tiles, splits)](
        weights, *_z_args(z, components), weighted_z, weighted_z_sq, mass,
        N, C, D, rows_per_split, **blocks,
    )  # fmt: skip
    mass = mass.sum(0)
    grads = reference.mixture_component_grads(
        weighted_z.sum(0), weighted_z_sq.sum(0), mass, components
    )
    return (*grads, mass)


def _triton_backward(grad, z, components, saved, log_weights, needs):
    """Gradients for (z, means, logvars, log_weights), float32. The kernels cover every pair
    but the dominant ones, which reference.mixture_add_top_grads adds. Keeps the (N, C)
    float32 weights grad_n * r_nc: the components' gradients need them whole."""
    out, best, top = saved
    (N, D), C = z.shape, components.const.shape[0]
    blocks = _blocks(N, C, D)
    weights = _triton_weights(grad, z, components, out, best, blocks)
    grad_z = _triton_grad_z(weights, z, components, blocks) if needs[0] else None
    grad_means = grad_logvars = mass = None
    if any(needs[1:]):
        grad_means, grad_logvars, mass = _triton_component_grads(weights, z, components, blocks)
    grads = (grad_z, grad_means, grad_logvars, mass)
    reference.mixture_add_top_grads(grads, grad, out, top, z, components, best)
    log_weights_grad = None
    if needs[3]:
        log_weights_grad = reference.mixture_log_weights_grad(mass, grad, log_weights)
    return grad_z, grad_means, grad_logvars, log_weights_grad


def _rows(z):
    """z (..., D) as (N, D) rows, a view where strides allow."""
    return z.reshape(z.shape[:-1].numel(), z.shape[-1])


class _MixtureLogProb(torch.autograd.Function):
    """(z (..., D), means (C, D), logvars (C, D), log_weights (C,) or None) -> (...)."""

    @staticmethod
    def forward(ctx, z, means, logvars, log_weights):
        dtype = reference.mixture_dtype(z, means, logvars, log_weights)
        ctx.triton = use_triton(z.device, dtype) and z.numel() > 0
        rows = _rows(z)
        if ctx.triton:
            components = reference.MixtureComponents(means, logvars, log_weights, torch.float32)
            out, best, top = _triton_forward(rows, components)
        else:
            out, best, top = reference.mixture_log_prob_forward(rows, means, logvars, log_weights)
        ctx.save_for_backward(z, means, logvars, log_weights, out, best, top)
        return out.reshape(z.shape[:-1])

    @staticmethod
    def backward(ctx, grad):
        z, means, logvars, log_weights, *saved = ctx.saved_tensors
        needs = ctx.needs_input_grad
        rows, grad = _rows(z), grad.reshape(-1)
        if ctx.triton:
            components = reference.MixtureComponents(means, logvars, log_weights, torch.float32)
            grads = _triton_backward(grad, rows, components, saved, log_weights, needs)
        else:
            grads = reference.mixture_log_prob_backward(
                grad, rows, means, logvars, log_weights, *saved
            )
        grad_z = None if grads[0] is None else grads[0].reshape(z.shape)
        inputs = (z, means, logvars, log_weights)
        return tuple(
            g.to(t.dtype) if need else None
            for g, t, need in zip((grad_z, *grads[1:]), inputs, needs)
        )


def _check_shapes(z, means, logvars, log_weights):
    D = z.shape[-1]
    if means.dim() != 2 or means.shape[1] != D:
        raise ValueError(
            f"means must have shape (C, D) with D = z.shape[-1] = {D}; got {tuple(means.shape)}"
        )
    if means.shape[0] == 0:
        raise ValueError("means must have at least one component (C >= 1); got C = 0")
    V.check_exact_shape("logvars", logvars, means.shape, "means")
    C = means.shape[0]
    if log_weights is not None and log_weights.shape != (C,):
        raise ValueError(
            f"log_weights must have shape (C,) = ({C},), one per component; "
            f"got {tuple(log_weights.shape)}"
        )


def mixture_log_prob(z, means, logvars, log_weights=None):
    """log sum_c pi_c N(z; means_c, diag exp(logvars_c)), pi = softmax(log_weights).

    z: (..., D); means, logvars: (C, D); log_weights: (C,) unnormalized, None for pi = 1/C.
    Returns (...), float32 (float64 for float64 inputs, on the torch path). Differentiable in
    all four.

    Precision: the quadratic term sum_d (z_d - m_cd)^2 / s_cd^2 is expanded into matrix
    products (z and the means shifted by c, the per-dim median of the means), which cancels:
    a component's log-density is off by about 2^-24 * sum_d ((z_d - c_d)^2 + (m_cd - c_d)^2)
    / s_cd^2 (float32; products in IEEE float32 on Triton, never TF32; the torch path follows
    torch's matmul precision settings). So each row's dominant component is recomputed
    directly, as the naive formula does, and outputs and gradients match a float32 naive
    evaluation even with logvars near -10. The error stays only where a second component
    with small s, far from c, holds much of a row's mass (two tight components overlapping).
    Memory: the backward keeps an (N, C) float32 matrix (128 MB for N = 64k, C = 512), as
    does the torch path's forward; never N x C x D.
    """
    named = {"z": z, "means": means, "logvars": logvars, "log_weights": log_weights}
    for name, value in named.items():
        if value is not None or name != "log_weights":
            V.check_tensor(name, value)
    V.check_same_device(named)
    _check_shapes(z, means, logvars, log_weights)
    return _MixtureLogProb.apply(z, means, logvars, log_weights)
