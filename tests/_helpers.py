"""Comparison helpers: relative error that also reports NaN and inf mismatches."""

from __future__ import annotations

import torch


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol=1e-5, atol=1e-6):
    """|actual - expected| <= atol + rtol * |expected| elementwise, in float64, with NaN and
    inf required at the same places (same sign). Reports the worst element on failure."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    nan_a, nan_e = a.isnan(), e.isnan()
    if not torch.equal(nan_a, nan_e):
        raise AssertionError(
            f"{name}: NaN mismatch, {int(nan_a.sum())} NaN in actual vs {int(nan_e.sum())} expected"
        )
    inf_a, inf_e = a.isinf(), e.isinf()
    if not torch.equal(inf_a, inf_e) or not torch.equal(a[inf_a], e[inf_e]):
        raise AssertionError(f"{name}: inf mismatch ({int(inf_a.sum())} vs {int(inf_e.sum())})")
    finite = ~(nan_e | inf_e)
    a, e = a[finite], e[finite]
    if a.numel() == 0:
        return
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    if bad.any():
        i = int((err / (atol + rtol * e.abs())).argmax())
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements off; worst actual={a[i].item():.8g} "
            f"expected={e[i].item():.8g} (abs err {err[i].item():.3g}, "
            f"rel err {(err[i] / e[i].abs().clamp_min(1e-30)).item():.3g})"
        )


def grads(output_terms, inputs):
    """Gradients of sum(output * incoming) for each (output, incoming) pair; None for inputs
    that get no gradient."""
    loss = sum((out * g).sum() for out, g in output_terms)
    return torch.autograd.grad(loss, inputs, allow_unused=True)
