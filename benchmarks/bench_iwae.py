"""fastvae's importance-weighting ops against the eager torch recipe and its torch.compile.

The layout of bench_gaussian.py, whose helpers it uses: one pytest-benchmark group per
(op, pass, size), with the implementations side by side:
  fastvae  the public op, backend "auto" (Triton kernels on CUDA, the torch path on the CPU)
  eager    the plain-torch recipe users write today
  compile  torch.compile of the eager recipe, static shapes (each size gets its own kernels)
Passes: "fwd" (inputs require grad, forward only, as in training) and "fwd+bwd" (forward, then
the gradients of every input for a random upstream gradient). estimate_log_likelihood is an
evaluation under no_grad: "fwd" only, and its point is the peak memory of K = 5000 samples.

Every op also runs at two launch-bound sizes: B = 8 rows of D = 4 latents and a typical
B = 128, D = 64, with K = C = 10 samples or components (N = B rows for mixture_log_prob).

Targets (the issue, on a GPU): log_mean_exp >= 85% of the bandwidth roofline (extra_info
gbps against bytes_moved); importance_sample >= 3x eager at <= 0.5x its peak memory;
mixture_log_prob >= 5x eager; estimate_log_likelihood < 1/10 of eager's peak memory at no
loss of speed. On the CPU: never slower than eager.

Run: python -m pytest benchmarks/bench_iwae.py --benchmark-only --benchmark-columns=median,ops
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import bench_gaussian  # benchmarks/ is on sys.path, as pytest's default import mode puts it
import pytest
import torch
from bench_gaussian import IMPLS, PASSES, compile_or_skip, compiled, forward_backward
from torch.distributions import Normal

import fastvae

pytestmark = bench_gaussian.pytestmark  # the same warning filter

CPU_MAX_EAGER_BYTES = 512 << 20  # on the CPU, skip sizes whose eager recipe makes a larger tensor


class Size(SimpleNamespace):
    """A case's dims by name, e.g. Size(K=64, B=4096); str() gives "K=64,B=4096"."""

    def __str__(self) -> str:
        return ",".join(f"{name}={value}" for name, value in vars(self).items())


@dataclass(frozen=True)
class Op:
    """A benchmarked op: its two implementations, called as impl(*args, **kwargs) with
    (args, kwargs) = inputs(size, device) (tensors that take a gradient require it), its
    sizes by tier ("small", "medium", "large"), the bytes of the largest tensor its eager
    recipe makes, and the minimum bytes its forward and its forward + backward move (fp32)."""

    name: str
    fastvae: Callable
    eager: Callable
    inputs: Callable[[Size, torch.device], tuple[tuple, dict]]
    sizes: tuple[tuple[str, Size], ...]  # (tier, size)
    cuda_sizes: tuple[tuple[str, Size], ...]  # sizes too large for a CPU run
    eager_bytes: Callable[[Size], int]
    fwd_bytes: Callable[[Size], int]
    bwd_bytes: Callable[[Size], int] | None  # None: forward only, under no_grad
    passes: tuple[str, ...] = PASSES
    cpu_sizes: tuple[tuple[str, Size], ...] = ()  # the CPU's stand-ins for cuda_sizes

    def all_sizes(self) -> tuple[tuple[str, Size], ...]:
        return (*self.sizes, *self.cpu_sizes, *self.cuda_sizes)

    def bytes_moved(self, pass_name: str, size: Size) -> int:
        extra = self.bwd_bytes(size) if pass_name == "fwd+bwd" else 0
        return self.fwd_bytes(size) + extra

    def tier(self, size: Size) -> str:
        return next(tier for tier, s in self.all_sizes() if s == size)

    def cuda_skip_reason(self, size: Size) -> str | None:
        if size in (s for _, s in self.cpu_sizes):
            return f"{size} is the CPU's {self.tier(size)} size"
        return None

    def cpu_skip_reason(self, size: Size) -> str | None:
        if size in (s for _, s in self.cuda_sizes):
            return f"{size} runs on CUDA only"
        if self.eager_bytes(size) > CPU_MAX_EAGER_BYTES:
            return (
                f"eager materializes a {self.eager_bytes(size) / 2**30:.1f} GiB tensor at {size}; "
                f"CPU runs stop at {CPU_MAX_EAGER_BYTES >> 20} MiB"
            )
        return None


