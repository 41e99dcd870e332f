"""Property tests: every public op, forward and backward, against an independent float64 oracle.

Hypothesis draws shapes (sizes 0 and 1, D = 1, odd sizes, extra leading dims), broadcasting
between the arguments, layouts (transposed, permuted, sliced, stride-0 expanded views), dtypes
(float32, float16, bfloat16, float64) and value regimes (logvar in [-60, 60], means up to 1e4,
-inf log weights and whole -inf rows, NaN), and runs every case on both paths (the `path`
fixture: the torch reference and the Triton kernels, in the interpreter on CPU). The oracle is
torch.distributions / torch.logsumexp in float64 on the same (rounded) input values (for the
discretized logistic, the float64 formula of test_discretized_logistic.py), never
fastvae.reference; gradients are those of sum(out * g) for a random incoming g.

Tolerances come from an error model rather than one global rtol. fastvae computes in float32
(float64 for float64 inputs), so a result may be off by a few float32 roundings of the terms
that make it up: each check passes a per-element `scale` (the sum of those terms' magnitudes,
e.g. e^r and 1 in d/dlogvar = (e^r - 1) / 2, where they cancel), allowed C * u * scale, plus
one rounding to the result's storage dtype (relative, and summed over the copies of a
broadcast input). Where the float64 value does not fit the storage dtype (exp(30) in float16)
the result must be inf of the same sign. NaN is accepted only where the oracle has NaN, and
where float16 storage itself sums +inf and -inf: torch's expand-backward adding overflowed
copies of a stride-0 input, or autograd adding overflowed gradients that reach a float16 z.
The drawn-noise ops cannot be compared sample by sample: there the oracle is evaluated at the
returned z, and the tolerance adds the effect of z's own rounding, computed by evaluating the
oracle at z -+ that rounding (every term is at most quadratic in each z element).

Every example seeds its own noise, and settings(derandomize=True, database=None) makes the
run deterministic. The number of examples is tuned for a run of under a minute on two cores;
FASTVAE_PROPERTY_SCALE=10 (say) multiplies it for a deeper search; FASTVAE_PROPERTY_SHRINK=1
shrinks a failing example (slow through the interpreter).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
from collections.abc import Callable
from unittest import mock

import pytest
import torch
from _helpers import assert_close
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from test_discretized_logistic import oracle_elements as discretized_logistic_oracle
from torch.distributions import Bernoulli, MultivariateNormal, Normal, kl_divergence

import fastvae

# The interpreter computes masked-off lanes with numpy too (log(0), inf - inf, overflow).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SCALE = float(os.environ.get("FASTVAE_PROPERTY_SCALE", "1"))
SHRINK = os.environ.get("FASTVAE_PROPERTY_SHRINK", "0") == "1"
BASE = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    # shrinking through the interpreter can take minutes; a failure's draws are printed
    # either way, and derandomize makes them reproducible
    phases=[Phase.explicit, Phase.generate] + ([Phase.shrink] if SHRINK else []),
    # `path` and conftest's seeding fixture are function-scoped: both are meant to hold for
    # every example (the backend), or are replaced by each example's own seed.
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)


def examples(n: int) -> settings:
    return settings(BASE, max_examples=max(1, round(n * SCALE)))


INF = math.inf
LOG_2PI = math.log(2 * math.pi)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LEAD_SIZES = (1, 2, 3, 0, 5, 7)  # shrinks towards the first
D_SIZES = (1, 2, 3, 5, 8, 13, 33)
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded", "permuted")


# -- error model ------------------------------------------------------------------------------


def unit(dtype: torch.dtype) -> float:
    """Unit roundoff of the arithmetic fastvae does for inputs of `dtype`."""
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def storage_tol(dtype: torch.dtype) -> tuple[float, float]:
    """(relative, absolute) error of rounding a value once to `dtype`, computed in float32
    (float64): subnormal spacing, or float32 flushing subnormals to zero (as GPUs do, and the
    interpreter's numpy under a flush-to-zero CPU mode)."""
    info = torch.finfo(dtype)
    flush = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny
    return info.eps, max(info.tiny * info.eps, flush)


def backprop(full: torch.Tensor, leaf: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Pull a per-element tensor of `full`'s shape back to `leaf` through the view/expand that
    made `full` from it: gradients sum over broadcast copies, elements outside a slice get 0."""
    (out,) = torch.autograd.grad(full, leaf, value.to(full.dtype), retain_graph=True)
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.detach().view(ints), b.detach().view(ints))


def assert_within(name, actual, expected, tol, overflow=None, nan_ok=None):
    """actual against the float64 `expected`, elementwise within `tol` (a tensor or float).

    NaN exactly where the oracle has NaN; inf of the same sign where the oracle has it, or
    where the oracle's finite value is beyond actual's dtype (must: further than tol; may, of
    either sign: where [expected - tol, expected + tol] reaches the limit, or where `overflow`
    marks a float32 intermediate that overflows).
    `nan_ok` marks sums of copies that overflowed one by one (+inf + -inf may be NaN).
    """
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    tol = torch.as_tensor(tol, dtype=torch.float64).expand_as(e).nan_to_num(0.0)
    big = torch.finfo(actual.dtype).max
    finite = e.isfinite()
    must = finite & (e.abs() - tol > big)
    up, down = finite & ~must & (e + tol >= big), finite & ~must & (e - tol <= -big)
    if overflow is not None:
        up, down = up | (finite & ~must & overflow.cpu()), down | (finite & ~must & overflow.cpu())
    target = torch.where(must, e.sign() * INF, e)
    accepted_inf = (up & (a == INF)) | (down & (a == -INF))
    target = torch.where(accepted_inf, a, target)
    if nan_ok is not None:
        nan_ok = nan_ok.cpu() & finite & (a.isnan() | a.isinf())
        target = torch.where(nan_ok, a, target)
    # NaN and inf at the same places (assert_close with no tolerance on the finite values).
    assert_close(name, a, target, rtol=INF, atol=INF)
    keep = target.isfinite()
    err, bound = (a - target).abs()[keep], tol[keep]
    bad = err > bound
    if bad.any():
        i = int(torch.where(bad, err / bound.clamp_min(1e-300), 0.0).argmax())
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{err.numel()} elements off; worst actual="
            f"{a[keep][i].item():.9g} expected={target[keep][i].item():.9g} "
            f"(abs err {err[i].item():.3g} > tol {bound[i].item():.3g})"
        )


def check_output(name, actual, expected, scale, dtype, C, *, extra=0.0):
    """An output against the oracle: C * u * scale for the arithmetic, one rounding to the
    output's dtype, `extra` (e.g. the effect of z's rounding)."""
    rel, tiny = storage_tol(actual.dtype)
    tol = rel * expected.detach().abs() + C * unit(dtype) * scale + 1.01 * extra + tiny
    assert_within(name, actual, expected, tol)


def check_grads(ours, ref, full, h, gerr, dtype, C, dev=None, overflows=None):
    """Each gradient of our leaves against the oracle's, pulled back from per-element
    contributions h (full shape) through the views that made `full` from the float64 leaves.

    ours: name -> our gradient (or None); ref: name -> float64 leaf; gerr: name -> per-element
    error scale of h; dev: name -> per-element deviation from z's rounding, if any;
    overflows: name -> full-shape mask of contributions that pass through an intermediate
    gradient stored in a dtype it overflows (inf or NaN accepted where they land).
    """
    for name, grad in ours.items():
        assert grad is not None, f"no gradient for {name}"
        expected = backprop(full[name], ref[name], h[name])
        rel, tiny = storage_tol(grad.dtype)
        magnitude = backprop(full[name], ref[name], h[name].abs())
        error = backprop(full[name], ref[name], gerr[name])
        # each copy of a broadcast input is stored (subnormals: absolute spacing) before the sum
        tiny = backprop(full[name], ref[name], torch.full_like(h[name], tiny)) + tiny
        # a NaN scale (from NaN inputs) counts as 0, not as an unknown
        tol = (rel * magnitude).nan_to_num(0.0) + C * unit(dtype) * error.nan_to_num(0.0) + tiny
        if dev is not None and name in dev:  # (1% slack: these bounds can be attained)
            tol = tol + 1.01 * backprop(full[name], ref[name], dev[name]).nan_to_num(0.0)
        overflow = error > torch.finfo(compute_dtype(dtype)).max
        # copies of a broadcast leaf whose own gradient overflows the storage dtype: torch's
        # expand-backward sums them in that dtype, and +inf + -inf is NaN there
        copy_over = h[name].abs() >= torch.finfo(grad.dtype).max
        if overflows is not None and name in overflows:
            copy_over = copy_over | overflows[name]
        copy_over = copy_over.double()
        nan_ok = backprop(full[name], ref[name], copy_over) > 0
        assert_within(f"grad {name}", grad, expected, tol, overflow, nan_ok)


# -- strategies -------------------------------------------------------------------------------


def draw_shape(draw, max_lead=2, d_sizes=D_SIZES):
    lead = draw(st.lists(st.sampled_from(LEAD_SIZES), max_size=max_lead))
    return (*lead, draw(st.sampled_from(d_sizes)))


def draw_sub_shape(draw, shape):
    """A shape that broadcasts to `shape`: leading dims dropped, some dims set to 1."""
    drop = draw(st.integers(0, len(shape) - 1)) if len(shape) > 1 else 0
    return tuple(1 if draw(st.sampled_from((False, False, True))) else s for s in shape[drop:])


def draw_layout(draw, shape) -> tuple[tuple[int, ...], Callable]:
    """(the leaf's shape, view): view(leaf) has `shape` and the drawn layout."""
    name = draw(st.sampled_from(LAYOUTS))
    nd = len(shape)
    if name in ("transposed", "permuted") and nd < 2:
        name = "sliced"
    if name == "transposed":
        return (*shape[:-2], shape[-1], shape[-2]), lambda t: t.transpose(-1, -2)
    if name == "permuted":
        perm = tuple(reversed(range(nd)))
        return tuple(shape[p] for p in perm), lambda t: t.permute(perm)
    if name == "sliced":
        index = (slice(1, None, 2),) * nd
        return tuple(2 * s + 1 for s in shape), lambda t: t[index]
    if name == "expanded":
        base = tuple(1 if draw(st.booleans()) else s for s in shape)
        return base, lambda t: t.expand(shape)
    return tuple(shape), lambda t: t


def make_values(gen, shape, kind, regime, limit=60.0):
    """float64 values of one kind ("mean", "logvar", "eps") in one regime."""
    n = math.prod(shape)
    if kind == "eps" or regime == "normal":
        scale = {"mean": 2.0, "logvar": 1.0, "eps": 1.0}[kind]
        v = torch.randn(n, generator=gen, dtype=torch.float64) * scale
    elif regime == "zero":
        v = torch.zeros(n, dtype=torch.float64)
    elif kind == "logvar":  # wide: uniform in [-limit, limit], the ends and 0 included
        v = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * limit
        v[torch.rand(n, generator=gen) < 0.15] = limit
        v[torch.rand(n, generator=gen) < 0.15] = -limit
        v[torch.rand(n, generator=gen) < 0.1] = 0.0
    else:  # huge means: +-10^U(-2, 4), +-1e4 included
        v = 10.0 ** (torch.rand(n, generator=gen, dtype=torch.float64) * 6 - 2)
        v[torch.rand(n, generator=gen) < 0.2] = 1e4
        v *= torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    return v.reshape(shape)


def draw_input(draw, gen, shape, kind, dtype, limit=60.0, regimes=None):
    """(float64 values of the leaf, rounded through dtype; view giving `shape`)."""
    base_shape, view = draw_layout(draw, shape)
    if regimes is None:
        regimes = {"mean": ("normal", "huge", "zero"), "logvar": ("normal", "wide", "zero")}.get(
            kind, ("normal",)
        )
    regime = draw(st.sampled_from(regimes))
    values = make_values(gen, base_shape, kind, regime, limit)
    return values.to(dtype).double(), view


def leaf_holding(values, base_shape, view):
    """A leaf of base_shape whose view(leaf) holds `values` (where an expanded view repeats
    one element, that of the first copy)."""
    leaf = torch.zeros(base_shape, dtype=values.dtype)
    target = view(leaf)
    if any(st == 0 and n > 1 for st, n in zip(target.stride(), target.shape)):
        index = tuple(slice(0, b) for b in base_shape)
        return values[index].clone()
    target.copy_(values)
    return leaf


class Leaves:
    """Our leaves (dtype, device) and the oracle's (float64, cpu), from the same values, and
    the views each side passes on."""

    def __init__(self, specs, dtype, device, grad=None, dtypes=None):
        self.names = list(specs)
        self.ours, self.ref, self.views, self.ref_views = {}, {}, {}, {}
        for name, (values, view) in specs.items():
            requires = grad is None or name in grad
            own = (dtypes or {}).get(name, dtype)
            self.ours[name] = values.to(device, own).requires_grad_(requires)
            self.ref[name] = values.clone().requires_grad_(requires)
            self.views[name] = view(self.ours[name])
            self.ref_views[name] = view(self.ref[name])
        self.snapshot = {k: v.detach().clone() for k, v in self.ours.items()}

    def assert_unmodified(self):
        for name, leaf in self.ours.items():
            assert same_bits(leaf, self.snapshot[name]), f"{name} was written to"

    def grads(self, outputs, incoming, names):
        """Our gradients of sum(out * g) for the leaves `names`."""
        pairs = [(o, g) for o, g in zip(outputs, incoming) if o.requires_grad]
        if not pairs:
            return {n: torch.zeros_like(self.ours[n]) for n in names}
        got = torch.autograd.grad(
            [o for o, _ in pairs],
            [self.ours[n] for n in names],
            [g.to(o.device, o.dtype) for o, g in pairs],
            allow_unused=True,
        )
        return {n: torch.zeros_like(self.ours[n]) if g is None else g for n, g in zip(names, got)}


def incoming(gen, shape, dtype) -> torch.Tensor:
    """A random incoming gradient, exactly representable in the output's dtype."""
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).double()


def gen_of(draw) -> torch.Generator:
    return torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))


