"""The Gaussian ops against torch.distributions (float64 oracle), on both code paths.

Every case runs the torch path on CPU and the Triton kernels (interpreter on CPU, or CUDA),
compares outputs and the gradients of sum(out * g) for a random incoming g (not ones).
"""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import assert_close, grads
from conftest import PATHS, enter_path
from test_importance import small_tiles
from torch.distributions import Normal, kl_divergence

import fastvae
from fastvae.ops import gaussian

FP32 = {"out": {"rtol": 1e-5, "atol": 1e-5}, "grad": {"rtol": 1e-4, "atol": 1e-5}}
LOW = {
    torch.float16: {"out": {"rtol": 2e-3, "atol": 2e-3}, "grad": {"rtol": 2e-3, "atol": 2e-3}},
    torch.bfloat16: {"out": {"rtol": 1e-2, "atol": 1e-2}, "grad": {"rtol": 1e-2, "atol": 1e-2}},
}


# The torch path as at large sizes: the sample op's autograd.Function (FUNCTION_FORM) and the
# log-density's fused CPU loops (CPU_LOOPS), each the form of one op.
LARGE_FORM = pytest.param(("torch", "cpu", "function", "loops"), id="torch-large")


@pytest.fixture(params=[PATHS[0], LARGE_FORM, *PATHS[1:]])
def path(request, monkeypatch):
    """(backend, device) of each code path: the torch path at these small sizes (a sample as
    torch ops that autograd differentiates; the log-density's autograd.Function on the
    reference) and as at large ones (above AUTOGRAD_SAMPLE_ELEMENTS and
    LOG_PROB_LOOP_ELEMENTS), the Triton kernels."""
    thresholds = [(gaussian, "AUTOGRAD_SAMPLE_ELEMENTS")]
    loops = [gaussian._LOG_PROB_LOOP, gaussian._LOG_PROB_GRADS_LOOP]
    yield from enter_path(request.param, monkeypatch, thresholds, loops)


# -- float64 oracles built from torch.distributions ------------------------------------------


def _normal(mu, logvar):
    return Normal(mu, torch.exp(0.5 * logvar))


def oracle_reparameterize(mu, logvar, eps, num_samples=None):
    q = _normal(mu, logvar)  # eps (num_samples, ...) broadcasts against the posterior
    return (q.loc + q.scale * eps,)


def oracle_kl(mu, logvar, prior_mu=None, prior_logvar=None, free_bits=0.0):
    prior_mu = torch.zeros_like(mu) if prior_mu is None else prior_mu
    prior_logvar = torch.zeros_like(logvar) if prior_logvar is None else prior_logvar
    kl = kl_divergence(_normal(mu, logvar), _normal(prior_mu, prior_logvar))
    return (torch.clamp(kl, min=free_bits).sum(-1),)


def oracle_reparameterize_kl(mu, logvar, eps, prior_mu=None, prior_logvar=None, free_bits=0.0):
    kl = oracle_kl(mu, logvar, prior_mu, prior_logvar, free_bits)
    return oracle_reparameterize(mu, logvar, eps) + kl


def oracle_log_prob(x, mu, logvar):
    if not isinstance(logvar, torch.Tensor):  # None (unit variance) or a float
        logvar = torch.tensor(0.0 if logvar is None else logvar, dtype=torch.float64)
    return (_normal(mu, logvar).log_prob(x).sum(-1),)


OPS = {
    "reparameterize": (lambda **a: (fastvae.reparameterize(**a),), oracle_reparameterize),
    "reparameterize_kl": (fastvae.reparameterize_kl, oracle_reparameterize_kl),
    "gaussian_kl": (lambda **a: (fastvae.gaussian_kl(**a),), oracle_kl),
    "gaussian_log_prob": (lambda **a: (fastvae.gaussian_log_prob(**a),), oracle_log_prob),
}