def random_inputs(*shapes: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """0.5 * N(0, 1) tensors of `shapes` that require grad."""
    return tuple((0.5 * torch.randn(shape, device=device)).requires_grad_() for shape in shapes)


def standard_normal_log_prob(z):
    """log N(z; 0, I) per row, through torch.distributions."""
    return Normal(0.0, 1.0).log_prob(z).sum(-1)


# -- log_mean_exp ----------------------------------------------------------------------------


def fastvae_log_mean_exp(x):
    return fastvae.log_mean_exp(x, dim=0)


def eager_log_mean_exp(x):
    """The IWAE bound's log (1/K) sum_k exp(x_k) over dim 0, the plain-torch way."""
    return torch.logsumexp(x, 0) - math.log(x.shape[0])


# x (K, B): forward reads x (4N, N = K B) and writes (B,); backward reads x, g and out, writes
# the gradient (8N + 8B).
LOG_MEAN_EXP = Op(
    name="log_mean_exp",
    fastvae=fastvae_log_mean_exp,
    eager=eager_log_mean_exp,
    inputs=lambda s, device: (random_inputs((s.K, s.B), device=device), {}),
    sizes=(
        ("small", Size(K=10, B=8)),
        ("small", Size(K=10, B=128)),
        ("small", Size(K=64, B=4096)),
        ("small", Size(K=5000, B=64)),
        ("medium", Size(K=256, B=4096)),
        ("large", Size(K=64, B=262144)),
    ),
    cuda_sizes=(("large", Size(K=1024, B=16384)),),
    eager_bytes=lambda s: 4 * s.K * s.B,
    fwd_bytes=lambda s: 4 * s.K * s.B + 4 * s.B,
    bwd_bytes=lambda s: 8 * s.K * s.B + 8 * s.B,
)


# -- importance_sample -----------------------------------------------------------------------


def eager_importance_sample(mu, logvar, num_samples):
    """K reparameterized samples of q = N(mu, diag exp(logvar)) and log p(z) - log q(z | x),
    the usual recipe: repeat the posterior K times, draw, score z twice."""
    std = torch.exp(0.5 * logvar)
    mu_k, std_k = mu.repeat(num_samples, 1, 1), std.repeat(num_samples, 1, 1)
    z = mu_k + std_k * torch.randn_like(mu_k)
    log_ratio = standard_normal_log_prob(z) - Normal(mu_k, std_k).log_prob(z).sum(-1)
    return z, log_ratio


# mu, logvar (B, D), z (K, B, D): forward reads mu, logvar and writes z and log_ratio (K, B);
# backward reads g_z and z, g_log_ratio, mu and logvar, writes g_mu and g_logvar.
IMPORTANCE_SAMPLE = Op(
    name="importance_sample",
    fastvae=fastvae.importance_sample,
    eager=eager_importance_sample,
    inputs=lambda s, device: (
        random_inputs((s.B, s.D), (s.B, s.D), device=device),
        {"num_samples": s.K},
    ),
    sizes=(
        ("small", Size(B=8, D=4, K=10)),
        ("small", Size(B=128, D=64, K=10)),
        ("small", Size(B=64, D=16, K=50)),
        ("medium", Size(B=512, D=64, K=64)),
    ),
    cpu_sizes=(("large", Size(B=256, D=256, K=64)),),
    cuda_sizes=(("large", Size(B=4096, D=256, K=64)),),
    eager_bytes=lambda s: 4 * s.K * s.B * s.D,
    fwd_bytes=lambda s: 8 * s.B * s.D + 4 * s.K * s.B * (s.D + 1),
    bwd_bytes=lambda s: 8 * s.K * s.B * s.D + 4 * s.K * s.B + 16 * s.B * s.D,
)


# -- mixture_log_prob ------------------------------------------------------------------------


def eager_mixture_log_prob(z, means, logvars, log_weights):
    """log sum_c pi_c N(z; means_c, diag exp(logvars_c)) by broadcasting: N x C x D tensors."""
    log_pi = torch.log_softmax(log_weights, 0)
    components = Normal(means, torch.exp(0.5 * logvars)).log_prob(z[:, None, :]).sum(-1)
    return torch.logsumexp(log_pi + components, dim=1)


# Compute-bound (N C D multiply-adds); the bytes are the inputs and outputs only: forward
# reads z, means, logvars, log_weights and writes (N,); backward reads them and g, writes
# their gradients.
MIXTURE_LOG_PROB = Op(
    name="mixture_log_prob",
    fastvae=fastvae.mixture_log_prob,
    eager=eager_mixture_log_prob,
    inputs=lambda s, device: (
        random_inputs((s.N, s.D), (s.C, s.D), (s.C, s.D), (s.C,), device=device),
        {},
    ),
    sizes=(
        ("small", Size(N=8, C=10, D=4)),
        ("small", Size(N=128, C=10, D=64)),
        ("small", Size(N=4096, C=128, D=16)),
        ("medium", Size(N=2048, C=512, D=64)),
        ("large", Size(N=65536, C=512, D=64)),  # eager's 8 GiB N x C x D: CUDA only
    ),
    cuda_sizes=(),
    eager_bytes=lambda s: 4 * s.N * s.C * s.D,
    fwd_bytes=lambda s: 4 * (s.N * s.D + 2 * s.C * s.D + s.C + s.N),
    bwd_bytes=lambda s: 4 * (2 * s.N * s.D + 4 * s.C * s.D + 2 * s.C + s.N),
)


# -- estimate_log_likelihood -----------------------------------------------------------------

NLL_X_DIM = 8


def linear_gaussian_model(latent_dim: int, device: torch.device) -> tuple[Callable, Callable]:
    """(encode, log_likelihood) of a fixed linear-Gaussian VAE, the same for every
    implementation: log p(x | z) = log N(x; z W^T + b, diag s^2) -> (K, B) for z (K, B, D),
    x (B, 8); encode(x) = (mu, logvar), each (B, D): the exact posterior's mean and the diagonal
    of its covariance, so that the importance weights are those of a well-fitted encoder."""
    dec_w = torch.randn(NLL_X_DIM, latent_dim, device=device) / math.sqrt(latent_dim)
    dec_b = 0.1 * torch.randn(NLL_X_DIM, device=device)
    dec_logvar = torch.full((NLL_X_DIM,), -1.0, device=device)
    eye = torch.eye(latent_dim, device=device)
    post_cov = torch.linalg.inv(eye + dec_w.T @ (dec_w / dec_logvar.exp()[:, None]))
    enc_w = post_cov @ dec_w.T / dec_logvar.exp()  # (D, 8): mu = (x - b) enc_w^T
    enc_logvar = post_cov.diagonal().log()

    def encode(x):
        return (x - dec_b) @ enc_w.T, enc_logvar.repeat(x.shape[0], 1)

    def log_likelihood(x, z):
        return fastvae.gaussian_log_prob(x, z @ dec_w.T + dec_b, dec_logvar)

    return encode, log_likelihood


@torch.no_grad()
def eager_estimate_log_likelihood(encode, log_likelihood, x, num_samples):
    """The importance-sampled log p(x) with all K samples materialized at once."""
    mu, logvar = encode(x)
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn((num_samples, *mu.shape), device=mu.device, dtype=mu.dtype)
    log_q = Normal(mu, std).log_prob(z).sum(-1)
    log_w = log_likelihood(x, z) + standard_normal_log_prob(z) - log_q
    return torch.logsumexp(log_w, 0) - math.log(num_samples)


def nll_inputs(s: Size, device: torch.device) -> tuple[tuple, dict]:
    encode, log_likelihood = linear_gaussian_model(s.D, device)
    x = torch.randn(s.B, NLL_X_DIM, device=device)
    return (encode, log_likelihood, x), {"num_samples": s.K}


# Not a bandwidth op: its target is peak memory. The bytes are x read and (B,) written.
ESTIMATE_LOG_LIKELIHOOD = Op(
    name="estimate_log_likelihood",
    fastvae=fastvae.estimate_log_likelihood,
    eager=eager_estimate_log_likelihood,
    inputs=nll_inputs,
    sizes=(
        ("small", Size(K=10, B=8, D=4)),
        ("small", Size(K=10, B=128, D=64)),
        ("small", Size(K=250, B=256, D=16)),
        ("medium", Size(K=5000, B=256, D=16)),
        ("large", Size(K=5000, B=1024, D=64)),  # eager's 1.2 GiB K x B x D: CUDA only
    ),
    cuda_sizes=(),
    eager_bytes=lambda s: 4 * s.K * s.B * s.D,
    fwd_bytes=lambda s: 4 * s.B * (NLL_X_DIM + 1),
    bwd_bytes=None,
    passes=("fwd",),
)

OPS = {
    op.name: op
    for op in (LOG_MEAN_EXP, IMPORTANCE_SAMPLE, MIXTURE_LOG_PROB, ESTIMATE_LOG_LIKELIHOOD)
}
CASES = [
    pytest.param(op.name, pass_name, size, id=f"{op.name}-{pass_name}-{size}")
    for op in OPS.values()
    for pass_name in op.passes
    for _, size in op.all_sizes()
]


def implementation(op: Op, impl: str) -> Callable:
    return {"fastvae": op.fastvae, "eager": op.eager, "compile": compiled(op.eager)}[impl]


def random_like(outputs):
    """N(0, 1) upstream gradients shaped like `outputs` (a tensor or a tuple of them)."""
    if isinstance(outputs, torch.Tensor):
        return torch.randn_like(outputs)
    return tuple(torch.randn_like(out) for out in outputs)


def build_case(op: Op, impl: str, pass_name: str, size: Size, device: torch.device):
    """One step of the benchmark as a zero-argument callable; inputs and the upstream
    gradients are made once, from a fixed seed. A compile case is compiled here, or skipped.
    The gradients take their shapes from fastvae's outputs: the eager recipe's forward can
    alone be out of memory."""
    torch.manual_seed(0)
    args, kwargs = op.inputs(size, device)
    forward = functools.partial(implementation(op, impl), *args, **kwargs)
    if pass_name == "fwd":
        step = forward
    else:
        wrt = tuple(a for a in args if isinstance(a, torch.Tensor) and a.requires_grad)
        with torch.no_grad():
            grads = random_like(op.fastvae(*args, **kwargs))
        step = functools.partial(forward_backward, forward, wrt, grads)
    if impl == "compile":
        compile_or_skip(step)
    return step


def skip_if_out_of_memory(run: Callable[[], None], size: Size) -> None:
    """run(), or a skip where it runs out of GPU memory (eager's N x C x D tensors can);
    the memory is given back first, once the exception's frames are gone."""
    try:
        run()
        return
    except torch.cuda.OutOfMemoryError as exc:
        reason = f"out of GPU memory at {size}: {str(exc).splitlines()[0]}"
    torch.cuda.empty_cache()
    pytest.skip(reason)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("op_name", "pass_name", "size"), CASES)
def test_iwae_op(benchmark, run_benchmark, device, op_name, pass_name, size, impl):
    run_op_case(benchmark, run_benchmark, device, OPS[op_name], pass_name, size, impl)


def run_op_case(benchmark, run_benchmark, device, op: Op, pass_name: str, size: Size, impl: str):
    """Time one (op, pass, size, impl) case into its pytest-benchmark group, or skip it: a size
    of the other device, or out of GPU memory."""
    reason = op.cuda_skip_reason(size) if device.type == "cuda" else op.cpu_skip_reason(size)
    if reason:
        pytest.skip(reason)
    benchmark.group = f"{op.name} {pass_name} {size}"
    benchmark.extra_info.update(
        kind="op", op=op.name, impl=impl, pass_name=pass_name, size=str(size), tier=op.tier(size)
    )

    def run() -> None:
        step = build_case(op, impl, pass_name, size, device)
        run_benchmark(step, bytes_moved=op.bytes_moved(pass_name, size))

    skip_if_out_of_memory(run, size)
