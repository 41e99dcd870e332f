"""bernoulli_log_prob against torch.distributions.Bernoulli in float64, on both code paths.

Every case runs the torch path on CPU and the Triton kernels (interpreter on CPU, or CUDA) and
compares the output and the gradients of sum(out * g) for a random incoming g (not ones).
"""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import assert_close, check_against_oracle
from conftest import CPU_LOOPS, FUNCTION_FORM, PATHS, enter_path
from test_importance import small_tiles
from torch.distributions import Bernoulli

import fastvae
from fastvae.ops import _launch, bernoulli

K, B = 4, 9
X_DTYPES = [torch.float32, torch.bool, torch.uint8]
LOW = {torch.float16: {"rtol": 2e-3, "atol": 2e-3}, torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2}}


@pytest.fixture(params=[PATHS[0], FUNCTION_FORM, CPU_LOOPS, *PATHS[1:]])
def path(request, monkeypatch):
    """(backend, device) of each code path: the torch path's three forms (torch ops that
    autograd differentiates, at these small sizes; the op's autograd.Function, as above
    AUTOGRAD_ELEMENTS; its fused CPU loops, as from LOOP_ELEMENTS), the Triton kernels."""
    loops = [bernoulli._FORWARD_LOOP, bernoulli._LOGITS_GRAD_LOOP]
    yield from enter_path(request.param, monkeypatch, [(bernoulli, "AUTOGRAD_ELEMENTS")], loops)


def oracle(x, logits):
    return Bernoulli(logits=logits, validate_args=False).log_prob(x.to(logits.dtype)).sum(-1)


def _op(x, logits):
    return fastvae.bernoulli_log_prob(x, logits)


def binary(*shape, dtype=torch.float32):
    return (torch.rand(*shape) < 0.5).to(dtype)


def check(x, logits, device, **kwargs):
    grad = ("logits", "x") if x.is_floating_point() else ("logits",)
    inputs = {"x": x, "logits": logits}
    return check_against_oracle(_op, oracle, inputs, device, grad=grad, **kwargs)


@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize("D", [1, 3, 37, 1000])
def test_k_samples_against_one_x(path, D, x_dtype):
    """x (B, D) in its own dtype against K samples of logits (K, B, D)."""
    check(binary(B, D, dtype=x_dtype), 3 * torch.randn(K, B, D), path[1])


def test_float_x_in_between(path):
    """Grey levels in [0, 1] (the continuous relaxation BCE computes), and x gets g l."""
    check(torch.rand(B, 29), 3 * torch.randn(K, B, 29), path[1])


LAYOUTS = {
    "transposed x": (lambda: (binary(23, B), lambda t: t.t()), lambda: torch.randn(K, B, 23)),
    "sliced x": (lambda: (binary(2 * B, 50), lambda t: t[::2, 1:24]), lambda: torch.randn(B, 23)),
    "x one row": (lambda: (binary(1, 23), lambda t: t.expand(B, 23)), lambda: torch.randn(B, 23)),
    "x stride-0 samples": (
        lambda: (binary(B, 23), lambda t: t.expand(K, B, 23)), lambda: torch.randn(K, B, 23)
    ),
    "transposed logits": (lambda: binary(B, 23), lambda: (torch.randn(23, B), lambda t: t.t())),
    "logits broadcast over x": (
        lambda: binary(K, B, 23), lambda: (torch.randn(B, 1), lambda t: t.expand(B, 23))
    ),
}  # fmt: skip


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.uint8])
def test_strided_and_broadcast_inputs(path, layout, x_dtype):
    make_x, make_logits = LAYOUTS[layout]
    x = make_x()
    x = (x[0].to(x_dtype), x[1]) if isinstance(x, tuple) else x.to(x_dtype)
    grad = ("logits", "x") if x_dtype.is_floating_point else ("logits",)
    inputs = {"x": x, "logits": make_logits()}
    check_against_oracle(_op, oracle, inputs, path[1], grad=grad)


def test_x_is_read_in_place(path, monkeypatch):
    """The kernels read one x (B, D) against (K, B, D) logits through a stride-0 row dim: no
    expanded or converted copy of x (the torch path converts x (B, D) once, never K times)."""
    if path[0] != "triton":
        pytest.skip("the kernels' operand layout")
    layouts = []

    def recording(*args, **kwargs):
        layouts.append(_launch.row_layout(*args, **kwargs))
        return layouts[-1]

    monkeypatch.setattr(bernoulli, "row_layout", recording)
    x = binary(B, 40, dtype=torch.uint8).to(path[1])
    logits = torch.randn(K, B, 40, device=path[1], requires_grad=True)
    fastvae.bernoulli_log_prob(x, logits).sum().backward()
    assert len(layouts) == 2  # forward and backward
    for layout in layouts:
        x_op = layout.operands[0]
        assert x_op.tensor.data_ptr() == x.data_ptr() and x_op.tensor.dtype == torch.uint8
        assert (layout.n_rows, layout.R2, x_op.s1, x_op.s2) == (K * B, B, 0, 40)


def test_small_tiles(path, monkeypatch):
    """Many row blocks and several column blocks a row (D larger than one block)."""
    monkeypatch.setattr(_launch, "tile", small_tiles)
    check(binary(7, 11), 3 * torch.randn(3, 7, 11), path[1])
    check(binary(7, 11, dtype=torch.bool), 3 * torch.randn(3, 7, 11), path[1])


