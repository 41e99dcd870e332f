"""fastvae's full-covariance posterior, reparameterize_kl_tril, against eager torch and its
torch.compile.

The layout of bench_gaussian.py, whose helpers it uses: one pytest-benchmark group per
(pass, size), with the implementations side by side:
  fastvae        the public op, backend "auto" (Triton kernels on CUDA, the torch path on the CPU)
  eager          the hand-written recipe: torch.tril, a batched matmul, the diagonal's log
  compile        torch.compile of that recipe, static shapes (each size gets its own kernels)
  distributions  MultivariateNormal(mu, scale_tril=tril(L)).rsample() and kl_divergence
                 against N(0, I), the torch.distributions way (benchmarks/report.py tables
                 fastvae, eager and compile; this one is in the JSON)
Passes: "fwd" (inputs require grad, forward only) and "fwd+bwd" (forward, then the gradients
of mu and scale_tril for a random upstream gradient of z and ones into the KL).

Sizes: B = 128 rows of D = 16 (small), B = 1024 of D = 64 (medium) and of D = 256 (large);
scale_tril's B * D^2 elements dominate the time and the memory.

Run: python -m pytest benchmarks/bench_tril.py --benchmark-only --benchmark-columns=median,ops
"""

from __future__ import annotations

import functools

import bench_gaussian  # benchmarks/ is on sys.path, as pytest's default import mode puts it
import pytest
import torch
from bench_gaussian import (
    PASSES,
    Size,
    compile_or_skip,
    compiled,
    forward_backward,
    random_z_grad_unit_kl_grad,
)
from torch.distributions import MultivariateNormal, kl_divergence

import fastvae

pytestmark = bench_gaussian.pytestmark  # the same warning filter

IMPLS = ("fastvae", "eager", "compile", "distributions")
SIZES = (Size(128, 16, "small"), Size(1024, 64, "medium"), Size(1024, 256, "large"))
SIZE_IDS = [f"{s.tier}-{s.batch}-{s.dim}" for s in SIZES]


def eager_reparameterize_kl_tril(mu, scale_tril):
    """z = mu + L eps and KL(N(mu, L L^T) || N(0, I)) per row, by hand in plain torch."""
    L = torch.tril(scale_tril)
    eps = torch.randn_like(mu)
    z = mu + torch.bmm(L, eps.unsqueeze(-1)).squeeze(-1)
    log_det = torch.diagonal(L, dim1=-2, dim2=-1).abs().log().sum(-1)
    kl = 0.5 * (mu.pow(2).sum(-1) + L.pow(2).sum((-2, -1)) - mu.shape[-1]) - log_det
    return z, kl


def distributions_reparameterize_kl_tril(mu, scale_tril):
    """The same through torch.distributions (argument validation on, its default)."""
    q = MultivariateNormal(mu, scale_tril=torch.tril(scale_tril))
    eye = torch.eye(mu.shape[-1], dtype=mu.dtype, device=mu.device)
    p = MultivariateNormal(torch.zeros_like(mu[0]), scale_tril=eye)
    return q.rsample(), kl_divergence(q, p)


def implementation(impl: str):
    return {
        "fastvae": fastvae.reparameterize_kl_tril,
        "eager": eager_reparameterize_kl_tril,
        "compile": compiled(eager_reparameterize_kl_tril),
        "distributions": distributions_reparameterize_kl_tril,
    }[impl]


def inputs(size: Size, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """mu (B, D) and a well-conditioned scale_tril (B, D, D) near the identity, both requiring
    grad, from a fixed seed."""
    torch.manual_seed(0)
    B, D = size.batch, size.dim
    mu = 0.5 * torch.randn(B, D, device=device)
    scale_tril = 0.1 * torch.randn(B, D, D, device=device) + torch.eye(D, device=device)
    return mu.requires_grad_(), scale_tril.requires_grad_()


def bytes_moved(pass_name: str, size: Size) -> int:
    """The fp32 minimum: the forward reads mu and L's lower triangle and writes z and the KL;
    the backward reads g_z, g_kl, mu and the triangle again and writes g_mu and all of g_L
    (its upper triangle is zeros, but it is a dense tensor)."""
    B, D = size.batch, size.dim
    triangle = D * (D + 1) // 2
    forward = 4 * B * (D + triangle + D + 1)
    backward = 4 * B * (D + 1 + D + triangle + D + D * D)
    return forward + (backward if pass_name == "fwd+bwd" else 0)


def build_case(impl: str, pass_name: str, size: Size, device: torch.device):
    """One step of the benchmark as a zero-argument callable (see bench_gaussian.build_case)."""
    args = inputs(size, device)
    forward = functools.partial(implementation(impl), *args)
    if pass_name == "fwd":
        step = forward
    else:
        with torch.no_grad():
            grads = random_z_grad_unit_kl_grad(eager_reparameterize_kl_tril(*args))
        step = functools.partial(forward_backward, forward, args, grads)
    if impl == "compile":
        compile_or_skip(step)
    return step


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("pass_name", PASSES)
@pytest.mark.parametrize("impl", IMPLS)
def test_reparameterize_kl_tril(benchmark, run_benchmark, device, impl, pass_name, size):
    benchmark.group = f"reparameterize_kl_tril {pass_name} {size}"
    benchmark.extra_info.update(
        kind="op", op="reparameterize_kl_tril", impl=impl, pass_name=pass_name, size=str(size),
        tier=size.tier,
    )  # fmt: skip
    step = build_case(impl, pass_name, size, device)
    run_benchmark(step, bytes_moved=bytes_moved(pass_name, size))