def patch_internal(module_name: str, attribute: str, value) -> contextlib.AbstractContextManager:
    """Patch a fastvae internal the tests use to reach more code (tile sizes, noise blocks);
    a no-op where a rewrite of the ops has removed it."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return contextlib.nullcontext()
    if not hasattr(module, attribute):
        return contextlib.nullcontext()
    return mock.patch.object(module, attribute, value)


@contextlib.contextmanager
def kernel_tiles(draw, path):
    """On the Triton path, half the examples launch the kernels with the GPU's tile sizes
    instead of the interpreter's large ones: several programs per launch, masked edges."""
    if path[0] != "triton" or not draw(st.booleans()):
        yield
        return
    with (
        patch_internal("fastvae.ops._launch", "interpreting", lambda: False),
        patch_internal("fastvae.ops.mixture", "interpreting", lambda: False),
    ):
        yield


# -- oracles ----------------------------------------------------------------------------------


def normal(mu, logvar):
    return Normal(mu, torch.exp(0.5 * logvar), validate_args=False)


def mixture_logits(z, means, logvars, log_weights):
    """log pi_c + log N(z; m_c, diag e^logvars_c) for z (..., 1, D) against (..., C, D)
    components: (..., C), with Normal and log_softmax in float64."""
    log_pi = torch.log_softmax(log_weights, -1)
    return log_pi + normal(means, logvars).log_prob(z).sum(-1)


def mixture_scales(z, means, logvars, log_weights):
    """(S (..., C): magnitude of each logit's terms, r (..., C): responsibilities), detached."""
    z, means, logvars, log_weights = (t.detach() for t in (z, means, logvars, log_weights))
    D = means.shape[-1]
    F = 4 + logvars.abs()
    quad = ((z - means) ** 2 * torch.exp(-logvars) * F).sum(-1)
    finite_w = log_weights.masked_fill(log_weights.isinf(), 0.0)
    w_scale = 2 + 2 * finite_w.abs().amax(-1, keepdim=True)
    S = w_scale + 0.5 * (D * LOG_2PI + logvars.abs().sum(-1) + quad)
    r = torch.softmax(mixture_logits(z, means, logvars, log_weights), -1).nan_to_num(0.0)
    return S, r


def lse_error(log_r, delta, dim):
    """A bound on the error of a log-sum-exp whose terms are each off by up to `delta`, from
    the exact normalized log weights log_r = x - logsumexp(x): log sum r e^(+-delta)."""
    up = torch.logsumexp(log_r + delta, dim)
    down = -torch.logsumexp(log_r - delta, dim)
    return torch.maximum(up, down).nan_to_num(0.0, 0.0, 0.0)  # all -inf rows: exact


def weight_error(log_r, delta):
    """A bound on |computed - exact| normalized weight exp(log_r) when log_r is off by up to
    delta: absolute, so that a weight whose float64 value underflows to 0 may be anything up
    to e^(log_r + delta) where float32 cannot tell the log weights apart. Not capped at 1:
    the kernels compute exp(x - lse) with their own rounded lse, so that where the terms are
    huge (lse ~ -4.5e8, ulp 32) all the weights may come out near 1 (capped at e^60: finite)."""
    r = torch.exp(log_r)
    hi = torch.exp(torch.clamp(log_r + delta, max=60.0))
    err = torch.maximum(hi - r, r - torch.exp(log_r - delta)).nan_to_num(0.0, 0.0, 0.0)
    return err + torch.finfo(torch.float32).tiny  # a subnormal weight may be flushed to 0


def mixture_log_prob_error(z, means, logvars, log_weights, C, u):
    """A bound on the float32 error of a mixture's log-density at z (..., 1, D), in units of
    C u (a `scale`): each logit is off by up to C u S_c, and the log-sum-exp follows."""
    logits = mixture_logits(z, means, logvars, log_weights).detach()
    S_c, _ = mixture_scales(z, means, logvars, log_weights)
    log_r = logits - torch.logsumexp(logits, -1, keepdim=True)
    return lse_error(log_r, C * u * S_c, -1) / (C * u) + 1


def mixture_errors(z, means, logvars, log_weights, g, r, r_err):
    """Error scales of the mixture's gradient contributions, per (..., C, D) (log_weights:
    (..., C)), given |g| (..., 1), the responsibilities r (..., C) and a bound r_err on their
    error: (gerr: the terms' own float32 roundings, in units of C u; dev: absolute, from r's
    error). z (..., 1, D) against components (..., C, D)."""
    z, means, logvars, log_weights = (t.detach() for t in (z, means, logvars, log_weights))
    F = 4 + logvars.abs()
    inv = torch.exp(-logvars)
    slope, quad = (z - means).abs() * inv, (z - means) ** 2 * inv
    a, a_err = (g * r)[..., None], (g * r_err)[..., None]
    pi = torch.softmax(log_weights, -1)
    finite_w = log_weights.masked_fill(log_weights.isinf(), 0.0).abs().amax(-1, keepdim=True)
    gerr = {
        "z": a * slope * F,
        "means": a * slope * F,
        "logvars": 0.5 * a * (quad * F + 1),
        "log_weights": g * r + pi * g * (2 + 2 * finite_w),
    }
    dev = {
        "z": a_err * slope,
        "means": a_err * slope,
        "logvars": 0.5 * a_err * (quad + 1),
        "log_weights": g * r_err,
    }
    return gerr, dev


# -- 1. the closed-form Gaussian ops ----------------------------------------------------------

GAUSSIAN_OPS = ("reparameterize", "reparameterize_k", "gaussian_kl", "reparameterize_kl",
                "gaussian_log_prob")  # fmt: skip


def gaussian_oracle(op, f, free_bits):
    """Outputs of `op` from full-shape float64 tensors f, by torch.distributions."""
    out = {}
    if "eps" in f:
        q = normal(f["mu"], f["logvar"])
        out["z"] = q.loc + q.scale * f["eps"]
    if op in ("gaussian_kl", "reparameterize_kl"):
        zero = torch.zeros_like(f["mu"])
        prior = normal(f.get("prior_mu", zero), f.get("prior_logvar", zero))
        kl = kl_divergence(normal(f["mu"], f["logvar"]), prior)
        out["kl"] = (torch.clamp(kl, min=free_bits) if free_bits else kl).sum(-1)
    if op == "gaussian_log_prob":
        out["log_prob"] = normal(f["mu"], f["logvar"]).log_prob(f["x"]).sum(-1)
    return out


def gaussian_errors(f, g):
    """(output scales, per-element gradient error scales) of the Gaussian ops' float32 terms.
    f: detached full-shape inputs; g: incoming gradients, each expanded to the full shape."""
    f = {k: v.detach() for k, v in f.items()}
    mu, lv = f["mu"], f["logvar"]
    scale = {}
    gerr = {k: torch.zeros_like(mu if k != "x" else f["x"]) for k in f}
    if "z" in g:
        sigma, eps, gz = torch.exp(0.5 * lv), f["eps"], g["z"].abs()
        F = 4 + lv.abs()
        scale["z"] = mu.abs() + sigma * eps.abs() * F
        gerr["mu"] = gerr["mu"] + gz
        gerr["logvar"] = gerr["logvar"] + gz * sigma * eps.abs() * F / 2
        gerr["eps"] = gz * sigma * F
    if "kl" in g:
        pm = f.get("prior_mu", torch.zeros_like(mu))
        plv = f.get("prior_logvar", torch.zeros_like(mu))
        F, Fp = 4 + lv.abs() + plv.abs(), 4 + plv.abs()  # exp's argument error
        e_r, inv, d = torch.exp(lv - plv), torch.exp(-plv), mu - pm
        scale["kl"] = 0.5 * (e_r * F + lv.abs() + plv.abs() + 1 + d * d * inv * Fp)
        gk = g["kl"].abs()
        gerr["mu"] = gerr["mu"] + gk * d.abs() * inv * Fp
        gerr["logvar"] = gerr["logvar"] + 0.5 * gk * (e_r * F + 1)
        if "prior_mu" in f:
            gerr["prior_mu"] = gk * d.abs() * inv * Fp
        if "prior_logvar" in f:
            gerr["prior_logvar"] = 0.5 * gk * (1 + e_r * F + d * d * inv * Fp)
    if "log_prob" in g:
        d, inv, gl = f["x"] - mu, torch.exp(-lv), g["log_prob"].abs()
        F = 4 + lv.abs()
        scale["log_prob"] = 0.5 * (LOG_2PI + lv.abs() + d * d * inv * F)
        gerr["x"] = gl * d.abs() * inv * F
        gerr["mu"] = gl * d.abs() * inv * F
        gerr["logvar"] = 0.5 * gl * (d * d * inv * F + 1)
    return scale, gerr


def choose_free_bits(draw, f, C, dtype):
    """0, or a threshold between two of the per-element KLs, clear of both by more than the
    float32 error of each (so both paths clamp the same elements), or above them all."""
    mode = draw(st.sampled_from(("none", "between", "all")))
    if mode == "none":
        return 0.0
    zero = torch.zeros_like(f["mu"])
    prior = normal(f.get("prior_mu", zero), f.get("prior_logvar", zero))
    kl = kl_divergence(normal(f["mu"], f["logvar"]), prior).detach().flatten()
    kl = kl[kl.isfinite()]
    if kl.numel() == 0:
        return 0.5
    if mode == "all":
        return float(kl.max()) * 2 + 1.0
    scale, _ = gaussian_errors({k: v for k, v in f.items()}, {"kl": torch.zeros(())})
    slack = float((C * unit(dtype) * scale["kl"]).max()) * 2 + 1e-6
    v = kl.sort().values
    gaps = torch.nonzero((v[1:] - v[:-1] > 2 * slack) & (v[1:] > 0)).flatten()
    assume(gaps.numel() > 0)
    i = int(gaps[draw(st.integers(0, gaps.numel() - 1))])
    return float((v[i] + v[i + 1]) / 2)


