"""Checkpoints: a run saved to a file after n steps and resumed from it (a new model and
optimizer, built from another seed, then loaded) continues bit for bit as the run that never
stopped: the same losses, parameters and optimizer state (torch.equal), for VAE and IWAE with
every prior (the learnable ones included) and for the GAN with both of its optimizers, on the
torch path and on the Triton kernels (interpreted on the CPU).

What a checkpoint must hold to resume exactly (nothing of it is specific to fastvae):
- model.state_dict(): the networks, the learnable priors (LearnedGaussian's mu and logvar,
  MixturePrior's means, logvars and logits, VampPrior's pseudo-inputs) and the latent size
  (extra state, so StandardNormal() without a dim can sample after loading);
- optimizer.state_dict() (Adam's moments and step count) and the LR scheduler's;
- torch.get_rng_state(): fastvae draws the seed of its noise from torch's default generator,
  so the noise after resuming is the noise the run would have drawn only if this is restored
  (torch.cuda.get_rng_state_all() too for a CUDA run; under DDP, each rank's own state);
- the state of whatever draws the data (here a torch.Generator), and the step count, from
  which schedules outside the optimizer (the VAE's KL weight `beta`, a plain attribute that
  is not in the state_dict) are recomputed.
Restoring: model.load_state_dict, optimizer.load_state_dict, scheduler.load_state_dict,
torch.set_rng_state, generator.set_state. The controls check that without the RNG state, or
without the optimizer's state, the resumed run does not match, so the comparison can fail.
"""

from __future__ import annotations

import pytest
import torch

import fastvae
from fastvae._backend import interpreting, triton_available
from fastvae.nn import GAN, IWAE, VAE, LearnedGaussian, MixturePrior, StandardNormal, VampPrior
from fastvae.toy2d import data
from fastvae.toy2d.models import mlp

PRIORS = ("standard", "learned", "mixture", "vamp")
N_STEPS, M_STEPS = 4, 3  # train n, save, continue m
BATCH = 64
WARMUP = 5  # the VAE's KL weight ramps over the first WARMUP steps, across the checkpoint


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """Both paths on the CPU: the torch reference, and the Triton kernels (interpreted)."""
    if request.param == "triton" and not (triton_available() and interpreting()):
        pytest.skip("the Triton kernels on CPU tensors need Triton's interpreter")
    with fastvae.use_backend(request.param):
        yield request.param


def _net(n_in: int, n_out: int) -> torch.nn.Sequential:
    return mlp(n_in, n_out, width=16, depth=2)


def _prior(name: str, encoder: torch.nn.Module):
    if name == "standard":
        return StandardNormal()  # no dim: the model learns it from the first batch
    if name == "learned":
        return LearnedGaussian(2)
    if name == "mixture":
        return MixturePrior(2, 3)
    return VampPrior(encoder, 0.25 * torch.randn(3, 2))


class LatentRun:
    """A VAE or IWAE with its Adam, LR schedule and data stream."""

    def __init__(self, kind: str, prior: str, seed: int):
        torch.manual_seed(seed)
        encoder, decoder = _net(2, 4), _net(2, 4)
        prior_module = _prior(prior, encoder)
        if kind == "vae":
            self.model = VAE(encoder, decoder, prior=prior_module)
        else:
            self.model = IWAE(encoder, decoder, prior=prior_module, num_samples=4,
                              estimator="dreg")  # fmt: skip
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, N_STEPS + M_STEPS
        )
        self.data = torch.Generator().manual_seed(seed + 1)
        self.step = 0

    def train(self, steps: int) -> list[torch.Tensor]:
        losses = []
        for _ in range(steps):
            if isinstance(self.model, VAE):  # KL warm-up: a function of the step count
                self.model.beta = min(1.0, (self.step + 1) / WARMUP)
            loss = self.model(data.sample("8gaussians", BATCH, self.data)).loss
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            losses.append(loss.detach().clone())
        return losses

    def checkpoint(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "data_rng": self.data.get_state(),
        }

    def restore(self, state: dict, *, rng: bool = True, optimizer: bool = True) -> None:
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
        if optimizer:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if rng:
            torch.set_rng_state(state["torch_rng"])
        self.data.set_state(state["data_rng"])


