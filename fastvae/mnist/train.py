"""The training loop and its learning-rate schedules.

The paper's (--full): Adam (eps 1e-4), batch 20, 3^i epochs at lr 1e-3 * 10^(-i/7) for i = 0..7
(3,280 passes). A CPU run of E epochs compresses it: lr * 10^(-e / (E - 1)) in epoch e, the
same tenfold decay over E epochs.
"""

from __future__ import annotations

import math

import torch

from fastvae._jobs import progress as progress_bar
from fastvae.mnist.models import Run, loss_and_bound, model_input

PAPER_STAGES = 8  # i = 0..7, 3^i epochs each
ADAM_EPS = 1e-4
POSTFIX_EVERY = 50  # steps between progress-bar loss updates (each costs a host sync)


def paper_epochs() -> int:
    return sum(3**i for i in range(PAPER_STAGES))


def learning_rates(lr: float, epochs: int, full: bool) -> list[float]:
    """The learning rate of each epoch."""
    if full:
        return [lr * 10 ** (-i / 7) for i in range(PAPER_STAGES) for _ in range(3**i)]
    return [lr * 10 ** (-e / max(1, epochs - 1)) for e in range(epochs)]


def train(
    model,
    run: Run,
    train_bins: torch.Tensor,
    rates: list[float],
    batch: int,
    *,
    generator: torch.Generator,
    device: torch.device,
    desc: str,
    progress: bool = True,
):
    """Train for len(rates) epochs over train_bins (N, 784) uint8, shuffled each epoch, with
    dynamically binarized batches (Bernoulli models). Returns the last logged loss (nats)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=rates[0], eps=ADAM_EPS, fused=True)
    steps_per_epoch = math.ceil(train_bins.shape[0] / batch)
    bar = progress_bar(len(rates) * steps_per_epoch, desc, progress)
    steps = iter(bar)
    loss_value = math.nan
    for rate in rates:
        for group in optimizer.param_groups:
            group["lr"] = rate
        order = torch.randperm(train_bins.shape[0], generator=generator)
        for first in range(0, train_bins.shape[0], batch):
            step = next(steps)
            bins = train_bins[order[first : first + batch]]
            x = model_input(run, bins, generator).to(device)
            loss, _ = loss_and_bound(model, x, run.objective)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % POSTFIX_EVERY == 0:
                loss_value = loss.item()
                bar.set_postfix(loss=f"{loss_value:.2f}", lr=f"{rate:.2e}", refresh=False)
    return loss_value
