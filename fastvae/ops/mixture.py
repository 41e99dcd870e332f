"""Mixture-of-Gaussians prior: mixture_log_prob (formulas: docs/math.md).

One op (fastvae.ops._library) runs the Triton kernels in fastvae.kernels.mixture (CUDA, or the
interpreter) or the torch math in fastvae.reference; both compute every (row, component)
log-density directly from z - m, in blocks, never an N x C x D tensor. See mixture_log_prob.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import wrap_triton

from fastvae import _validate as V
from fastvae import reference
from fastvae._backend import interpreting, use_triton
from fastvae.ops._launch import _next_power_of_2, mixture_kernels
from fastvae.ops._library import empty_grads, fused_op, reduced_grads, register_autograd

_REDUCTION_PROGRAMS = 512  # a few waves of a large GPU; the partial sums are (splits, C, D)

# (BLOCK_N, BLOCK_C, BLOCK_D, num_warps) per kernel on a GPU: 72-87 registers on sm_90a,
# no spills. "logits" serves the forward and mixture_a_kernel alike, so that both compute the
# same logits (responsibilities exp(logit - out) of the forward's out).
_GPU_BLOCKS = {
    "logits": (16, 32, 8, 4),
    "grad_z": (16, 32, 8, 4),
    "sums": (16, 32, 8, 4),
}


def _blocks(kernel: str, N: int, C: int, D: int) -> dict:
    """Tile sizes of a kernel: the fixed _GPU_BLOCKS (BLOCK_D no wider than D needs) on a GPU;
    in the interpreter, whose cost is per program and per op, tiles of up to 64^3 elements."""
    if interpreting():
        block_n, block_c, block_d, warps = 64, 64, 64, 4
    else:
        block_n, block_c, block_d, warps = _GPU_BLOCKS[kernel]
    return {
        "BLOCK_N": min(block_n, _next_power_of_2(N)),
        "BLOCK_C": min(block_c, _next_power_of_2(C)),
        "BLOCK_D": min(block_d, _next_power_of_2(D)),
        "num_warps": warps,
    }


def _cdiv(n: int, block: int) -> int:
    return (n + block - 1) // block


def _rows_per_split(N: int, block_n: int, tiles: int) -> int:
    """Rows each program of the components' sums covers: a multiple of block_n, so that the
    (C, D) tiles times the row splits make about _REDUCTION_PROGRAMS programs."""
    n_blocks = _cdiv(N, block_n)
    splits = min(n_blocks, max(1, _REDUCTION_PROGRAMS // tiles))
    return _cdiv(n_blocks, splits) * block_n


def _pair_args(z, components) -> tuple:
    """Kernel arguments that read every pair: z, its (row, column) strides, means, inv_var."""
    return z, z.stride(0), z.stride(1), components.means, components.inv_var


def _triton_forward(z, components):
    """out (N,) float32 of reference.mixture_log_prob_forward."""
    (N, D), C = z.shape, components.const.shape[0]
    out = torch.empty(N, dtype=torch.float32, device=z.device)
    blocks = _blocks("logits", N, C, D)
    wrap_triton(mixture_kernels().mixture_log_prob_fwd_kernel)[(_cdiv(N, blocks["BLOCK_N"]),)](
        *_pair_args(z, components), components.const, out, N, C, D, **blocks
    )
    return out


def _triton_a(grad, z, components, out):
    """a_nc = grad_n r_nc (N, C) float32."""
    (N, D), C = z.shape, components.const.shape[0]
    a = torch.empty((N, C), dtype=torch.float32, device=z.device)
    blocks = _blocks("logits", N, C, D)
    grid = (_cdiv(N, blocks["BLOCK_N"]), _cdiv(C, blocks["BLOCK_C"]))
    wrap_triton(mixture_kernels().mixture_a_kernel)[grid](
        *_pair_args(z, components), components.const, out, grad, grad.stride(0), a,
        N, C, D, **blocks,
    )  # fmt: skip
    return a


def _triton_grad_z(a, z, components):
    """grad_z_n = -sum_c a_nc (z_n - m_c) / s_c^2: (N, D) float32."""
    (N, D), C = z.shape, a.shape[1]
    grad_z = torch.empty((N, D), dtype=torch.float32, device=z.device)
    blocks = _blocks("grad_z", N, C, D)
    grid = (_cdiv(N, blocks["BLOCK_N"]), _cdiv(D, blocks["BLOCK_D"]))
    wrap_triton(mixture_kernels().mixture_grad_z_kernel)[grid](
        a, *_pair_args(z, components), grad_z, N, C, D, **blocks
    )
    return grad_z


def _triton_component_sums(a, z, components):
    """(grad_means, spread) (C, D) float32 from the kernel's sums over row splits."""
    (N, D), C = z.shape, a.shape[1]
    blocks = _blocks("sums", N, C, D)
    tiles = (_cdiv(C, blocks["BLOCK_C"]), _cdiv(D, blocks["BLOCK_D"]))
    rows_per_split = _rows_per_split(N, blocks["BLOCK_N"], tiles[0] * tiles[1])
    splits = _cdiv(N, rows_per_split)
    grad_means, spread = (
        torch.empty((splits, C, D), dtype=torch.float32, device=z.device) for _ in range(2)
    )
    wrap_triton(mixture_kernels().mixture_component_sums_kernel)[(*tiles, splits)](
        a, *_pair_args(z, components), grad_means, spread, N, C, D, rows_per_split, **blocks
    )
    return grad_means.sum(0), spread.sum(0)


