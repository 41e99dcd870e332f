"""torch.compile(fullgraph=True) traces every public op and module, without a graph break, on
the "eager", "aot_eager" and "inductor" backends, and agrees with eager mode: outputs and the
gradients of a weighted sum of them (weights not ones).

On CPU the torch path is traced through: its reference math lands in the graphs (no opaque
fastvae operator is left), and noise is drawn there with normal_() from the default
generator, not with the eager path's per-block seeds where those are used: a case that draws
noise is compared with Dynamo's graph run eagerly (backend "eager", the same noise under
torch.manual_seed). On CUDA the ops run as the
fastvae::<op>_triton triton_ops, whose kernels inductor schedules itself, with eager mode's
noise. Inductor draws torch's noise with fallback_random; its own is tested on its own.
"""

from __future__ import annotations

import copy
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from functorch.compile import aot_function, make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._higher_order_ops.triton_kernel_wrap import TritonKernelWrapperFunctional
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.library import opcheck

import fastvae
from fastvae.kernels.modes import ROW_KL, ROW_LOG_RATIO, ROW_NEG_LOG_Q
from fastvae.nn import GAN, IWAE, VAE, LearnedGaussian, MixturePrior, StandardNormal, VampPrior
from tests._helpers import assert_close

ROOT = pathlib.Path(__file__).resolve().parents[1]
BACKENDS = ["eager", "aot_eager", "inductor"]
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    ),
]
B, D, K, C = 5, 3, 4, 6


def _leaf(*shape, device, scale=1.0):
    return (scale * torch.randn(*shape, device=device)).requires_grad_()