def check_against_oracle(op_name, inputs, device, dtype=torch.float32, tol=FP32, **kwargs):
    """Run `op_name` on `inputs` and its oracle on the same values in float64.

    inputs: name -> base tensor, or (base tensor, view): the base is the leaf that gets a
    gradient, the view (strided, transposed, broadcast) is what the op receives.
    """
    op, oracle = OPS[op_name]
    inputs = {k: v if isinstance(v, tuple) else (v, None) for k, v in inputs.items()}

    def leaves_and_views(dev, dt):
        leaves = {
            k: base.detach().to(dtype).to(dev, dt, copy=True).requires_grad_()
            for k, (base, _) in inputs.items()
        }
        views = {k: view(leaves[k]) if view else leaves[k] for k, (_, view) in inputs.items()}
        return leaves, views

    ours_leaves, ours = leaves_and_views(device, dtype)
    ref_leaves, ref = leaves_and_views("cpu", torch.float64)
    out = op(**ours, **kwargs)
    expected = oracle(**ref, **kwargs)
    assert len(out) == len(expected)
    incoming = [torch.randn(e.shape, dtype=torch.float64) for e in expected]
    for i, (o, e) in enumerate(zip(out, expected)):
        assert o.device.type == torch.device(device).type
        assert_close(f"{op_name} output {i}", o, e, **tol["out"])
    ours_grads = grads([(o, g.to(o.device, o.dtype)) for o, g in zip(out, incoming)],
                       list(ours_leaves.values()))  # fmt: skip
    ref_grads = grads(list(zip(expected, incoming)), list(ref_leaves.values()))
    for name, a, e in zip(inputs, ours_grads, ref_grads):
        if e is None:
            assert a is None or not a.any(), f"grad {name} should be zero"
            continue
        assert a is not None, f"{op_name}: no gradient for {name}"
        assert a.dtype == ours_leaves[name].dtype
        assert_close(f"{op_name} grad {name}", a, e, **tol["grad"])


def _posterior(*shape):
    return {"mu": torch.randn(*shape), "logvar": torch.randn(*shape)}


# -- shapes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("D", [1, 3, 37, 64, 1000, 5000])
@pytest.mark.parametrize("B", [0, 1, 257])
def test_reparameterize_kl_shapes(path, B, D):
    inputs = {**_posterior(B, D), "eps": torch.randn(B, D)}
    check_against_oracle("reparameterize_kl", inputs, path[1])


@pytest.mark.parametrize("D", [1, 37, 5000])
@pytest.mark.parametrize("op_name", ["reparameterize", "gaussian_kl"])
def test_single_ops_shapes(path, op_name, D):
    inputs = _posterior(33, D)
    if op_name == "reparameterize":
        inputs["eps"] = torch.randn(33, D)
    check_against_oracle(op_name, inputs, path[1])


@pytest.mark.parametrize("D", [1, 37, 1000])
def test_log_prob_of_k_samples_against_one_posterior(path, D):
    inputs = {"x": torch.randn(5, 17, D), **_posterior(17, D)}
    check_against_oracle("gaussian_log_prob", inputs, path[1])


SAMPLED_OPERANDS = {  # K = 4 samples, B = 6, D = 9: which operands have the sample dim
    "x": ("x",),  # K samples scored against one posterior
    "mu-logvar": ("mu", "logvar"),  # K decoder outputs against one x
    "x-logvar": ("x", "logvar"),
    "none-leading-1": (),  # (1, B, D) everywhere: one sample
}


