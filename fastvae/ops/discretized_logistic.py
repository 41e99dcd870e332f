"""discretized_logistic_log_prob: the log-likelihood of binned data (8-bit pixels, say) under a
logistic per element, as in PixelCNN++ and the seed tutorial's eq. 34.

One op (fastvae.ops._library) whose forward and backward launch the Triton kernels in
fastvae.kernels.discretized_logistic (CUDA, or the interpreter) or the torch math in
fastvae.reference. x is read in place in its own dtype (bin values k / bins as floats, or the
integers k) and broadcast without a copy. Formulas: docs/math.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastvae import _validate as V
from fastvae import reference
from fastvae._backend import traced, use_triton
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


def _reference_backward(grad, x, mean, log_scale, bins, needs):
    grads = reference.discretized_logistic_log_prob_backward(grad, x, mean, log_scale, bins, needs)
    return reduced_grads(grads, (mean, log_scale), needs)


def _fake_backward(grad, x, mean, log_scale, bins, needs):
    return empty_grads((mean, log_scale), needs)


_FORWARD = fused_op(
    "discretized_logistic_log_prob", reference=reference.discretized_logistic_log_prob_forward,
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
