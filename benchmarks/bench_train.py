"""Whole training steps (forward, backward, optimizer step): fastvae.nn against the libraries.

One pytest-benchmark group per workload, the implementations side by side, all with the same
networks (the same MLPs, the same initial weights), the same batch and Adam(lr=1e-3):
  fastvae          fastvae.nn.VAE / IWAE with the workload's prior (backend "auto"); the
                   unit-variance decoder as decoder_logvar=0.0 (the network gives the mean)
  fastvae-compile  torch.compile of fastvae's loss; skipped with the reason where it fails
  eager            the plain torch recipe: torch.distributions (Normal, kl_divergence,
                   MixtureSameFamily), logsumexp for the IWAE bound
  compile          torch.compile of that recipe's loss (the optimizer step stays eager)
  pythae           pythae.models VAE / IWAE / VAMP around the same networks (BaseEncoder /
                   BaseDecoder wrappers), reconstruction_loss="mse"
  pyro             Pyro SVI with pyro.optim.Adam: Trace_ELBO for the VAEs, RenyiELBO(alpha=0,
                   num_particles=K, vectorize_particles=True) for the IWAEs
  networks         the networks alone: the encoder, the decoder on K x B latents (and for the
                   VampPrior the encoder on the pseudo-inputs), a trivial loss, backward and the
                   optimizer step. Every other row's time minus this one is its time in latent
                   ops (sampling, KL / log-weights, prior, the likelihood and the bound).
pythae and pyro-ppl are optional (`make bench-peers`, or `pip install -e ".[peers]"`): a missing
one skips its rows with the reason.

The model: x in [0, 1]^X, a Gaussian decoder of unit variance (pythae's "mse" loss up to a
constant), MLP encoders X -> 256 -> 256 -> 2D and decoders D -> 256 -> 256 -> X with ReLU, X =
784, D = 64, a batch of 64 on the CPU and 512 on CUDA. The latent-heavy workload has D = 256, K
= 64, X = 32 and a decoder D -> 32 -> X. The MNIST workload is fastvae.mnist's IWAE k = 50
(batch 100, tanh MLPs 784 -> 200 -> 200 -> 2 x 50 and back): x binarized, a Bernoulli decoder
(fastvae: x as bool; eager: BCE with logits against x expanded K-fold; pythae: its "bce" loss on
sigmoid(logits); Pyro: Bernoulli(logits)); an epoch of 60,000 digits is 600 such steps.
Validation of torch.distributions and Pyro arguments is off (the fastest form of those recipes).
Where the libraries differ by design: pythae's VAMP makes its pseudo-inputs with its own
Linear(C, X) + Hardtanh layer (an extra C x C x X product a step); Pyro's loss is the batch's
sum, not its mean (Adam's steps do not depend on the scale); pythae's IWAE repeats x and the
posterior K times before the decoder.

Every row's extra_info has "profile": the ops with the most self time in one profiled step
(torch.profiler), which RESULTS.md shows under a missed target; compiled rows also record
"compile_s" and "graph_breaks". The fastvae row also records "paired": its speed-up over each
eager-mode baseline (eager, pythae, pyro) measured in one loop, a step of each back to back in
alternating order, the median of the rounds' ratios; the fastvae-compile row records its own
against compile. Separate cases run minutes apart, and on a
shared machine the speed drifts by more than the differences measured (on the 2-core CPU the
MNIST networks-only step took 110 ms in one run and 81 ms in the next); in a paired loop the
drift cancels.

Run: python -m pytest benchmarks/bench_train.py --benchmark-only --benchmark-columns=median,ops
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import bench_gaussian  # benchmarks/ is on sys.path, as pytest's default import mode puts it
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.distributions import (
    Categorical,
    Independent,
    MixtureSameFamily,
    Normal,
    kl_divergence,
)
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile

import fastvae.nn

pytestmark = bench_gaussian.pytestmark  # the same warning filter

LR = 1e-3
IMPLS = ("fastvae", "fastvae-compile", "eager", "compile", "pythae", "pyro", "networks")
BASELINES = ("eager", "compile", "pythae", "pyro")
# The baselines each fastvae row is also timed against in a paired loop: eager-mode against
# eager-mode, compiled against compiled.
PAIRED_BASELINES = {"fastvae": ("eager", "pythae", "pyro"), "fastvae-compile": ("compile",)}
PAIRED_ROUNDS = 10  # at least; more while under PAIRED_SECONDS a baseline
PAIRED_SECONDS = 2.0


@dataclass(frozen=True)
class Workload:
    """A model and its sizes. model: "vae" (closed-form KL to N(0, I)), "iwae" (K samples,
    N(0, I) prior) or "vamp" (a VAE with a VampPrior of `components` pseudo-inputs);
    enc_hidden / dec_hidden: the widths of the MLPs' hidden layers."""

    name: str
    model: str
    batch: int
    x_dim: int
    latent: int
    enc_hidden: tuple[int, ...]
    dec_hidden: tuple[int, ...]
    samples: int = 1
    components: int = 0
    likelihood: str = "gaussian"  # or "bernoulli": binarized x, the decoder gives logits
    activation: str = "relu"

    def __str__(self) -> str:
        k = f",K={self.samples}" if self.model == "iwae" else ""
        c = f",C={self.components}" if self.components else ""
        return f"B={self.batch},X={self.x_dim},D={self.latent}{k}{c}"


