"""Full-covariance Gaussian posterior: reparameterize_kl_tril.

One op (fastvae.ops._library: a torch.library operator pair with registered autograd) whose
forward and backward launch the Triton kernels in fastvae.kernels.tril (CUDA, or the
interpreter) or the torch math in fastvae.reference. On both paths the noise is drawn from a
seed and regenerated in backward: nothing of z's size is stored.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import wrap_triton

from fastvae import _validate as V
from fastvae import reference
from fastvae._backend import use_triton
from fastvae.kernels.modes import ROW_NONE
from fastvae.ops._launch import operand_args, row_layout, tril_kernels, tril_tile
from fastvae.ops._library import empty_grads, fused_op, reduced_grads, register_autograd
from fastvae.ops.gaussian import SampleSpec, _torch_eps, draw_seed, noise_in_graph


def _z_dtype(mu: Tensor, scale_tril: Tensor) -> torch.dtype:
    return torch.promote_types(mu.dtype, scale_tril.dtype)


def _blocks(D: int, block: int) -> int:
    return (D + block - 1) // block


def _triton_tril(
    mu: Tensor, scale_tril: Tensor, eps: Tensor | None, seed: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The op's schema and Triton implementation -> (z, kl). A program per (row, block of
    BLOCK_I dims); with several blocks a row, each writes its part of the KL, summed here."""
    layout = row_layout(mu.shape, [mu, eps], matrices=[scale_tril])
    mu_op, eps_op, tril_op = layout.operands
    blocks = tril_tile(layout.D)
    n_blocks = _blocks(layout.D, blocks["BLOCK_I"])
    z = torch.empty(mu.shape, dtype=_z_dtype(mu, scale_tril), device=mu.device)
    kl_shape = mu.shape[:-1] if n_blocks == 1 else (*mu.shape[:-1], n_blocks)
    kl = torch.empty(kl_shape, dtype=torch.float32, device=mu.device)
    wrap_triton(tril_kernels().tril_fwd_kernel)[(layout.n_rows, n_blocks)](
        *operand_args(mu_op, mu), *operand_args(eps_op, mu),
        *operand_args(tril_op, mu), tril_op.tensor.stride(-1),
        mu if seed is None else seed, z, kl, layout.R2, layout.D,
        HAS_EPS=eps is not None, **blocks,
    )  # fmt: skip
    return z, kl if n_blocks == 1 else kl.sum(-1)


def _reference_eps(eps, seed, mu, dtype) -> Tensor:
    """The given eps, or the torch path's noise of z's shape regenerated from the seed."""
    if eps is not None:
        return eps
    spec = SampleSpec(mu.shape, None, True, ROW_NONE, 0.0, 0, dtype)
    return _torch_eps(seed, spec, mu.device, reference.opmath_dtype(dtype))


def _reference_tril(mu, scale_tril, eps, seed):
    dtype = _z_dtype(mu, scale_tril)
    z, kl = reference.tril_sample_kl_forward(mu, scale_tril, _reference_eps(eps, seed, mu, dtype))
    return z.to(dtype), kl


def _fake_tril(mu, scale_tril, eps, seed):
    dtype = _z_dtype(mu, scale_tril)
    return (
        torch.empty(mu.shape, dtype=dtype, device=mu.device),
        torch.empty(mu.shape[:-1], dtype=reference.opmath_dtype(dtype), device=mu.device),
    )


def _triton_tril_backward(
    grad_z: Tensor | None,
    grad_kl: Tensor | None,
    mu: Tensor,
    scale_tril: Tensor,
    eps: Tensor | None,
    seed: Tensor | None,
    needs: list[bool],
) -> list[Tensor]:
    """The backward op's schema and Triton implementation -> the gradients of (mu,
    scale_tril, eps), by reduced_grads. A program per (row, block of BLOCK_K columns)."""
    inputs = (mu, scale_tril, eps)
    kl_grad = None if grad_kl is None else grad_kl.unsqueeze(-1)
    layout = row_layout(mu.shape, [mu, eps, grad_z, kl_grad], matrices=[scale_tril])
    mu_op, eps_op, gz_op, gkl_op, tril_op = layout.operands
    wanted = (needs[0], needs[1], needs[2] and grad_z is not None)
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) if want else None
             for t, want in zip(inputs, wanted)]  # fmt: skip
    blocks = tril_tile(layout.D)
    programs = (layout.n_rows, _blocks(layout.D, blocks["BLOCK_K"]))
    wrap_triton(tril_kernels().tril_bwd_kernel)[programs](
        *operand_args(mu_op, mu), *operand_args(eps_op, mu), *operand_args(gz_op, mu),
        *operand_args(gkl_op, mu)[:3], *operand_args(tril_op, mu), tril_op.tensor.stride(-1),
        mu if seed is None else seed, *(mu if g is None else g for g in grads),
        layout.R2, layout.D,
        HAS_GZ=grad_z is not None, HAS_GKL=grad_kl is not None, HAS_EPS=eps is not None,
        WANT_GMU=wanted[0], WANT_GL=wanted[1], WANT_GEPS=wanted[2], **blocks,
    )  # fmt: skip
    return reduced_grads(grads, inputs, needs)