def _op_cases(device):
    """name -> (function of the leaves, leaves): every public op, every optional argument."""
    mu, logvar, prior_mu, prior_logvar = (_leaf(B, D, device=device) for _ in range(4))
    means, logvars, log_weights = (
        _leaf(C, D, device=device),
        _leaf(C, D, device=device),
        _leaf(C, device=device),
    )
    eps = torch.randn(K, B, D, device=device)
    z_leaf = eps.clone().requires_grad_()
    log_w = _leaf(K, B, device=device)
    posterior, mixture = (mu, logvar), (means, logvars, log_weights)
    binary = (torch.rand(B, D, device=device) < 0.5).float()  # data against K samples of logits
    logits = _leaf(K, B, D, device=device, scale=3.0)
    pixels = torch.randint(0, 256, (B, D), dtype=torch.uint8, device=device)
    scale_tril, eye = _leaf(B, D, D, device=device, scale=0.3), torch.eye(D, device=device)

    def iwae(estimator, prior):
        def run(mu, logvar, *prior_args):
            z = fastvae.reparameterize(mu, logvar, num_samples=K)
            log_px = -(z - 1.0).pow(2).sum(-1)
            prior_value = prior_args if prior_args else None
            return fastvae.iwae_loss(log_px, z, mu, logvar, estimator=estimator, prior=prior_value)

        return run, (mu, logvar, *prior)

    encoder = torch.nn.Linear(4, 2 * D).to(device)
    x = torch.randn(B, 4, device=device)

    def log_likelihood(weight):
        def log_px(x, z):
            return -((z @ weight[:, :4]) - x).pow(2).sum(-1)

        return fastvae.estimate_log_likelihood(
            lambda x: encoder(x).chunk(2, -1), log_px, x, num_samples=7, chunk_size=3
        )

    return {
        "reparameterize": (lambda m, v: fastvae.reparameterize(m, v), (mu, logvar)),
        "reparameterize eps": (lambda m, v: fastvae.reparameterize(m, v, eps=eps[0]), posterior),
        "reparameterize K": (lambda m, v: fastvae.reparameterize(m, v, num_samples=K), posterior),
        "gaussian_kl": (lambda m, v: fastvae.gaussian_kl(m, v), (mu, logvar)),
        "gaussian_kl prior free_bits": (
            lambda m, v, pm, pv: fastvae.gaussian_kl(m, v, pm, pv, free_bits=0.2),
            (mu, logvar, prior_mu, prior_logvar),
        ),
        "reparameterize_kl": (
            lambda m, v, pm, pv: fastvae.reparameterize_kl(m, v, pm, pv),
            (mu, logvar, prior_mu, prior_logvar),
        ),
        "reparameterize_kl_tril": (
            lambda m, s: fastvae.reparameterize_kl_tril(m, s + eye), (mu, scale_tril)
        ),
        "reparameterize_kl_tril eps": (
            lambda m, s, e: fastvae.reparameterize_kl_tril(m, s + eye, eps=e[0]),
            (mu, scale_tril, z_leaf),
        ),
        "gaussian_log_prob": (
            lambda m, v: fastvae.gaussian_log_prob(eps, m, v), (mu, logvar)
        ),
        "gaussian_log_prob unit variance": (
            lambda m: fastvae.gaussian_log_prob(eps, m, None), (mu,)
        ),
        "gaussian_log_prob fixed logvar": (
            lambda m: fastvae.gaussian_log_prob(eps, m, -0.5), (mu,)
        ),
        "bernoulli_log_prob bool": (
            lambda lg: fastvae.bernoulli_log_prob(binary.bool(), lg), (logits,)
        ),
        "bernoulli_log_prob float x": (
            lambda x, lg: fastvae.bernoulli_log_prob(x, lg),
            (binary.clone().requires_grad_(), logits),
        ),
        "discretized_logistic_log_prob uint8": (
            lambda m, s: fastvae.discretized_logistic_log_prob(pixels, m, s), (mu, logvar)
        ),
        "discretized_logistic_log_prob float x, 32 bins": (
            lambda m, s: fastvae.discretized_logistic_log_prob(pixels % 32 / 32, m, s, bins=32),
            (mu, logvar),
        ),
        "discretized_logistic_log_prob broad scales": (  # d = e^-log_scale / bins ~ 1e-5
            lambda m, s: fastvae.discretized_logistic_log_prob(pixels, m, s + 6.0), (mu, logvar)
        ),
        "log_mean_exp": (lambda w: fastvae.log_mean_exp(w, dim=0), (log_w,)),
        "log_mean_exp transposed": (lambda w: fastvae.log_mean_exp(w.t(), dim=1), (log_w,)),
        "importance_sample": (
            lambda m, v, pm, pv: fastvae.importance_sample(m, v, K, prior=(pm, pv)),
            (mu, logvar, prior_mu, prior_logvar),
        ),
        "importance_sample mixture": (
            lambda m, v, *mix: fastvae.importance_sample(m, v, K, prior=mix), (mu, logvar, *mixture)
        ),
        "mixture_log_prob": (
            lambda z, *mix: fastvae.mixture_log_prob(z, *mix), (z_leaf, *mixture)
        ),
        "mixture_log_prob uniform": (
            lambda z, m, v: fastvae.mixture_log_prob(z, m, v), (z_leaf, means, logvars)
        ),
        "iwae_loss": iwae("iwae", ()),
        "iwae_loss stl gaussian prior": iwae("stl", (prior_mu, prior_logvar)),
        "iwae_loss dreg mixture prior": iwae("dreg", mixture),
        "estimate_log_likelihood": (log_likelihood, (_leaf(D, 4, device=device),)),
    }  # fmt: skip