MLP = (256, 256)
# The CPU's sizes; on CUDA the batch is CUDA_BATCH (the networks are the same).
WORKLOADS = {
    w.name: w
    for w in (
        Workload("vae", "vae", 64, 784, 64, MLP, MLP),
        Workload("iwae-k8", "iwae", 64, 784, 64, MLP, MLP, samples=8),
        Workload("iwae-k64", "iwae", 64, 784, 64, MLP, MLP, samples=64),
        Workload("vamp-c500", "vamp", 64, 784, 64, MLP, MLP, components=500),
        # Latent-heavy: a wide latent, many samples, small data and a small decoder.
        Workload("latent-heavy", "iwae", 64, 32, 256, MLP, (32,), samples=64),
        # fastvae.mnist's IWAE k = 50 (Burda et al.'s 1-layer model), one step of its epoch
        # of 600 (60,000 digits, batch 100): Bernoulli decoder, tanh MLPs.
        Workload(
            "mnist-iwae-k50",
            "iwae",
            100,
            784,
            50,
            (200, 200),
            (200, 200),
            samples=50,
            likelihood="bernoulli",
            activation="tanh",
        ),  # fmt: skip
    )
}
CUDA_BATCH = 512


def sized_for(workload: Workload, device: torch.device) -> Workload:
    return replace(workload, batch=CUDA_BATCH) if device.type == "cuda" else workload


# -- the shared networks and data ------------------------------------------------------------


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


def mlp(sizes: tuple[int, ...], activation: str = "relu") -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


@dataclass
class Setup:
    """What every implementation of a workload starts from: encoder (x -> 2D: mu, logvar),
    decoder (z -> the mean of x, or its Bernoulli logits), the batch x (0 / 1 floats for a
    Bernoulli likelihood) and the initial VampPrior pseudo-inputs."""

    workload: Workload
    encoder: nn.Sequential
    decoder: nn.Sequential
    x: torch.Tensor
    pseudo_inputs: torch.Tensor | None


def make_setup(workload: Workload, device: torch.device) -> Setup:
    """The same networks (weights from seed 0) and data (seed 1) for every implementation."""
    w = workload
    torch.manual_seed(0)
    encoder = mlp((w.x_dim, *w.enc_hidden, 2 * w.latent), w.activation).to(device)
    decoder = mlp((w.latent, *w.dec_hidden, w.x_dim), w.activation).to(device)
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(w.batch, w.x_dim, generator=generator).to(device)
    if w.likelihood == "bernoulli":
        x = torch.bernoulli(x, generator=generator)
    pseudo = None
    if w.model == "vamp":
        pseudo = torch.rand(w.components, w.x_dim, generator=generator).to(device)
    return Setup(w, encoder, decoder, x, pseudo)


def parameters(*modules: nn.Module, extra: tuple[torch.Tensor, ...] = ()) -> list[torch.Tensor]:
    return [p for m in modules for p in m.parameters()] + list(extra)


def training_step(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor]):
    """zero_grad, loss, backward, Adam step: one call of the returned function."""
    optimizer = torch.optim.Adam(params, lr=LR)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        return loss.detach()

    step.optimizer = optimizer
    return step


# -- fastvae ---------------------------------------------------------------------------------


