"""The IWAE paper's MNIST architectures as fastvae modules, and each model's objective.

1 stochastic layer (Burda et al. 2015): encoder 784-200-200-(50 mu, 50 logvar), tanh; decoder the
mirror, 50-200-200-784 Bernoulli logits. The decoder's output bias starts at the logit of the
mean training image. 2 layers: see fastvae.mnist.hierarchy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fastvae.mnist import data
from fastvae.nn import IWAE, VAE, VampPrior

MODELS = ("vae", "iwae", "iwae-dreg", "vamp", "dlogistic")
HIDDEN = (200, 200)
LATENT = 50
PSEUDO_INPUTS = 500  # the VampPrior's components
DLOGISTIC_LOG_SCALE = -2.0  # the discretized-logistic decoder's starting log-scale


@dataclass(frozen=True)
class Run:
    """One row of the study: a model name and its number of samples k."""

    model: str
    k: int

    @property
    def key(self) -> str:
        return f"{self.model}_k{self.k}"

    @property
    def objective(self) -> str:
        """ "iwae": log (1/k) sum_k w_k; "vae": (1/k) sum_k log w_k (the ELBO, k samples)."""
        return "iwae" if self.model.startswith("iwae") else "vae"

    @property
    def likelihood(self) -> str:
        return "discretized_logistic" if self.model == "dlogistic" else "bernoulli"


def mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    """Linear layers of the given sizes with tanh between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def _init_output_bias(decoder: nn.Sequential, likelihood: str, mean_image: torch.Tensor) -> None:
    """Start the decoder at the mean training image: Bernoulli logits logit(mean); the
    discretized logistic's (mean, log_scale) halves at (mean, DLOGISTIC_LOG_SCALE)."""
    bias = decoder[-1].bias
    with torch.no_grad():
        if likelihood == "bernoulli":
            p = mean_image.clamp(1e-3, 1 - 1e-3)
            bias.copy_(torch.log(p) - torch.log1p(-p))
        else:
            bias[: data.PIXELS].copy_(mean_image)
            bias[data.PIXELS :].fill_(DLOGISTIC_LOG_SCALE)


def make_model(run: Run, mean_image: torch.Tensor, pseudo_inputs: torch.Tensor | None = None):
    """The 1-layer model of run: a VAE (k = 1, closed-form or Monte Carlo KL) or an IWAE
    module whose k samples the objective combines. mean_image: (784,) intensities;
    pseudo_inputs: (500, 784) intensities for "vamp"."""
    encoder = mlp((data.PIXELS, *HIDDEN, 2 * LATENT))
    out = data.PIXELS * (2 if run.likelihood == "discretized_logistic" else 1)
    decoder = mlp((LATENT, *HIDDEN[::-1], out))
    _init_output_bias(decoder, run.likelihood, mean_image)
    prior = VampPrior(encoder, pseudo_inputs) if run.model == "vamp" else None
    if run.k == 1 and run.objective == "vae":
        return VAE(encoder, decoder, likelihood=run.likelihood, prior=prior)
    estimator = "dreg" if run.model == "iwae-dreg" else "iwae"
    return IWAE(
        encoder,
        decoder,
        likelihood=run.likelihood,
        prior=prior,
        num_samples=run.k,
        estimator=estimator,
    )


def loss_and_bound(model, x: torch.Tensor, objective: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimize, per-example bound (B,) in nats) of the model's objective on x."""
    out = model(x)
    if isinstance(model, VAE) or objective == "iwae":
        return out.loss, out.elbo
    bound = (out.reconstruction - out.kl).mean(0)  # the k-sample ELBO: mean of log w
    return -bound.mean(), bound


def model_input(run: Run, bins: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A training batch for run from uint8 bins (B, 784): the bins themselves for the
    discretized logistic, else a fresh binarization (bool)."""
    if run.likelihood == "discretized_logistic":
        return bins
    return data.binarize(bins, generator)


def bits_per_dim(nll_nats: float) -> float:
    return nll_nats / (data.PIXELS * math.log(2))