class _FullEncoder(torch.nn.Module):
    """x (B, 4) -> (mu (B, D), scale_tril (B, D, D)), for a VAE with posterior="full"."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, D + D * D)

    def forward(self, x):
        out = self.linear(x)
        return out[:, :D], out[:, D:].unflatten(-1, (D, D)) + torch.eye(D, device=x.device)


def _module_cases(device):
    """name -> (function of no arguments, the module whose parameters get gradients)."""

    def nets(x_params=8):  # 8: a Gaussian's mean and log-variance of x (4,); 4: Bernoulli
        return torch.nn.Linear(4, 2 * D), torch.nn.Sequential(
            torch.nn.Linear(D, x_params), torch.nn.Tanh()
        )

    x = torch.rand(B, 4, device=device)
    cases = {}
    priors = {
        "standard": lambda enc: StandardNormal(),
        "learned": lambda enc: LearnedGaussian(D),
        "mixture": lambda enc: MixturePrior(D, C),
        "vamp": lambda enc: VampPrior(enc, torch.randn(C, 4)),
    }
    for prior_name, prior in priors.items():
        encoder, decoder = nets()
        free_bits = 0.01 if prior_name in ("standard", "learned") else 0.0  # closed-form KL
        vae = VAE(encoder, decoder, prior=prior(encoder), beta=0.5, free_bits=free_bits)
        vae = vae.to(device)
        cases[f"VAE {prior_name}"] = (lambda m=vae: m(x).loss, vae)
        for estimator in ("iwae", "dreg"):
            encoder, decoder = nets(x_params=4)
            iwae = IWAE(encoder, decoder, prior=prior(encoder), num_samples=K,
                        estimator=estimator, likelihood="bernoulli").to(device)  # fmt: skip
            cases[f"IWAE {prior_name} {estimator}"] = (lambda m=iwae: m(x).loss, iwae)
    encoder = torch.nn.Linear(4, 2 * D)
    vae = VAE(encoder, torch.nn.Linear(D, 4), decoder_logvar=0.0).to(device)
    cases["VAE fixed variance"] = (lambda m=vae: m(x).loss, vae)
    vae = VAE(_FullEncoder(), nets()[1], posterior="full").to(device)
    cases["VAE full posterior"] = (lambda m=vae: m(x).loss, vae)
    encoder, decoder = nets()  # the decoder's 8 outputs: (mean, log_scale) of 4 pixels
    vae = VAE(encoder, decoder, likelihood="discretized_logistic").to(device)
    pixels = torch.randint(0, 256, (B, 4), dtype=torch.uint8, device=device)
    cases["VAE discretized_logistic uint8"] = (lambda m=vae: m(pixels).loss, vae)
    encoder, decoder = nets()
    vae = VAE(encoder, decoder, prior=MixturePrior(D, C)).to(device)
    cases["VAE sample"] = (lambda: vae.sample(B), vae)
    cases["VAE reconstruct"] = (lambda: vae.reconstruct(x), vae)
    cases["VAE log_likelihood"] = (lambda: vae.log_likelihood(x, num_samples=9, chunk_size=4), vae)
    gan = GAN(torch.nn.Linear(2, 4), torch.nn.Linear(4, 1), latent_dim=2, loss="hinge").to(device)
    cases["GAN generator_loss"] = (lambda: gan.generator_loss(B), gan)
    cases["GAN discriminator_loss"] = (lambda: gan.discriminator_loss(x), gan)
    return cases


def _outputs(result) -> list[torch.Tensor]:
    tensors = list(result) if isinstance(result, tuple | list) else [result]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def _run(fn, args, params, seed=0):
    """fn(*args)'s outputs and the gradients of sum_i <w_i, output_i> for fixed weights w."""
    torch.manual_seed(seed)
    outputs = _outputs(fn(*args))
    generator = torch.Generator().manual_seed(1)
    loss = sum(
        (out.float() * torch.randn(out.shape, generator=generator).to(out.device)).sum()
        for out in outputs
    )
    wanted = [p for p in params if p.requires_grad]
    differentiable = loss.requires_grad if isinstance(loss, torch.Tensor) else False
    grads = torch.autograd.grad(loss, wanted, allow_unused=True) if differentiable else []
    return outputs, list(grads)


class _Recorder:
    """aot_eager that keeps the targets called by each forward and backward graph it gets."""

    def __init__(self):
        self.targets = []

        def record(graph_module, inputs):
            nodes = graph_module.graph.nodes
            self.targets += [str(n.target) for n in nodes if n.op == "call_function"]
            return make_boxed_func(graph_module.forward)

        self.backend = aot_autograd(fw_compiler=record, bw_compiler=record)


def _compiled(fn, backend):
    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, fullgraph=True)


def _draws_noise(fn, args) -> bool:
    """Whether fn's outputs change with torch's seed."""
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        runs.append(_outputs(fn(*args)))
    return any(not torch.equal(a, b) for a, b in zip(*runs))


def _check_compiled(name, fn, args, params, backend, device):
    """Compiled fn agrees with eager mode (on CPU, where fn draws noise: with Dynamo's graph run
    eagerly); with aot_eager, its graphs call no opaque fastvae operator."""
    if device == "cpu" and _draws_noise(fn, args):
        expected = _run(_compiled(fn, "eager"), args, params)
    else:
        expected = _run(fn, args, params)
    recorder = _Recorder()
    compiled = _compiled(fn, recorder.backend if backend == "aot_eager" else backend)
    _assert_agree(name, expected, _run(compiled, args, params))
    opaque = [t for t in recorder.targets if "fastvae" in t]
    assert not opaque, f"{name}: opaque fastvae operators in the graph: {opaque}"