def fastvae_model(s: Setup) -> nn.Module:
    w = s.workload
    if w.likelihood == "bernoulli":
        return fastvae.nn.IWAE(s.encoder, s.decoder, likelihood="bernoulli", num_samples=w.samples)
    # the unit-variance Gaussian decoder: the network gives the mean alone
    if w.model == "iwae":
        return fastvae.nn.IWAE(s.encoder, s.decoder, num_samples=w.samples, decoder_logvar=0.0)
    prior = None
    if w.model == "vamp":
        prior = fastvae.nn.VampPrior(s.encoder, s.pseudo_inputs)
    return fastvae.nn.VAE(s.encoder, s.decoder, prior=prior, decoder_logvar=0.0)


def fastvae_step(s: Setup, compile_loss: bool):
    model = fastvae_model(s)

    def loss(x):
        return model(x).loss

    if compile_loss:
        loss = torch.compile(loss)
    # Binarized data as fastvae.mnist keeps it: bool, 0 / 1 by its dtype (the same values).
    x = s.x.bool() if s.workload.likelihood == "bernoulli" else s.x
    return training_step(functools.partial(loss, x), list(model.parameters()))


# -- the eager torch.distributions recipe ----------------------------------------------------


def eager_log_px(w: Workload, decoder, x, z):
    """log p(x | z) summed over x's dims: unit-variance Normal, or Bernoulli by BCE with logits."""
    if w.likelihood == "bernoulli":
        logits = decoder(z)
        return -F.binary_cross_entropy_with_logits(
            logits, x.expand_as(logits), reduction="none"
        ).sum(-1)
    return Normal(decoder(z), 1.0, validate_args=False).log_prob(x).sum(-1)


def eager_loss(w: Workload, encoder, decoder, x, pseudo_inputs=None):
    """The negative ELBO (VAE), or the negative IWAE bound, the torch.distributions way."""
    mu, logvar = encoder(x).chunk(2, dim=-1)
    q = Normal(mu, torch.exp(0.5 * logvar), validate_args=False)
    prior = Normal(torch.zeros_like(mu), torch.ones_like(mu), validate_args=False)
    if w.model == "iwae":
        z = q.rsample((w.samples,))  # (K, B, D)
        log_px = eager_log_px(w, decoder, x, z)
        log_w = log_px + prior.log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
        return -(torch.logsumexp(log_w, dim=0) - math.log(w.samples)).mean()
    z = q.rsample()
    log_px = eager_log_px(w, decoder, x, z)
    if w.model == "vamp":
        means, logvars = encoder(pseudo_inputs).chunk(2, dim=-1)
        components = Independent(Normal(means, torch.exp(0.5 * logvars), validate_args=False), 1)
        uniform = Categorical(logits=torch.zeros_like(means[:, 0]), validate_args=False)
        vamp = MixtureSameFamily(uniform, components, validate_args=False)
        kl = q.log_prob(z).sum(-1) - vamp.log_prob(z)
    else:
        kl = kl_divergence(q, prior).sum(-1)
    return (kl - log_px).mean()


def eager_step(s: Setup, compile_loss: bool):
    extra = ()
    pseudo = None
    if s.pseudo_inputs is not None:
        pseudo = nn.Parameter(s.pseudo_inputs.clone())
        extra = (pseudo,)
    loss = functools.partial(eager_loss, s.workload, s.encoder, s.decoder)
    if compile_loss:
        loss = torch.compile(loss)
    return training_step(
        functools.partial(loss, s.x, pseudo), parameters(s.encoder, s.decoder, extra=extra)
    )


# -- the networks alone ----------------------------------------------------------------------


def networks_step(s: Setup):
    """The networks' share: encoder(x), decoder on K x B latents (mu repeated; no sampling),
    the VampPrior's encoder(pseudo-inputs), a mean as the loss, backward, Adam."""
    w = s.workload
    extra = ()
    pseudo = None
    if s.pseudo_inputs is not None:
        pseudo = nn.Parameter(s.pseudo_inputs.clone())
        extra = (pseudo,)

    def loss():
        mu, logvar = s.encoder(s.x).chunk(2, dim=-1)
        z = mu.expand(w.samples, *mu.shape).reshape(-1, w.latent) if w.model == "iwae" else mu
        total = s.decoder(z).mean() + logvar.mean()
        if pseudo is not None:
            total = total + s.encoder(pseudo).mean()
        return total

    return training_step(loss, parameters(s.encoder, s.decoder, extra=extra))


