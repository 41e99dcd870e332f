"""bernoulli_log_prob: the log-likelihood of data under independent Bernoulli logits.

One op (fastvae.ops._library) whose forward and backward launch the Triton kernels in
fastvae.kernels.bernoulli (CUDA, or the interpreter) or the torch math in fastvae.reference.
x is read in place in its own dtype (float, bool or uint8) and broadcast without a copy, e.g.
one binarized image batch (B, D) against K samples of logits (K, B, D). Formulas:
docs/math.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastvae import _validate as V
from fastvae import reference
from fastvae._backend import use_triton
from fastvae.ops import _cpu_loops
from fastvae.ops._launch import grad_buffer, kernel_module, launch_rows, row_layout
from fastvae.ops._library import empty_grads, fused_op, reduced_grads, register_autograd

X_DTYPES = (torch.bool, torch.uint8)  # besides the floating-point ones


def _fake(x, logits):
    shape = V.broadcast_shapes(x.shape, logits.shape)
    return logits.new_empty(shape[:-1], dtype=reference.likelihood_dtype(x, logits))


def _kernels():
    return kernel_module("bernoulli")


def _triton_forward(x: Tensor, logits: Tensor) -> Tensor:
    shape = V.broadcast_shapes(x.shape, logits.shape)
    out = torch.empty(shape[:-1], dtype=torch.float32, device=logits.device)
    layout = row_layout(shape, [x, logits])
    launch_rows(_kernels().bernoulli_log_prob_fwd_kernel, layout, out)
    return out


def _triton_backward(grad: Tensor, x: Tensor, logits: Tensor, needs: list[bool]) -> list[Tensor]:
    """-> the gradients of (x, logits), by reduced_grads."""
    shape = V.broadcast_shapes(x.shape, logits.shape)
    inputs = (x, logits)
    grads = [grad_buffer(t, shape) if need else None for t, need in zip(inputs, needs)]
    layout = row_layout(shape, [x, logits, grad.unsqueeze(-1)])
    launch_rows(_kernels().bernoulli_log_prob_bwd_kernel, layout,
                *(logits if g is None else g for g in grads),
                per_row=1, WANT_GX=needs[0], WANT_GL=needs[1])  # fmt: skip
    return reduced_grads(grads, inputs, needs)


def _offset(x, logits):
    """x - [l > 0], float32: exact for x in {0, 1} (the kernels' form, as are the loops')."""
    return x.to(torch.float32) - (logits > 0.0).to(torch.float32)


def _loop_forward(x, logits):
    """log p per row, (R1, R2): l (x - [l > 0]) - log1p(e^-|l|), the product 0 where the
    offset is (an infinite logit that x agrees with)."""
    logits = logits.to(torch.float32)
    offset = _offset(x, logits)
    bracket = torch.where(offset == 0.0, 0.0, logits * offset)
    return (bracket - _cpu_loops.log1p_exp_neg(logits.abs())).sum(-1)


def _loop_logits_grad(x, logits, grad):
    """g (x - sigmoid(l)) = g ((x - [l > 0]) +- sigmoid(-|l|)), (R1, R2, D), as a 1-tuple."""
    logits = logits.to(torch.float32)
    tail = torch.sigmoid(-logits.abs())
    slope = _offset(x, logits) + torch.where(logits > 0.0, tail, -tail)
    return (grad.to(torch.float32) * slope,)


LOOP_ELEMENTS = 1 << 19  # from here the CPU loops' speed pays for their fixed cost (measured)
_FORWARD_LOOP = _cpu_loops.CpuLoop(_loop_forward, LOOP_ELEMENTS)
_LOGITS_GRAD_LOOP = _cpu_loops.CpuLoop(_loop_logits_grad, LOOP_ELEMENTS, gradients=True)


def _reference_forward(x, logits):
    shape = V.broadcast_shapes(x.shape, logits.shape)
    out = _FORWARD_LOOP(shape, [x, logits])
    return reference.bernoulli_log_prob_forward(x, logits) if out is None else out


def _reference_backward(grad, x, logits, needs):
    shape = V.broadcast_shapes(x.shape, logits.shape)
    loop = None
    if not needs[0]:  # (x's gradient g l is no loop's)
        loop = _LOGITS_GRAD_LOOP(shape, [x, logits, grad.unsqueeze(-1)])
    if loop is None:
        grads = reference.bernoulli_log_prob_backward(grad, x, logits, needs)
    else:
        grads = (None, *loop)
    return reduced_grads(grads, (x, logits), needs)


def _fake_backward(grad, x, logits, needs):
    return empty_grads((x, logits), needs)


# Up to this many elements of logits the torch path runs as torch ops that autograd
# differentiates: cheaper there than the op's autograd.Function and the second split of x in
# its backward, while the Function keeps less for backward on larger logits (and its CPU loops
# run faster from their LOOP_ELEMENTS up).
AUTOGRAD_ELEMENTS = 1 << 18


def _autograd(x, logits) -> bool:
    """Whether autograd differentiates the torch path: not for x that requires grad (the torch
    math drops x's remainder where it is known to be 0, and x's gradient with it), nor in
    float64 (softplus's backward takes sigmoid(t) as 1 beyond t = 20, 2e-9 off), nor where
    the Function's CPU loops run."""
    shape = V.broadcast_shapes(x.shape, logits.shape)
    return (
        not x.requires_grad
        and shape.numel() <= AUTOGRAD_ELEMENTS
        and reference.likelihood_dtype(x, logits) != torch.float64
        and not _FORWARD_LOOP.applies(shape, [x, logits])
    )


_FORWARD = fused_op("bernoulli_log_prob", reference=_reference_forward,
                    triton=_triton_forward, fake=_fake, plain_autograd=_autograd)  # fmt: skip
_BACKWARD = fused_op("bernoulli_log_prob_backward", reference=_reference_backward,
                     triton=_triton_backward, fake=_fake_backward)  # fmt: skip


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    if grad is None:
        return None, None
    needs = list(ctx.needs_input_grad)
    grads = _BACKWARD(ctx.triton, grad, *ctx.saved_tensors, needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


register_autograd(_FORWARD, _setup, _backward)


def bernoulli_log_prob(x, logits):
    """log p(x | logits) = sum_d [x_d l_d - softplus(l_d)] over the last dim (-BCE with logits).

    x: the data, float, bool or uint8 (0/1, one byte a pixel), read in place; logits: float.
    They broadcast together to (..., D), e.g. x (B, D) against K samples of logits (K, B, D),
    without copying x. Returns (...), float32 (float64 for float64 inputs). Gradients: logits
    get g (x - sigmoid(l)); a float x that requires grad gets g l. Exact for |logits| up to
    1e4 and more (no 1 - sigmoid that rounds to 0).
    """
    V.check_data_tensor("x", x, X_DTYPES)
    V.check_tensor("logits", logits)
    named = {"x": x, "logits": logits}
    V.check_same_device(named)
    shape = V.broadcast_shape(named)
    dtype = reference.likelihood_dtype(x, logits)
    triton = use_triton(logits.device, dtype) and shape.numel() > 0
    if triton and x.dtype == torch.bool:  # the kernels read its bytes (0 / 1) as uint8, in place
        x = x.view(torch.uint8)  # (kernels get no i1 pointer; traced, the view must come first)
    return _FORWARD(triton, x, logits)