def _assert_agree(name, eager, compiled):
    (out_e, grads_e), (out_c, grads_c) = eager, compiled
    assert len(out_e) == len(out_c)
    for i, (e, c) in enumerate(zip(out_e, out_c)):
        assert c.dtype == e.dtype, f"{name} output {i}: dtype {c.dtype} != {e.dtype}"
        assert_close(f"{name} output {i}", c, e, rtol=1e-4, atol=1e-5)
    assert len(grads_e) == len(grads_c)
    for i, (e, c) in enumerate(zip(grads_e, grads_c)):
        assert (e is None) == (c is None), f"{name} gradient {i}: None in one run only"
        if e is not None:
            assert_close(f"{name} gradient {i}", c, e, rtol=1e-4, atol=1e-5)


@pytest.fixture(autouse=True)
def _eager_random_numbers_in_inductor():
    with torch._inductor.config.patch(fallback_random=True), fastvae.use_backend("auto"):
        yield


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_op_cases("cpu")))
def test_op_compiles_without_graph_breaks_and_agrees(case, backend, device):
    fn, leaves = _op_cases(device)[case]
    _check_compiled(case, fn, leaves, leaves, backend, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_module_cases("cpu")))
def test_module_compiles_without_graph_breaks_and_agrees(case, backend, device):
    fn, module = _module_cases(device)[case]
    _check_compiled(case, fn, (), list(module.parameters()), backend, device)


def test_compiled_training_step_agrees_across_backends():
    """A compiled step function (forward, backward, optimizer step; backward() splits the
    graph there, as in any torch code) trains an IWAE with DReG exactly as its graphs run
    eagerly do (backend "eager": the same noise)."""
    torch.manual_seed(0)
    model = IWAE(torch.nn.Linear(4, 2 * D), torch.nn.Linear(D, 8), num_samples=K,
                 prior=LearnedGaussian(D), estimator="dreg")  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.rand(B, 4)

    def step():
        optimizer.zero_grad()
        loss = model(x).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    reference = copy.deepcopy(model.state_dict())
    losses = []
    for backend in ("eager", "aot_eager"):
        torch._dynamo.reset()
        run = torch.compile(step, backend=backend)
        model.load_state_dict(reference)
        torch.manual_seed(1)
        losses.append(torch.stack([run() for _ in range(3)]))
    assert_close("losses", losses[1], losses[0], rtol=1e-5)
    assert losses[0][-1] < losses[0][0]


@pytest.mark.parametrize("prior", ["standard", "vamp"])
def test_compiled_model_learns_its_latent_size_without_compiling_again(prior):
    """A model whose prior has no size learns D from its first batch, compiled too, and its
    second call reuses the first graph (it compiled twice when the graph read latent_dim)."""
    encoder = torch.nn.Linear(4, 2 * D)
    prior = StandardNormal() if prior == "standard" else VampPrior(encoder, torch.randn(C, 4))
    model = VAE(encoder, torch.nn.Linear(D, 8), prior=prior)
    assert model.latent_dim is None
    torch._dynamo.reset()
    loss = torch.compile(lambda x: model(x).loss, backend="eager", fullgraph=True)
    x = torch.rand(B, 4)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            loss(x).backward()
    assert model.latent_dim == D
    assert model.sample(2).shape == (2, 4)


def test_compiled_model_checks_a_restored_latent_size():
    """A compiled call checks the encoder's D against a latent size restored from a
    checkpoint, as an eager call does, and keeps the restored one."""
    model = VAE(torch.nn.Linear(4, 2 * D), torch.nn.Linear(D, 8))
    model.set_extra_state({"latent_dim": D + 1})
    torch._dynamo.reset()
    loss = torch.compile(lambda x: model(x).loss, backend="eager")
    with pytest.raises(ValueError, match=f"encoder\\(x\\) gave D = {D}; the prior has {D + 1}"):
        loss(torch.rand(B, 4))
    assert model.latent_dim == D + 1


def test_compiled_noise_is_reproducible_and_standard_normal():
    """Inductor's own noise (no fallback_random): torch.manual_seed reproduces a compiled run,
    a next call draws anew, and eps = (z - mu) / sigma has mean 0 and variance 1."""
    n, mu, logvar = 20000, torch.randn(2, 3), torch.randn(2, 3)
    fn = _compiled(lambda m, v: fastvae.reparameterize(m, v, num_samples=n), "inductor")
    with torch._inductor.config.patch(fallback_random=False):
        torch.manual_seed(5)
        z = fn(mu, logvar)
        torch.manual_seed(5)
        assert torch.equal(fn(mu, logvar), z)
        assert not torch.equal(fn(mu, logvar), z)
    eps = ((z - mu) * torch.exp(-0.5 * logvar)).double()
    assert eps.mean(0).abs().max() < 5 / n**0.5
    assert (eps.var(0) - 1).abs().max() < 5 * (2 / n) ** 0.5


