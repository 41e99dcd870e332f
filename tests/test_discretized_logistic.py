"""discretized_logistic_log_prob against an independent float64 formula, on both code paths.

The oracle takes log P = log(sigmoid(v) - sigmoid(u)) on the side of the mean where the two
sigmoids are small: for a bin below the mean log sigmoid(v) + log(1 - e^(log sigmoid(u) -
log sigmoid(v))), for a bin above it the same with sigmoid(-u) and sigmoid(-v) (torch's float64
logsigmoid, expm1 and log1p); the edge bins are log sigmoid(v) and log sigmoid(-u). Its
gradients come from autograd. (fastvae's kernels use another identity: see
kernels/discretized_logistic.py.)
"""

from __future__ import annotations

import math
import re

import mpmath
import pytest
import torch
from _helpers import assert_close, check_against_oracle
from conftest import CPU_LOOPS, PATHS, enter_path, run_cpu_loops
from test_importance import small_tiles
from torch.nn import functional as F

import fastvae
from fastvae.ops import _launch, discretized_logistic

K, B = 3, 6
LOOPS = [
    discretized_logistic._FORWARD_LOOP,
    discretized_logistic._GRADS_LOOP,
    discretized_logistic._OFF_GRID_LOOP,
]


@pytest.fixture(params=[PATHS[0], CPU_LOOPS, *PATHS[1:]])
def path(request, monkeypatch):
    """(backend, device) of each code path: the torch reference, its fused CPU loops (as from
    LOOP_ELEMENTS), the Triton kernels."""
    yield from enter_path(request.param, monkeypatch, loops=LOOPS)


LOW = {torch.float16: {"rtol": 2e-3, "atol": 2e-3}, torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2}}


def _log_diff(log_hi, log_lo):
    """log(e^log_hi - e^log_lo) for log_lo < log_hi, with log(1 - e^t) by Maechler's switch."""
    t = log_lo - log_hi
    return log_hi + torch.where(
        t > -math.log(2), torch.log(-torch.expm1(t)), torch.log1p(-torch.exp(t))
    )


def oracle_elements(k, mean, log_scale, bins=256):
    """log P(bin k) per element, in float64, for integer bins k broadcast with the parameters."""
    shape = torch.broadcast_shapes(k.shape, mean.shape, log_scale.shape)
    k, mean, log_scale = (t.expand(shape) for t in (k.double(), mean, log_scale))
    inv_scale = torch.exp(-log_scale)
    u, v = (k / bins - mean) * inv_scale, ((k + 1) / bins - mean) * inv_scale
    first, last = k == 0, k == bins - 1
    above = (u + v > 0) & ~first | last  # the bin's middle lies above the mean
    interior = ~first & ~last
    cases = [
        (first, lambda u, v: F.logsigmoid(v)),
        (last & ~first, lambda u, v: F.logsigmoid(-u)),
        (interior & ~above, lambda u, v: _log_diff(F.logsigmoid(v), F.logsigmoid(u))),
        (interior & above, lambda u, v: _log_diff(F.logsigmoid(-u), F.logsigmoid(-v))),
    ]
    out = torch.zeros(shape, dtype=torch.float64)
    for mask, log_p in cases:
        out = out.index_put((mask,), log_p(u[mask], v[mask]))
    return out


def oracle(x, mean, log_scale, bins=256):
    """sum_d log P(bin of x_d) in float64; x holds k / bins (float) or k (integers)."""
    k = torch.round(x * bins) if x.is_floating_point() else x
    return oracle_elements(k, mean, log_scale, bins).sum(-1)


def _op(x, mean, log_scale, bins=256):
    return fastvae.discretized_logistic_log_prob(x, mean, log_scale, bins=bins)


def bin_values(*shape, bins=256, dtype=torch.uint8):
    """Random bins of every kind (the edge bins included): k as integers, or k / bins."""
    k = torch.randint(0, bins, shape)
    k.view(-1)[:2] = torch.tensor([0, bins - 1])[: k.numel()]
    return k.to(dtype) if not dtype.is_floating_point else (k / bins).to(dtype)


