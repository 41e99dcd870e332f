"""log_mean_exp: log((1/K) sum_k exp(x_k)) along one dim, e.g. the IWAE bound from K log-weights.

One op (fastvae.ops._library) whose forward and backward launch the Triton kernels in
fastvae.kernels.logmeanexp (CUDA, or the interpreter) or the torch math in fastvae.reference.
The kernels read x in place as rows of K values: x.movedim(dim, -1) is a free view whose
(..., K) layout row_layout reads like any other operand, with the reduced dim as the column axis.
The output is float32 (float64 for float64 inputs); only it is saved for backward, not the
softmax.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor
from torch.library import wrap_triton

from fastvae import _validate as V
from fastvae import reference
from fastvae._backend import use_triton
from fastvae.ops._cpu_loops import CpuLoop
from fastvae.ops._launch import (
    Layout,
    Operand,
    grid,
    logmeanexp_kernels,
    operand_args,
    row_layout,
    tile,
)
from fastvae.ops._library import fused_op, in_layout, register_autograd


def _grad_operand(x_op: Operand, layout: Layout) -> Operand:
    """Where backward writes x's gradient, as rows like x_op: with x's own strides when x is
    dense (empty_like keeps them exactly then), else contiguous (..., K)."""
    x_rows = x_op.tensor
    grad = torch.empty_like(x_rows)
    if grad.stride() == x_rows.stride():
        return Operand(grad, x_op.s1, x_op.s2, x_op.sd)
    K = layout.D
    grad = torch.empty_like(x_rows, memory_format=torch.contiguous_format)
    return Operand(grad, layout.R2 * K, K, 1)


def _launch(kernel, layout: Layout, *args) -> None:
    """Run `kernel` over layout's rows of K = layout.D values, BLOCK_K of them at a time."""
    blocks = tile(layout.n_rows, layout.D)
    blocks["BLOCK_K"] = blocks.pop("BLOCK_D")
    wrap_triton(kernel)[grid(layout.n_rows, blocks["BLOCK_R"])](
        *args, layout.n_rows, layout.R2, layout.D, math.log(layout.D), **blocks
    )


def _triton_log_mean_exp(x: Tensor, dim: int) -> Tensor:
    """The log_mean_exp op's schema and Triton implementation."""
    rows = x.movedim(dim, -1)
    layout = row_layout(rows.shape, [rows])
    out = torch.empty(rows.shape[:-1], dtype=torch.float32, device=x.device)
    _launch(
        logmeanexp_kernels().log_mean_exp_fwd_kernel, layout,
        *operand_args(layout.operands[0], x), out,
    )  # fmt: skip
    return out


def _triton_log_mean_exp_backward(grad: Tensor, x: Tensor, out: Tensor, dim: int) -> Tensor:
    """The backward op's schema and Triton implementation -> x's gradient, laid out as
    torch.empty_like(x) (x's strides where x is dense)."""
    rows = x.movedim(dim, -1)
    layout = row_layout(rows.shape, [rows, grad.unsqueeze(-1)])
    x_op, g_op = layout.operands
    gx_op = _grad_operand(x_op, layout)
    _launch(
        logmeanexp_kernels().log_mean_exp_bwd_kernel, layout,
        *operand_args(x_op, x), *operand_args(g_op, x)[:3], *gx_op, out,
    )  # fmt: skip
    return in_layout(gx_op.tensor.movedim(-1, dim), torch.empty_like(x))


def _loop_log_mean_exp(x, dim: int, log_k: float):
    """log sum exp - log K along dim (inductor's logsumexp: a max and a sum of exps)."""
    return torch.logsumexp(x.to(torch.float32), dim) - log_k


def _loop_log_mean_exp_grad(x, out, grad, dim: int, log_k: float):
    """g exp(x - (out + log K)), 0 along dim where out is -inf (all of x -inf), in x's dtype."""
    log_sum_exp = (out + log_k).unsqueeze(dim)
    log_sum_exp = torch.where(log_sum_exp == -math.inf, math.inf, log_sum_exp)
    slope = torch.exp(x.to(torch.float32) - log_sum_exp)
    return (grad.to(torch.float32).unsqueeze(dim) * slope).to(x.dtype)


