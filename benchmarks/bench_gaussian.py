"""fastvae's Gaussian ops against the eager torch recipe and its torch.compile.

One pytest-benchmark group per (op, pass, size), with the implementations side by side (each
size has a tier, small / medium / large, in extra_info; benchmarks/report.py reads them):
  fastvae  the public op, backend "auto" (Triton kernels on CUDA, the torch path on the CPU)
  eager    the usual plain-torch recipe
  compile  torch.compile of the eager recipe, static shapes (each size gets its own kernels)
Passes: "fwd" (inputs require grad, forward only, as in training) and "fwd+bwd" (forward, then
the gradients of every input for a fixed upstream gradient).

Run: python -m pytest benchmarks --benchmark-only --benchmark-columns=median,ops
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch._dynamo.exc import TorchDynamoException
from torch.distributions import Normal

import fastvae

# Inductor's CPU backend imports torch.utils.mkldnn, which warns about torch.jit internally.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")

IMPLS = ("fastvae", "eager", "compile")
PASSES = ("fwd", "fwd+bwd")
LOG_PROB_SAMPLES = 8  # K samples (K, B, D) scored against one posterior (B, D)


@dataclass(frozen=True)
class Size:
    """A batch of `batch` rows of `dim` latents; tier: "small", "medium" or "large"; only:
    the one device type ("cpu" or "cuda") this size runs on, None for both."""

    batch: int
    dim: int
    tier: str = "small"
    only: str | None = None

    @property
    def numel(self) -> int:
        return self.batch * self.dim

    def __str__(self) -> str:
        return f"B={self.batch},D={self.dim}"

    def skip_reason(self, device: torch.device) -> str | None:
        if self.only is not None and device.type != self.only:
            return f"{self} is the {self.only.upper()}'s {self.tier} size"
        return None


# B * D = 32 and 8k (the smallest and a typical latent batch), 64k (small), 1M (medium) and
# 4M on the CPU or 16M on CUDA (large).
SIZES = (
    Size(8, 4, "small"),
    Size(128, 64, "small"),
    Size(1024, 64, "small"),
    Size(256, 256, "small"),
    Size(16384, 64, "medium"),
    Size(4096, 256, "medium"),
    Size(16384, 256, "large", only="cpu"),
    Size(65536, 256, "large", only="cuda"),
)
SIZE_IDS = [f"{s.tier}-{s.batch}-{s.dim}" for s in SIZES]


@dataclass(frozen=True)
class Op:
    """A benchmarked op: its two implementations, input shapes, upstream gradients, and the
    minimum fp32 bytes per latent element (N = B * D) its forward and backward move."""

    name: str
    fastvae: Callable
    eager: Callable
    input_shapes: Callable[[Size], tuple[tuple[int, ...], ...]]
    output_grads: Callable
    fwd_bytes_per_element: int
    bwd_bytes_per_element: int

    def bytes_moved(self, pass_name: str, size: Size) -> int:
        per_element = self.fwd_bytes_per_element
        if pass_name == "fwd+bwd":
            per_element += self.bwd_bytes_per_element
        return per_element * size.numel


def eager_reparameterize_kl(mu, logvar):
    """z = mu + sigma * eps and KL(q || N(0, I)) per row, the plain-torch way."""
    eps = torch.randn_like(mu)
    std = torch.exp(0.5 * logvar)
    z = mu + std * eps
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1)
    return z, kl


def eager_log_prob(x, mu, logvar):
    """log N(x; mu, diag exp(logvar)) per row, through torch.distributions."""
    return Normal(mu, (0.5 * logvar).exp()).log_prob(x).sum(-1)


def random_z_grad_unit_kl_grad(outputs):
    """Upstream gradients of (z * gz).sum() + kl.sum(): gz random, ones into the KL."""
    z, kl = outputs
    return torch.randn_like(z), torch.ones_like(kl)


# Bytes as in docs/math.md: forward reads mu, logvar and writes z (12N); backward
# reads g_z, mu, logvar and writes g_mu, g_logvar (20N).
REPARAMETERIZE_KL = Op(
    name="reparameterize_kl",
    fastvae=fastvae.reparameterize_kl,
    eager=eager_reparameterize_kl,
    input_shapes=lambda s: ((s.batch, s.dim), (s.batch, s.dim)),
    output_grads=random_z_grad_unit_kl_grad,
    fwd_bytes_per_element=12,
    bwd_bytes_per_element=20,
)
# Counted the same way: forward reads x (K N), mu and logvar; backward reads them again and
# writes g_x (K N), g_mu and g_logvar.
GAUSSIAN_LOG_PROB = Op(
    name="gaussian_log_prob",
    fastvae=fastvae.gaussian_log_prob,
    eager=eager_log_prob,
    input_shapes=lambda s: ((LOG_PROB_SAMPLES, s.batch, s.dim), (s.batch, s.dim), (s.batch, s.dim)),
    output_grads=torch.randn_like,
    fwd_bytes_per_element=4 * LOG_PROB_SAMPLES + 8,
    bwd_bytes_per_element=8 * LOG_PROB_SAMPLES + 16,
)
OPS = {op.name: op for op in (REPARAMETERIZE_KL, GAUSSIAN_LOG_PROB)}


@functools.cache
def compiled(fn: Callable) -> Callable:
    """torch.compile of `fn`, made once; it compiles on its first call for each shape."""
    return torch.compile(fn, dynamic=False)


def implementation(op: Op, impl: str) -> Callable:
    return {"fastvae": op.fastvae, "eager": op.eager, "compile": compiled(op.eager)}[impl]


def build_case(op: Op, impl: str, pass_name: str, size: Size, device: torch.device):
    """One step of the benchmark as a zero-argument callable; inputs and the upstream
    gradients are made once, from a fixed seed. A compile case is compiled here, or skipped."""
    torch.manual_seed(0)
    inputs = tuple(
        (0.5 * torch.randn(shape, device=device)).requires_grad_()
        for shape in op.input_shapes(size)
    )
    forward = functools.partial(implementation(op, impl), *inputs)
    if pass_name == "fwd":
        step = forward
    else:
        with torch.no_grad():
            grads = op.output_grads(op.eager(*inputs))
        step = functools.partial(forward_backward, forward, inputs, grads)
    if impl == "compile":
        compile_or_skip(step)
    return step


def forward_backward(forward: Callable, inputs: tuple, grads):
    """Forward, then the input gradients for upstream `grads` (returned, not accumulated)."""
    return torch.autograd.grad(forward(), inputs, grads)


def compile_or_skip(step: Callable) -> None:
    """Run the first, compiling call of `step`; skip the test if torch.compile fails here."""
    try:
        step()
    except TorchDynamoException as exc:
        pytest.skip(f"torch.compile failed on this machine: {str(exc).splitlines()[0]}")


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("pass_name", PASSES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op_name", OPS)
def test_gaussian_op(benchmark, run_benchmark, device, op_name, impl, pass_name, size):
    op = OPS[op_name]
    if reason := size.skip_reason(device):
        pytest.skip(reason)
    benchmark.group = f"{op_name} {pass_name} {size}"
    benchmark.extra_info.update(
        kind="op", op=op_name, impl=impl, pass_name=pass_name, size=str(size), tier=size.tier
    )
    step = build_case(op, impl, pass_name, size, device)
    run_benchmark(step, bytes_moved=op.bytes_moved(pass_name, size))