def check(x, mean, log_scale, device, bins=256, **kwargs):
    inputs = {"x": x, "mean": mean, "log_scale": log_scale}
    return check_against_oracle(
        lambda **a: _op(**a, bins=bins), lambda **a: oracle(**a, bins=bins), inputs, device,
        grad=("mean", "log_scale"), **kwargs,
    )  # fmt: skip


def params(*shape, spread=1.0, scale=-3.0):
    """Means around the data's range [0, 1) (and beyond it), log-scales around `scale`."""
    return torch.rand(*shape) * 1.4 * spread - 0.2 * spread, scale + torch.randn(*shape)


@pytest.mark.parametrize("x_dtype", [torch.uint8, torch.int64, torch.float32, torch.float16])
@pytest.mark.parametrize("D", [1, 3, 37, 1000])
def test_k_samples_against_one_x(path, D, x_dtype):
    """x (B, D) as uint8 / int64 k or float k / 256 against (K, B, D) means and log-scales."""
    check(bin_values(B, D, dtype=x_dtype), *params(K, B, D), path[1])


@pytest.mark.parametrize("log_scale", [-10.0, -7.0, 0.0, 3.0, 6.0])
def test_scales(path, log_scale):
    """Sharp (log_scale -10: the bin holding the mean has P ~ 1, the others ~ e^-10^4) to
    broad (log_scale 6: P ~ 1 / (256 e^6) a bin)."""
    mean, _ = params(B, 300)
    check(bin_values(B, 300), mean, torch.full((B, 300), log_scale), path[1])


def test_sharp_scale_relative_accuracy(path):
    """log_scale -10 with the mean at the bin's centre, a quarter from an edge, on an edge:
    log P from ~ -2e-19 to ~ -0.7, each to float32's relative accuracy."""
    k = torch.tensor([[3, 100, 100, 200, 0, 255]])
    mean = torch.tensor([[3.5, 100.25, 100.0, 201.0, 0.5, 254.5]]) / 256  # exact in float32
    log_scale = torch.full_like(mean, -10.0)
    device = path[1]
    for d in range(k.shape[1]):
        args = (k[:, d : d + 1], mean[:, d : d + 1], log_scale[:, d : d + 1])
        out = fastvae.discretized_logistic_log_prob(*(t.to(device) for t in args))
        expected = oracle(*(t.double() if t.is_floating_point() else t for t in args))
        assert_close(f"log P of case {d}", out, expected, rtol=2e-6, atol=0.0)


def exact(k, mean, log_scale, bins=256):
    """(log P, d/dmean, d/dlog_scale) of one element from the definition P = sigmoid(v) -
    sigmoid(u) = sigmoid(-u) - sigmoid(-v), in 50-digit arithmetic (mpmath, whose exponents do
    not underflow), on the side of the mean where both sigmoids are small: no cancellation."""
    mpmath.mp.dps = 50
    inv = mpmath.exp(-mpmath.mpf(log_scale))
    mean = mpmath.mpf(mean)

    def edge(j, infinite):  # (sigmoid(t), sigmoid(-t), t) of the edge j / bins
        if infinite:
            return mpmath.mpf(j > 0), mpmath.mpf(j <= 0), mpmath.mpf(0)
        t = (mpmath.mpf(j) / bins - mean) * inv
        return 1 / (1 + mpmath.exp(-t)), 1 / (1 + mpmath.exp(t)), t

    (s_u, r_u, u), (s_v, r_v, v) = edge(k, k == 0), edge(k + 1, k == bins - 1)
    p = r_u - r_v if u + v > 0 else s_v - s_u
    ds_u, ds_v = s_u * r_u, s_v * r_v  # sigmoid'
    return [float(t) for t in (mpmath.log(p), inv * (ds_u - ds_v) / p, (u * ds_u - v * ds_v) / p)]