@pytest.mark.parametrize("sampled", list(SAMPLED_OPERANDS))
@pytest.mark.parametrize("logvar", ["tensor", None, -0.7])
def test_log_prob_broadcast_over_samples(path, sampled, logvar):
    """Operands with and without the leading sample dim (the kernels loop over it, reading the
    others once and summing their gradients over it), and one logvar for every element."""
    names = SAMPLED_OPERANDS[sampled]
    lead = (4,) if names else (1,)
    inputs = {n: torch.randn(*(lead if n in names else ()), 6, 9) for n in ("x", "mu", "logvar")}
    if logvar != "tensor":
        inputs.pop("logvar")
    kwargs = {} if logvar == "tensor" else {"logvar": logvar}
    check_against_oracle("gaussian_log_prob", inputs, path[1], **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_program", [1, 2, 7])
def test_log_prob_samples_split_over_programs(path, per_program, dtype, monkeypatch):
    """The GPU's split of the samples over programs (forced here: the interpreter takes all
    of them in one), whose per-chunk gradient sums (float32) are added up on the host; small
    tiles (several column blocks a row) and a broadcast (D,) logvar too."""
    monkeypatch.setattr(gaussian, "tile", small_tiles)
    monkeypatch.setattr(gaussian, "samples_per_program", lambda rows, samples: per_program)
    tol = FP32 if dtype == torch.float32 else LOW[dtype]
    inputs = {"x": torch.randn(5, 3, 11), "mu": torch.randn(3, 11), "logvar": torch.randn(11)}
    check_against_oracle("gaussian_log_prob", inputs, path[1], dtype=dtype, tol=tol)
    inputs = {"x": torch.randn(3, 11), "mu": torch.randn(5, 3, 11), "logvar": torch.randn(5, 3, 11)}
    check_against_oracle("gaussian_log_prob", inputs, path[1], dtype=dtype, tol=tol)


def test_log_prob_sizes_one_beyond_the_sample_dim(path):
    """Inputs that keep every dim with size 1 in more than the sample dim (a learned decoder
    variance (1, 1, D)): their gradient, summed over the samples in the kernel, is summed
    down further to their shape."""
    inputs = {"x": torch.randn(4, 6, 9), "mu": torch.randn(1, 6, 1), "logvar": torch.randn(1, 1, 9)}
    check_against_oracle("gaussian_log_prob", inputs, path[1])


def test_log_prob_samples_in_a_layout_that_needs_a_copy(path):
    """K samples against a (A, B, C, D) posterior whose row dims cannot merge: the kernels read
    contiguous copies, the gradients still summed over the samples."""
    mu = (torch.randn(5, 4, 3, 6), lambda t: t.permute(1, 0, 2, 3))
    inputs = {"x": torch.randn(2, 4, 5, 3, 6), "mu": mu, "logvar": torch.randn(4, 5, 3, 6)}
    check_against_oracle("gaussian_log_prob", inputs, path[1])


def test_leading_dims(path):
    inputs = {**_posterior(2, 3, 4, 7), "eps": torch.randn(2, 3, 4, 7)}
    check_against_oracle("reparameterize_kl", inputs, path[1])


# -- one logvar for every element: None, a float, a 0-dim tensor ----------------------------

FIXED_LOGVARS = {"none": None, "float": -0.7, "0-dim": torch.tensor(0.4)}


def _fixed_logvar_inputs(x, mu, logvar):
    """The inputs of check_against_oracle, and the kwargs: a 0-dim logvar is an input (it gets
    a gradient), None or a float a keyword."""
    if isinstance(logvar, torch.Tensor):
        return {"x": x, "mu": mu, "logvar": logvar}, {}
    return {"x": x, "mu": mu}, {"logvar": logvar}


@pytest.mark.parametrize(
    "shapes",
    [((0, 5), (0, 5)), ((9, 1), (9, 1)), ((3, 17, 37), (17, 37)), ((6, 1000), (1, 1000))],
    ids=["B=0", "D=1", "K-samples-odd-D", "broadcast-mu"],
)
@pytest.mark.parametrize("logvar", list(FIXED_LOGVARS))
def test_log_prob_with_one_logvar(path, logvar, shapes):
    inputs, kwargs = _fixed_logvar_inputs(*map(torch.randn, shapes), FIXED_LOGVARS[logvar])
    check_against_oracle("gaussian_log_prob", inputs, path[1], **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("logvar", list(FIXED_LOGVARS))
def test_log_prob_with_one_logvar_low_precision(path, logvar, dtype):
    x, mu = torch.randn(4, 21, 37), torch.randn(21, 37)  # K samples against one mean
    inputs, kwargs = _fixed_logvar_inputs(x, mu, FIXED_LOGVARS[logvar])
    check_against_oracle("gaussian_log_prob", inputs, path[1], dtype=dtype, tol=LOW[dtype],
                         **kwargs)  # fmt: skip


def test_log_prob_one_logvar_equals_a_broadcast_one(path):
    """logvar=c is logvar=torch.full(..., c) read in place, forward and gradients."""
    x, mu = (torch.randn(5, 33, device=path[1], requires_grad=True) for _ in range(2))
    g = torch.randn(5, device=path[1])
    for fixed in (None, 1.5):
        full = torch.full((1, 33), 0.0 if fixed is None else fixed, device=path[1])
        results = []
        for logvar in (fixed, full.expand(5, 33)):
            out = fastvae.gaussian_log_prob(x, mu, logvar)
            results.append((out, *torch.autograd.grad((out * g).sum(), (x, mu))))
        for name, a, e in zip(("out", "grad x", "grad mu"), *results):
            assert_close(f"{fixed}: {name}", a, e, rtol=1e-5, atol=1e-5)


# -- strided and broadcast inputs ------------------------------------------------------------

LAYOUTS = {
    "transposed": lambda B, D: (torch.randn(D, B), lambda t: t.t()),
    "every-other-column": lambda B, D: (torch.randn(B, 2 * D), lambda t: t[:, ::2]),
    "row-slice": lambda B, D: (torch.randn(2 * B, D + 3), lambda t: t[1::2, 2 : D + 2]),
    "broadcast-row": lambda B, D: (torch.randn(1, D), lambda t: t.expand(B, D)),
    "broadcast-column": lambda B, D: (torch.randn(B, 1), lambda t: t.expand(B, D)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_strided_and_broadcast_inputs(path, layout):
    B, D = 19, 45
    inputs = {
        "mu": LAYOUTS[layout](B, D),
        "logvar": LAYOUTS[layout](B, D),
        "eps": torch.randn(B, D),
    }
    check_against_oracle("reparameterize_kl", inputs, path[1])
    x = (torch.randn(3, 1, D), lambda t: t.expand(3, B, D))
    inputs = {"x": x, "mu": LAYOUTS[layout](B, D), "logvar": LAYOUTS[layout](B, D)}
    check_against_oracle("gaussian_log_prob", inputs, path[1])


def test_broadcasting_between_mu_and_logvar(path):
    inputs = {"mu": torch.randn(6, 10), "logvar": torch.randn(10), "eps": torch.randn(6, 10)}
    check_against_oracle("reparameterize_kl", inputs, path[1])
    inputs = {"x": torch.randn(4, 6, 10), "mu": torch.randn(6, 10), "logvar": torch.randn(6, 1)}
    check_against_oracle("gaussian_log_prob", inputs, path[1])


def test_layout_that_needs_a_copy(path):
    # (K, A, B, D) with a posterior (A, B, D) whose A and B cannot merge: still correct.
    mu = (torch.randn(5, 4, 6), lambda t: t.permute(1, 0, 2))
    inputs = {"x": torch.randn(3, 4, 5, 6), "mu": mu, "logvar": torch.randn(4, 5, 6)}
    check_against_oracle("gaussian_log_prob", inputs, path[1])


# -- priors and free bits --------------------------------------------------------------------


@pytest.mark.parametrize("prior_shape", [(50, 24), (24,), (1, 24)])
def test_prior_and_its_gradient(path, prior_shape):
    inputs = {
        **_posterior(50, 24),
        "prior_mu": torch.randn(prior_shape),
        "prior_logvar": torch.randn(prior_shape),
    }
    check_against_oracle("gaussian_kl", inputs, path[1])
    check_against_oracle("reparameterize_kl", {**inputs, "eps": torch.randn(50, 24)}, path[1])


@pytest.mark.parametrize("which", ["prior_mu", "prior_logvar"])
def test_prior_with_one_part(path, which):
    inputs = {**_posterior(8, 5), which: torch.randn(5)}
    check_against_oracle("gaussian_kl", inputs, path[1])


@pytest.mark.parametrize("prior_shape", [(7, 11), (11,)])
def test_small_tiles(path, prior_shape, monkeypatch):
    """Many row blocks and several column blocks a row (see small_tiles), K samples too."""
    monkeypatch.setattr(gaussian, "tile", small_tiles)
    inputs = {
        **_posterior(7, 11),
        "prior_mu": torch.randn(prior_shape),
        "prior_logvar": torch.randn(prior_shape),
    }
    check_against_oracle("gaussian_kl", inputs, path[1], free_bits=0.3)
    check_against_oracle("reparameterize_kl", {**inputs, "eps": torch.randn(7, 11)}, path[1])
    posterior = {**_posterior(7, 11), "eps": torch.randn(3, 7, 11)}
    check_against_oracle("reparameterize", posterior, path[1], num_samples=3)


def test_small_tiles_drawn_noise(path, monkeypatch):
    """Drawn noise in small tiles, K samples from the middle of a stream, a permuted mu and
    expanded (stride-0) incoming gradients: the backward regenerates the forward's noise."""
    monkeypatch.setattr(gaussian, "tile", small_tiles)
    mu = torch.randn(11, 7, device=path[1]).t().requires_grad_()
    logvar = torch.randn(7, 11, device=path[1], requires_grad=True)
    seed = torch.tensor([3], device=path[1])
    first = gaussian.noise_block(torch.Size((7, 11)))  # the second block of the stream
    z, _ = gaussian.sample(mu, logvar, num_samples=3, seed=seed, first_sample=first)
    z.sum().backward()
    assert_close("grad logvar", logvar.grad, (0.5 * (z - mu)).sum(0), rtol=1e-5, atol=1e-6)
    assert_close("grad mu", mu.grad, torch.full_like(mu, 3.0))


def test_free_bits(path):
    # KL_d spans both sides of the threshold; the clamped elements get no gradient.
    inputs = {"mu": torch.randn(40, 30) * 0.7, "logvar": torch.randn(40, 30) * 0.5}
    check_against_oracle("gaussian_kl", inputs, path[1], free_bits=0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [1, 37, 5000])
def test_free_bits_fused_with_sampling(path, D, dtype):
    # reparameterize_kl(free_bits=): z is untouched, the KL and its gradients are clamped.
    inputs = {
        "mu": torch.randn(6, D) * 0.7,
        "logvar": torch.randn(6, D) * 0.5,
        "prior_logvar": torch.randn(D) * 0.3,
        "eps": torch.randn(6, D),
    }
    tol = FP32 if dtype == torch.float32 else LOW[dtype]
    check_against_oracle("reparameterize_kl", inputs, path[1], dtype=dtype, tol=tol, free_bits=0.2)


# -- dtypes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(path, dtype):
    inputs = {**_posterior(21, 37), "eps": torch.randn(21, 37)}
    check_against_oracle("reparameterize_kl", inputs, path[1], dtype=dtype, tol=LOW[dtype])
    inputs = {"x": torch.randn(3, 21, 37), **_posterior(21, 37)}
    check_against_oracle("gaussian_log_prob", inputs, path[1], dtype=dtype, tol=LOW[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_output_dtypes(path, dtype):
    mu, logvar = (t.to(path[1], dtype) for t in _posterior(4, 3).values())
    z, kl = fastvae.reparameterize_kl(mu, logvar)
    assert z.dtype == dtype
    assert kl.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert fastvae.gaussian_log_prob(z, mu, logvar).dtype == kl.dtype
    assert fastvae.gaussian_log_prob(z, mu, None).dtype == kl.dtype


def test_float64_gradcheck():
    # float64 always runs the torch path, whatever the backend.
    mu, logvar, eps, pmu, plv = (torch.randn(3, 4, dtype=torch.float64) for _ in range(5))
    scalar_logvar = torch.tensor(0.3, dtype=torch.float64)
    for t in (mu, logvar, pmu, plv, eps, scalar_logvar):
        t.requires_grad_()
    checks = [
        (lambda m, lv, e: fastvae.reparameterize_kl(m, lv, eps=e), (mu, logvar, eps)),
        (lambda m, lv, a, b: fastvae.gaussian_kl(m, lv, a, b), (mu, logvar, pmu, plv)),
        (fastvae.gaussian_log_prob, (eps, mu, logvar)),
        (fastvae.gaussian_log_prob, (eps, mu, scalar_logvar)),
        (lambda e, m: fastvae.gaussian_log_prob(e, m, None), (eps, mu)),
        (lambda e, m: fastvae.gaussian_log_prob(e, m, -1.2), (eps, mu)),
    ]
    for fn, args in checks:
        assert torch.autograd.gradcheck(fn, args)


# -- samples ---------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 4])
def test_num_samples(path, K):
    inputs = {**_posterior(9, 6), "eps": torch.randn(K, 9, 6)}
    check_against_oracle("reparameterize", inputs, path[1], num_samples=K)
    mu, logvar = (t.to(path[1]) for t in _posterior(9, 6).values())
    assert fastvae.reparameterize(mu, logvar, num_samples=K).shape == (K, 9, 6)


def test_gradient_through_drawn_noise(path):
    """Backward regenerates eps: dz/dmu = 1 and dz/dlogvar = (z - mu) / 2."""
    mu = torch.randn(31, 50, device=path[1], requires_grad=True)
    logvar = torch.randn(31, 50, device=path[1], requires_grad=True)
    for num_samples in (None, 3):
        z = fastvae.reparameterize(mu, logvar, num_samples=num_samples)
        g = torch.randn_like(z)
        g_mu, g_logvar = torch.autograd.grad((z * g).sum(), (mu, logvar))
        expected = (g * (z - mu) / 2).sum(0) if num_samples else g * (z - mu) / 2
        assert_close("grad mu", g_mu, g.sum(0) if num_samples else g)
        assert_close("grad logvar", g_logvar, expected, rtol=1e-4, atol=1e-5)


def test_fused_equals_separate_ops(path):
    mu, logvar = (t.to(path[1]) for t in _posterior(12, 7).values())
    torch.manual_seed(3)
    z, kl = fastvae.reparameterize_kl(mu, logvar)
    torch.manual_seed(3)
    assert torch.equal(z, fastvae.reparameterize(mu, logvar))
    assert torch.equal(kl, fastvae.gaussian_kl(mu, logvar))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ["noise", "samples", "eps", "free bits"])
def test_autograd_form_equals_the_function(case, dtype, monkeypatch):
    """Below AUTOGRAD_SAMPLE_ELEMENTS the torch path's sample runs as torch ops under autograd:
    the same values as the op's autograd.Function (run at every size here), the same noise, and
    gradients equal up to rounding."""
    mu, logvar = (t.to(dtype).requires_grad_() for t in _posterior(12, 7).values())
    kwargs = {
        "noise": {},
        "samples": {"num_samples": 3},
        "eps": {"eps": torch.randn(12, 7, dtype=dtype, requires_grad=True)},
        "free bits": {"free_bits": 0.4},
    }[case]
    num_samples = kwargs.pop("num_samples", None)
    inputs = (mu, logvar, *(t for t in kwargs.values() if isinstance(t, torch.Tensor)))
    results = []
    for elements in (gaussian.AUTOGRAD_SAMPLE_ELEMENTS, 0):
        monkeypatch.setattr(gaussian, "AUTOGRAD_SAMPLE_ELEMENTS", elements)
        torch.manual_seed(5)
        row_term = gaussian.ROW_NONE if num_samples else gaussian.ROW_KL
        z, kl = gaussian.sample(mu, logvar, num_samples=num_samples, row_term=row_term, **kwargs)
        assert z.grad_fn is not None and ("sample" in type(z.grad_fn).__name__) == (not elements)
        g_z = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
        loss = (z * g_z).sum() + (kl * kl).sum()
        results.append((z, kl, torch.autograd.grad(loss, inputs)))
    (z, kl, grads_autograd), (z_function, kl_function, grads_function) = results
    assert torch.equal(z, z_function) and torch.equal(kl, kl_function)
    tolerance = {} if dtype == torch.float32 else LOW[dtype]["grad"]
    for name, a, b in zip(("mu", "logvar", "eps"), grads_autograd, grads_function):
        assert_close(f"grad {name}", a, b, **tolerance)


def test_kl_of_a_logvar_broadcast_over_rows_that_mu_lacks(path):
    """A stride-0 logvar (4, 3) against mu (3,): one KL per row of the broadcast shape."""
    mu = torch.randn(3, dtype=torch.float64)
    logvar_row = torch.randn(1, 3, dtype=torch.float64)
    (expected,) = oracle_kl(mu.expand(4, 3), logvar_row.expand(4, 3))
    mu_in, row_in = (t.float().to(path[1]).requires_grad_() for t in (mu, logvar_row))
    kl = fastvae.gaussian_kl(mu_in, row_in.expand(4, 3))
    assert kl.shape == (4,)
    assert_close("kl", kl, expected, **FP32["out"])
    g = torch.randn(4, dtype=torch.float64)
    got = torch.autograd.grad((kl * g.float().to(path[1])).sum(), (mu_in, row_in))
    mu64, row64 = (t.clone().requires_grad_() for t in (mu, logvar_row))
    (kl64,) = oracle_kl(mu64.expand(4, 3), row64.expand(4, 3))
    want = torch.autograd.grad((kl64 * g).sum(), (mu64, row64))
    for name, a, b in zip(("mu", "logvar"), got, want):
        assert_close(f"grad {name}", a, b, **FP32["grad"])


def test_free_bits_at_the_boundary_passes_its_gradient(path):
    """KL_d equal to free_bits is not clamped: forward and backward agree on it."""
    if path[0] == "triton":
        pytest.skip("the kernels' KL_d rounds to another value at these inputs")
    values = (-0.5629199147224426, -0.04197060689330101)
    mu, logvar = (torch.full((1, 1), v, requires_grad=True) for v in values)
    free_bits = 0.15887373685836792
    kl = fastvae.gaussian_kl(mu, logvar, free_bits=free_bits)
    assert kl.item() == torch.tensor(free_bits).item()
    g_mu, g_logvar = torch.autograd.grad(kl.sum(), (mu, logvar))
    assert g_mu.item() == pytest.approx(values[0], rel=1e-6)
    assert g_logvar.item() == pytest.approx(0.5 * (math.exp(values[1]) - 1.0), rel=1e-5)


def test_autograd_form_counts_the_broadcast_shape(monkeypatch):
    """The size threshold is z's size: mu (64, 1) and logvar (1, 64) make 4096 elements."""
    monkeypatch.setattr(gaussian, "AUTOGRAD_SAMPLE_ELEMENTS", 1000)
    mu, logvar = torch.randn(64, 1, requires_grad=True), torch.randn(1, 64, requires_grad=True)
    z, _ = fastvae.reparameterize_kl(mu, logvar)
    assert "sample" in type(z.grad_fn).__name__


def test_num_samples_takes_no_kl():
    mu, logvar = _posterior(3, 2).values()
    with pytest.raises(ValueError, match="num_samples takes no KL"):
        gaussian.sample(mu, logvar, num_samples=2, row_term=gaussian.ROW_KL)


# -- empty inputs, NaN and extreme values ----------------------------------------------------


def test_empty_inputs(path):
    mu = torch.randn(0, 5, device=path[1], requires_grad=True)
    logvar = torch.randn(0, 5, device=path[1], requires_grad=True)
    z, kl = fastvae.reparameterize_kl(mu, logvar)
    assert z.shape == (0, 5) and kl.shape == (0,)
    (z.sum() + kl.sum()).backward()
    assert mu.grad.shape == (0, 5) and logvar.grad.shape == (0, 5)
    assert fastvae.reparameterize(mu, logvar, num_samples=2).shape == (2, 0, 5)
    assert fastvae.gaussian_log_prob(z, mu, logvar).shape == (0,)
    empty_latent = torch.randn(4, 0, device=path[1])
    assert torch.equal(
        fastvae.gaussian_kl(empty_latent, empty_latent), torch.zeros(4, device=path[1])
    )


def test_nan_in_nan_out(path):
    mu, logvar = (t.to(path[1]) for t in _posterior(4, 6).values())
    mu[1, 2] = float("nan")
    logvar[3, 0] = float("nan")
    z, kl = fastvae.reparameterize_kl(mu, logvar)
    assert z[1, 2].isnan() and z[3, 0].isnan() and z.isnan().sum() == 2
    assert kl.isnan().tolist() == [False, True, False, True]
    kl_fb = fastvae.gaussian_kl(mu, logvar, free_bits=0.5)
    assert kl_fb.isnan().tolist() == [False, True, False, True]
    lp = fastvae.gaussian_log_prob(z.nan_to_num(), mu, logvar)
    assert lp.isnan().tolist() == [False, True, False, True]


def test_extreme_values(path):
    """logvar in [-60, 60] and means of 1e4 stay finite and accurate."""
    logvar = torch.linspace(-60, 60, 64).repeat(3, 1)
    mu = torch.tensor([-1e4, 0.0, 1e4]).unsqueeze(1).expand(3, 64).clone()
    eps = torch.randn(3, 64)
    tol = {"out": {"rtol": 1e-5, "atol": 1e-5}, "grad": {"rtol": 1e-4, "atol": 1e-5}}
    check_against_oracle(
        "reparameterize_kl", {"mu": mu, "logvar": logvar, "eps": eps}, path[1], tol=tol
    )
    x = mu + torch.randn(3, 64)
    check_against_oracle(
        "gaussian_log_prob", {"x": x, "mu": mu, "logvar": logvar}, path[1], tol=tol
    )


def test_kl_row_near_float32_max_stays_finite(path):
    """Each element's KL is halved before the row sum: two halves of 1.62e38 make a finite
    3.24e38, where summing first would overflow to inf."""
    mu = torch.full((1, 2), 1.8e19, device=path[1])
    logvar = torch.zeros(1, 2, device=path[1])
    expected = torch.tensor([3.24e38], dtype=torch.float64)
    for kl in (fastvae.gaussian_kl(mu, logvar), fastvae.reparameterize_kl(mu, logvar)[1]):
        assert torch.isfinite(kl).all()
        assert_close("kl", kl.cpu().double(), expected, rtol=1e-5, atol=0.0)


def test_inputs_are_not_modified(path):
    mu, logvar, eps = (torch.randn(6, 5, device=path[1]) for _ in range(3))
    copies = [t.clone() for t in (mu, logvar, eps)]
    fastvae.reparameterize_kl(mu, logvar, eps=eps)
    fastvae.reparameterize(mu, logvar, eps=eps.expand(2, 6, 5).clone(), num_samples=2)
    for original, copy in zip((mu, logvar, eps), copies):
        assert torch.equal(original, copy)


def test_mixed_input_dtypes(path):
    """float32 mu with float64 logvar computes (and returns z) in float64."""
    inputs = {
        "mu": torch.randn(7, 5),
        "logvar": torch.randn(7, 5).double(),
        "eps": torch.randn(7, 5),
    }
    leaves = {k: v.to(path[1]).requires_grad_() for k, v in inputs.items()}
    z, kl = fastvae.reparameterize_kl(**leaves)
    assert z.dtype == kl.dtype == torch.float64
    ref = {k: v.double().requires_grad_() for k, v in inputs.items()}
    z_ref, kl_ref = oracle_reparameterize_kl(**ref)
    g = torch.randn(7, 5, dtype=torch.float64)
    ours = grads([(z, g.to(path[1])), (kl, g[:, 0].to(path[1]))], list(leaves.values()))
    expected = grads([(z_ref, g), (kl_ref, g[:, 0])], list(ref.values()))
    for name, a, e in zip(inputs, ours, expected):
        assert a.dtype == leaves[name].dtype
        assert_close(f"grad {name}", a, e, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    z = fastvae.reparameterize(leaves["mu"], leaves["logvar"])
    g_mu, g_logvar = torch.autograd.grad((z * g.to(z)).sum(), (leaves["mu"], leaves["logvar"]))
    expected_logvar = (g.to(z) * (z - leaves["mu"].double()) / 2).detach()
    assert_close("grad logvar, drawn noise", g_logvar, expected_logvar, rtol=1e-5, atol=1e-6)
