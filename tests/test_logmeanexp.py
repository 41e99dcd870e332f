"""log_mean_exp against torch.logsumexp(x) - log K in float64, on both code paths.

Every case compares the output and the gradient of sum(out * g) for a random incoming g (not
ones) with softmax(x) * g, on the same (rounded) input values in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import assert_close
from conftest import CPU_LOOPS, FUNCTION_FORM, PATHS, enter_path

from fastvae import log_mean_exp
from fastvae.ops import logmeanexp

# The interpreter computes with numpy, which warns where the math is meant: log(0) = -inf for
# rows of all -inf, inf - inf = NaN, and exp overflow in masked-off lanes.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

INF = math.inf
FP32 = {"out": {"rtol": 1e-5, "atol": 1e-5}, "grad": {"rtol": 1e-4, "atol": 1e-6}}
LOW = {
    torch.float16: {"out": {"rtol": 2e-3, "atol": 2e-3}, "grad": {"rtol": 2e-3, "atol": 2e-3}},
    torch.bfloat16: {"out": {"rtol": 1e-2, "atol": 1e-2}, "grad": {"rtol": 1e-2, "atol": 1e-2}},
}


@pytest.fixture(params=[PATHS[0], FUNCTION_FORM, CPU_LOOPS, *PATHS[1:]])
def path(request, monkeypatch):
    """(backend, device) of each code path: the torch path's three forms (torch.logsumexp under
    autograd, at these small sizes where x has no -inf; the op's autograd.Function, as above
    AUTOGRAD_ELEMENTS; its fused CPU loops, as from LOOP_ELEMENTS), the Triton kernels."""
    loops = [logmeanexp._FORWARD_LOOP, logmeanexp._GRAD_LOOP]
    yield from enter_path(request.param, monkeypatch, [(logmeanexp, "AUTOGRAD_ELEMENTS")], loops)


def oracle(x, dim):
    """float64 log-mean-exp of x and its gradient's softmax; rows of all -inf get softmax 0."""
    out = torch.logsumexp(x, dim) - math.log(x.shape[dim])
    softmax = torch.softmax(x, dim)
    return out, torch.where((out == -INF).unsqueeze(dim), 0.0, softmax)


def check(base, dim, device, dtype=torch.float32, tol=FP32, view=None):
    """log_mean_exp of view(base) in `dtype` on `device`, and the gradient for base, against
    the oracle on the same values. Returns (out, gradient for base)."""
    leaf = base.to(device, dtype, copy=True).requires_grad_()
    x = view(leaf) if view else leaf
    out = log_mean_exp(x, dim)
    ref_leaf = leaf.detach().cpu().double().requires_grad_()
    ref_x = view(ref_leaf) if view else ref_leaf
    expected, softmax = oracle(ref_x, dim)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.device.type == torch.device(device).type
    assert_close("log_mean_exp", out, expected, **tol["out"])
    g = torch.randn(expected.shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, leaf, g.to(out))
    (expected_grad,) = torch.autograd.grad(ref_x, ref_leaf, softmax * g.unsqueeze(dim))
    assert grad.dtype == dtype
    assert_close("log_mean_exp grad", grad, expected_grad, **tol["grad"])
    return out, grad


# -- dims and sizes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, dim",
    [((7,), 0), ((6, 5), 0), ((6, 5), 1), ((6, 5), -1),
     ((3, 4, 5), 0), ((3, 4, 5), 1), ((3, 4, 5), -1), ((3, 4, 5), -2)],
)  # fmt: skip
def test_dims(path, shape, dim):
    out, _ = check(torch.randn(shape) * 3, dim, path[1])
    assert out.shape == torch.Size(s for d, s in enumerate(shape) if d != dim % len(shape))


@pytest.mark.parametrize("K", [1, 3, 1000, 40000])
def test_number_of_values(path, K):
    # 40000 spans several BLOCK_K chunks per row: 3 in the interpreter, 10 on a GPU.
    check(torch.randn(K, 3) * 3, 0, path[1])
    check(torch.randn(2, K) * 3, -1, path[1])