def _triton_backward(grad, z, components, out, log_weights, needs):
    """Gradients for (z, means, logvars, log_weights), float32, None where not needed. Keeps
    the (N, C) float32 a = grad * r: the components' gradients need it whole."""
    a = _triton_a(grad, z, components, out)
    grad_z = _triton_grad_z(a, z, components) if needs[0] else None
    grad_means = grad_logvars = log_weights_grad = None
    if needs[1] or needs[2]:
        grad_means, spread = _triton_component_sums(a, z, components)
    if needs[2] or needs[3]:
        mass = a.sum(0)
        if needs[2]:
            grad_logvars = reference.mixture_logvars_grad(spread, mass)
        if needs[3]:
            log_weights_grad = reference.mixture_log_weights_grad(mass, log_weights)
    return grad_z, grad_means, grad_logvars, log_weights_grad


def _rows(z):
    """z (..., D) as (N, D) rows, a view where strides allow."""
    return z.reshape(z.shape[:-1].numel(), z.shape[-1])


def _triton_mixture_log_prob(
    z: Tensor, means: Tensor, logvars: Tensor, log_weights: Tensor | None
) -> Tensor:
    """The mixture_log_prob op's schema and Triton implementation -> (...) float32."""
    components = reference.MixtureComponents(means, logvars, log_weights, torch.float32)
    return _triton_forward(_rows(z), components).reshape(z.shape[:-1])


def _triton_mixture_log_prob_backward(
    grad: Tensor,
    z: Tensor,
    means: Tensor,
    logvars: Tensor,
    log_weights: Tensor | None,
    out: Tensor,
    needs: list[bool],
) -> list[Tensor]:
    """The backward op's schema and Triton implementation -> the gradients of (z, means,
    logvars, log_weights), by reduced_grads."""
    components = reference.MixtureComponents(means, logvars, log_weights, torch.float32)
    grads = _triton_backward(grad.reshape(-1), _rows(z), components, out.reshape(-1),
                             log_weights, needs)  # fmt: skip
    return _reduced(grads, z, means, logvars, log_weights, needs)


def _reference_mixture_log_prob(z, means, logvars, log_weights):
    return reference.mixture_log_prob_forward(_rows(z), means, logvars, log_weights).reshape(
        z.shape[:-1]
    )


def _reference_mixture_log_prob_backward(grad, z, means, logvars, log_weights, out, needs):
    grads = reference.mixture_log_prob_backward(
        grad.reshape(-1), _rows(z), means, logvars, log_weights, out.reshape(-1), needs
    )
    return _reduced(grads, z, means, logvars, log_weights, needs)


def _reduced(grads, z, means, logvars, log_weights, needs):
    grad_z = None if grads[0] is None else grads[0].reshape(z.shape)
    return reduced_grads((grad_z, *grads[1:]), (z, means, logvars, log_weights), needs)


def _fake_mixture_log_prob(z, means, logvars, log_weights):
    dtype = reference.mixture_dtype(z, means, logvars, log_weights)
    return z.new_empty(z.shape[:-1], dtype=dtype)


def _fake_mixture_log_prob_backward(grad, z, means, logvars, log_weights, out, needs):
    return empty_grads((z, means, logvars, log_weights), needs)


_MIXTURE_LOG_PROB = fused_op(
    "mixture_log_prob", reference=_reference_mixture_log_prob,
    triton=_triton_mixture_log_prob, fake=_fake_mixture_log_prob,
)  # fmt: skip
_MIXTURE_LOG_PROB_BACKWARD = fused_op(
    "mixture_log_prob_backward", reference=_reference_mixture_log_prob_backward,
    triton=_triton_mixture_log_prob_backward, fake=_fake_mixture_log_prob_backward,
)  # fmt: skip


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output)


def _backward(ctx, grad):
    if grad is None:
        return None, None, None, None
    needs = list(ctx.needs_input_grad)
    grads = _MIXTURE_LOG_PROB_BACKWARD(ctx.triton, grad, *ctx.saved_tensors, needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


register_autograd(_MIXTURE_LOG_PROB, _setup, _backward)


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

    Precision: every (row, component) log-density is computed directly from z - means_c, as
    the naive formula is, not by expanded matrix products in float32 (which cancel for tight
    components away from the origin), so outputs and gradients match a float32 naive
    evaluation at any scale and logvars. On the CPU the torch path uses the expanded products
    in float64 wherever their error bound is a quarter of float32's rounding (docs/math.md).
    Range: a z with an infinite element has density 0: out -inf and no gradient. So, in
    float32, does a z whose sum_d (z_d - m_cd)^2 / s_cd^2 overflows (> 3.4e38) for every
    component.
    Memory: never N x C x D. The Triton backward keeps an (N, C) float32 matrix (128 MB for
    N = 64k, C = 512); the torch path works in blocks of about 2^19 (row, component, dim)
    elements, 2^22 under torch.compile.
    """
    named = {"z": z, "means": means, "logvars": logvars, "log_weights": log_weights}
    for name, value in named.items():
        if value is not None or name != "log_weights":
            V.check_tensor(name, value)
    V.check_same_device(named)
    _check_shapes(z, means, logvars, log_weights)
    dtype = reference.mixture_dtype(z, means, logvars, log_weights)
    triton = use_triton(z.device, dtype) and z.numel() > 0
    return _MIXTURE_LOG_PROB(triton, z, means, logvars, log_weights)