def assert_exact(device, k, mean, log_scale):
    """log P and both gradients of D = 1 rows (k, mean, log_scale of shape (n, 1)) to float32's
    relative accuracy against `exact`."""
    elements = zip(k, mean, log_scale)
    want = torch.tensor([exact(int(a), float(m), float(s)) for a, m, s in elements])
    leaves = [t.to(device).requires_grad_() for t in (mean, log_scale)]
    out = fastvae.discretized_logistic_log_prob(k.to(device), *leaves)
    grads = torch.autograd.grad(out.sum(), leaves)
    for name, got, expected in zip(("log P", "d/dmean", "d/dlog_scale"), (out, *grads), want.T):
        assert_close(name, got.flatten(), expected, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("log_scale", [-10.0, -4.0, 0.0, 6.0, 10.0])
def test_each_element_against_exact_arithmetic(path, log_scale):
    """log P and both gradients of each element (D = 1 rows) to float32's relative accuracy
    against 50-digit arithmetic, tiny values included: at broad scales the float64 oracle's
    v - u cancels (0.2% off at log_scale 10), and sigmoid(u), sigmoid(-v) are both near 1/2 (the
    mean's slope then comes from a product, not their difference)."""
    k, mean = bin_values(40, 1), torch.rand(40, 1) * 1.4 - 0.2
    mean[:4, 0] = (k[:4, 0] + torch.tensor([0.5, 0.25, 0.0, 1.0])) / 256  # centre, edges
    assert_exact(path[1], k, mean, torch.full((40, 1), log_scale))


@pytest.mark.parametrize("log_scale", [-2.0, 3.0, 6.0])
def test_mean_gradient_near_a_bins_middle(path, log_scale):
    """Means within 1e-3 bin widths of their bin's middle, where sigmoid(u) - sigmoid(-v) is
    small against its terms (both near 1/2 at broad scales): d/dmean (and log P, d/dlog_scale)
    to float32's relative accuracy against 50-digit arithmetic."""
    k = bin_values(40, 1)
    k[:2, 0] = torch.tensor([1, 254])
    offset = torch.tensor([1e-3, -1e-3]).repeat(20)[:, None] * torch.rand(40, 1)
    assert_exact(path[1], k, (k + 0.5 + offset) / 256, torch.full((40, 1), log_scale))


@pytest.mark.parametrize("spread", [30.0, 1e4])
def test_far_tails(path, spread):
    """Means far below and above the data (u, v up to ~1e8 at log_scale -10): finite, exact."""
    mean, log_scale = params(K, B, 50, spread=spread)
    out = check(bin_values(B, 50), mean, log_scale.clamp(-10, 2), path[1])
    assert out.isfinite().all()


@pytest.mark.parametrize("log_scale", [82.0, 86.0])
def test_broad_scales_up_to_the_documented_limit(path, log_scale):
    """e^-log_scale / bins below float32's smallest normal number (log_scale > 81.8 for 256
    bins): log P and its gradients still follow log_scale."""
    k = torch.tensor([[3], [128], [255]])
    mean = torch.tensor([[0.3], [128.5 / 256], [0.9]])
    assert_exact(path[1], k, mean, torch.full((3, 1), log_scale))


def test_infinite_and_overflowing_means(path):
    """A mean at +-inf, or whose standardized edges overflow float32: log P is 0 or -inf as the
    limit says, never NaN."""
    x = torch.tensor([[0, 255, 0, 255, 0, 200]])
    mean = torch.tensor([[math.inf, math.inf, -math.inf, -math.inf, 3.0, -2.0]])
    log_scale = torch.tensor([[-4.0, -4.0, -4.0, -4.0, -87.9, -87.9]])
    want = [-math.inf, 0.0, 0.0, -math.inf, -math.inf, -math.inf]
    for d in range(x.shape[1]):
        args = (t[:, d : d + 1].to(path[1]) for t in (x, mean, log_scale))
        assert fastvae.discretized_logistic_log_prob(*args).item() == want[d], f"case {d}"


def test_gradients_at_an_infinite_mean_that_holds_all_the_mass(path):
    """The last bin under a mean at +inf, the first under -inf: P = 1 whatever the scale, so
    both gradients are 0 (u sigmoid(u) at u = -inf is 0, not -inf * 0 = NaN)."""
    x = torch.tensor([[255, 0]], device=path[1])
    mean = torch.tensor([[math.inf, -math.inf]], device=path[1], requires_grad=True)
    log_scale = torch.full((1, 2), -4.0, device=path[1], requires_grad=True)
    out = fastvae.discretized_logistic_log_prob(x, mean, log_scale)
    out.backward(torch.tensor([1.5], device=path[1]))
    assert out.item() == 0.0
    assert mean.grad.tolist() == [[0.0, 0.0]] and log_scale.grad.tolist() == [[0.0, 0.0]]


@pytest.mark.parametrize(("x_dtype", "bins"), [(torch.int8, 256), (torch.uint8, 1024)])
def test_integer_x_of_a_dtype_narrower_than_the_bins(path, x_dtype, bins):
    """bins - 1 need not fit x's dtype (int8 data with 256 bins, uint8 with 1024)."""
    k = bin_values(B, 40, bins=min(bins, 128), dtype=torch.int64)
    check(k.to(x_dtype), *params(B, 40), path[1], bins=bins)


@pytest.mark.parametrize("bins", [2, 5, 100, 256, 1024])
def test_bins(path, bins):
    """Any number of bins (2: every bin an edge bin); non-powers of 2 have edges k / bins
    rounded in float32."""
    for x_dtype in (torch.int32, torch.float32):
        check(bin_values(B, 40, bins=bins, dtype=x_dtype), *params(B, 40), path[1], bins=bins)


def test_probabilities_sum_to_one(path):
    """exp(log P) over every bin of one element sums to 1: the edge bins reach +-inf."""
    k = torch.arange(256).unsqueeze(1)  # (256 bins, D = 1)
    for mean, log_scale in ((0.3, -2.0), (0.001, -10.0), (-5.0, 0.0), (0.99, 4.0), (0.5, -6.0)):
        log_p = fastvae.discretized_logistic_log_prob(
            k.to(path[1]), torch.tensor([mean], device=path[1]),
            torch.tensor([log_scale], device=path[1]),
        )  # fmt: skip
        assert abs(torch.logsumexp(log_p.double(), 0).item()) < 1e-6


LAYOUTS = {
    "transposed x": (lambda: (bin_values(23, B), lambda t: t.t()), lambda: params(K, B, 23)),
    "sliced x": (lambda: (bin_values(2 * B, 50), lambda t: t[::2, 1:24]), lambda: params(B, 23)),
    "x one row": (lambda: (bin_values(1, 23), lambda t: t.expand(B, 23)), lambda: params(B, 23)),
    "per-dim log_scale": (
        lambda: bin_values(B, 23), lambda: (params(B, 23)[0], torch.randn(23) - 3)
    ),
    "transposed mean": (
        lambda: bin_values(B, 23),
        lambda: ((torch.rand(23, B), lambda t: t.t()), torch.randn(B, 23) - 3),
    ),
    "one scale": (lambda: bin_values(K, B, 23), lambda: (params(B, 23)[0], torch.full((1,), -4.0))),
    "samples of the mean only": (
        lambda: bin_values(B, 23), lambda: (params(K, B, 23)[0], params(B, 23)[1])
    ),
    "samples of log_scale only": (
        lambda: bin_values(B, 23), lambda: (params(B, 23)[0], params(K, B, 23)[1])
    ),
}  # fmt: skip


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_strided_and_broadcast_inputs(path, layout):
    make_x, make_params = LAYOUTS[layout]
    check(make_x(), *make_params(), path[1])


def test_x_is_read_in_place(path, monkeypatch):
    """The kernels read one uint8 x (B, D) against (K, B, D) parameters through a stride-0 row
    dim: no expanded or converted copy of x."""
    if path[0] != "triton":
        pytest.skip("the kernels' operand layout")
    layouts = []

    def recording(*args, **kwargs):
        layouts.append(_launch.row_layout(*args, **kwargs))
        return layouts[-1]

    monkeypatch.setattr(discretized_logistic, "row_layout", recording)
    x = bin_values(B, 40).to(path[1])
    mean, log_scale = (t.to(path[1]).requires_grad_() for t in params(K, B, 40))
    fastvae.discretized_logistic_log_prob(x, mean, log_scale).sum().backward()
    assert len(layouts) == 2  # forward and backward
    for layout in layouts:
        x_op = layout.operands[0]
        assert x_op.tensor.data_ptr() == x.data_ptr() and x_op.tensor.dtype == torch.uint8
        assert (layout.n_rows, layout.R2, x_op.s1, x_op.s2) == (K * B, B, 0, 40)


def test_small_tiles(path, monkeypatch):
    """Many row blocks and several column blocks a row (D larger than one block)."""
    monkeypatch.setattr(_launch, "tile", small_tiles)
    check(bin_values(7, 11), *params(3, 7, 11), path[1])


def test_integer_and_float_x_agree(path):
    k = bin_values(B, 30)
    mean, log_scale = (t.to(path[1]) for t in params(B, 30))
    results = [_op(x.to(path[1]), mean, log_scale) for x in (k, k.long(), k / 256, k.half() / 256)]
    for other in results[1:]:
        assert torch.equal(other, results[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(path, dtype):
    """float16 / bfloat16 means and log-scales compute in float32 and return float32."""
    tol = {"out_tol": LOW[dtype], "grad_tol": LOW[dtype]}
    out = check(bin_values(B, 37), *params(K, B, 37), path[1], dtype=dtype, **tol)
    assert out.dtype == torch.float32


def test_float64_gradcheck():
    x = bin_values(3, 4, dtype=torch.float64)
    mean = torch.rand(2, 3, 4, dtype=torch.float64, requires_grad=True)
    log_scale = (torch.randn(3, 4, dtype=torch.float64) - 2).requires_grad_()
    out = fastvae.discretized_logistic_log_prob(x, mean, log_scale)
    assert out.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda m, s: _op(x, m, s), (mean, log_scale))
    interior = torch.full((3, 4), 3)  # of 5 bins
    assert torch.autograd.gradcheck(lambda m, s: _op(interior, m, s, 5), (mean, log_scale))


def test_x_gets_no_gradient(path):
    x = (bin_values(B, 5, dtype=torch.float32)).to(path[1]).requires_grad_()
    mean, log_scale = (t.to(path[1]).requires_grad_() for t in params(B, 5))
    out = fastvae.discretized_logistic_log_prob(x, mean, log_scale)
    grads = torch.autograd.grad(out.sum(), (x, mean, log_scale), allow_unused=True)
    assert grads[0] is None and grads[1] is not None and grads[2] is not None


def test_empty_inputs(path):
    mean = torch.zeros(K, 0, 5, device=path[1], requires_grad=True)
    out = fastvae.discretized_logistic_log_prob(bin_values(0, 5).to(path[1]), mean, mean)
    assert out.shape == (K, 0)
    out.sum().backward()
    assert mean.grad.shape == (K, 0, 5)
    zeros = torch.zeros(3, 0, device=path[1])
    assert torch.equal(_op(zeros, zeros, zeros).cpu(), torch.zeros(3))


def test_nan_in_nan_out(path):
    x = bin_values(4, 6, dtype=torch.float32).to(path[1])
    mean, log_scale = (t.to(path[1]) for t in params(4, 6))
    mean[1, 2] = math.nan
    log_scale[2, 5] = math.nan
    x[3, 0] = math.nan
    out = fastvae.discretized_logistic_log_prob(x, mean, log_scale)
    assert out.isnan().tolist() == [False, True, True, True]
    x[3, 0], mean[1, 2], log_scale[2, 5] = 0.0, 0.5, 0.0
    x[:, :2] = torch.tensor([0.0, 255 / 256])  # NaN in an edge bin's parameters
    mean[0, 0], log_scale[1, 1] = math.nan, math.nan
    out = fastvae.discretized_logistic_log_prob(x, mean, log_scale)
    assert out.isnan().tolist() == [True, True, False, False]


# -- checks of x's values ---------------------------------------------------------------------

OFF_GRID = {
    "k / 255 data": (lambda: torch.arange(256.0) / 255, "x must hold bin values k / bins"),
    "beyond the last bin": (lambda: torch.tensor([0.0, 1.0]), "got 1.0 (x * bins = 256)"),
    "negative": (lambda: torch.tensor([-1 / 256]), "x must hold bin values"),
    "integer bins": (lambda: torch.tensor([0, 256], dtype=torch.int16), "[0, 256); got 256"),
    "negative integer": (lambda: torch.tensor([-1, 3]), "[0, 256); got -1"),
}


@pytest.mark.parametrize("loops", [False, True], ids=["torch", "torch-loops"])
@pytest.mark.parametrize("case", list(OFF_GRID))
def test_values_off_the_bins_raise_on_cpu(case, loops, monkeypatch):
    if loops:
        run_cpu_loops(monkeypatch, LOOPS)
    make_x, message = OFF_GRID[case]
    x = make_x()
    mean = torch.zeros_like(x, dtype=torch.float32)
    for validate in (None, True):
        with pytest.raises(ValueError, match=re.escape(message)):
            fastvae.discretized_logistic_log_prob(x, mean, mean, validate=validate)


def test_unchecked_values_are_rounded_and_clamped(path):
    """validate=False (or CUDA, or compiled code): round(x * bins), clamped to the edge bins."""
    mean, log_scale = (torch.full((1, 4), v, device=path[1]) for v in (0.4, -2.0))

    def tensor(values):
        return torch.tensor([values], device=path[1])

    unchecked = _op_unchecked(tensor([0.3, 1.7, -0.2, 0.49 / 256]), mean, log_scale)
    assert torch.equal(unchecked, _op(tensor([77, 255, 0, 0]), mean, log_scale))
    unchecked = _op_unchecked(tensor([300, -4, 255, 2]), mean, log_scale)
    assert torch.equal(unchecked, _op(tensor([255, 0, 255, 2]), mean, log_scale))


def _op_unchecked(x, mean, log_scale):
    return fastvae.discretized_logistic_log_prob(x, mean, log_scale, validate=False)


def test_value_checks_need_no_device_sync():
    """validate=None checks CPU tensors only: not CUDA ones (meta stands in for them here)."""
    x = torch.tensor([0.3])
    assert discretized_logistic._checks_values(x, None)
    assert not discretized_logistic._checks_values(x.to("meta"), None)
    assert discretized_logistic._checks_values(x.to("meta"), True)
    assert not discretized_logistic._checks_values(x, False)


def test_compiled_code_skips_the_value_check():
    fn = torch.compile(_op, backend="eager", fullgraph=True)
    x = torch.tensor([[0.3, 0.5]])
    zeros = torch.zeros(1, 2)
    assert_close("compiled", fn(x, zeros, zeros), _op_unchecked(x, zeros, zeros))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_on_cuda():
    x = bin_values(B, 8).cuda()
    mean, log_scale = (t.cuda() for t in params(B, 8))
    torch.cuda.set_sync_debug_mode("error")
    try:
        fastvae.discretized_logistic_log_prob(x, mean, log_scale)
    finally:
        torch.cuda.set_sync_debug_mode("default")