@pytest.mark.parametrize("x_dtype", X_DTYPES)
def test_extreme_logits(path, x_dtype):
    """|logits| up to 1e4: exact, finite, and relative accuracy where log p is tiny (x agreeing
    with a large logit: log p = -log1p(e^-|l|), ~1e-13 at |l| = 30)."""
    values = torch.tensor([1e4, -1e4, 100.0, -88.0, 30.0, -30.0, 17.0, -5.0, 0.0, 1e-3])
    logits = values.repeat(2, 1)
    x = torch.stack([values > 0, values < 0]).to(x_dtype)  # agreeing, disagreeing
    out = check(x, logits, path[1], out_tol={"rtol": 1e-6, "atol": 0.0})
    assert out.isfinite().all()
    agreeing = torch.tensor([[30.0, -30.0, 17.0]], device=path[1])
    tiny = fastvae.bernoulli_log_prob((agreeing > 0).to(x_dtype), agreeing)
    assert_close("tiny log p", tiny, oracle((agreeing > 0).double(), agreeing.double()), 1e-6, 0)
    big = torch.tensor([[1e4, -1e4, 30.0]], device=path[1], requires_grad=True)
    out = fastvae.bernoulli_log_prob((big > 0).to(x_dtype), big)
    (g,) = torch.autograd.grad(out.sum(), big)
    expected = torch.tensor([[0.0, 0.0, 9.357622968840175e-14]])
    assert_close("gradient of agreeing logits", g, expected, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", [None, torch.uint8])
def test_low_precision(path, dtype, x_dtype):
    """float16 / bfloat16 logits (and x) compute in float32 and return float32."""
    x = binary(B, 37, dtype=x_dtype or torch.float32)
    tol = {"out_tol": LOW[dtype], "grad_tol": LOW[dtype]}
    out = check(x, 3 * torch.randn(K, B, 37), path[1], dtype=dtype, **tol)
    assert out.dtype == torch.float32


@pytest.mark.parametrize(
    ("x_dtype", "logits_dtype", "expected"),
    [
        (torch.uint8, torch.float16, torch.float32),
        (torch.bool, torch.float64, torch.float64),
        (torch.float64, torch.float32, torch.float64),
        (torch.bfloat16, torch.bfloat16, torch.float32),
    ],
)
def test_output_dtypes(path, x_dtype, logits_dtype, expected):
    x = binary(3, 5, dtype=x_dtype).to(path[1])
    logits = torch.randn(3, 5, dtype=logits_dtype, device=path[1])
    assert fastvae.bernoulli_log_prob(x, logits).dtype == expected


def test_gradient_of_x_only_when_it_requires_grad(path):
    x = torch.rand(B, 6, device=path[1])
    logits = torch.randn(K, B, 6, device=path[1], requires_grad=True)
    out = fastvae.bernoulli_log_prob(x, logits)
    (g,) = torch.autograd.grad(out.sum(), logits)
    assert g.shape == logits.shape and x.grad is None
    x.requires_grad_()
    (g_x,) = torch.autograd.grad(fastvae.bernoulli_log_prob(x, logits.detach()).sum(), x)
    assert_close("grad x", g_x, logits.detach().sum(0))


def test_float64_gradcheck():
    x = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fastvae.bernoulli_log_prob, (x, logits))
    binary_x = torch.rand(3, 4) < 0.5
    assert torch.autograd.gradcheck(lambda t: fastvae.bernoulli_log_prob(binary_x, t), (logits,))


def test_empty_inputs(path):
    logits = torch.randn(K, 0, 5, device=path[1], requires_grad=True)
    out = fastvae.bernoulli_log_prob(binary(0, 5).to(path[1]), logits)
    assert out.shape == (K, 0)
    out.sum().backward()
    assert logits.grad.shape == (K, 0, 5)
    zeros = torch.zeros(3, 0, device=path[1])
    no_dims = fastvae.bernoulli_log_prob(zeros, zeros)
    assert torch.equal(no_dims.cpu(), torch.zeros(3))


def test_nan_in_nan_out(path):
    logits = torch.randn(4, 6, device=path[1])
    x = binary(4, 6).to(path[1])
    logits[1, 2] = float("nan")
    x[3, 0] = float("nan")
    out = fastvae.bernoulli_log_prob(x, logits)
    assert out.isnan().tolist() == [False, True, False, True]


def test_inputs_are_not_modified(path):
    x, logits = torch.rand(B, 8, device=path[1]), torch.randn(K, B, 8, device=path[1])
    copies = (x.clone(), logits.clone())
    fastvae.bernoulli_log_prob(x, logits.requires_grad_()).sum().backward()
    assert torch.equal(x, copies[0]) and torch.equal(logits.detach(), copies[1])


def test_autograd_form_counts_the_broadcast_shape(monkeypatch):
    """The size threshold is the broadcast shape's: x (64, 1, 8) and logits (1, 64, 8) make
    32768 elements."""
    monkeypatch.setattr(bernoulli, "AUTOGRAD_ELEMENTS", 1000)
    x = binary(64, 1, 8)
    logits = torch.randn(1, 64, 8, requires_grad=True)
    out = fastvae.bernoulli_log_prob(x, logits)
    assert "bernoulli" in type(out.grad_fn).__name__


@pytest.mark.parametrize("x_dtype", X_DTYPES)
def test_infinite_logits(path, x_dtype):
    """An infinite logit that x agrees with adds 0 (not NaN), one that x disagrees with -inf;
    the logits' gradient stays finite (binary x in eager mode; docs/math.md says where the
    torch path gives NaN instead)."""
    inf = float("inf")
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).to(x_dtype).to(path[1])
    logits = torch.tensor([[inf, 1.0], [-inf, 1.0], [-inf, 0.0]], device=path[1])
    logits.requires_grad_()
    out = fastvae.bernoulli_log_prob(x, logits)
    expected = torch.tensor([-math.log1p(math.e), -math.log1p(1 / math.e), -inf])
    assert_close("out", out, expected)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    assert torch.isfinite(grad).all(), grad
