"""fastvae's data likelihoods against the eager torch recipes and their torch.compile.

The layout of bench_iwae.py, whose Op, Size and build_case it uses: one pytest-benchmark group
per (op, pass, size), with the implementations side by side:
  fastvae  the public op, backend "auto" (Triton kernels on CUDA, the torch path on the CPU),
           default arguments (on CPU tensors discretized_logistic_log_prob checks x's values)
  eager    the plain-torch recipe users write today
  compile  torch.compile of the eager recipe, static shapes
Passes: "fwd" (parameters require grad, forward only) and "fwd+bwd" (forward, then the
parameters' gradients for a random upstream gradient). x is data: it takes no gradient.

bernoulli_log_prob: K samples of logits (K, B, D) against one binarized batch x (B, D), uint8
(one byte a pixel) or float 0/1; eager: binary_cross_entropy_with_logits against x converted
and expanded to (K, B, D). discretized_logistic_log_prob: 8-bit data (B, D), uint8 k or float
k / 256, against (mean, log_scale) (B, D); eager: the PixelCNN++ recipe (log-sigmoid edge bins,
the density at the bin's centre where the sigmoids' difference underflows, a where-chain).

Run: python -m pytest benchmarks/bench_likelihoods.py --benchmark-only
"""

from __future__ import annotations

import math

import bench_gaussian  # benchmarks/ is on sys.path, as pytest's default import mode puts it
import pytest
import torch
from bench_gaussian import IMPLS
from bench_iwae import Op, Size, run_op_case
from torch.nn import functional as F

import fastvae

pytestmark = bench_gaussian.pytestmark  # the same warning filter

BINS = 256
X_DTYPES = {"uint8": torch.uint8, "float": torch.float32}


def binarized(s: Size, device: torch.device) -> torch.Tensor:
    """x (B, D): 0/1 pixels in the dtype s.x names."""
    return (torch.rand(s.B, s.D, device=device) < 0.5).to(X_DTYPES[s.x])


def pixels(s: Size, device: torch.device) -> torch.Tensor:
    """x (B, D): 8-bit data as uint8 k or float k / 256, as s.x says."""
    k = torch.randint(0, BINS, (s.B, s.D), device=device, dtype=torch.uint8)
    return k if s.x == "uint8" else k.float() / BINS


# -- bernoulli_log_prob ----------------------------------------------------------------------


def eager_bernoulli_log_prob(x, logits):
    """log p(x | logits) per row: -BCE with logits against x made float and expanded."""
    target = x.to(logits.dtype).expand_as(logits)
    return -F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1)


def bernoulli_inputs(s: Size, device: torch.device) -> tuple[tuple, dict]:
    logits = (2 * torch.randn(s.K, s.B, s.D, device=device)).requires_grad_()
    return (binarized(s, device), logits), {}


def _x_bytes(s: Size) -> int:
    return s.B * s.D * (1 if s.x == "uint8" else 4)


# Forward: reads x (B D, once) and logits (4 K B D), writes (K, B); backward: reads g, x and
# logits, writes the logits' gradient.
BERNOULLI_LOG_PROB = Op(
    name="bernoulli_log_prob",
    fastvae=fastvae.bernoulli_log_prob,
    eager=eager_bernoulli_log_prob,
    inputs=bernoulli_inputs,
    sizes=(
        ("small", Size(K=1, B=64, D=784, x="uint8")),
        ("medium", Size(K=50, B=64, D=784, x="uint8")),
        ("medium", Size(K=50, B=64, D=784, x="float")),
    ),
    cuda_sizes=(("large", Size(K=50, B=1024, D=784, x="uint8")),),
    eager_bytes=lambda s: 4 * s.K * s.B * s.D,
    fwd_bytes=lambda s: _x_bytes(s) + 4 * s.K * s.B * (s.D + 1),
    bwd_bytes=lambda s: _x_bytes(s) + 4 * s.K * s.B * (2 * s.D + 1),
)


# -- discretized_logistic_log_prob -----------------------------------------------------------


def eager_discretized_logistic(x, mean, log_scale):
    """sum_d log P(bin of x_d) the PixelCNN++ way (Salimans et al. 2017) in this convention's
    units: bin [k, k + 1) / 256 of x = k / 256, the first and last bins open to -inf and +inf."""
    if not x.is_floating_point():
        x = x.to(mean.dtype) / BINS
    inv_scale = torch.exp(-log_scale)
    plus_in = inv_scale * (x + 1.0 / BINS - mean)
    min_in = inv_scale * (x - mean)
    log_cdf_plus = plus_in - F.softplus(plus_in)  # log sigmoid(plus_in): the first bin
    log_one_minus_cdf_min = -F.softplus(min_in)  # log (1 - sigmoid(min_in)): the last bin
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    mid_in = inv_scale * (x + 0.5 / BINS - mean)
    log_pdf_mid = mid_in - log_scale - 2.0 * F.softplus(mid_in)  # the density at the centre
    interior = torch.where(
        cdf_delta > 1e-5,
        torch.log(cdf_delta.clamp(min=1e-12)),
        log_pdf_mid - math.log(BINS),  # density x width where the difference underflows
    )
    last = torch.where(x > (BINS - 1.5) / BINS, log_one_minus_cdf_min, interior)
    return torch.where(x < 0.5 / BINS, log_cdf_plus, last).sum(-1)


def discretized_logistic_inputs(s: Size, device: torch.device) -> tuple[tuple, dict]:
    mean = torch.rand(s.B, s.D, device=device).requires_grad_()
    log_scale = (0.5 * torch.randn(s.B, s.D, device=device) - 3.0).requires_grad_()
    return (pixels(s, device), mean, log_scale), {}


# Forward: reads x, mean and log_scale (B D each), writes (B,); backward: reads g and the
# three again, writes the gradients of mean and log_scale.
DISCRETIZED_LOGISTIC_LOG_PROB = Op(
    name="discretized_logistic_log_prob",
    fastvae=fastvae.discretized_logistic_log_prob,
    eager=eager_discretized_logistic,
    inputs=discretized_logistic_inputs,
    sizes=(
        ("small", Size(B=64, D=784, x="uint8")),
        ("small", Size(B=64, D=784, x="float")),
        ("medium", Size(B=64, D=3072, x="uint8")),
    ),
    cuda_sizes=(("large", Size(B=1024, D=3072, x="uint8")),),
    eager_bytes=lambda s: 4 * s.B * s.D,
    fwd_bytes=lambda s: _x_bytes(s) + 8 * s.B * s.D + 4 * s.B,
    bwd_bytes=lambda s: _x_bytes(s) + 16 * s.B * s.D + 4 * s.B,
)

OPS = {op.name: op for op in (BERNOULLI_LOG_PROB, DISCRETIZED_LOGISTIC_LOG_PROB)}
CASES = [
    pytest.param(op.name, pass_name, size, id=f"{op.name}-{pass_name}-{size}")
    for op in OPS.values()
    for pass_name in op.passes
    for _, size in op.all_sizes()
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("op_name", "pass_name", "size"), CASES)
def test_likelihood_op(benchmark, run_benchmark, device, op_name, pass_name, size, impl):
    run_op_case(benchmark, run_benchmark, device, OPS[op_name], pass_name, size, impl)