@pytest.mark.parametrize("op", GAUSSIAN_OPS)
@examples(40)
@given(data=st.data())
def test_gaussian_ops(path, op, data):
    """reparameterize (eps given, with and without num_samples), gaussian_kl and
    reparameterize_kl (no prior, either part, both; free bits), gaussian_log_prob."""
    with kernel_tiles(data.draw, path):
        check_gaussian_op(path, op, data)


def check_gaussian_op(path, op, data):
    draw, device = data.draw, path[1]
    gen = gen_of(draw)
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw_shape(draw, max_lead=3 if op == "gaussian_log_prob" else 2)
    names = ["x", "mu", "logvar"] if op == "gaussian_log_prob" else ["mu", "logvar"]
    kinds = {"x": "mean", "mu": "mean", "logvar": "logvar", "prior_mu": "mean",
             "prior_logvar": "logvar", "eps": "eps"}  # fmt: skip
    kl_op = op in ("gaussian_kl", "reparameterize_kl")
    shapes = {n: draw_sub_shape(draw, shape) for n in names}
    S = torch.broadcast_shapes(*shapes.values())
    if kl_op:
        for part in draw(st.sampled_from(((), ("prior_mu",), ("prior_logvar",),
                                          ("prior_mu", "prior_logvar")))):  # fmt: skip
            shapes[part] = draw_sub_shape(draw, S)
    K = draw(st.sampled_from((1, 2, 3))) if op == "reparameterize_k" else None
    full_shape = S if K is None else (K, *S)
    if op in ("reparameterize", "reparameterize_k", "reparameterize_kl"):
        shapes["eps"] = full_shape
    specs = {}
    for n, s in shapes.items():
        # the prior's logvar stays in [-20, 20]: e^(logvar - prior_logvar) fits float32
        limit = 20.0 if n == "prior_logvar" else 60.0
        specs[n] = draw_input(draw, gen, s, kinds[n], dtype, limit)
    nan = draw(st.sampled_from((None,) * 5 + tuple(specs)))
    leaves = Leaves(specs, dtype, device)
    full = {n: v.expand(full_shape) for n, v in leaves.ref_views.items()}
    C = 32 + 2 * S[-1]
    free_bits = 0.0
    if op in ("gaussian_kl", "reparameterize_kl"):
        free_bits = choose_free_bits(draw, full, C, dtype)
    if nan is not None and free_bits == 0.0 and specs[nan][0].numel():
        for t in (leaves.ours[nan], leaves.ref[nan], leaves.snapshot[nan]):
            t.data.view(-1)[0] = math.nan  # NaN in gives NaN out

    args = leaves.views
    if op.startswith("reparameterize") and op != "reparameterize_kl":
        outs = {"z": fastvae.reparameterize(args["mu"], args["logvar"], eps=args["eps"],
                                            num_samples=K)}  # fmt: skip
    elif op == "reparameterize_kl":
        z, kl = fastvae.reparameterize_kl(**args, free_bits=free_bits)
        outs = {"z": z, "kl": kl}
    elif op == "gaussian_kl":
        outs = {"kl": fastvae.gaussian_kl(**args, free_bits=free_bits)}
    else:
        outs = {"log_prob": fastvae.gaussian_log_prob(**args)}
    expected = gaussian_oracle(op, full, free_bits)
    assert outs.keys() == expected.keys()

    g = {k: incoming(gen, e.shape, outs[k].dtype) for k, e in expected.items()}
    g_full = {k: v if k == "z" else v[..., None].expand(full_shape) for k, v in g.items()}
    scale, gerr = gaussian_errors(full, g_full)
    for k, out in outs.items():
        assert out.device.type == torch.device(device).type
        want = dtype if k == "z" else compute_dtype(dtype)
        assert out.dtype == want, f"{k}: {out.dtype} != {want}"
        s = scale[k] if k == "z" else (scale[k] + free_bits).sum(-1)
        check_output(k, out, expected[k], s, dtype, C)

    ours = leaves.grads([outs[k] for k in g], list(g.values()), leaves.names)
    h = dict(zip(full, torch.autograd.grad(
        list(expected.values()), list(full.values()), list(g.values()),
        retain_graph=True, allow_unused=True,
    )))  # fmt: skip
    h = {k: torch.zeros_like(full[k]) if v is None else v for k, v in h.items()}
    for name, grad in ours.items():
        assert grad.dtype == dtype and grad.shape == leaves.ours[name].shape
    check_grads(ours, leaves.ref, full, h, gerr, dtype, C)
    leaves.assert_unmodified()


# -- 2. log_mean_exp --------------------------------------------------------------------------


@examples(60)
@given(data=st.data())
def test_log_mean_exp(path, data):
    """Any dim, any layout, -inf entries and whole -inf rows, +inf, NaN, |x| up to 1e4."""
    with kernel_tiles(data.draw, path):
        check_log_mean_exp(path, data)


def check_log_mean_exp(path, data):
    draw, device = data.draw, path[1]
    gen = gen_of(draw)
    dtype = draw(st.sampled_from(DTYPES))
    shape = list(draw_shape(draw, max_lead=2, d_sizes=(1, 2, 3, 5, 8, 17, 0)))
    dim = draw(st.integers(-len(shape), len(shape) - 1))
    if shape[dim] == 0:
        shape[dim] = draw(st.sampled_from((1, 4, 40)))
    shape = tuple(shape)
    base_shape, view = draw_layout(draw, shape)
    regime = draw(st.sampled_from(("normal", "huge", "mixed")))
    x = torch.randn(base_shape, generator=gen, dtype=torch.float64) * 3
    if regime != "normal":
        offset = 1e4 if regime == "huge" else torch.randn(base_shape, generator=gen) * 3e3
        x = x + offset * torch.where(torch.rand(base_shape, generator=gen) < 0.5, -1, 1)
    for special, p in ((-INF, draw(st.sampled_from((0.0, 0.3, 0.8)))),
                       (INF, draw(st.sampled_from((0.0,) * 4 + (0.05,)))),
                       (math.nan, draw(st.sampled_from((0.0,) * 4 + (0.05,))))):  # fmt: skip
        x[torch.rand(base_shape, generator=gen) < p] = special
    rows = view(x).movedim(dim, -1)  # a view of x: writing a row writes the leaf
    if draw(st.booleans()) and x.numel() and 0 not in rows.stride():  # whole -inf rows
        rows[torch.rand(rows.shape[:-1], generator=gen) < 0.5] = -INF
    x = x.to(dtype).double()
    leaves = Leaves({"x": (x, view)}, dtype, device)
    out = fastvae.log_mean_exp(leaves.views["x"], dim)

    xr = leaves.ref_views["x"]
    K = xr.shape[dim]
    lse = torch.logsumexp(xr.detach(), dim)
    expected = lse - math.log(K)
    assert out.dtype == compute_dtype(dtype) and out.shape == expected.shape
    finite_max = xr.detach().masked_fill(~xr.isfinite(), 0.0).abs().amax(dim)
    C = 32 + 2 * K
    check_output("log_mean_exp", out, expected, 3 * finite_max + math.log(K) + 1, dtype, C)

    g = incoming(gen, expected.shape, out.dtype)
    (ours,) = torch.autograd.grad(out, leaves.ours["x"], g.to(device, out.dtype))
    assert ours.dtype == dtype
    softmax = torch.exp(xr.detach() - lse.unsqueeze(dim))  # that of torch.logsumexp
    softmax = softmax.masked_fill((lse == -INF).unsqueeze(dim), 0.0)  # all -inf: 0
    h = softmax * g.unsqueeze(dim)
    gerr = h.abs() * (4 + 2 * xr.detach().abs() + 2 * expected.abs().unsqueeze(dim) + K)
    check_grads({"x": ours}, leaves.ref, {"x": xr}, {"x": h}, {"x": gerr.nan_to_num(0.0)},
                dtype, C)  # fmt: skip
    leaves.assert_unmodified()


# -- 3. mixture_log_prob ----------------------------------------------------------------------


@examples(40)
@given(data=st.data())
def test_mixture_log_prob(path, data):
    """z of any leading shape (0 rows, a single (D,) row), components of any layout (expanded:
    identical components), uniform or given weights with -inf entries, logvars in [-60, 60],
    means up to 1e4, z near the components or far from all of them, +-inf (density 0) or NaN."""
    with kernel_tiles(data.draw, path):
        check_mixture_log_prob(path, data)


def check_mixture_log_prob(path, data):
    draw, device = data.draw, path[1]
    gen = gen_of(draw)
    dtype = draw(st.sampled_from(DTYPES))
    lead = tuple(draw(st.lists(st.sampled_from(LEAD_SIZES), max_size=2)))
    D = draw(st.sampled_from((1, 2, 3, 5, 9)))
    C = draw(st.sampled_from((1, 2, 3, 7, 16)))
    specs = {
        "means": draw_input(draw, gen, (C, D), "mean", dtype),
        "logvars": draw_input(draw, gen, (C, D), "logvar", dtype),
    }
    z_shape, z_view = draw_layout(draw, (*lead, D))
    z_regime = draw(st.sampled_from(("near", "normal", "huge")))
    if z_regime == "near":  # drawn from the components
        means, logvars = (specs[k][1](specs[k][0]) for k in ("means", "logvars"))
        pick = torch.randint(0, C, lead, generator=gen)
        noise = torch.randn((*lead, D), generator=gen, dtype=torch.float64)
        z = leaf_holding(means[pick] + torch.exp(0.5 * logvars[pick]) * noise, z_shape, z_view)
    else:
        z = make_values(gen, z_shape, "mean", z_regime)
    # (a float16 z near a wide component overflows to inf, as may this one element)
    special = draw(st.sampled_from((None,) * 4 + (INF, -INF, math.nan)))
    if special is not None and z.numel():
        z.view(-1)[draw(st.integers(0, z.numel() - 1))] = special
    specs = {"z": (z.to(dtype).double(), z_view), **specs}
    weights = draw(st.sampled_from(("none", "normal", "minus-inf")))
    if weights != "none":
        w_shape, w_view = draw_layout(draw, (C,))
        w = torch.randn(w_shape, generator=gen, dtype=torch.float64) * 2
        if weights == "minus-inf" and C > 1:
            w[torch.rand(w_shape, generator=gen) < 0.5] = -INF
            if w_view(w).isinf().all():  # at least one component keeps some weight
                w = w.nan_to_num(neginf=0.0)
        specs["log_weights"] = (w.to(dtype).double(), w_view)
    leaves = Leaves(specs, dtype, device)
    v = leaves.views
    out = fastvae.mixture_log_prob(v["z"], v["means"], v["logvars"], v.get("log_weights"))
    assert out.shape == lead and out.dtype == compute_dtype(dtype)

    r = leaves.ref_views
    N = math.prod(lead)
    # A row whose z has an infinite element has density 0: out -inf and no gradient. The
    # oracle evaluates it at z = 0 and masks it (autograd alone would give 0 * inf = NaN).
    z_rows = r["z"].reshape(N, D)
    dead = z_rows.isinf().any(-1) & ~z_rows.isnan().any(-1)
    full = {
        "z": torch.where(dead[:, None], 0.0, z_rows)[:, None, :].expand(N, C, D),
        "means": r["means"].expand(N, C, D),
        "logvars": r["logvars"].expand(N, C, D),
    }
    if "log_weights" in r:
        full["log_weights"] = r["log_weights"].expand(N, C)
    log_weights = full.get("log_weights", torch.zeros(N, C, dtype=torch.float64))
    # A finite z whose q = sum (z - m)^2 / s^2 overflows float32 for every weighted component
    # (near a weightless wide one, far from tight ones) gets out -inf (the oracle's rounds
    # there too) but no gradient, where the oracle's is finite: not drawn.
    quad = ((full["z"] - full["means"]) ** 2 * torch.exp(-full["logvars"])).sum(-1).detach()
    far = (quad > 1e38) | (log_weights == -INF)
    assume(not (far.all(-1) & ~dead).any())
    logits = mixture_logits(full["z"], full["means"], full["logvars"], log_weights)
    lse = torch.logsumexp(logits, -1)  # (at z = 0 on the dead rows: for the error model)
    expected = lse.masked_fill(dead, -INF)
    S, resp = mixture_scales(full["z"], full["means"], full["logvars"], log_weights)
    tol_C = 32 + 2 * (C + D)
    # each logit is off by up to delta; the log-sum-exp, and the responsibilities, follow
    delta = tol_C * unit(dtype) * S
    log_r = (logits - lse[:, None]).detach()
    out_err = lse_error(log_r, delta, -1) + tol_C * unit(dtype) * (lse.detach().abs() + 1)
    r_err = weight_error(log_r, delta + out_err[:, None])
    check_output("mixture_log_prob", out, expected.reshape(lead), torch.zeros(lead), dtype,
                 tol_C, extra=out_err.reshape(lead))  # fmt: skip

    g = incoming(gen, lead, out.dtype).reshape(N)
    ours = leaves.grads([out], [g.reshape(lead)], leaves.names)
    h = dict(zip(full, torch.autograd.grad(expected, list(full.values()), g)))
    g_live = g.masked_fill(dead, 0.0).abs()[:, None]
    gerr, dev = mixture_errors(full["z"], full["means"], full["logvars"], log_weights,
                               g_live, resp, r_err)  # fmt: skip
    gerr = {k: gerr[k] + 2 * h[k].abs() for k in full}
    assert all(grad.dtype == dtype for grad in ours.values())
    check_grads(ours, leaves.ref, full, h, gerr, dtype, tol_C, dev=dev)
    leaves.assert_unmodified()


