"""discretized_logistic_log_prob: the log-likelihood of binned data (8-bit pixels, say) under a
logistic per element, as in PixelCNN++ and the seed tutorial's eq. 34.

One op (fastvae.ops._library) whose forward and backward launch the Triton kernels in
fastvae.kernels.discretized_logistic (CUDA, or the interpreter) or the torch math in
fastvae.reference. x is read in place in its own dtype (bin values k / bins as floats, or the
integers k) and broadcast without a copy. Formulas: docs/math.md.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastvae import _validate as V
from fastvae import reference
from fastvae._backend import traced, use_triton
from fastvae.ops import _cpu_loops
from fastvae.ops._launch import grad_buffer, kernel_module, launch_rows, row_layout
from fastvae.ops._library import empty_grads, fused_op, reduced_grads, register_autograd


def _fake(x, mean, log_scale, bins):
    shape = V.broadcast_shapes(x.shape, mean.shape, log_scale.shape)
    return mean.new_empty(shape[:-1], dtype=reference.likelihood_dtype(x, mean, log_scale))


def _kernels():
    return kernel_module("discretized_logistic")


def _launch(kernel_name: str, shape: torch.Size, tensors: list, outputs: list, bins: int,
            **flags) -> None:  # fmt: skip
    """Run a kernel over x, mean, log_scale and any per-row operand after them (an incoming
    gradient (..., 1)), broadcast to `shape`, writing `outputs`."""
    kernel = getattr(_kernels(), kernel_name)
    launch_rows(kernel, row_layout(shape, tensors), *outputs, bins, 1.0 / bins,
                per_row=len(tensors) - 3, X_IS_INT=not tensors[0].is_floating_point(),
                **flags)  # fmt: skip


def _triton_forward(x: Tensor, mean: Tensor, log_scale: Tensor, bins: int) -> Tensor:
    shape = V.broadcast_shapes(x.shape, mean.shape, log_scale.shape)
    out = torch.empty(shape[:-1], dtype=torch.float32, device=mean.device)
    _launch("discretized_logistic_fwd_kernel", shape, [x, mean, log_scale], [out], bins)
    return out


def _triton_backward(grad: Tensor, x: Tensor, mean: Tensor, log_scale: Tensor, bins: int,
                     needs: list[bool]) -> list[Tensor]:  # fmt: skip
    """-> the gradients of (mean, log_scale), by reduced_grads."""
    shape = V.broadcast_shapes(x.shape, mean.shape, log_scale.shape)
    inputs = (mean, log_scale)
    grads = [grad_buffer(t, shape) if need else None for t, need in zip(inputs, needs)]
    _launch("discretized_logistic_bwd_kernel", shape, [x, mean, log_scale, grad.unsqueeze(-1)],
            [mean if g is None else g for g in grads], bins, WANT_GM=needs[0],
            WANT_GS=needs[1])  # fmt: skip
    return reduced_grads(grads, inputs, needs)


class _Edges(NamedTuple):
    """x's bin under the logistic, as the kernels take it: standardized edges u and v, w = u + v
    (from the bin's middle: no cancellation), d = v - u, whether the bin has a finite lower
    and upper edge (a NaN x has both, so that it reaches the result), e^-log_scale."""

    u: Tensor
    v: Tensor
    w: Tensor
    d: Tensor
    has_lower: Tensor
    has_upper: Tensor
    inv_scale: Tensor


def _edges(x, mean, log_scale, bins) -> _Edges:
    k = x.to(torch.float32)
    if x.is_floating_point():  # k / bins
        k = torch.floor(k * bins + 0.5)
    k = k.clamp(0.0, bins - 1.0)  # NaN stays NaN
    mean = mean.to(torch.float32)
    inv_scale = torch.exp(-log_scale.to(torch.float32))
    u = (k / bins - mean) * inv_scale
    v = ((k + 1.0) / bins - mean) * inv_scale
    w = ((2.0 * k + 1.0) / bins - 2.0 * mean) * inv_scale
    is_nan = torch.isnan(k)
    has_lower, has_upper = (k >= 1.0) | is_nan, (k < bins - 1.0) | is_nan
    return _Edges(u, v, w, inv_scale / bins, has_lower, has_upper, inv_scale)


def _loop_forward(x, mean, log_scale, bins):
    """log P per row, (R1, R2): -softplus(u) - softplus(-v) + log(1 - e^-d), each edge bin
    without the term of its infinite edge."""
    e = _edges(x, mean, log_scale, bins)
    log_p = torch.where(e.has_lower, -_cpu_loops.softplus(e.u), 0.0)
    log_p = log_p - torch.where(e.has_upper, _cpu_loops.softplus(-e.v), 0.0)
    interior = e.has_lower & e.has_upper
    return torch.where(interior, log_p + _cpu_loops.log1mexp(e.d), log_p).sum(-1)


def _loop_off_grid(x, bins):
    """Whether any float x is off the bin values (as _check_bin_values says), a 0-dim bool."""
    scaled = x.to(torch.float32) * bins
    tolerance = torch.finfo(x.dtype).eps * bins
    off = ((scaled - torch.round(scaled)).abs() > tolerance) | (scaled < -0.5)
    return (off | (scaled > bins - 0.5)).any()


def _loop_grads(x, mean, log_scale, grad, bins, want_mean: bool, want_log_scale: bool):
    """(g a e^-log_scale, g b) as (R1, R2, D) tensors (None where not wanted), for a and b of
    discretized_logistic_log_prob_backward's reference, in the kernels' forms."""
    e = _edges(x, mean, log_scale, bins)
    g = grad.to(torch.float32)
    interior = e.has_lower & e.has_upper
    sig_u, sig_neg_v = torch.sigmoid(e.u), torch.sigmoid(-e.v)
    grad_mean = grad_log_scale = None
    if want_mean:  # a as a product on the side of the bin's middle that keeps it exact
        side = torch.where(e.w >= 0.0, sig_u * (1.0 - sig_neg_v), -sig_neg_v * (1.0 - sig_u))
        edge = torch.where(e.has_lower, sig_u, 0.0) - torch.where(e.has_upper, sig_neg_v, 0.0)
        slope = torch.where(interior, side * -reference.expm1(-e.w.abs()), edge)
        grad_mean = g * slope * e.inv_scale
    if want_log_scale:
        big = torch.finfo(torch.float32).max  # u sigmoid(u) is 0, not NaN, at u = -inf
        b = torch.where(e.has_lower, e.u.clamp(min=-big) * sig_u, 0.0)
        b = b - torch.where(e.has_upper, e.v.clamp(max=big) * sig_neg_v, 0.0)
        width = torch.where(e.d > 0.0, e.d / reference.expm1(e.d), 1.0)  # d / (e^d - 1)
        grad_log_scale = g * torch.where(interior, b - width, b)
    return grad_mean, grad_log_scale


# The CPU loops are faster at any size, but below this not by a compilation's worth.
LOOP_ELEMENTS = 1 << 10
_FORWARD_LOOP = _cpu_loops.CpuLoop(_loop_forward, LOOP_ELEMENTS)
_OFF_GRID_LOOP = _cpu_loops.CpuLoop(_loop_off_grid, LOOP_ELEMENTS)
_GRADS_LOOP = _cpu_loops.CpuLoop(_loop_grads, LOOP_ELEMENTS, gradients=True)


def _reference_forward(x, mean, log_scale, bins):
    shape = V.broadcast_shapes(x.shape, mean.shape, log_scale.shape)
    out = _FORWARD_LOOP(shape, [x, mean, log_scale], bins)
    if out is None:
        return reference.discretized_logistic_log_prob_forward(x, mean, log_scale, bins)
    return out


def _reference_backward(grad, x, mean, log_scale, bins, needs):
    shape = V.broadcast_shapes(x.shape, mean.shape, log_scale.shape)
    tensors = [x, mean, log_scale, grad.unsqueeze(-1)]
    grads = _GRADS_LOOP(shape, tensors, bins, *needs)
    if grads is None:
        grads = reference.discretized_logistic_log_prob_backward(
            grad, x, mean, log_scale, bins, needs
        )
    return reduced_grads(grads, (mean, log_scale), needs)


def _fake_backward(grad, x, mean, log_scale, bins, needs):
    return empty_grads((mean, log_scale), needs)


_FORWARD = fused_op(
    "discretized_logistic_log_prob", reference=_reference_forward,
    triton=_triton_forward, fake=_fake,
)  # fmt: skip
_BACKWARD = fused_op(
    "discretized_logistic_log_prob_backward", reference=_reference_backward,
    triton=_triton_backward, fake=_fake_backward,
)  # fmt: skip


def _setup(ctx, inputs, output):
    x, mean, log_scale, ctx.bins = inputs
    ctx.save_for_backward(x, mean, log_scale)


def _backward(ctx, grad):
    if grad is None:
        return None, None, None, None
    needs = list(ctx.needs_input_grad[1:3])
    grads = _BACKWARD(ctx.triton, grad, *ctx.saved_tensors, ctx.bins, needs)
    return None, *(g if need else None for g, need in zip(grads, needs)), None


register_autograd(_FORWARD, _setup, _backward)


def _checks_values(x: Tensor, validate: bool | None) -> bool:
    """Whether to check x's values: never under a compiler's trace (no data-dependent branch
    there); else as `validate` says, None meaning on CPU tensors only (on CUDA the check would
    wait for the device)."""
    if validate is False or traced((x,)):
        return False
    return validate is True or x.device.type == "cpu"


def _check_bin_values(x: Tensor, bins: int) -> None:
    """x holds bin values: integers k in [0, bins), or floats k / bins to within their dtype's
    rounding (NaN passes: it gives NaN)."""
    if x.numel() == 0:
        return
    if not x.is_floating_point():
        low, high = (int(t) for t in torch.aminmax(x))
        if low < 0 or high >= bins:
            bad = low if low < 0 else high
            raise ValueError(f"x must hold bin indices k in [0, bins) = [0, {bins}); got {bad}")
        return
    if x.dtype != torch.float64:  # a CPU loop's one pass, where it runs, clears most x
        off = _OFF_GRID_LOOP(x.shape, [x.detach()], bins)
        if off is not None and not off.item():
            return
    scaled = x.detach().to(torch.promote_types(x.dtype, torch.float32)) * bins
    tolerance = torch.finfo(x.dtype).eps * bins
    low, high = (float(t) for t in torch.aminmax(scaled))
    off_grid = scaled - scaled.round()
    below_k, above_k = (float(t) for t in torch.aminmax(off_grid))  # (faster than abs, max)
    if max(-below_k, above_k) > tolerance or low < -0.5 or high > bins - 0.5:
        off_grid = off_grid.abs_()
        value = x[(off_grid > tolerance) | (scaled < -0.5) | (scaled > bins - 0.5)][0].item()
        raise ValueError(
            f"x must hold bin values k / bins with k an integer in [0, {bins}) (bins = {bins}); "
            f"got {value} (x * bins = {value * bins:.6g}). Pass the integers k (uint8 pixels, "
            "say) or k / bins, or validate=False to skip this check"
        )


def discretized_logistic_log_prob(x, mean, log_scale, *, bins=256, validate=None):
    """log P(x | mean, log_scale) of binned data under a logistic per element, summed over the
    last dim, in nats.

    x: the data as bin values k / bins (float) or the integers k (uint8, another integer
    dtype), k in [0, bins). Bin k is [k / bins, (k + 1) / bins), the first reaching down to
    -inf and the last up to +inf, and P = sigmoid((upper - mean) / s) - sigmoid((lower - mean)
    / s) with s = exp(log_scale); mean and s are in x's units. x, mean and log_scale broadcast
    together to (..., D), e.g. x (B, D) against K samples (K, B, D), without copying x.
    Returns (...), float32 (float64 for float64 inputs); in bits per dim: -out / (D ln 2).
    Gradients reach mean and log_scale (x is data). Accurate in both tails and for sharp
    scales (log_scale down to about -10); e^-log_scale must fit float32 (|log_scale| < 88).

    validate: check that x holds bin values, which reads x's values: None (default) checks CPU
    tensors only, never CUDA ones (the check would wait for the device); True checks on any
    device; False never. Compiled code never checks. An unchecked float x counts in bin
    round(x * bins), an unchecked x of either kind is clamped to [0, bins - 1].
    """
    V.check_data_tensor("x", x, V.INTEGER_DTYPES)
    V.check_tensor("mean", mean)
    V.check_tensor("log_scale", log_scale)
    named = {"x": x, "mean": mean, "log_scale": log_scale}
    V.check_same_device(named)
    shape = V.broadcast_shape(named)
    bins = V.check_bins(bins)
    if _checks_values(x, V.check_optional_bool("validate", validate)):
        _check_bin_values(x, bins)
    dtype = reference.likelihood_dtype(x, mean, log_scale)
    triton = use_triton(mean.device, dtype) and shape.numel() > 0
    return _FORWARD(triton, x, mean, log_scale, bins)
