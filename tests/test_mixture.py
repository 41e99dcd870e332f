"""mixture_log_prob against torch.distributions' MixtureSameFamily (float64), on both paths.

Every case compares the output and the gradients of sum(out * g), for a random incoming g,
for z, means, logvars and log_weights.
"""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import assert_close, grads
from conftest import PATHS
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

import fastvae
from fastvae.ops.mixture import mixture_log_prob
from fastvae.reference import ExpandedMixture

FP32 = {"out": {"rtol": 1e-5, "atol": 1e-5}, "grad": {"rtol": 1e-4, "atol": 1e-5}}
BF16 = {"out": {"rtol": 1e-5, "atol": 1e-5}, "grad": {"rtol": 1e-2, "atol": 1e-2}}
NAMES = ("z", "means", "logvars", "log_weights")


@pytest.fixture(
    params=[
        pytest.param(("torch", "cpu", 2**62), id="torch-direct"),
        pytest.param(("torch", "cpu", 0), id="torch-expanded"),
        *PATHS[1:],
    ]
)
def path(request, monkeypatch):
    """(backend, device) of each code path: the torch path's two forms (direct, and the
    expanded square wherever its error bound holds: ExpandedMixture), the Triton kernels."""
    backend, device, *min_pairs = request.param
    if min_pairs:
        monkeypatch.setattr(ExpandedMixture, "MIN_PAIRS", min_pairs[0])
    with fastvae.use_backend(backend):
        yield backend, device


def oracle(z, means, logvars, log_weights=None):
    C = means.shape[0]
    logits = torch.zeros(C, dtype=means.dtype) if log_weights is None else log_weights
    if z.numel() == 0:  # torch.distributions cannot reshape empty batches
        return z.sum(-1) + 0.0 * (means.sum() + logvars.sum() + logits.sum())
    components = Independent(Normal(means, torch.exp(0.5 * logvars)), 1)
    return MixtureSameFamily(Categorical(logits=logits), components).log_prob(z)


def check(inputs, device, dtype=torch.float32, tol=FP32, z_view=None, op=mixture_log_prob):
    """`op` (ours: mixture_log_prob) on `inputs` (name -> tensor; log_weights may be None) in
    `dtype` against the oracle on the same values in float64. z_view: what the op receives
    instead of the z leaf (a strided or broadcast view). Gradient tolerances scale with each
    gradient's largest element: the gradients of logvars subtract terms of that size."""

    def leaves(dev, dt):
        return {
            k: None if v is None else v.to(dtype).to(dev, dt, copy=True).requires_grad_()
            for k, v in inputs.items()
        }

    def call(op, args):
        args = dict(args)
        if z_view is not None:
            args["z"] = z_view(args["z"])
        return op(**args)

    ours, ref = leaves(device, dtype), leaves("cpu", torch.float64)
    out = call(op, ours)
    expected = call(oracle, ref)
    assert out.device.type == torch.device(device).type
    assert out.dtype == torch.float32
    assert_close("output", out, expected, **tol["out"])
    g = torch.randn(expected.shape, dtype=torch.float64)
    present = [k for k in NAMES if inputs.get(k) is not None]
    ours_grads = grads([(out, g.to(out.device, out.dtype))], [ours[k] for k in present])
    ref_grads = grads([(expected, g)], [ref[k] for k in present])
    for name, a, e in zip(present, ours_grads, ref_grads):
        assert a.dtype == ours[name].dtype
        scale = e.abs().max().item() if e.numel() else 0.0
        rtol, atol = tol["grad"]["rtol"], tol["grad"]["atol"]
        assert_close(f"grad {name}", a, e, rtol=rtol, atol=atol * max(scale, 1.0))
    return out


def mixture(N, C, D, spread=1.0):
    return {
        "z": torch.randn(N, D) * 1.5,
        "means": torch.randn(C, D) * spread,
        "logvars": torch.randn(C, D) * 0.5,
        "log_weights": torch.randn(C),
    }