# -- 4. drawn noise: reparameterize, reparameterize_kl and importance_sample without eps -------

DRAWN_OPS = ("reparameterize", "reparameterize_k", "reparameterize_kl", "importance_sample")
PRIORS = ("none", "pair", "mixture", "distribution")


def draw_prior(draw, gen, S, dtype, kinds=PRIORS, limit=20.0):
    """(kind, specs of its leaves): none; a (mu, logvar) pair broadcasting to S; a mixture;
    or an object with log_prob (no leaves, built by op_prior)."""
    kind = draw(st.sampled_from(kinds))
    specs = {}
    if kind == "pair":
        for n, k in (("prior_mu", "mean"), ("prior_logvar", "logvar")):
            shape = draw_sub_shape(draw, S)
            regimes = ("normal", "zero") if k == "mean" else None
            specs[n] = draw_input(draw, gen, shape, k, dtype, limit, regimes=regimes)
    elif kind == "mixture":
        C = draw(st.sampled_from((1, 3, 6)))
        specs["means"] = draw_input(draw, gen, (C, S[-1]), "mean", dtype, regimes=("normal",))
        specs["logvars"] = draw_input(draw, gen, (C, S[-1]), "logvar", dtype, limit)
        specs["log_weights"] = draw_input(draw, gen, (C,), "mean", dtype, regimes=("normal",))
    return kind, specs


def op_prior(kind, v, dtype, device, D):
    """The prior argument of the ops: None, a pair, a triple, or an object with log_prob."""
    if kind == "pair":
        return (v["prior_mu"], v["prior_logvar"])
    if kind == "mixture":
        return (v["means"], v["logvars"], v["log_weights"])
    if kind == "distribution":
        return ShiftedNormal(compute_dtype(dtype))
    return None


class ShiftedNormal:
    """A prior given as an object with log_prob(z): N(0.5, I), in float32 (float64). (torch's
    Independent(Normal) would do, but cannot reshape an empty batch.)"""

    def __init__(self, dtype):
        self.dtype = dtype

    def log_prob(self, z):
        return Normal(0.5, 1.0, validate_args=False).log_prob(z.to(self.dtype)).sum(-1)


def log_prior(kind, z, f):
    """log p(z) (..., ) for z (..., D), by torch.distributions in float64; f: full leaves."""
    if kind == "pair":
        return normal(f["prior_mu"], f["prior_logvar"]).log_prob(z).sum(-1)
    if kind == "mixture":
        zc = z.unsqueeze(-2)
        return torch.logsumexp(mixture_logits(zc, f["means"], f["logvars"], f["log_weights"]), -1)
    loc = 0.5 if kind == "distribution" else 0.0
    return Normal(torch.full_like(z, loc), torch.ones_like(z)).log_prob(z).sum(-1)


def z_rounding(z, mu, sigma_eps, dtype):
    """A bound on |returned z - mu - sigma * eps| (exact arithmetic, the drawn eps)."""
    rel, tiny = storage_tol(dtype)
    return 2 * rel * z.abs() + 8 * unit(dtype) * (mu.abs() + sigma_eps.abs()) + 2 * tiny


@pytest.mark.parametrize("op", DRAWN_OPS)
@examples(30)
@given(data=st.data())
def test_drawn_noise(path, op, data):
    """Without eps the noise cannot be known in advance: the oracle is evaluated at the
    returned z (eps = (z - mu) / sigma), within the effect of z's rounding. Checked: z - mu is
    sigma times plausible N(0, 1) noise, the KL (exact: noise-free), log_ratio = log p(z) -
    log q(z|x) for each prior form, and the gradients: dz/dmu = 1, dz/dlogvar = (z - mu) / 2,
    and log_ratio's own (through z and log q's logvar) for the fused priors."""
    with kernel_tiles(data.draw, path):
        check_drawn_noise(path, op, data)


def check_drawn_noise(path, op, data):
    draw, device = data.draw, path[1]
    gen = gen_of(draw)
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw_shape(draw, max_lead=2)
    shapes = {n: draw_sub_shape(draw, shape) for n in ("mu", "logvar")}
    S = torch.broadcast_shapes(*shapes.values())
    kind, prior_specs = "none", {}
    if op == "importance_sample":
        kind, prior_specs = draw_prior(draw, gen, S, dtype)
    elif op == "reparameterize_kl":
        kind, prior_specs = draw_prior(draw, gen, S, dtype, ("none", "pair"))
    # A float16 z overflows beyond sigma ~ 6e4: fine where the prior is fused (z is inf, the
    # rest float32) or a mixture (density 0, no gradient), but torch's Normal.log_prob, behind
    # the "distribution" prior, backpropagates 0 * inf = NaN from an inf z.
    limit = 16.0 if dtype == torch.float16 and kind == "distribution" else 60.0
    specs = {
        "mu": draw_input(draw, gen, shapes["mu"], "mean", dtype),
        "logvar": draw_input(draw, gen, shapes["logvar"], "logvar", dtype, limit),
        **prior_specs,
    }
    leaves = Leaves(specs, dtype, device)
    v = leaves.views
    K = None
    if op in ("reparameterize_k", "importance_sample"):
        K = draw(st.sampled_from((1, 2, 4)))
    full_shape = S if K is None else (K, *S)

    if op in ("reparameterize", "reparameterize_k"):
        outs = {"z": fastvae.reparameterize(v["mu"], v["logvar"], num_samples=K)}
    elif op == "reparameterize_kl":
        pair = (v["prior_mu"], v["prior_logvar"]) if kind == "pair" else ()
        z, kl = fastvae.reparameterize_kl(v["mu"], v["logvar"], *pair)
        outs = {"z": z, "kl": kl}
    else:
        prior = op_prior(kind, v, dtype, device, S[-1])
        z, log_ratio = fastvae.importance_sample(v["mu"], v["logvar"], K, prior=prior)
        outs = {"z": z, "log_ratio": log_ratio}
    z = outs["z"]
    assert z.shape == full_shape and z.dtype == dtype

    r = leaves.ref_views
    full = {n: r[n].expand(full_shape) for n in ("mu", "logvar")}
    if kind == "pair":
        full.update({n: r[n].expand(full_shape) for n in ("prior_mu", "prior_logvar")})
    elif kind == "mixture":
        lead = (*full_shape[:-1], r["means"].shape[0])
        full.update({n: r[n].expand(*lead, S[-1]) for n in ("means", "logvars")})
        full["log_weights"] = r["log_weights"].expand(lead)
    mu, lv = full["mu"].detach(), full["logvar"].detach()
    sigma = torch.exp(0.5 * lv)
    z_r = z.detach().double().cpu()
    fin = z_r.isfinite()
    assert not z_r.isnan().any(), "NaN z from finite inputs"
    # inf only where the dtype cannot hold mu + sigma * eps (|eps| < 9 here)
    assert ((mu.abs() + 9 * sigma)[~fin] > torch.finfo(dtype).max).all(), "z overflowed"
    z_r = torch.where(fin, z_r, mu)
    eps_hat = (z_r - mu) / sigma
    u = z_rounding(z_r, mu, z_r - mu, dtype)
    well = fin & (u < 0.01 * sigma)  # eps known to 0.01 there
    assert (eps_hat[well].abs() < 9).all(), "z - mu is not sigma times N(0, 1) noise"

    def oracle(eps):
        """(outputs, the row's per-element terms that carry z's rounding) at eps."""
        zz = full["mu"] + torch.exp(0.5 * full["logvar"]) * eps
        got, terms = {"z": zz}, None
        if op == "reparameterize_kl":
            got["kl"] = gaussian_oracle("gaussian_kl", full, 0.0)["kl"]
        if op == "importance_sample":
            terms = -normal(full["mu"], full["logvar"]).log_prob(zz)
            if kind in ("none", "pair"):  # fused: log p at the kernel's own z
                prior = (
                    (full["prior_mu"], full["prior_logvar"])
                    if kind == "pair"
                    else (torch.zeros_like(zz), torch.zeros_like(zz))
                )
                terms = terms + normal(*prior).log_prob(zz)
                got["log_ratio"] = terms.sum(-1)
            else:  # the prior's log_prob at the returned z
                got["log_ratio"] = terms.sum(-1) + log_prior(kind, zz, full)
        return got, terms

    du = u / sigma
    expected, terms = oracle(eps_hat)
    C = 32 + 2 * S[-1]
    if "kl" in outs:
        scale, _ = gaussian_errors(full, {"kl": torch.zeros(())})
        check_output("kl", outs["kl"], expected["kl"], scale["kl"].sum(-1), dtype, C)
    if "log_ratio" in outs:
        lr = outs["log_ratio"]
        assert lr.dtype == compute_dtype(dtype) and lr.shape == full_shape[:-1]
        assert not lr.isnan().any(), "NaN log_ratio from finite inputs"
        shifted = [oracle(eps_hat + s * du)[1] for s in (1.0, -1.0)]
        dev = torch.maximum(*((t - terms).abs() for t in shifted)).detach().sum(-1)
        F = 4 + lv.abs()
        scale = 0.5 * (LOG_2PI + lv.abs() + eps_hat**2 * F) + 0.5 * (z_r.abs() + 0.5) ** 2
        if kind == "pair":
            pm, plv = full["prior_mu"].detach(), full["prior_logvar"].detach()
            scale = scale + 0.5 * (LOG_2PI + plv.abs() + (z_r - pm) ** 2 * torch.exp(-plv) * F)
        scale = scale.sum(-1)
        if kind == "mixture":
            args = (z_r.unsqueeze(-2), full["means"], full["logvars"], full["log_weights"])
            scale = scale + mixture_log_prob_error(*args, C, unit(dtype))
        rows = fin.all(-1)
        assert lr.detach().cpu()[rows].isfinite().all()
        check_output("log_ratio", lr[rows.to(lr.device)], expected["log_ratio"][rows],
                     scale[rows], dtype, C, extra=dev[rows])  # fmt: skip

    # gradients: random g on z and on the row term (none on a log_prob prior's row)
    g = {"z": incoming(gen, full_shape, dtype)}
    for k in ("kl", "log_ratio"):
        if k in outs:
            g[k] = incoming(gen, full_shape[:-1], compute_dtype(dtype))
    if kind in ("mixture", "distribution"):
        g["log_ratio"] = torch.zeros_like(g["log_ratio"])
    names = ["mu", "logvar"] + (["prior_mu", "prior_logvar"] if kind == "pair" else [])
    ours = leaves.grads([outs[k] for k in g], list(g.values()), names)
    assert all(ours[n].dtype == dtype for n in names)
    if not fin.all():  # z overflowed: no NaN gradient is all there is to check
        for n in names:  # (but float16 copies of an expanded view may sum +inf and -inf)
            view = leaves.views[n]
            if not any(st == 0 and k > 1 for st, k in zip(view.stride(), view.shape)):
                assert not ours[n].isnan().any(), f"NaN gradient for {n}"
        leaves.assert_unmodified()
        return

    def grads_at(eps):
        got, _ = oracle(eps)
        keys = [k for k in g if k in got]
        gs = torch.autograd.grad([got[k] for k in keys], [full[n] for n in names],
                                 [g[k] for k in keys], allow_unused=True)  # fmt: skip
        return {n: torch.zeros_like(full[n]) if t is None else t for n, t in zip(names, gs)}

    h = grads_at(eps_hat)
    h_shift = [grads_at(eps_hat + s * du) for s in (1.0, -1.0)]
    dev = {n: torch.maximum(*((hs[n] - h[n]).abs() for hs in h_shift)) for n in names}
    g_full = {k: t if k == "z" else t[..., None].expand(full_shape) for k, t in g.items()}
    if "log_ratio" in g:  # the oracle's own float64 error: autograd adds log q's two paths,
        # +-(z - mu) / sigma^2 each, which cancel, to the rest
        gr = 64 * 2.0**-53 * g_full["log_ratio"].abs()
        dev["mu"] = dev["mu"] + gr * eps_hat.abs() / sigma
        dev["logvar"] = dev["logvar"] + gr * eps_hat**2
    _, gerr = gaussian_errors(dict(full, eps=eps_hat),
                              {k: t for k, t in g_full.items() if k != "log_ratio"})  # fmt: skip
    if "log_ratio" in g:  # the row's terms: 1/2 from log q, the prior's slope at z
        gr = g_full["log_ratio"].abs()
        F = 4 + lv.abs()
        pm = full.get("prior_mu", torch.zeros_like(mu)).detach()
        plv = full.get("prior_logvar", torch.zeros_like(mu)).detach()
        slope = (z_r - pm).abs() * torch.exp(-plv) * (F + plv.abs())
        gerr["mu"] = gerr["mu"] + gr * slope
        gerr["logvar"] = gerr["logvar"] + gr * (1 + slope * sigma * eps_hat.abs() * F)
        if kind == "pair":
            gerr["prior_mu"] = gr * slope
            gerr["prior_logvar"] = gr * (1 + slope * (z_r - pm).abs())
    gerr = {n: gerr[n] + h[n].abs() for n in names}
    check_grads(ours, leaves.ref, {n: full[n] for n in names}, h, gerr, dtype, C, dev=dev)
    leaves.assert_unmodified()