def test_streaming_over_chunks(path):
    """The running max moves between chunks, and whole chunks are -inf."""
    K = 40000
    ramp = torch.linspace(-30.0, 30.0, K)
    half = torch.full((K // 2,), -INF)
    rows = [
        ramp,  # the max grows in every chunk: the running sum is rescaled each time
        ramp.flip(0),
        torch.randn(K) * 5,
        torch.full((K,), -INF),
        torch.cat([half, torch.randn(K // 2)]),
        torch.cat([torch.randn(K // 2), half]),
    ]
    out, grad = check(torch.stack(rows), 1, path[1])
    assert out[3] == -INF and torch.equal(grad[3], torch.zeros(K, device=path[1]))


# -- strided inputs --------------------------------------------------------------------------

LAYOUTS = {
    "transposed": (lambda: torch.randn(5, 9), lambda t: t.t()),
    "strided": (lambda: torch.randn(18, 15), lambda t: t[::2, 1::3]),
    "broadcast": (lambda: torch.randn(1, 5), lambda t: t.expand(9, 5)),
    "sliced-3d": (lambda: torch.randn(4, 7, 12), lambda t: t[:, 1:6, ::2]),
    "permuted-3d": (lambda: torch.randn(5, 4, 6), lambda t: t.permute(2, 0, 1)),
    # rows that do not collapse to two dims: row_layout reads a contiguous copy
    "permuted-4d": (lambda: torch.randn(3, 4, 5, 6), lambda t: t.permute(2, 0, 3, 1)),
}


@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_strided_inputs(path, layout, dim):
    make, view = LAYOUTS[layout]
    check(make() * 3, dim, path[1], view=view)


def test_gradient_has_the_layout_of_dense_x(path):
    x = torch.randn(5, 9, device=path[1]).t().requires_grad_()
    (grad,) = torch.autograd.grad(log_mean_exp(x, 0).sum(), x)
    assert grad.stride() == x.stride()


# -- dtypes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [0, -1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(path, dtype, dim):
    check(torch.randn(37, 6) * 3, dim, path[1], dtype=dtype, tol=LOW[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_output_dtypes(path, dtype):
    check(torch.randn(4, 3), 0, path[1], dtype=dtype, tol=LOW.get(dtype, FP32))


def test_float64_gradcheck():
    # float64 always runs the torch path, whatever the backend.
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    for dim in (0, 1, -1):
        assert torch.autograd.gradcheck(lambda t, d=dim: log_mean_exp(t, d), (x,))


# -- extreme values, infinities and NaN ------------------------------------------------------


def test_huge_magnitudes(path):
    """Values of +-1e4 neither overflow nor lose the softmax."""
    K = 50
    rows = [1e4 + torch.randn(K), -1e4 + torch.randn(K), torch.linspace(-1e4, 1e4, K)]
    # out + log K, rounded to float32 near 1e4, shifts the gradient by up to ~5e-4 relative.
    tol = {"out": FP32["out"], "grad": {"rtol": 1e-3, "atol": 1e-6}}
    check(torch.stack(rows), 1, path[1], tol=tol)
    check(torch.stack(rows).t(), 0, path[1], tol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_all_minus_inf(path, dtype):
    """-inf out and a gradient of exactly 0, never NaN (torch.logsumexp's backward gives NaN)."""
    x = torch.randn(4, 6)
    x[1] = -INF
    x[3, ::2] = -INF
    out, grad = check(x, 1, path[1], dtype=dtype, tol=LOW.get(dtype, FP32))
    assert out[1] == -INF and out[[0, 2, 3]].isfinite().all()
    assert torch.equal(grad[1], torch.zeros(6, dtype=dtype, device=path[1]))
    assert not grad.isnan().any()
    one = torch.full((1, 3), -INF, device=path[1], requires_grad=True)
    (grad_one,) = torch.autograd.grad(log_mean_exp(one, 0).sum(), one)
    assert torch.equal(grad_one, torch.zeros(1, 3, device=path[1]))


def test_minus_inf_mixed_with_finite(path):
    x = torch.randn(7, 5)
    x[torch.rand(7, 5) < 0.5] = -INF
    x[:, 2] = torch.randn(7)  # at least one finite value per row
    check(x, 1, path[1])
    check(x.t().contiguous(), 0, path[1])


def test_nan_in_nan_out(path):
    x = torch.randn(4, 5)
    x[1, 2] = float("nan")
    x[3] = -INF
    x[3, 4] = float("nan")
    out, grad = check(x, 1, path[1])  # NaN rows: NaN output and gradient
    assert out.isnan().tolist() == [False, True, False, True]


def test_plus_inf_in_plus_inf_out(path):
    """+inf in gives +inf; the gradient is then that of torch.logsumexp: NaN at the +inf
    values, 0 elsewhere in the row."""
    x = torch.randn(4, 3)
    x[0, 0] = INF
    x[1] = torch.tensor([INF, -INF, 0.0])
    x[2, :2] = INF
    leaf = x.to(path[1]).requires_grad_()
    out = log_mean_exp(leaf, 1)
    assert out[:3].tolist() == [INF] * 3 and out[3].isfinite()
    g = torch.randn(4)
    (grad,) = torch.autograd.grad(out, leaf, g.to(path[1]))
    ref = x.double().requires_grad_()
    (expected,) = torch.autograd.grad(torch.logsumexp(ref, 1), ref, g.double())
    assert_close("grad", grad, expected, **FP32["grad"])


# -- empty inputs and bad arguments ----------------------------------------------------------


@pytest.mark.parametrize("shape, dim", [((0, 5), 1), ((5, 0), 0), ((3, 0, 4), -1)])
def test_empty_batch(path, shape, dim):
    x = torch.randn(shape, device=path[1], requires_grad=True)
    out = log_mean_exp(x, dim)
    assert out.shape == torch.Size(s for d, s in enumerate(shape) if d != dim % len(shape))
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.shape == x.shape


X = torch.zeros(4, 3)

BAD_INPUTS = {
    "x not a tensor": (lambda: log_mean_exp([0.0, 1.0]), TypeError, "x must be a torch.Tensor"),
    "integer x": (lambda: log_mean_exp(X.long()), TypeError, "x must be a floating-point"),
    "scalar x": (lambda: log_mean_exp(torch.tensor(0.0)), ValueError, "x must have at least one"),
    "float dim": (lambda: log_mean_exp(X, 1.0), TypeError, "dim must be an int, got float"),
    "bool dim": (lambda: log_mean_exp(X, True), TypeError, "dim must be an int, got bool"),
    "dim too large": (lambda: log_mean_exp(X, 2), ValueError, "dim must be in [-2, 1]"),
    "dim too small": (lambda: log_mean_exp(X, -3), ValueError, "dim must be in [-2, 1]"),
    "empty dim": (lambda: log_mean_exp(torch.zeros(0, 3)), ValueError, "dim 0 of x is empty"),
    "unsupported device": (lambda: log_mean_exp(X.to("meta")), ValueError, "cpu and cuda"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_a_clear_error(case):
    call, error, message = BAD_INPUTS[case]
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value)