# -- shapes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("D", [1, 2, 37, 64])
@pytest.mark.parametrize("C", [1, 3, 17, 100])
def test_components_and_dims(path, C, D):
    check(mixture(33, C, D), path[1])


@pytest.mark.parametrize("N", [0, 1, 300])
@pytest.mark.parametrize(("C", "D"), [(3, 2), (100, 64)])
def test_rows(path, N, C, D):
    check(mixture(N, C, D), path[1])


def test_one_component_is_a_gaussian(path):
    inputs = {k: v.to(path[1]) for k, v in mixture(40, 1, 37).items()}
    out = mixture_log_prob(**inputs)
    expected = fastvae.gaussian_log_prob(inputs["z"], inputs["means"][0], inputs["logvars"][0])
    assert_close("one component", out, expected, rtol=1e-6, atol=1e-5)


def test_leading_dims(path):
    inputs = {**mixture(0, 5, 7), "z": torch.randn(2, 3, 4, 7)}
    assert check(inputs, path[1]).shape == (2, 3, 4)


def test_single_row_and_empty_latent(path):
    assert check({**mixture(0, 5, 7), "z": torch.randn(7)}, path[1]).shape == ()
    z, means = torch.randn(4, 0, device=path[1]), torch.randn(3, 0, device=path[1])
    assert_close("empty latent", mixture_log_prob(z, means, means), torch.zeros(4))


def test_uniform_weights(path):
    check({**mixture(50, 6, 9), "log_weights": None}, path[1])


# -- strided and broadcast inputs ------------------------------------------------------------

Z_VIEWS = {  # the z leaf's shape, and the view the op receives
    "transposed": ((19, 45), lambda t: t.t()),
    "every-other-column": ((45, 38), lambda t: t[:, ::2]),
    "broadcast-row": ((1, 19), lambda t: t.expand(45, 19)),
    "permuted-leading-dims": ((5, 9, 19), lambda t: t.permute(1, 0, 2)),
}


@pytest.mark.parametrize("layout", list(Z_VIEWS))
def test_strided_z(path, layout):
    shape, view = Z_VIEWS[layout]
    check({**mixture(0, 7, 19), "z": torch.randn(shape)}, path[1], z_view=view)


def test_transposed_components(path):
    inputs = mixture(30, 11, 20)
    means, logvars = inputs["means"].t().contiguous().t(), inputs["logvars"].t().contiguous().t()
    assert not means.is_contiguous()
    check({**inputs, "means": means, "logvars": logvars}, path[1])