# -- 5. iwae_loss -----------------------------------------------------------------------------


def iwae_weights(log_w):
    """softmax over the samples, 0 for rows of all -inf (the bound is -inf, no gradient)."""
    w = torch.softmax(log_w, 0)
    return w.masked_fill(torch.isneginf(log_w).all(0, keepdim=True), 0.0)


@pytest.mark.parametrize("estimator", ["iwae", "stl", "dreg"])
@examples(30)
@given(data=st.data())
def test_iwae_loss(path, estimator, data):
    """The loss and every gradient (encoder through z, decoder, log p(x|z) offsets, prior
    parameters) against the surrogates of docs/math.md built on torch.distributions, for priors
    None, (mu, logvar) and a mixture, reductions mean / sum / none, -inf log-likelihoods (some
    samples, and rows with every sample -inf: loss +inf, zero gradient)."""
    with kernel_tiles(data.draw, path):
        check_iwae_loss(path, estimator, data)


def check_iwae_loss(path, estimator, data):
    draw, device = data.draw, path[1]
    gen = gen_of(draw)
    dtype = draw(st.sampled_from(DTYPES))
    cd = compute_dtype(dtype)
    shape = draw_shape(draw, max_lead=2, d_sizes=(1, 2, 3, 5, 8))
    K = draw(st.sampled_from((1, 2, 3, 6)))
    # float16 z stays finite (sigma <= e^8): an inf z makes log w NaN, for the oracle too
    limit = 16.0 if dtype == torch.float16 else 60.0
    specs = {
        "mu": draw_input(draw, gen, draw_sub_shape(draw, shape), "mean", dtype),
        "logvar": draw_input(draw, gen, draw_sub_shape(draw, shape), "logvar", dtype, limit),
    }
    S = torch.broadcast_shapes(*(view(v).shape for v, view in specs.values()))
    B = S[:-1]
    specs["eps"] = draw_input(draw, gen, (K, *S), "eps", dtype)
    kind, prior_specs = draw_prior(draw, gen, S, dtype, kinds=("none", "pair", "mixture"))
    specs.update(prior_specs)
    # the decoder: log p(x | z) = -1/2 sum_d (x_d - w_d z_d)^2 + b, in the compute dtype
    x = (torch.randn(S, generator=gen, dtype=torch.float64) * 2).to(cd).double()
    specs["w"] = (torch.randn(S[-1], generator=gen, dtype=torch.float64).to(cd).double(),
                  lambda t: t)  # fmt: skip
    b = torch.randn((K, *B), generator=gen, dtype=torch.float64).to(cd).double()
    b[torch.rand(b.shape, generator=gen) < draw(st.sampled_from((0.0, 0.3)))] = -INF
    if draw(st.booleans()) and b.numel():
        b[:, torch.rand(B, generator=gen) < 0.5] = -INF  # rows of all -inf
    specs["b"] = (b, lambda t: t)
    reduction = draw(st.sampled_from(("mean", "sum", "none")))

    leaves = Leaves(specs, dtype, device, grad=set(specs) - {"eps"}, dtypes={"w": cd, "b": cd})
    v = leaves.views
    z = fastvae.reparameterize(v["mu"], v["logvar"], eps=v["eps"], num_samples=K)
    log_px = -0.5 * ((x.to(device, cd) - v["w"] * z.to(cd)) ** 2).sum(-1) + v["b"]
    prior = op_prior(kind, v, dtype, device, S[-1])
    loss = fastvae.iwae_loss(log_px, z, v["mu"], v["logvar"], estimator=estimator,
                             prior=prior, reduction=reduction)  # fmt: skip

    # oracle: z as the op returned it, with reparameterize's exact derivatives
    r = leaves.ref_views
    KS = (K, *S)
    full = {"mu": r["mu"].expand(KS), "logvar": r["logvar"].expand(KS), "w": r["w"].expand(KS),
            "b": r["b"]}  # fmt: skip
    if kind == "pair":
        full.update({n: r[n].expand(KS) for n in ("prior_mu", "prior_logvar")})
    elif kind == "mixture":
        C = r["means"].shape[0]
        full.update({n: r[n].expand(*KS[:-1], C, S[-1]) for n in ("means", "logvars")})
        full["log_weights"] = r["log_weights"].expand(*KS[:-1], C)
    eps = r["eps"].detach().expand(KS)
    sigma = torch.exp(0.5 * full["logvar"])
    z64 = (z.detach().double().cpu() + (full["mu"] - full["mu"].detach())
           + (sigma - sigma.detach()) * eps)  # fmt: skip
    log_px64 = -0.5 * ((x - full["w"] * z64) ** 2).sum(-1) + full["b"]
    q_mu, q_lv = full["mu"], full["logvar"]
    if estimator != "iwae":
        q_mu, q_lv = q_mu.detach(), q_lv.detach()
    log_q = normal(q_mu, q_lv).log_prob(z64).sum(-1)
    log_p = log_prior(kind, z64, full)
    log_w = log_px64 + log_p - log_q
    rows = -(torch.logsumexp(log_w.detach(), 0) - math.log(K))
    finite_w = torch.where(log_w.isfinite(), log_w, 0.0)  # w~ = 0 at the -inf ones
    n_rows = max(1, math.prod(B))
    expected = {"mean": rows.sum() / n_rows if rows.numel() else rows.mean(),
                "sum": rows.sum(), "none": rows}[reduction]  # fmt: skip

    # error model: each log w_k is off by up to delta_k = C u S_k (S_k: its terms' magnitude),
    # the bound by lse_error, each normalized weight by weight_error (absolute)
    C = 32 + 2 * (K + S[-1])
    u = unit(dtype)
    zd, lv = z64.detach(), full["logvar"].detach()
    mu_d, F = full["mu"].detach(), 4 + lv.abs()
    sig_eps = sigma.detach() * eps.abs()
    q_terms = 0.5 * (LOG_2PI + lv.abs() + (zd - mu_d) ** 2 * torch.exp(-lv) * F)
    q_lv = 0.5 * (1 + (zd - mu_d) ** 2 * torch.exp(-lv) * F)  # d log q / d logvar's terms
    resid = (x - full["w"].detach() * zd).abs()
    z_slope = resid * full["w"].detach().abs() + (zd - mu_d).abs() / sigma.detach() ** 2 * F
    z_slope_dev = torch.zeros_like(zd)  # from the mixture's responsibilities' error
    if kind == "pair":
        pm, plv = full["prior_mu"].detach(), full["prior_logvar"].detach()
        p_slope = (zd - pm).abs() * torch.exp(-plv) * (F + plv.abs())
        p_terms = 0.5 * (LOG_2PI + plv.abs() + (zd - pm).abs() * p_slope)
        z_slope = z_slope + p_slope
    elif kind == "mixture":
        zc = zd.unsqueeze(-2)
        S_c, resp = mixture_scales(zc, full["means"], full["logvars"], full["log_weights"])
        p_logits = mixture_logits(zc, full["means"], full["logvars"], full["log_weights"])
        p_log_r = (p_logits - torch.logsumexp(p_logits, -1, keepdim=True)).detach()
        p_delta = C * u * S_c
        p_err = lse_error(p_log_r, p_delta, -1)
        r_err = weight_error(p_log_r, p_delta + p_err[..., None])
        p_terms = ((resp * S_c).sum(-1) + p_err / (C * u))[..., None] / S[-1]
        inv = torch.exp(-full["logvars"].detach())
        comp_slope = (zc - full["means"].detach()).abs() * inv
        z_slope = z_slope + (
            resp[..., None] * comp_slope * (4 + full["logvars"].detach().abs())
        ).sum(-2)
        z_slope_dev = (r_err[..., None] * comp_slope).sum(-2)
    else:
        p_terms = 0.5 * (LOG_2PI + zd**2)
        z_slope = z_slope + zd.abs()
    b_abs = full["b"].detach().abs().nan_to_num(0.0, 0.0, 0.0)
    S_k = (0.5 * resid**2 + q_terms + p_terms).sum(-1) + b_abs
    S_k = S_k.masked_fill(full["b"].detach().isinf(), 0.0)
    w_t = iwae_weights(log_w.detach())
    log_wt = (log_w - torch.logsumexp(log_w, 0)).detach()
    delta = C * u * S_k
    row_err = lse_error(log_wt, delta, 0) + C * u * (math.log(K) + 1 + rows.abs())
    row_err = row_err.nan_to_num(0.0, 0.0, 0.0)
    w_err = weight_error(log_wt, delta + row_err)
    loss_err = {"mean": row_err.sum() / n_rows, "sum": row_err.sum(), "none": row_err}[reduction]
    loss_err = loss_err + C * u * rows.abs().nan_to_num(0.0, 0.0, 0.0).sum()
    assert loss.dtype == cd
    loss_tol = torch.finfo(cd).eps * expected.abs() + loss_err + torch.finfo(cd).tiny
    assert_within("loss", loss, expected, loss_tol)

    # gradients: random incoming g; per-row weights g_row of the reduction
    g = incoming(gen, expected.shape, cd)
    g_row = {"mean": g / n_rows, "sum": g, "none": g}[reduction].expand(B)
    names = [n for n in leaves.names if n != "eps"]
    ours = leaves.grads([loss], [g], names)
    enc = {"mu", "logvar"} if estimator == "dreg" else set()
    if estimator == "dreg":
        surrogate_enc = -(w_t.pow(2) * finite_w * g_row).sum()
        surrogate_dec = -(w_t * finite_w * g_row).sum()
        h_enc = torch.autograd.grad(surrogate_enc, [full[n] for n in enc], retain_graph=True)
        h_dec = torch.autograd.grad(surrogate_dec, [full[n] for n in names if n not in enc],
                                    retain_graph=True, allow_unused=True)  # fmt: skip
        h = dict(zip(enc, h_enc)) | dict(zip([n for n in names if n not in enc], h_dec))
    else:
        surrogate = -(w_t * finite_w * g_row).sum()
        hs = torch.autograd.grad(surrogate, [full[n] for n in names], retain_graph=True,
                                 allow_unused=True)  # fmt: skip
        h = dict(zip(names, hs))
    h = {n: torch.zeros_like(full[n]) if t is None else t for n, t in h.items()}
    # per element: |weight| * the magnitude of d log w / d leaf's terms (float32 roundings,
    # units of C u), and |g| * the weight's error * that magnitude (absolute)
    weight = {n: ((w_t**2 if n in enc else w_t) * g_row).abs() for n in names}
    weight_err = {n: ((2 if n in enc else 1) * w_err * g_row).abs() for n in names}
    terms = {
        "mu": z_slope * (2 if estimator == "iwae" else 1),
        "logvar": z_slope * sig_eps * F + q_lv,
        "w": resid * zd.abs(),
    }
    if kind == "pair":
        terms["prior_mu"] = p_slope
        terms["prior_logvar"] = 1 + (zd - pm).abs() * p_slope
    gerr = {n: weight[n][..., None] * t for n, t in terms.items()}
    gerr["b"] = weight["b"]
    dev = {n: weight_err[n][..., None] * t for n, t in terms.items()}
    dev["b"] = weight_err["b"]
    dev["mu"] = dev["mu"] + weight["mu"][..., None] * z_slope_dev
    dev["logvar"] = dev["logvar"] + weight["logvar"][..., None] * z_slope_dev * sig_eps
    if kind == "mixture":
        args = (zc, full["means"], full["logvars"], full["log_weights"])
        m_gerr, m_dev = mixture_errors(*args, weight["means"][..., None], resp, r_err)
        m_weight_err, _ = mixture_errors(*args, weight_err["means"][..., None], resp, resp * 0)
        for n in ("means", "logvars", "log_weights"):
            gerr[n], dev[n] = m_gerr[n], m_dev[n] + m_weight_err[n]
    gerr = {n: (gerr[n] + 2 * h[n].abs()).nan_to_num(0.0, 0.0, 0.0) for n in names}
    dev = {n: dev[n].nan_to_num(0.0, 0.0, 0.0) for n in names}
    for n in names:
        assert ours[n].dtype == (cd if n in ("w", "b") else dtype)
    # The gradients reaching z (decoder, log p, log q) are each stored in z's dtype and
    # summed there, and the direct ones of mu, logvar (log q, "iwae") in theirs: one rounding
    # of each term. Where they overflow float16 (the log q path's eps / sigma at logvar -60)
    # the encoder's gradient is inf or NaN.
    z_grad = (w_t * g_row).abs()[..., None] * z_slope * 2
    rel = storage_tol(dtype)[0]
    dev["mu"] = dev["mu"] + 2 * rel * z_grad
    dev["logvar"] = dev["logvar"] + 2 * rel * (
        z_grad * sig_eps / 2 + (w_t * g_row).abs()[..., None] * q_lv
    )
    z_over = z_grad >= torch.finfo(dtype).max
    overflows = {"mu": z_over, "logvar": z_over}
    check_grads(ours, leaves.ref, {n: full[n] for n in names}, h, gerr, dtype, C,
                dev=dev, overflows=overflows)  # fmt: skip
    all_minus_inf = torch.isneginf(full["b"].detach()).all(0)
    if all_minus_inf.any():
        assert (rows[all_minus_inf] == INF).all()
    leaves.assert_unmodified()