def _opcheck_cases(device):
    """(operator, arguments) for torch.library.opcheck: schema, fake kernel (shapes, dtypes and
    strides), autograd registration, and AOT dispatch with dynamic shapes."""
    ops = torch.ops.fastvae
    mu, logvar = _leaf(B, D, device=device), _leaf(B, D, device=device)
    prior = (_leaf(D, device=device), _leaf(D, device=device))
    eps = torch.randn(K, B, D, device=device)
    seed = torch.tensor([7], device=device)
    x = _leaf(B, K, device=device).t()  # a transposed view
    mixture = (_leaf(C, D, device=device), _leaf(C, D, device=device), _leaf(C, device=device))
    half = mu.detach().to(torch.bfloat16).requires_grad_()
    binary = (torch.rand(B, D, device=device) < 0.5).to(torch.uint8)  # the op's bool x
    pixels = torch.randint(0, 256, (B, D), dtype=torch.uint8, device=device)
    levels = (torch.randint(0, 256, (D, B), device=device) / 256).t()  # k / 256, transposed
    scale_tril = 0.3 * torch.randn(B, D, D, device=device) + torch.eye(D, device=device)
    scale_tril.requires_grad_()
    # sample: (..., num_samples, want_z, row_term, free_bits, first_sample)
    return [
        (ops.sample, (mu, logvar, *prior, None, seed, K, True, ROW_LOG_RATIO, 0.0, 0)),
        (ops.sample, (mu, logvar, *prior, eps, None, K, True, ROW_NEG_LOG_Q, 0.0, 0)),
        (ops.sample, (mu, logvar, *prior, None, None, None, False, ROW_KL, 0.3, 0)),
        (ops.sample, (half, logvar, None, None, None, seed, None, True, ROW_KL, 0.0, 0)),
        (ops.gaussian_log_prob, (eps, mu, logvar, 0.0)),
        (ops.gaussian_log_prob, (eps, mu, None, -0.5)),
        (ops.bernoulli_log_prob, (binary, eps)),
        (ops.bernoulli_log_prob, (binary.float().requires_grad_(), half)),
        (ops.discretized_logistic_log_prob, (pixels, eps, logvar, 256)),
        (ops.discretized_logistic_log_prob, (levels, mu, half, 256)),
        (ops.sample_tril, (mu, scale_tril, _leaf(B, D, device=device), None)),
        (ops.sample_tril, (half, scale_tril, _leaf(B, D, device=device), None)),
        (ops.log_mean_exp, (x, 0)),
        (ops.log_mean_exp, (x, 1)),
        (ops.mixture_log_prob, (eps, *mixture)),
        (ops.mixture_log_prob, (eps, *mixture[:2], None)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_operators_pass_opcheck(device):
    cases = _opcheck_cases(device)
    if device == "cuda":  # the Triton operators, which run there
        cases = [
            (getattr(torch.ops.fastvae, f"{op._name.split('::')[1]}_triton"), a) for op, a in cases
        ]
    for op, args in cases:
        opcheck(op, args)


class _Traced(Exception):  # noqa: N818 - carries the graph out of aot_function
    def __init__(self, graph):
        self.graph = graph


def _traced_graph(fn, args):
    """The functionalized forward graph AOTAutograd hands a backend for fn(*args)."""

    def backend(graph_module, inputs):
        raise _Traced(graph_module.graph)

    try:
        aot_function(fn, fw_compiler=backend)(*args)
    except _Traced as traced:
        return traced.graph
    raise AssertionError("the backend was not called")


def _triton_operator_cases(device):
    """(operator, arguments) of every Triton operator, forward and backward."""
    ops = torch.ops.fastvae

    def t(*shape):
        return torch.randn(*shape, device=device)

    mu, logvar, eps, prior = t(B, D), t(B, D), t(K, B, D), (t(D), t(D))
    seed, mixture, x = torch.tensor([7], device=device), (t(C, D), t(C, D), t(C)), t(B, K).t()
    spec = (K, True, ROW_LOG_RATIO, 0.0, 0)  # num_samples, want_z, row term, free bits, first
    grad_z, grad_row, needs = t(K, B, D), t(K, B), [True] * 4
    binary = (torch.rand(B, D, device=device) < 0.5).to(torch.uint8)
    pixels = torch.randint(0, 256, (B, D), dtype=torch.uint8, device=device)
    return {
        "sample": (ops.sample_triton, (mu, logvar, *prior, None, seed, *spec)),
        "sample_backward": (
            ops.sample_backward_triton,
            (grad_z, grad_row, mu, logvar, *prior, None, seed, None, needs, *spec),
        ),
        "gaussian_log_prob": (ops.gaussian_log_prob_triton, (eps, mu, logvar, 0.0)),
        "gaussian_log_prob fixed": (ops.gaussian_log_prob_triton, (eps, mu, None, -0.5)),
        "sample_tril": (ops.sample_tril_triton, (mu, t(B, D, D), None, seed)),
        "sample_tril_backward": (
            ops.sample_tril_backward_triton,
            (t(B, D), t(B), mu, t(B, D, D), t(B, D), None, needs[:3]),
        ),
        "gaussian_log_prob_backward": (
            ops.gaussian_log_prob_backward_triton, (grad_row, eps, mu, logvar, 0.0, needs[:3])
        ),
        "gaussian_log_prob_backward fixed": (
            ops.gaussian_log_prob_backward_triton,
            (grad_row, eps, mu, None, -0.5, [True, True, False]),
        ),
        "bernoulli_log_prob": (ops.bernoulli_log_prob_triton, (binary, eps)),
        "bernoulli_log_prob_backward": (
            ops.bernoulli_log_prob_backward_triton, (grad_row, binary, eps, [False, True])
        ),
        "discretized_logistic_log_prob": (
            ops.discretized_logistic_log_prob_triton, (pixels, eps, logvar, 256)
        ),
        "discretized_logistic_log_prob_backward": (
            ops.discretized_logistic_log_prob_backward_triton,
            (grad_row, pixels, eps, logvar, 256, [True, True]),
        ),
        "log_mean_exp": (ops.log_mean_exp_triton, (x, 0)),
        "log_mean_exp_backward": (ops.log_mean_exp_backward_triton, (t(B), x, t(B), 0)),
        "mixture_log_prob": (ops.mixture_log_prob_triton, (eps, *mixture)),
        "mixture_log_prob_backward": (
            ops.mixture_log_prob_backward_triton, (grad_row, eps, *mixture, grad_row, needs)
        ),
    }  # fmt: skip


def triton_trace_failures() -> list[str]:
    """For each Triton operator, what is wrong with the graph inductor would get on CUDA:
    it must hold the operator's Triton kernel launches and no opaque fastvae operator. Traced
    on fake CUDA tensors, so it needs no GPU; kernels must be real JIT functions, not
    interpreted ones (TRITON_INTERPRET unset)."""
    failures = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        cases = _triton_operator_cases("cuda")
        for name, (op, args) in cases.items():
            try:
                graph = _traced_graph(lambda *a, op=op: op(*a), args)
            except Exception as error:  # noqa: BLE001 - report every operator
                failures.append(f"{name}: {type(error).__name__}: {error}"[:500])
                continue
            targets = [n.target for n in graph.nodes if n.op == "call_function"]
            if not any(isinstance(t, TritonKernelWrapperFunctional) for t in targets):
                failures.append(f"{name}: no Triton kernel in the graph: {targets}")
            if any("fastvae" in str(t) for t in targets):
                failures.append(f"{name}: an opaque fastvae operator is left: {targets}")
    return failures


def test_triton_operators_trace_into_their_kernels():
    """What inductor gets on CUDA, checked here without a GPU: each triton_op decomposes into
    its kernel launches, which inductor then schedules itself (in a fresh process: this one's
    kernels are the interpreter's)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from tests.test_compile import triton_trace_failures as f; print(*f(), sep='\\n')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "", result.stdout


def test_compiled_noise_is_eager_modes():
    """Without a generator, a compiled call draws the noise eager mode draws (normal_ from the
    default generator, which inductor leaves to ATen) for float32 z."""
    mu, logvar = torch.randn(16, 40), torch.randn(16, 40)
    torch.manual_seed(3)
    expected = fastvae.reparameterize_kl(mu, logvar)
    torch._dynamo.reset()
    torch.manual_seed(3)
    with torch._inductor.config.patch(fallback_random=False):  # inductor's own random lowering
        actual = torch.compile(fastvae.reparameterize_kl, backend="inductor")(mu, logvar)
    assert_close("z", actual[0], expected[0])
    assert_close("kl", actual[1], expected[1])