# -- dtypes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(path, dtype):
    check(mixture(40, 17, 37), path[1], dtype=dtype, tol=BF16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_output_dtype(path, dtype):
    inputs = {k: v.to(path[1], dtype) for k, v in mixture(4, 3, 2).items()}
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    assert mixture_log_prob(**inputs).dtype == expected


def test_float64_gradcheck():
    # float64 always runs the torch path, whatever the backend.
    inputs = {k: v.double().requires_grad_() for k, v in mixture(5, 4, 3).items()}
    assert torch.autograd.gradcheck(mixture_log_prob, tuple(inputs.values()))
    assert torch.autograd.gradcheck(mixture_log_prob, tuple(inputs.values())[:3])


# -- extreme values --------------------------------------------------------------------------


def _extreme(N, C, D, tight=False):
    """logvars in [-10, 10] (or all near -10), three components 50 away from the others, and z
    drawn from the components, where the expanded square cancels worst."""
    means = torch.randn(C, D)
    means[:3] += 50.0
    if tight:
        logvars = torch.full((C, D), -10.0) + 0.1 * torch.randn(C, D)
    else:
        logvars = torch.empty(C, D).uniform_(-10.0, 10.0)
    pick = torch.randint(0, C, (N,))
    z = means[pick] + torch.randn(N, D) * torch.exp(0.5 * logvars[pick])
    return {"z": z, "means": means, "logvars": logvars, "log_weights": torch.randn(C)}


@pytest.mark.parametrize("tight", [False, True], ids=["logvars-10..10", "logvars-near-10"])
def test_extreme_values(path, tight):
    inputs = _extreme(200, 17, 37, tight)
    out = check(inputs, path[1])
    assert out.isfinite().all()


def test_far_from_every_component(path):
    """z 1e3 away: every responsibility but one underflows; nothing becomes NaN."""
    inputs = {**_extreme(0, 9, 16), "z": torch.randn(20, 16) * 1e3}
    check(inputs, path[1])


def test_zero_weight_component(path):
    inputs = mixture(25, 5, 8)
    inputs["log_weights"][2] = -float("inf")
    out = mixture_log_prob(**{k: v.to(path[1]) for k, v in inputs.items()})
    expected = oracle(**{k: v.double() for k, v in inputs.items()})
    assert_close("output", out, expected, **FP32["out"])


def test_empty_rows_backward(path):
    inputs = {k: v.to(path[1]).requires_grad_() for k, v in mixture(0, 4, 3).items()}
    out = mixture_log_prob(inputs["z"].reshape(2, 0, 3), *list(inputs.values())[1:])
    assert out.shape == (2, 0)
    out.sum().backward()
    assert inputs["z"].grad.shape == (0, 3)
    assert not inputs["means"].grad.any() and not inputs["log_weights"].grad.any()


def _far_and_tight(N, C, D):
    """Components 1e4 from the origin with s = 1e-4 (below float32's spacing there), z drawn
    from them: the expanded square's float64 sums cancel from ~1e16 D."""
    means = 1e4 + torch.randn(C, D)
    logvars = torch.full((C, D), -18.0)
    z = means[torch.randint(0, C, (N,))] + 1e-4 * torch.randn(N, D)
    return {"z": z, "means": means, "logvars": logvars, "log_weights": torch.randn(C)}


def test_the_error_bound_picks_the_form(monkeypatch):
    """The torch path takes the expanded square where its error bound holds (typical inputs
    never reach the direct form's mixture_logits) and the direct form where it does not (far,
    tight components), matching the oracle either way; the control, without the bound,
    takes the expanded square there too, and misses."""
    calls = []
    direct = fastvae.reference.mixture_logits
    monkeypatch.setattr(
        fastvae.reference, "mixture_logits", lambda *args: calls.append(1) or direct(*args)
    )
    monkeypatch.setattr(ExpandedMixture, "MIN_PAIRS", 0)
    with fastvae.use_backend("torch"):
        check(mixture(300, 100, 64), "cpu")
        assert not calls
        check(_far_and_tight(100, 5, 16), "cpu")
        assert calls
        calls.clear()
        monkeypatch.setattr(ExpandedMixture, "ERROR_SHARE", math.inf)
        with pytest.raises(AssertionError):
            check(_far_and_tight(100, 5, 16), "cpu")
        assert not calls


# -- tight, near-duplicate components (VampPrior) --------------------------------------------

# Output relative to itself, gradients relative to their largest element.
TIGHT = {"out": {"rtol": 1e-4, "atol": 0.0}, "grad": {"rtol": 0.0, "atol": 1e-3}}


def _near_duplicates(N, C, D, scale, clusters):
    """Clusters of near-duplicate components (means within 0.01 of each other) with logvars
    around -8 (s ~ 0.02), cluster centres at `scale`, z drawn from the components, so that
    several tight components share each row's mass, far from the origin. The expanded form
    z^2/s^2 - 2 z m/s^2 + m^2/s^2 cancels here (0.1-1.7 nats off and gradients up to 30% off,
    on both paths); the direct form matches float32 brute force (3e-5 nats, 2e-5)."""
    centres = torch.randn(clusters, D) * scale
    means = centres[torch.arange(C) % clusters] + 0.005 * (2.0 * torch.rand(C, D) - 1.0)
    logvars = -8.0 + 0.1 * torch.randn(C, D)
    pick = torch.randint(0, C, (N,))
    z = means[pick] + torch.exp(0.5 * logvars[pick]) * torch.randn(N, D)
    return {"z": z, "means": means, "logvars": logvars, "log_weights": torch.randn(C)}


@pytest.mark.parametrize("scale", [2.0, 5.0])
def test_tight_near_duplicate_components(path, scale):
    check(_near_duplicates(128, 64, 64, scale, clusters=8), path[1], tol=TIGHT)


@pytest.mark.parametrize("scale", [2.0, 5.0])
def test_tight_near_duplicate_components_vamp_size(scale):
    """The size of a VampPrior (500 pseudo-inputs, D = 64), on the torch path."""
    with fastvae.use_backend("torch"):
        check(_near_duplicates(256, 500, 64, scale, clusters=50), "cpu", tol=TIGHT)


# -- blocking ----------------------------------------------------------------------------------


def test_small_blocks(path, monkeypatch):
    """Many partial blocks of rows, components and dims: the GPU tile sizes (in the
    interpreter too) and row splits on Triton, 200-element blocks on the torch path."""
    monkeypatch.setattr(fastvae.ops.mixture, "interpreting", lambda: False)
    monkeypatch.setattr(fastvae.reference, "MIXTURE_BLOCK", 200)
    check(mixture(40, 70, 37), path[1])


def test_blocks_under_a_trace(monkeypatch):
    """The compiled torch path, in blocks of MIXTURE_TRACED_BLOCK: here 1480 elements, 40 of
    the 70 components by one row, 20 blocks."""
    monkeypatch.setattr(fastvae.reference, "MIXTURE_TRACED_BLOCK", 40 * 37)
    torch._dynamo.reset()
    compiled = torch.compile(mixture_log_prob, backend="aot_eager", fullgraph=True)
    check(mixture(10, 70, 37), "cpu", op=compiled)


# -- bad input -------------------------------------------------------------------------------

Z, MEANS, LOGVARS, LOG_WEIGHTS = torch.zeros(4, 3), torch.zeros(2, 3), torch.zeros(2, 3), None

BAD = {
    "z not a tensor": (dict(z=[0.0]), TypeError, "z must be a torch.Tensor"),
    "integer means": (
        dict(means=torch.zeros(2, 3, dtype=torch.int64)),
        TypeError,
        "means must be a floating-point",
    ),
    "log_weights not a tensor": (
        dict(log_weights=[0.0, 0.0]),
        TypeError,
        "log_weights must be a torch.Tensor",
    ),
    "integer log_weights": (
        dict(log_weights=torch.zeros(2, dtype=torch.int32)),
        TypeError,
        "log_weights must be a floating-point",
    ),
    "scalar z": (dict(z=torch.tensor(0.0)), ValueError, "z must have at least one dimension"),
    "means not 2-d": (
        dict(means=torch.zeros(3)),
        ValueError,
        "means must have shape (C, D) with D = z.shape[-1] = 3; got (3,)",
    ),
    "means of another D": (
        dict(means=torch.zeros(2, 4)),
        ValueError,
        "means must have shape (C, D) with D = z.shape[-1] = 3; got (2, 4)",
    ),
    "no components": (
        dict(means=torch.zeros(0, 3), logvars=torch.zeros(0, 3)),
        ValueError,
        "means must have at least one component",
    ),
    "logvars disagree": (
        dict(logvars=torch.zeros(3, 3)),
        ValueError,
        "logvars must have the shape of means, (2, 3); got (3, 3)",
    ),
    "log_weights of wrong length": (
        dict(log_weights=torch.zeros(3)),
        ValueError,
        "log_weights must have shape (C,) = (2,)",
    ),
    "log_weights 2-d": (
        dict(log_weights=torch.zeros(2, 1)),
        ValueError,
        "log_weights must have shape (C,)",
    ),
    "mixed devices": (
        dict(logvars=torch.zeros(2, 3, device="meta")),
        ValueError,
        "logvars is on meta but z is on cpu",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_a_clear_error(case):
    changes, error, message = BAD[case]
    args = {"z": Z, "means": MEANS, "logvars": LOGVARS, "log_weights": LOG_WEIGHTS, **changes}
    with pytest.raises(error) as info:
        mixture_log_prob(**args)
    assert message in str(info.value)