# -- 6. estimate_log_likelihood ---------------------------------------------------------------


@examples(25)
@given(data=st.data())
def test_estimate_log_likelihood(path, data):
    """The streamed estimate against log-mean-exp over the K samples it drew (recorded from
    the log_likelihood callback) of log p(x|z) + log p(z) - log q(z|x) by torch.distributions,
    for each prior form, chunked (noise blocks made small so that chunk_size bites) and not;
    rows whose log-likelihood is -inf give -inf. The chunking never changes the noise."""
    with kernel_tiles(data.draw, path):
        check_estimate_log_likelihood(path, data)


def check_estimate_log_likelihood(path, data):
    draw, device = data.draw, path[1]
    gen = gen_of(draw)
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw_shape(draw, max_lead=2, d_sizes=(1, 2, 3, 5))
    limit = 16.0 if dtype == torch.float16 else 60.0  # see test_drawn_noise
    specs = {
        "mu": draw_input(draw, gen, draw_sub_shape(draw, shape), "mean", dtype),
        "logvar": draw_input(draw, gen, draw_sub_shape(draw, shape), "logvar", dtype, limit),
    }
    S = torch.broadcast_shapes(*(view(v).shape for v, view in specs.values()))
    kind, prior_specs = draw_prior(draw, gen, S, dtype)
    specs.update(prior_specs)
    leaves = Leaves(specs, dtype, device, grad=set())
    v = leaves.views
    K = draw(st.sampled_from((1, 2, 5, 9)))
    chunk = draw(st.sampled_from((None, 1, 2, 4, 100)))
    x = torch.randn(S, generator=gen, dtype=torch.float64)
    w = torch.randn(S[-1], generator=gen, dtype=torch.float64)
    b = torch.randn(S[:-1], generator=gen, dtype=torch.float64) * 3  # log p(x|z) in float64
    if draw(st.booleans()):
        b[torch.rand(b.shape, generator=gen) < 0.5] = -INF

    def run(chunk_size, seen):
        def log_likelihood(x_arg, z):
            assert x_arg is x
            seen.append(z.clone())
            return -0.5 * ((x - w * z.double().cpu()) ** 2).sum(-1).to(device) + b.to(device)

        torch.manual_seed(seed)
        return fastvae.estimate_log_likelihood(
            lambda x_arg: (v["mu"], v["logvar"]), log_likelihood, x, K,
            chunk_size=chunk_size, prior=op_prior(kind, v, dtype, device, S[-1]),
        )  # fmt: skip

    block = max(1, math.prod(S)) * draw(st.sampled_from((1, 2)))  # one or two samples a block
    seen, seen_whole = [], []
    with patch_internal("fastvae.ops.gaussian", "NOISE_BLOCK_ELEMENTS", block):
        est = run(chunk, seen)
        whole = run(None, seen_whole)
    assert est.dtype == compute_dtype(dtype) and est.shape == S[:-1]
    z = torch.cat(seen)
    assert z.shape == (K, *S) and sum(len(t) for t in seen_whole) == K
    assert same_bits(z, torch.cat(seen_whole)), "the noise depends on the chunking"

    r = {n: t.detach() for n, t in leaves.ref_views.items()}
    full = {n: r[n].expand(K, *S) for n in ("mu", "logvar")}
    if kind == "pair":
        full.update({n: r[n].expand(K, *S) for n in ("prior_mu", "prior_logvar")})
    elif kind == "mixture":
        C = r["means"].shape[0]
        full.update({n: r[n].expand(K, *S[:-1], C, S[-1]) for n in ("means", "logvars")})
        full["log_weights"] = r["log_weights"].expand(K, *S[:-1], C)
    mu, lv = full["mu"], full["logvar"]
    sigma = torch.exp(0.5 * lv)
    z_r = z.double().cpu()
    fin = z_r.isfinite()
    assert not z_r.isnan().any()
    z_r = torch.where(fin, z_r, mu)
    eps_hat = (z_r - mu) / sigma
    du = z_rounding(z_r, mu, z_r - mu, dtype) / sigma
    log_px = -0.5 * ((x - w * z_r) ** 2).sum(-1) + b

    def terms(eps):
        zz = mu + sigma * eps
        t = -normal(mu, lv).log_prob(zz)
        if kind in ("none", "pair"):
            zero = torch.zeros_like(zz)
            prior = (full["prior_mu"], full["prior_logvar"]) if kind == "pair" else (zero, zero)
            t = t + normal(*prior).log_prob(zz)
        return t

    t0 = terms(eps_hat)
    dev = torch.maximum(*((terms(eps_hat + s * du) - t0).abs() for s in (1.0, -1.0))).sum(-1)
    log_w = log_px + t0.sum(-1)
    if kind in ("mixture", "distribution"):
        log_w = log_w + log_prior(kind, z_r, full)
    expected = torch.logsumexp(log_w, 0) - math.log(K)
    C = 32 + 2 * (K + S[-1])
    F = 4 + lv.abs()
    scale = (0.5 * (LOG_2PI + lv.abs() + eps_hat**2 * F + (x - w * z_r) ** 2)).sum(-1)
    scale = scale + b.abs().nan_to_num(0, 0, 0) + log_px.abs().nan_to_num(0, 0, 0)
    if kind == "pair":
        pm, plv = full["prior_mu"], full["prior_logvar"]
        scale = scale + (0.5 * (plv.abs() + (z_r - pm) ** 2 * torch.exp(-plv) * F)).sum(-1)
    elif kind == "mixture":
        args = (z_r.unsqueeze(-2), full["means"], full["logvars"], full["log_weights"])
        scale = scale + mixture_log_prob_error(*args, C, unit(dtype))
    else:
        scale = scale + (0.5 * (LOG_2PI + (z_r.abs() + 0.5) ** 2)).sum(-1)
    row_fin = fin.all(-1).all(0)
    tol = (C * unit(dtype) * scale + dev).amax(0)
    rel, tiny = storage_tol(compute_dtype(dtype))
    assert_within("estimate", est[row_fin.to(est.device)], expected[row_fin],
                  (rel * expected.abs() + tol + tiny)[row_fin])  # fmt: skip
    assert not est.isnan().any()
    assert_within(
        "chunked vs whole",
        est,
        whole.double(),
        2 * C * unit(dtype) * scale.amax(0) + tiny + rel * whole.double().abs(),
    )


# -- 7. data likelihoods: bernoulli_log_prob, discretized_logistic_log_prob -------------------


@examples(15)
@given(data=st.data())
def test_bernoulli_log_prob(path, data):
    """x binary or grey (float, bool, uint8; any layout, broadcast) against logits up to 1e4,
    and NaN, by torch.distributions.Bernoulli."""
    with kernel_tiles(data.draw, path):
        check_bernoulli_log_prob(path, data)