# -- pythae ----------------------------------------------------------------------------------


def pythae_step(s: Setup):
    pytest.importorskip("pythae", reason="pythae is not installed (make bench-peers)")
    from pythae.models import IWAE, VAE, VAMP, IWAEConfig, VAEConfig, VAMPConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder

    class Encoder(BaseEncoder):
        def __init__(self, net):
            BaseEncoder.__init__(self)
            self.net = net

        def forward(self, x):
            mu, logvar = self.net(x).chunk(2, dim=-1)
            return ModelOutput(embedding=mu, log_covariance=logvar)

    class Decoder(BaseDecoder):
        def __init__(self, net):
            BaseDecoder.__init__(self)
            self.net = net

        def forward(self, z):  # pythae's "bce" loss takes probabilities
            out = self.net(z)
            return ModelOutput(reconstruction=torch.sigmoid(out) if bernoulli else out)

    w = s.workload
    bernoulli = w.likelihood == "bernoulli"
    loss_name = "bce" if bernoulli else "mse"
    common = {"input_dim": (w.x_dim,), "latent_dim": w.latent, "reconstruction_loss": loss_name}
    if w.model == "iwae":
        model_class, config = IWAE, IWAEConfig(**common, number_samples=w.samples)
    elif w.model == "vamp":
        model_class, config = VAMP, VAMPConfig(**common, number_components=w.components)
    else:
        model_class, config = VAE, VAEConfig(**common)
    # pythae's VAMP makes its pseudo-inputs with its own Linear(C, X) + Hardtanh layer.
    model = model_class(config, encoder=Encoder(s.encoder), decoder=Decoder(s.decoder))
    model = model.to(s.x.device)
    inputs = {"data": s.x}
    return training_step(lambda: model(inputs).loss, list(model.parameters()))


# -- Pyro ------------------------------------------------------------------------------------