LOOP_ELEMENTS = 1 << 18  # from here the CPU loops' speed pays for their fixed cost
_FORWARD_LOOP = CpuLoop(_loop_log_mean_exp, LOOP_ELEMENTS, on_grid=False)
_GRAD_LOOP = CpuLoop(_loop_log_mean_exp_grad, LOOP_ELEMENTS, on_grid=False, gradients=True)


def _reference_log_mean_exp(x, dim):
    out = _FORWARD_LOOP(x.shape, [x], dim, math.log(x.shape[dim]))
    return reference.log_mean_exp_forward(x, dim) if out is None else out


def _reference_log_mean_exp_backward(grad, x, out, dim):
    grad_x = _GRAD_LOOP(x.shape, [x, out, grad], dim, math.log(x.shape[dim]))
    if grad_x is None:
        return reference.log_mean_exp_backward(grad, x, out, dim).to(x.dtype)
    return in_layout(grad_x, torch.empty_like(x))  # (the loop's is contiguous)


def _fake_log_mean_exp(x, dim):
    shape = x.shape[:dim] + x.shape[dim + 1 :]
    return x.new_empty(shape, dtype=reference.opmath_dtype(x.dtype))


def _fake_log_mean_exp_backward(grad, x, out, dim):
    return torch.empty_like(x)


# Up to this many elements of a CPU x with no -inf the torch path runs as torch.logsumexp
# under autograd: cheaper there than the op's autograd.Function, whose backward is needed
# only for a row of all -inf (gradient 0, where torch's is NaN).
AUTOGRAD_ELEMENTS = 1 << 14


def _autograd(x, dim) -> bool:
    """Whether autograd differentiates the torch path: not where the CPU loops run, nor for
    an x with a -inf (NaN also sends x to the Function)."""
    return (
        0 < x.numel() <= AUTOGRAD_ELEMENTS
        and not _FORWARD_LOOP.applies(x.shape, [x])
        and x.device.type == "cpu"
        and x.amin().item() > -math.inf
    )


_LOG_MEAN_EXP = fused_op("log_mean_exp", reference=_reference_log_mean_exp,
                         triton=_triton_log_mean_exp, fake=_fake_log_mean_exp,
                         plain_autograd=_autograd)  # fmt: skip
_LOG_MEAN_EXP_BACKWARD = fused_op(
    "log_mean_exp_backward", reference=_reference_log_mean_exp_backward,
    triton=_triton_log_mean_exp_backward, fake=_fake_log_mean_exp_backward,
)  # fmt: skip


def _setup(ctx, inputs, output):
    x, ctx.dim = inputs
    ctx.save_for_backward(x, output)


def _backward(ctx, grad):
    if grad is None:
        return None, None
    x, out = ctx.saved_tensors
    return _LOG_MEAN_EXP_BACKWARD(ctx.triton, grad, x, out, ctx.dim), None


register_autograd(_LOG_MEAN_EXP, _setup, _backward)


def _check_dim(dim: object, x: torch.Tensor) -> int:
    """`dim` as a non-negative index of a non-empty dim of x."""
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"dim must be in [{-x.dim()}, {x.dim() - 1}] for x of shape {tuple(x.shape)}, got {dim}"
        )
    if x.shape[dim] == 0:
        raise ValueError(
            f"dim {dim} of x is empty (shape {tuple(x.shape)}): the log of the mean of no "
            "values is undefined"
        )
    return int(dim) % x.dim()


def log_mean_exp(x, dim=0):
    """log((1/K) sum_k exp(x_k)) along `dim`, computed stably (K = x.shape[dim]).

    x: (..., K, ...), any float dtype and strides. Returns x's shape without `dim`, float32
    (float64 for float64 x). The gradient is softmax(x, dim) times the incoming one; where all
    K values are -inf the output is -inf and the gradient 0 (not NaN). For IWAE:
    log_mean_exp(log_w, dim=0) with log_w of shape (K, B) is the bound L_K, shape (B,).
    """
    V.check_tensor("x", x)
    V.check_same_device({"x": x})
    dim = _check_dim(dim, x)
    triton = use_triton(x.device, x.dtype) and x.numel() > 0  # K >= 1: out not empty
    return _LOG_MEAN_EXP(triton, x, dim)