def check_bernoulli_log_prob(path, data):
    draw, device = data.draw, path[1]
    gen = gen_of(draw)
    dtype = draw(st.sampled_from(DTYPES))
    x_dtype = draw(st.sampled_from((torch.bool, torch.uint8, dtype)))
    shape = draw_shape(draw, max_lead=3)
    shapes = {"x": draw_sub_shape(draw, shape), "logits": draw_sub_shape(draw, shape)}
    S = torch.broadcast_shapes(*shapes.values())
    base_shape, view = draw_layout(draw, shapes["x"])
    x = torch.rand(base_shape, generator=gen, dtype=torch.float64)
    if not x_dtype.is_floating_point or draw(st.booleans()):
        x = (x < 0.5).double()  # else grey levels in [0, 1]
    specs = {"x": (x.to(x_dtype).double(), view)}
    specs["logits"] = draw_input(draw, gen, shapes["logits"], "mean", dtype)
    grad = {"x", "logits"} if x_dtype.is_floating_point else {"logits"}
    leaves = Leaves(specs, dtype, device, grad=grad, dtypes={"x": x_dtype})
    nan = draw(st.sampled_from((None, None, None, *sorted(grad))))
    if nan is not None and specs[nan][0].numel():
        for t in (leaves.ours[nan], leaves.ref[nan], leaves.snapshot[nan]):
            t.data.view(-1)[0] = math.nan

    out = fastvae.bernoulli_log_prob(leaves.views["x"], leaves.views["logits"])
    full = {n: v.expand(S) for n, v in leaves.ref_views.items()}
    x_f, l_f = full["x"], full["logits"]
    expected = Bernoulli(logits=l_f, validate_args=False).log_prob(x_f).sum(-1)
    cd = compute_dtype(torch.promote_types(dtype, x_dtype) if x_dtype.is_floating_point else dtype)
    assert out.dtype == cd and out.shape == S[:-1]
    C = 32 + 2 * S[-1]
    x_d, l_d = x_f.detach(), l_f.detach()
    scale = (l_d.abs() * (x_d.abs() + 1) + torch.log1p(torch.exp(-l_d.abs()))).sum(-1)
    check_output("log_prob", out, expected, scale, cd, C)

    g = incoming(gen, expected.shape, out.dtype)
    names = sorted(grad)
    ours = leaves.grads([out], [g], names)
    h = dict(zip(names, torch.autograd.grad(expected, [full[n] for n in names], g)))
    g_full = g.abs()[..., None].expand(S)
    gerr = {"logits": g_full * (x_d.abs() + 2), "x": g_full * l_d.abs()}
    check_grads(ours, leaves.ref, full, h, gerr, cd, C)
    leaves.assert_unmodified()


@examples(15)
@given(data=st.data())
def test_discretized_logistic_log_prob(path, data):
    """x as integer bins or k / bins floats (any layout, broadcast), bins from 2 to 1024, means
    on the bins, around them and far out (1e4), log-scales in [-12, 12], NaN parameters;
    against the float64 formula of tests/test_discretized_logistic.py."""
    with kernel_tiles(data.draw, path):
        check_discretized_logistic_log_prob(path, data)


def check_discretized_logistic_log_prob(path, data):
    draw, device = data.draw, path[1]
    gen = gen_of(draw)
    dtype = draw(st.sampled_from(DTYPES))
    bins = draw(st.sampled_from((2, 3, 16, 255, 256, 1024)))
    x_dtypes = (torch.int64, torch.float32, torch.float64) + (
        (torch.uint8, torch.float16) if bins <= 256 else ()
    )
    x_dtype = draw(st.sampled_from(x_dtypes))
    shape = draw_shape(draw, max_lead=3)
    shapes = {n: draw_sub_shape(draw, shape) for n in ("x", "mean", "log_scale")}
    S = torch.broadcast_shapes(*shapes.values())
    base_shape, view = draw_layout(draw, shapes["x"])
    k = torch.randint(0, bins, base_shape, generator=gen)
    k[torch.rand(base_shape, generator=gen) < 0.2] = 0  # the edge bins, often
    k[torch.rand(base_shape, generator=gen) < 0.2] = bins - 1
    x = k.double() if not x_dtype.is_floating_point else (k.double() / bins).to(x_dtype).double()
    specs = {"x": (x, view)}
    specs["mean"] = draw_input(draw, gen, shapes["mean"], "mean", dtype)
    if draw(st.booleans()):  # on the bins: centres, edges and in between
        values, mean_view = specs["mean"]
        on_bins = torch.randint(0, bins, values.shape, generator=gen) + torch.rand(
            values.shape, generator=gen, dtype=torch.float64
        ).mul(4).round().div(4)
        specs["mean"] = ((on_bins / bins).to(dtype).double(), mean_view)
    specs["log_scale"] = draw_input(draw, gen, shapes["log_scale"], "logvar", dtype, 12.0)
    leaves = Leaves(specs, dtype, device, grad={"mean", "log_scale"}, dtypes={"x": x_dtype})
    nan = draw(st.sampled_from((None, None, None, "mean", "log_scale")))
    if nan is not None and specs[nan][0].numel():
        for t in (leaves.ours[nan], leaves.ref[nan], leaves.snapshot[nan]):
            t.data.view(-1)[0] = math.nan

    v = leaves.views
    out = fastvae.discretized_logistic_log_prob(v["x"], v["mean"], v["log_scale"], bins=bins)
    full = {n: t.expand(S) for n, t in leaves.ref_views.items()}
    k_full = view(k).expand(S)
    elements = discretized_logistic_oracle(k_full, full["mean"], full["log_scale"], bins)
    expected = elements.sum(-1)
    float_x = x_dtype.is_floating_point
    cd = compute_dtype(torch.promote_types(dtype, x_dtype) if float_x else dtype)
    assert out.dtype == cd and out.shape == S[:-1]
    C = 32 + 2 * S[-1]
    errors = discretized_logistic_errors(
        k_full, full["mean"].detach(), full["log_scale"].detach(), bins, elements.detach()
    )
    check_output("log_prob", out, expected, errors["log_p"].sum(-1), cd, C,
                 extra=errors["oracle_log_p"].sum(-1))  # fmt: skip

    g = incoming(gen, expected.shape, out.dtype)
    names = ["mean", "log_scale"]
    ours = leaves.grads([out], [g], names)
    h = dict(zip(names, torch.autograd.grad(expected, [full[n] for n in names], g)))
    g_full = g.abs()[..., None].expand(S)
    gerr = {n: g_full * errors[n] for n in names}
    dev = {n: g_full * errors[f"oracle_{n}"] for n in names}
    check_grads(ours, leaves.ref, full, h, gerr, cd, C, dev=dev)
    leaves.assert_unmodified()


def discretized_logistic_errors(k, mean, log_scale, bins, log_p):
    """Per-element error scales of log P and of its gradients for mean and log_scale: "log_p",
    "mean", "log_scale" (units of C u) of fastvae's roundings, "oracle_*" (absolute, given
    the incoming gradient 1) of the float64 oracle's.

    Each edge u = (k / bins - mean) e^-log_scale carries roundings of the edge, the difference
    and e^-log_scale (F: exp's argument error), which reach log P through sigmoid(u) (or
    sigmoid(-v)), and the slopes through sigmoid(u) (1 + |u|). The oracle, in an interior bin,
    takes v - u from the rounded u and v: 1 / d amplifies their roundings (fastvae computes
    d = e^-log_scale / bins directly)."""
    inv = torch.exp(-log_scale)
    F = 4 + log_scale.abs()
    lo, hi = k / bins, (k + 1) / bins
    u, v = (lo - mean) * inv, (hi - mean) * inv
    has_lo, has_hi = k > 0, k < bins - 1
    s_u = torch.where(has_lo, torch.sigmoid(u), 0.0)
    s_v = torch.where(has_hi, torch.sigmoid(-v), 0.0)
    e_u = (u.abs() + lo.abs() * inv + 1) * F  # u's error, relative to u's scale
    e_v = (v.abs() + hi.abs() * inv + 1) * F
    both = (has_lo & has_hi).double()
    oracle = both * 2.0**-50 * (u.abs() + v.abs() + 2) / (inv / bins).clamp(max=1.0)
    errors = {
        "log_p": log_p.abs() + s_u * e_u + s_v * e_v + both * F,
        "mean": inv * (s_u * (e_u + F + 2) + s_v * (e_v + F + 2)),
        "log_scale": s_u * (1 + u.abs()) * (e_u + 2) + s_v * (1 + v.abs()) * (e_v + 2) + both * F,
        "oracle_log_p": oracle * (log_p.abs() + 1),
        "oracle_mean": oracle * 2 * inv,
        "oracle_log_scale": oracle * (u.abs() + v.abs() + 2),
    }
    return {name: t.nan_to_num(0.0, 0.0, 0.0) for name, t in errors.items()}


# -- 8. reparameterize_kl_tril ------------------------------------------------------------------


def draw_scale_tril(draw, gen, shape, dtype):
    """(float64 values rounded through dtype, view) of a scale_tril (*shape, D) in any layout:
    N(0, s^2) off the diagonal (above it too, which the op ignores), +-e^U(-a, a) on it (float16:
    a = 4, else up to 20; an expanded view may repeat an off-diagonal value there)."""
    full_shape = (*shape, shape[-1])
    base_shape, view = draw_layout(draw, full_shape)
    spread = draw(st.sampled_from((0.3, 3.0)))
    a = 4.0 if dtype == torch.float16 else draw(st.sampled_from((1.0, 20.0)))
    values = torch.randn(full_shape, generator=gen, dtype=torch.float64) * spread
    diag = torch.exp((torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * a)
    signs = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).double()
    values.diagonal(dim1=-2, dim2=-1).copy_(diag * signs)
    return leaf_holding(values, base_shape, view).to(dtype).double(), view


def tril_oracle(f):
    """(z, kl) from full-shape float64 tensors f by MultivariateNormal; KL(q || N(0, I)) depends
    on L L^T only, so q takes L with the columns of negative diagonal entries negated."""
    L = f["scale_tril"].tril()
    z = f["mu"] + (L @ f["eps"].unsqueeze(-1)).squeeze(-1)
    if f["mu"].shape[:-1].numel() == 0:  # torch.distributions divides by the batch size
        return {"z": z, "kl": f["mu"].sum(-1)}
    signs = torch.where(L.diagonal(dim1=-2, dim2=-1).detach() < 0, -1.0, 1.0).double()
    q = MultivariateNormal(f["mu"], scale_tril=L * signs.unsqueeze(-2), validate_args=False)
    eye = torch.eye(L.shape[-1], dtype=L.dtype).expand_as(L)
    p = MultivariateNormal(torch.zeros_like(f["mu"]), scale_tril=eye, validate_args=False)
    return {"z": z, "kl": kl_divergence(q, p)}


@examples(20)
@given(data=st.data())
def test_reparameterize_kl_tril(path, data):
    """mu and scale_tril of any layout (transposed, sliced, expanded, permuted), diagonals of
    either sign from e^-20 to e^20, values above the diagonal that must be ignored (NaN
    included), NaN in mu or below the diagonal, and eps given (any layout) or drawn (the noise
    reparameterize draws from the same generator state), against MultivariateNormal."""
    with kernel_tiles(data.draw, path):
        check_reparameterize_kl_tril(path, data)


