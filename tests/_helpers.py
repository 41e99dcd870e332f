"""Shared test helpers: comparisons that also report NaN and inf mismatches, tiny networks,
state_dict round trips."""

from __future__ import annotations

import io

import torch
from torch import nn


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


def check_grads(named, ours, expected, rtol=1e-4, atol=1e-5, nonzero=True):
    """Every parameter got a finite (and nonzero) gradient equal to the oracle's."""
    for name, a, e in zip(named, ours, expected, strict=True):
        assert a is not None, f"{name} got no gradient"
        assert torch.isfinite(a).all(), f"{name}: non-finite gradient"
        assert not nonzero or a.abs().max() > 0, f"{name}: zero gradient"
        assert e is not None, f"oracle: {name} got no gradient"
        scale = max(e.abs().max().item(), 1.0)
        assert_close(f"grad {name}", a, e, rtol=rtol, atol=atol * scale)


def mlp(n_in: int, n_out: int, width: int = 8) -> nn.Sequential:
    """One tanh hidden layer: (N, n_in) -> (N, n_out)."""
    return nn.Sequential(nn.Linear(n_in, width), nn.Tanh(), nn.Linear(width, n_out))


class Lambda(nn.Module):
    """A network that computes fn(x)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def round_trip(state: dict) -> dict:
    """`state` after torch.save and torch.load(weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def check_against_oracle(op, oracle, inputs, device, *, dtype=torch.float32, grad=(),
                         out_tol=None, grad_tol=None):  # fmt: skip
    """op(**ours) on `device` against oracle(**theirs) in float64 on the CPU: the output, and the
    gradients of sum(out * g) for a random incoming g (not ones) for the inputs named in `grad`;
    and that neither pass wrote into op's inputs.

    inputs: name -> tensor, or (base tensor, view): the floating base of an input named in `grad`
    goes to op in `dtype`, and to the oracle in float64 (rounded to `dtype` first); any other
    input (data) keeps its dtype, floating ones going to the oracle in float64; the base is
    the leaf whose gradient is compared, the view (strided, transposed, broadcast) is what op and
    oracle receive. Returns our output.
    """
    out_tol = out_tol or {"rtol": 1e-5, "atol": 1e-6}
    grad_tol = grad_tol or {"rtol": 1e-4, "atol": 1e-6}
    inputs = {k: v if isinstance(v, tuple) else (v, None) for k, v in inputs.items()}

    def leaves_and_views(dev, float_dtype):
        leaves = {}
        for k, (base, _) in inputs.items():
            if base.is_floating_point():
                base = base.detach().to(dtype if k in grad else base.dtype)
                base = base if float_dtype is None else base.to(float_dtype)
            leaves[k] = base.detach().to(dev, copy=True).requires_grad_(k in grad)
        views = {k: view(leaves[k]) if view else leaves[k] for k, (_, view) in inputs.items()}
        return leaves, views

    ours_leaves, ours = leaves_and_views(device, None)
    before = {k: t.detach().clone() for k, t in ours_leaves.items()}
    ref_leaves, ref = leaves_and_views("cpu", torch.float64)
    out, expected = op(**ours), oracle(**ref)
    assert out.device.type == torch.device(device).type
    assert_close("output", out, expected, **out_tol)
    if grad:
        g = torch.randn(expected.shape, dtype=torch.float64)
        got = torch.autograd.grad(out, [ours_leaves[n] for n in grad], g.to(out.device, out.dtype))
        want = torch.autograd.grad(expected, [ref_leaves[n] for n in grad], g)
        for name, a, e in zip(grad, got, want):
            assert a.dtype == ours_leaves[name].dtype, f"grad {name}: dtype {a.dtype}"
            scale = max(e.abs().max().item(), 1.0) if e.numel() else 1.0
            tol = {"rtol": grad_tol["rtol"], "atol": grad_tol["atol"] * scale}
            assert_close(f"grad {name}", a, e, **tol)
    for name, value in before.items():  # forward and backward left the inputs as they were
        torch.testing.assert_close(ours_leaves[name].detach(), value, rtol=0, atol=0,
                                   equal_nan=True, msg=f"input {name} was modified")  # fmt: skip
    return out
