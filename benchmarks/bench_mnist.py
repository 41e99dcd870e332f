"""fastvae.mnist's test evaluation: the k = 5000 importance-sampled NLL, streamed, against all
samples at once.

The layout of bench_iwae.py (its Op, Size and build_case), forward only, under no_grad:
  fastvae  model.log_likelihood(x, k): fastvae.mnist's evaluation, the samples drawn and
           folded in chunks (fastvae.estimate_log_likelihood)
  eager    the same model in plain torch with all k samples at once: (k, B, 784) logits,
           BCE with logits against x expanded k-fold, logsumexp over k
  compile  torch.compile of the eager recipe
The model is fastvae.mnist's 1-layer IWAE (784-200-200-50, tanh, Bernoulli decoder), fresh
weights; x: B binarized digits (random, half the pixels on), bool as fastvae.mnist keeps them.
The target is peak memory (streamed < 1/10 of all at once); the time is the decoder's on k B
latents either way.

Run: python -m pytest benchmarks/bench_mnist.py --benchmark-only
"""

from __future__ import annotations

import math

import bench_gaussian  # benchmarks/ is on sys.path, as pytest's default import mode puts it
import pytest
import torch
from bench_gaussian import IMPLS
from bench_iwae import Op, Size, run_op_case
from torch.distributions import Normal
from torch.nn import functional as F

from fastvae.mnist import models

pytestmark = bench_gaussian.pytestmark  # the same warning filter


def streamed_nll(model, x, num_samples):
    """fastvae.mnist's evaluation: log p(x) per digit, (B,)."""
    return model.log_likelihood(x, num_samples)


@torch.no_grad()
def all_at_once_nll(model, x, num_samples):
    """The importance-sampled log p(x) with all k samples materialized at once."""
    mu, logvar = model.encoder(x.float()).chunk(2, dim=-1)
    q = Normal(mu, torch.exp(0.5 * logvar))
    z = q.sample((num_samples,))
    logits = model.decoder(z.reshape(-1, z.shape[-1])).reshape(*z.shape[:-1], -1)
    target = x.float().expand_as(logits)
    log_px = -F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1)
    log_w = log_px + Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
    return torch.logsumexp(log_w, 0) - math.log(num_samples)


def nll_inputs(s: Size, device: torch.device) -> tuple[tuple, dict]:
    model = models.make_model(models.Run("iwae", 1), torch.full((784,), 0.5)).to(device)
    x = torch.bernoulli(torch.full((s.B, 784), 0.5, device=device)).bool()
    return (model, x), {"num_samples": s.K}


# Not a bandwidth op: its target is peak memory. The bytes are x read and (B,) written.
MNIST_TEST_NLL = Op(
    name="mnist_test_nll",
    fastvae=streamed_nll,
    eager=all_at_once_nll,
    inputs=nll_inputs,
    sizes=(("medium", Size(K=5000, B=10, D=784)),),
    cuda_sizes=(("large", Size(K=5000, B=100, D=784)),),
    eager_bytes=lambda s: 4 * s.K * s.B * s.D,
    fwd_bytes=lambda s: s.B * s.D + 4 * s.B,
    bwd_bytes=None,
    passes=("fwd",),
)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", [size for _, size in MNIST_TEST_NLL.all_sizes()], ids=str)
def test_mnist_test_nll(benchmark, run_benchmark, device, size, impl):
    run_op_case(benchmark, run_benchmark, device, MNIST_TEST_NLL, "fwd", size, impl)
