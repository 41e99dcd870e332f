"""Test-set measures: the streamed importance-sampled NLL, the training bound, active units."""

from __future__ import annotations

import torch

from fastvae.mnist.models import loss_and_bound

ACTIVE_THRESHOLD = 1e-2  # Burda et al.: unit u is active when Cov_x(E_q[z_u | x]) > 1e-2


def _batches(x: torch.Tensor, batch: int):
    for first in range(0, x.shape[0], batch):
        yield x[first : first + batch]


@torch.no_grad()
def nll_nats(model, x: torch.Tensor, samples: int, batch: int = 100) -> float:
    """-mean log p(x) over x (N, 784), each estimated with `samples` importance samples,
    streamed in chunks of samples (memory bounded by a chunk, not by samples)."""
    total = sum(
        -model.log_likelihood(xb, samples).double().sum().item() for xb in _batches(x, batch)
    )
    return total / x.shape[0]


@torch.no_grad()
def bound_nats(model, x: torch.Tensor, objective: str, batch: int = 100) -> float:
    """-mean of the training objective's bound over x, in nats."""
    total = sum(
        -loss_and_bound(model, xb, objective)[1].double().sum().item() for xb in _batches(x, batch)
    )
    return total / x.shape[0]


@torch.no_grad()
def active_units(model, x: torch.Tensor, batch: int = 1000, mean=None) -> int:
    """How many latent units u have Var_x(E_q[z_u | x]) > ACTIVE_THRESHOLD over x; mean(x):
    the layer's E_q[z | x] (default: the encoder's mu)."""
    mean = mean or (lambda xb: model.encode(xb)[0])
    mu = torch.cat([mean(xb).double() for xb in _batches(x, batch)])
    return int((mu.var(0, unbiased=False) > ACTIVE_THRESHOLD).sum())