def pyro_step(s: Setup):
    pytest.importorskip("pyro", reason="pyro-ppl is not installed (make bench-peers)")
    import pyro
    import pyro.distributions as dist
    from pyro.infer import SVI, RenyiELBO, Trace_ELBO

    w = s.workload
    encoder, decoder = s.encoder, s.decoder
    pyro.clear_param_store()

    def prior(like: torch.Tensor):
        if w.model != "vamp":
            zeros = torch.zeros_like(like)
            return dist.Normal(zeros, 1.0 + zeros, validate_args=False).to_event(1)
        pyro.module("encoder", encoder)
        pseudo = pyro.param("pseudo_inputs", s.pseudo_inputs.clone())
        means, logvars = encoder(pseudo).chunk(2, dim=-1)
        components = dist.Normal(means, torch.exp(0.5 * logvars), validate_args=False)
        uniform = dist.Categorical(logits=torch.zeros_like(means[:, 0]), validate_args=False)
        return dist.MixtureSameFamily(uniform, components.to_event(1), validate_args=False)

    def model(x):
        pyro.module("decoder", decoder)
        p = prior(x.new_empty(w.latent))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", p)
            if w.likelihood == "bernoulli":
                likelihood = dist.Bernoulli(logits=decoder(z), validate_args=False).to_event(1)
            else:
                likelihood = dist.Normal(decoder(z), 1.0, validate_args=False).to_event(1)
            pyro.sample("x", likelihood, obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            mu, logvar = encoder(x).chunk(2, dim=-1)
            q = dist.Normal(mu, torch.exp(0.5 * logvar), validate_args=False).to_event(1)
            pyro.sample("z", q)

    # Pyro's loss is the batch's sum (the others' mean): Adam's steps do not depend on that
    # scale. (poutine.scale would change RenyiELBO's bound, since it scales log-weights.)
    if w.model == "iwae":
        elbo = RenyiELBO(
            alpha=0, num_particles=w.samples, vectorize_particles=True, max_plate_nesting=1
        )
    else:
        elbo = Trace_ELBO(max_plate_nesting=1)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": LR}), loss=elbo)

    def step():
        with pyro.validation_enabled(False):
            return svi.step(s.x)

    return step


# -- the cases -------------------------------------------------------------------------------


def build_case(
    workload: Workload,
    impl: str,
    device: torch.device,
    info: dict | None = None,
    fresh_cache: bool = True,
) -> Callable[[], object]:
    """One training step of `impl` on `workload` as a zero-argument callable, from fresh
    networks; a compile case is compiled here (its first step), or skipped. `info` gets the
    compile cases' graph-break count and seconds to compile. fresh_cache: clear Dynamo's
    cache first (no recompile limit carried over from other cases), which would also drop
    the compiled code of a step still in use."""
    s = make_setup(workload, device)
    if impl in ("compile", "fastvae-compile"):
        if fresh_cache:
            torch._dynamo.reset()
        counters.clear()
        if impl == "compile":
            step = eager_step(s, compile_loss=True)
            compile_s = timed(bench_gaussian.compile_or_skip, step)
        else:
            step = fastvae_step(s, compile_loss=True)
            try:
                compile_s = timed(step)
            except Exception as exc:  # whatever fails to compile today is reported, not fatal
                first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                pytest.skip(f"torch.compile of fastvae's loss fails here: {first_line[:300]}")
        if info is not None:
            info.update(compile_s=compile_s, graph_breaks=sum(counters["graph_break"].values()))
        return step
    if impl == "fastvae":
        return fastvae_step(s, compile_loss=False)
    if impl == "eager":
        return eager_step(s, compile_loss=False)
    if impl == "pythae":
        return pythae_step(s)
    if impl == "pyro":
        return pyro_step(s)
    if impl == "networks":
        return networks_step(s)
    raise ValueError(f"unknown implementation {impl!r}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("workload_name", WORKLOADS)
def test_train_step(benchmark, run_benchmark, device, workload_name, impl):
    workload = sized_for(WORKLOADS[workload_name], device)
    benchmark.group = f"train {workload_name} {workload}"
    benchmark.extra_info.update(kind="train", workload=workload_name, impl=impl, **asdict(workload))
    step = build_case(workload, impl, device, info=benchmark.extra_info)
    run_benchmark(step, bytes_moved=0)
    benchmark.extra_info["profile"] = top_ops(step, device)
    if impl in PAIRED_BASELINES:
        paired = paired_speedups(workload, step, device, PAIRED_BASELINES[impl])
        benchmark.extra_info["paired"] = paired


def paired_speedups(
    workload: Workload, step: Callable[[], object], device, baselines: tuple[str, ...]
) -> dict[str, float]:
    """A fastvae `step` against each installed baseline in one loop: a round times one step
    of each, back to back, the first of the two alternating; -> {baseline: median of the
    rounds' baseline time / fastvae time}."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def seconds(fn) -> float:
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    speedups = {}
    for impl in baselines:
        try:
            baseline = build_case(workload, impl, device, fresh_cache=False)
        except pytest.skip.Exception:  # a peer library that is not installed
            continue
        baseline()
        sync()
        ratios, start, rounds = [], time.perf_counter(), 0
        while rounds < PAIRED_ROUNDS or time.perf_counter() - start < PAIRED_SECONDS:
            if rounds % 2:
                ours, theirs = seconds(step), seconds(baseline)
            else:
                theirs, ours = seconds(baseline), seconds(step)
            ratios.append(theirs / ours)
            rounds += 1
        speedups[impl] = statistics.median(ratios)
    return speedups


def top_ops(step: Callable[[], object], device: torch.device, n: int = 8) -> dict:
    """Where one step's time goes, by torch.profiler: the n ops with the most self time (on
    CUDA, device time), [name, ms, share of all ops' self time], and that total in ms."""
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    attr = "self_cpu_time_total"
    if device.type == "cuda":  # self_cuda_time_total before torch 2.4
        new = bool(events) and hasattr(events[0], "self_device_time_total")
        attr = "self_device_time_total" if new else "self_cuda_time_total"
    self_us = {e.key: getattr(e, attr, 0.0) for e in events}
    total = sum(self_us.values()) or 1.0
    top = sorted(self_us.items(), key=lambda kv: kv[1], reverse=True)[:n]
    return {
        "clock": "device" if device.type == "cuda" else "cpu",
        "total_ms": total / 1e3,
        "top": [[name, us / 1e3, us / total] for name, us in top],
    }


def timed(fn: Callable, *args) -> float:
    """Seconds that fn(*args) takes (the first, compiling call of a step)."""
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start