def check_reparameterize_kl_tril(path, data):
    draw, device = data.draw, path[1]
    gen = gen_of(draw)
    dtype = draw(st.sampled_from(DTYPES))
    S = draw_shape(draw, max_lead=2, d_sizes=(1, 2, 3, 5, 8, 13))
    specs = {
        "mu": draw_input(draw, gen, S, "mean", dtype),
        "scale_tril": draw_scale_tril(draw, gen, S, dtype),
    }
    given_eps = draw(st.booleans())
    if given_eps:
        specs["eps"] = draw_input(draw, gen, S, "eps", dtype)
    nan = draw(st.sampled_from((None,) * 4 + ("mu", "lower", "upper")))
    leaves = Leaves(specs, dtype, device)
    D = S[-1]
    if nan is not None and math.prod(S) and (nan != "upper" or D > 1):
        name = "mu" if nan == "mu" else "scale_tril"
        i, k = (D - 1, 0) if nan == "lower" else (0, D - 1)
        index = (0,) * len(S) if nan == "mu" else (0,) * (len(S) - 1) + (i, k)
        for t in (leaves.views[name], leaves.ref_views[name]):
            t.data[index] = math.nan  # through the view: the leaf's element
        leaves.snapshot[name] = leaves.ours[name].detach().clone()
    seed = draw(st.integers(0, 2**31 - 1))
    kwargs = {} if given_eps else {"generator": torch.Generator(device).manual_seed(seed)}
    z, kl = fastvae.reparameterize_kl_tril(**leaves.views, **kwargs)
    assert z.dtype == dtype and kl.dtype == compute_dtype(dtype)

    full = dict(leaves.ref_views)
    if not given_eps:
        zeros = torch.zeros(S, dtype=compute_dtype(dtype), device=device)
        same = torch.Generator(device).manual_seed(seed)
        full["eps"] = fastvae.reparameterize(zeros, zeros, generator=same).double().cpu()
    expected = tril_oracle(full)
    f = {k: v.detach() for k, v in full.items()}
    L, mu, eps = f["scale_tril"].tril(), f["mu"], f["eps"]
    diag = L.diagonal(dim1=-2, dim2=-1)
    C = 32 + 2 * D
    z_scale = mu.abs() + (L.abs() @ eps.abs().unsqueeze(-1)).squeeze(-1)
    kl_terms = mu * mu + (L * L).sum(-1) + 1 + 2 * (diag.abs().log().abs() + 1)
    check_output("z", z, expected["z"], z_scale, dtype, C)
    check_output("kl", kl, expected["kl"], kl_terms.sum(-1), dtype, C)
    leaves.assert_unmodified()
    if nan is not None:  # the NaN pattern of the outputs was checked; torch.distributions'
        return  # gradients spread a NaN further than the op's

    g = {"z": incoming(gen, S, dtype), "kl": incoming(gen, S[:-1], compute_dtype(dtype))}
    names = [n for n in ("mu", "scale_tril", "eps") if n in specs]
    ours = leaves.grads([z, kl], list(g.values()), names)
    targets = [full[n] for n in names]
    h = dict(zip(names, torch.autograd.grad(list(expected.values()), targets, list(g.values()),
                                            retain_graph=True, allow_unused=True)))  # fmt: skip
    g_z, g_kl = g["z"].abs(), g["kl"].abs()[..., None]
    below = torch.ones(D, D, dtype=torch.bool).tril()
    on_diag = torch.eye(D, dtype=torch.float64) / diag.abs().unsqueeze(-2)
    gerr = {
        "mu": g_z + g_kl * mu.abs(),
        "scale_tril": torch.where(below, g_z.unsqueeze(-1) * eps.abs().unsqueeze(-2)
                                  + g_kl.unsqueeze(-1) * (L.abs() + on_diag), 0.0),
        "eps": (g_z.unsqueeze(-1) * L.abs()).sum(-2),
    }  # fmt: skip
    gerr = {n: gerr[n] + h[n].abs() for n in names}
    for name in names:
        assert ours[name].dtype == dtype
    # above the diagonal h is exactly 0 and so is the tolerance (up to subnormals)
    check_grads(ours, leaves.ref, {n: full[n] for n in names}, h, gerr, dtype, C)


# -- 9. former defects: float32 overflow, infinite z --------------------------------------------


@pytest.mark.parametrize(
    ("shapes", "use_z"),
    [
        ({"mu": (3, 1), "logvar": (3, 4)}, False),
        ({"mu": (3, 4), "logvar": (3, 1)}, False),
        ({"mu": (3, 4), "logvar": (3, 1), "prior_logvar": (3, 1)}, False),
        ({"mu": (3, 1), "logvar": (3, 4), "prior_mu": (1,)}, True),
    ],
    ids=["mu", "logvar", "logvar-with-prior", "prior_mu-z-used"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_gradient_of_input_broadcast_along_d(shapes, use_z, dtype):
    """Inputs broadcast along the latent dim ((..., 1) against D > 1) get gradients summed over
    D (the torch path once returned them per element, in the input's shape)."""
    gen = torch.Generator().manual_seed(0)
    values = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    ours = {k: v.to(dtype).requires_grad_() for k, v in values.items()}
    with fastvae.use_backend("torch"):
        if use_z:
            z, kl = fastvae.reparameterize_kl(**ours)
            out = kl.sum() + (z * 0).sum()
        else:
            out = fastvae.gaussian_kl(**ours).sum()
    ref = {k: v.clone().requires_grad_() for k, v in values.items()}
    zero = torch.zeros(1, dtype=torch.float64)
    prior = normal(ref.get("prior_mu", zero), ref.get("prior_logvar", zero))
    expected = kl_divergence(normal(ref["mu"], ref["logvar"]), prior).sum()
    got = torch.autograd.grad(out, list(ours.values()))
    want = torch.autograd.grad(expected, list(ref.values()))
    for name, a, e in zip(ours, got, want):
        assert_close(f"grad {name}", a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("mu", "logvar", "logvar_shape", "prior_logvar", "prior_shape"),
    [
        (0.0, 60.0, (3, 4), -60.0, (4,)),  # e^(logvar - prior_logvar) overflows
        (0.0, 60.0, (4,), -60.0, (4,)),  # the same with logvar shared by the rows
        (1.0, 0.0, (3, 4), -100.0, (4,)),  # (mu - prior_mu)^2 / prior_var overflows
        (0.0, 60.0, (3, 2, 4), -60.0, (3, 1, 4)),  # a prior broadcast over a middle dim
    ],
    ids=["var-ratio", "shared-logvar", "mean-term", "middle-dim"],
)
@pytest.mark.parametrize("g", [(1.0, -1.0, 0.5), (1.0, -1.0, 0.0), (-1.0, 0.25, 0.5)])
def test_kl_gradient_of_broadcast_prior_when_float32_overflows(
    path, g, mu, logvar, logvar_shape, prior_logvar, prior_shape
):
    """A KL term beyond float32 in every row, with incoming gradients of both signs: a
    prior_logvar broadcast over the rows gets the float64 sum rounded to float32 (-inf, +inf
    or an exact 0 where the rows cancel), never NaN."""
    device = path[1]
    lead = (3, 2) if len(prior_shape) == 3 else (3,)
    mu64 = torch.full((*lead, 4), mu, dtype=torch.float64)
    logvar64 = torch.full(logvar_shape, logvar, dtype=torch.float64)
    prior64 = torch.full(prior_shape, prior_logvar, dtype=torch.float64)
    prior = prior64.to(device, torch.float32).requires_grad_()
    kl = fastvae.gaussian_kl(mu64.to(device).float(), logvar64.to(device).float(), None, prior)
    assert (kl == INF).all()  # the documented float32 forward: +inf, never NaN
    g = torch.tensor(g, dtype=torch.float64).reshape(3, *(1,) * (len(lead) - 1)).expand(lead)
    (grad,) = torch.autograd.grad(kl, prior, g.to(device, torch.float32))
    ref = prior64.clone().requires_grad_()
    zero = torch.zeros(4, dtype=torch.float64)
    expected = kl_divergence(normal(mu64, logvar64), normal(zero, ref)).sum(-1)
    (want,) = torch.autograd.grad(expected, ref, g)
    assert_close("grad prior_logvar", grad, want.float(), rtol=1e-5, atol=0.0)


def test_kl_overflow_without_broadcast_is_inf_not_nan(path):
    """The same overflow without a broadcast prior: +inf KL, +-inf gradients, no NaN."""
    device = path[1]
    mu = torch.zeros(3, 4, device=device, requires_grad=True)
    logvar = torch.full((3, 4), 60.0, device=device, requires_grad=True)
    prior_logvar = torch.full((3, 4), -60.0, device=device, requires_grad=True)
    kl = fastvae.gaussian_kl(mu, logvar, None, prior_logvar)
    assert (kl == INF).all()
    g = torch.tensor([1.0, -1.0, 0.5], device=device)
    grads = torch.autograd.grad(kl, (mu, logvar, prior_logvar), g)
    for t in grads:
        assert not t.isnan().any()
    assert (grads[1].sign() == g.sign()[:, None]).all() and grads[1].isinf().all()


def mixture_oracle(z, means, logvars, log_weights=None):
    """(out (N,), gradients of out.sum() for z, means, logvars, log_weights), float64, by
    torch.distributions at z (N, D) against components (C, D). A row whose z has an infinite
    element (and no NaN) has density 0: out -inf and no gradient (autograd alone would give
    0 * inf = NaN)."""
    C = means.shape[0]
    log_weights = torch.zeros(C) if log_weights is None else log_weights
    leaves = [t.detach().cpu().double().requires_grad_() for t in (z, means, logvars, log_weights)]
    z, means, logvars, log_weights = leaves
    live = ~z.isinf().any(-1) | z.isnan().any(-1)
    z_live = torch.where(live[:, None], z, 0.0)[:, None, :]
    out = torch.logsumexp(mixture_logits(z_live, means, logvars, log_weights), -1)
    out = out.masked_fill(~live, -INF)
    return out.detach(), torch.autograd.grad(out.sum(), leaves)


def check_mixture_oracle(path, z, means, logvars, log_weights=None, rtol=1e-5):
    """mixture_log_prob and its gradients (of out.sum()) against mixture_oracle, rounded to the
    output's (gradients': the inputs') dtype, within rtol. Returns our gradients."""
    inputs = [t.to(path[1]).requires_grad_() for t in (z, means, logvars, log_weights)
              if t is not None]  # fmt: skip
    out = fastvae.mixture_log_prob(*inputs)
    expected, expected_grads = mixture_oracle(z, means, logvars, log_weights)
    assert_close("out", out, expected.to(out.dtype), rtol=1e-5, atol=0.0)
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
    names = ("z", "means", "logvars", "log_weights")
    tiny = torch.finfo(z.dtype).tiny
    for name, grad, want in zip(names, grads, expected_grads):
        assert_close(f"grad {name}", grad, want.to(grad.dtype), rtol=rtol, atol=tiny)
    return grads


def test_mixture_gradient_where_a_far_component_overflows(path):
    """A component whose responsibility underflows to 0 while (z - m) / s^2 overflows float32
    (z = 1e13 against logvar -60: 1e39) contributes 0 to every gradient (0 * inf, not NaN)."""
    z = torch.tensor([[0.5, 1e13], [0.1, 0.2]])
    means = torch.zeros(2, 2)
    logvars = torch.tensor([[0.0, -60.0], [0.0, 60.0]])
    grads = check_mixture_oracle(path, z, means, logvars)
    # component 0 has responsibility 0 at row 0: d/dz = -(z - m_1) / s_1^2
    assert grads[0][0, 1].item() == pytest.approx(-1e13 * math.exp(-60.0), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mixture_log_prob_at_infinite_z(path, dtype):
    """A z with an infinite element (a float16 z that overflowed, given to a mixture or Vamp
    prior) has density 0: out -inf, exactly 0 gradient for its row, and nothing from it in the
    components' gradients (three components: the Triton tiles pad them to four)."""
    z = torch.tensor([[INF, 0.0], [1.0, 2.0], [-INF, -INF]], dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    means, logvars, log_weights = (
        torch.randn(shape, generator=gen).to(dtype) for shape in ((3, 2), (3, 2), (3,))
    )
    rtol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    grads = check_mixture_oracle(path, z, means, logvars, log_weights, rtol)
    assert not grads[0][[0, 2]].any()  # exactly 0, not merely small


def test_mixture_prior_at_an_overflowed_float16_sample(path):
    """importance_sample, float16, mixture prior: samples that overflow (sigma = e^30) have
    log_ratio -inf and pass nothing to the prior's parameters, nor NaN to mu and logvar."""
    device = path[1]
    gen = torch.Generator().manual_seed(0)
    mu = torch.zeros(2, 3, dtype=torch.float16, device=device, requires_grad=True)
    logvar = torch.tensor([[60.0] * 3, [0.0] * 3], dtype=torch.float16, device=device)
    logvar.requires_grad_()
    prior = [torch.randn(shape, generator=gen).to(device, torch.float16).requires_grad_()
             for shape in ((4, 3), (4, 3), (4,))]  # fmt: skip
    z, log_ratio = fastvae.importance_sample(mu, logvar, 2, prior=tuple(prior))
    assert z[:, 0].isinf().any(-1).all() and z[:, 1].isfinite().all()
    assert (log_ratio[:, 0] == -INF).all() and log_ratio[:, 1].isfinite().all()
    grads = torch.autograd.grad(log_ratio, (mu, logvar, *prior), torch.ones_like(log_ratio))
    assert all(g.isfinite().all() for g in grads[:2])
    _, expected = mixture_oracle(z.reshape(-1, 3), *prior)
    for name, grad, want in zip(("means", "logvars", "log_weights"), grads[2:], expected[1:]):
        assert_close(f"grad {name}", grad, want.half(), rtol=2e-3, atol=1e-4)