class GANRun:
    """A GAN with one Adam for each player, alternating one step of each."""

    def __init__(self, seed: int, loss: str = "nonsaturating"):
        torch.manual_seed(seed)
        self.gan = GAN(_net(2, 2), _net(2, 1), latent_dim=2, loss=loss)
        self.d_opt = torch.optim.Adam(self.gan.discriminator.parameters(), 2e-3, (0.5, 0.999))
        self.g_opt = torch.optim.Adam(self.gan.generator.parameters(), 2e-3, (0.5, 0.999))
        self.data = torch.Generator().manual_seed(seed + 1)
        self.model = self.gan

    def train(self, steps: int) -> list[torch.Tensor]:
        losses = []
        for _ in range(steps):
            d_loss = self.gan.discriminator_loss(data.sample("8gaussians", BATCH, self.data))
            self.d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.d_opt.step()
            g_loss = self.gan.generator_loss(BATCH)
            self.g_opt.zero_grad(set_to_none=True)
            g_loss.backward()
            self.g_opt.step()
            losses += [d_loss.detach().clone(), g_loss.detach().clone()]
        return losses

    def checkpoint(self) -> dict:
        return {
            "model": self.gan.state_dict(),
            "d_optimizer": self.d_opt.state_dict(),
            "g_optimizer": self.g_opt.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "data_rng": self.data.get_state(),
        }

    def restore(self, state: dict, *, rng: bool = True, optimizer: bool = True) -> None:
        self.gan.load_state_dict(state["model"])
        if optimizer:
            self.d_opt.load_state_dict(state["d_optimizer"])
            self.g_opt.load_state_dict(state["g_optimizer"])
        if rng:
            torch.set_rng_state(state["torch_rng"])
        self.data.set_state(state["data_rng"])


def _save_and_resume(make_run, tmp_path, **restore):
    """(losses and final state of the run that went on, the same of the resumed run)."""
    run = make_run(seed=1)
    run.train(N_STEPS)
    path = tmp_path / "checkpoint.pt"
    torch.save(run.checkpoint(), path)
    continued = run.train(M_STEPS)

    fresh = make_run(seed=2)  # other weights, other RNG state, until the checkpoint is loaded
    fresh.restore(torch.load(path, weights_only=True), **restore)
    resumed = fresh.train(M_STEPS)
    return (continued, run), (resumed, fresh)


def _assert_bitwise_equal(a, b):
    (losses_a, run_a), (losses_b, run_b) = a, b
    assert len(losses_a) == len(losses_b)
    for i, (la, lb) in enumerate(zip(losses_a, losses_b)):
        assert torch.equal(la, lb), f"loss {i} after resuming: {lb.item()!r} != {la.item()!r}"
    params_b = dict(run_b.model.named_parameters())
    for name, pa in run_a.model.named_parameters():
        assert torch.equal(pa, params_b[name]), f"parameter {name} differs after resuming"
    state_a, state_b = run_a.checkpoint(), run_b.checkpoint()
    assert torch.equal(state_a["torch_rng"], state_b["torch_rng"])
    for key in state_a:
        if "optimizer" in key:
            for p, s in state_a[key]["state"].items():
                for field, value in s.items():
                    assert torch.equal(value, state_b[key]["state"][p][field]), (key, p, field)


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("kind", ["vae", "iwae"])
def test_latent_model_resumes_bit_identically(backend, tmp_path, kind, prior):
    a, b = _save_and_resume(lambda seed: LatentRun(kind, prior, seed), tmp_path)
    _assert_bitwise_equal(a, b)
    assert b[1].model.latent_dim == 2
    if prior != "standard":  # the learnable prior was trained, and restored
        prior_params = dict(b[1].model.prior.named_parameters())
        assert prior_params and all(p.grad is not None for p in prior_params.values())
    draws = [r.model.sample(8, generator=torch.Generator().manual_seed(3)) for r in (a[1], b[1])]
    assert torch.equal(draws[0], draws[1])


@pytest.mark.parametrize("loss", ["nonsaturating", "hinge"])
def test_gan_resumes_bit_identically(backend, tmp_path, loss):
    a, b = _save_and_resume(lambda seed: GANRun(seed, loss), tmp_path)
    _assert_bitwise_equal(a, b)
    draws = [r.gan.sample(8, generator=torch.Generator().manual_seed(3)) for r in (a[1], b[1])]
    assert torch.equal(draws[0], draws[1])


@pytest.mark.parametrize(
    "make_run",
    [lambda seed: LatentRun("iwae", "mixture", seed), lambda seed: GANRun(seed)],
    ids=["iwae", "gan"],
)
@pytest.mark.parametrize("missing", ["rng", "optimizer"])
def test_resuming_without_rng_or_optimizer_state_diverges(tmp_path, make_run, missing):
    """Controls: the comparison above fails when a piece of the checkpoint is left out."""
    (losses_a, _), (losses_b, _) = _save_and_resume(make_run, tmp_path, **{missing: False})
    assert not all(torch.equal(la, lb) for la, lb in zip(losses_a, losses_b))