def _reference_tril_backward(grad_z, grad_kl, mu, scale_tril, eps, seed, needs):
    used_eps = None
    if grad_z is not None and needs[1]:
        used_eps = _reference_eps(eps, seed, mu, _z_dtype(mu, scale_tril))
    grads = reference.tril_sample_kl_backward(grad_z, grad_kl, mu, scale_tril, used_eps, needs)
    return reduced_grads(grads, (mu, scale_tril, eps), needs)


def _fake_tril_backward(grad_z, grad_kl, mu, scale_tril, eps, seed, needs):
    return empty_grads((mu, scale_tril, eps), needs)


def _traced_tril_args(mu, scale_tril, eps, seed):
    """Under a trace, on the torch path: noise to draw becomes eps drawn in the graph by
    noise_in_graph (as the diagonal sample op's; manual_seed reproduces a compiled run)."""
    if eps is None:
        dtype = reference.opmath_dtype(_z_dtype(mu, scale_tril))
        eps, seed = noise_in_graph(mu.shape, dtype, mu.device), None
    return mu, scale_tril, eps, seed


_TRIL = fused_op("sample_tril", reference=_reference_tril, triton=_triton_tril,
                 fake=_fake_tril, traced_args=_traced_tril_args)  # fmt: skip
_TRIL_BACKWARD = fused_op("sample_tril_backward", reference=_reference_tril_backward,
                          triton=_triton_tril_backward, fake=_fake_tril_backward)  # fmt: skip


def _setup_tril(ctx, inputs, output):
    """Saves the inputs and the seed: never z nor the noise, which backward regenerates."""
    ctx.save_for_backward(*inputs)


def _tril_backward(ctx, grad_z, grad_kl):
    if grad_z is None and grad_kl is None:
        return None, None, None, None
    mu, scale_tril, eps, seed = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])
    grads = _TRIL_BACKWARD(ctx.triton, grad_z, grad_kl, mu, scale_tril, eps, seed, needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None)


register_autograd(_TRIL, _setup_tril, _tril_backward)


def reparameterize_kl_tril(mu, scale_tril, *, eps=None, generator=None):
    """(z, kl) of a full-covariance Gaussian posterior N(mu, L L^T) against N(0, I).

    mu: (..., D). scale_tril: (..., D, D); L is its lower triangle (the upper one is ignored
    and gets a zero gradient). eps: optional, (..., D). Returns z = mu + L eps (..., D) in
    the inputs' dtype and kl = (|mu|^2 + |L|_F^2 - D - 2 sum_d log|L_dd|) / 2 (...), float32
    (float64 for float64 inputs): a zero on L's diagonal gives an infinite KL. Without eps
    the noise comes from a seed drawn from `generator` (or torch's default generator of the
    device) and is regenerated in backward, never stored.
    """
    named = {"mu": mu, "scale_tril": scale_tril, "eps": eps}
    for name, value in named.items():
        if value is not None or name != "eps":
            V.check_tensor(name, value)
    device = V.check_same_device(named)
    expected = (*mu.shape, mu.shape[-1])
    if scale_tril.shape != expected:
        raise ValueError(
            f"scale_tril must have shape (..., D, D) = {expected} to match mu of shape "
            f"{tuple(mu.shape)}; got {tuple(scale_tril.shape)}"
        )
    V.check_exact_shape("eps", eps, mu.shape, "z")
    if generator is not None:
        V.check_generator(generator, device)
        if eps is not None:
            raise ValueError("pass either eps or generator, not both: eps fixes the noise")
    triton = use_triton(device, _z_dtype(mu, scale_tril)) and mu.numel() > 0
    seed = draw_seed(generator, device) if eps is None else None
    return _TRIL(triton, mu, scale_tril, eps, seed)
