"""fastvae.nn under DistributedDataParallel: 2 processes, gloo backend, on the CPU.

One spawn of two ranks runs every scenario (each spawn costs seconds of imports):
- an IWAE (learnable mixture prior, DReG) trains a few steps on a per-rank data shard: after
  it the parameters are bitwise identical on both ranks (all_gather), and the loss on a fixed
  held-out batch fell;
- seeded per rank as examples/ddp_train.py does (torch.manual_seed(seed + rank) after building
  the model), the two ranks draw different noise for the same input; seeded alike they draw
  the same noise (so the noise comes from torch's seed, and the comparison can tell);
- a control: two steps under ddp.no_sync() (no gradient all_reduce) leave the ranks'
  parameters different, which the identity check must see;
- a VAE with a learned Gaussian prior, and a GAN whose generator and discriminator are wrapped
  in DDP one by one, also stay identical across ranks.
The example itself runs under torchrun at the end.
"""

from __future__ import annotations

import datetime
import gc
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from fastvae.nn import GAN, IWAE, VAE, LearnedGaussian, MixturePrior
from fastvae.toy2d import data
from fastvae.toy2d.models import mlp

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed/gloo"
)

WORLD_SIZE = 2
SEED = 0
STEPS = 40
BATCH = 128
TIMEOUT_S = 45  # per launch; the whole file takes about 12 s on an idle 2-core CPU
COLLECTIVE_TIMEOUT_S = 20  # a rank stuck in a collective fails (with a message) before that
EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "ddp_train.py"


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    """t from every rank, in rank order."""
    t = t.detach().contiguous()
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return out


def _flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _make_iwae() -> IWAE:
    encoder, decoder = mlp(2, 4, width=64, depth=2), mlp(2, 4, width=64, depth=2)
    with torch.no_grad():
        decoder[-1].bias[2:] = -4.0  # the toy-2D recipe: start the decoder narrow
    return IWAE(encoder, decoder, prior=MixturePrior(2, 4), num_samples=5, estimator="dreg")


def _train_steps(ddp: DDP, optimizer, shard: torch.Generator, steps: int) -> None:
    """steps of a VAE or IWAE on this rank's data."""
    for _ in range(steps):
        loss = ddp(data.sample("8gaussians", BATCH, shard)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _worker(rank: int, world_size: int, init_method: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    try:
        results = _scenarios(rank)
        # DDP's wrappers hold the process group and sit in reference cycles: collect them now,
        # not at interpreter exit, where tearing gloo down can abort the process.
        gc.collect()
        dist.barrier()
        if rank == 0:
            torch.save(results, os.path.join(out, "results.pt"))
    finally:
        dist.destroy_process_group()


def _scenarios(rank: int) -> dict:
    """Every scenario on this rank; what all_gather collected, the same on every rank."""
    results = {}
    shard = torch.Generator().manual_seed(1000 + rank)  # this rank's own data

    # The IWAE: the same model on every rank, then per-rank noise.
    torch.manual_seed(SEED)
    model = _make_iwae()
    ddp = DDP(model)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=3e-3)
    torch.manual_seed(SEED + rank)

    probe = data.sample("8gaussians", 64, torch.Generator().manual_seed(1))  # same everywhere
    with torch.no_grad():
        results["z_per_rank_seed"] = _gather(model(probe).z)
    results["params_at_start"] = _gather(_flat_params(model))

    held_out = data.sample("8gaussians", 2048, torch.Generator().manual_seed(2))

    def held_out_loss() -> torch.Tensor:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(123)  # the same noise before and after training
            return model(held_out).loss

    before = held_out_loss()
    _train_steps(ddp, optimizer, shard, STEPS)
    results["held_out_loss"] = _gather(torch.stack([before, held_out_loss()]))
    results["params_after_training"] = _gather(_flat_params(model))

    torch.manual_seed(SEED)  # control: the same seed on both ranks gives the same noise
    with torch.no_grad():
        results["z_same_seed"] = _gather(model(probe).z)

    with ddp.no_sync():  # control: steps without the gradient all_reduce
        _train_steps(ddp, optimizer, shard, 2)
    results["params_without_all_reduce"] = _gather(_flat_params(model))

    # A VAE with a learnable prior.
    torch.manual_seed(SEED)
    vae = VAE(mlp(2, 4, width=32, depth=2), mlp(2, 4, width=32, depth=2),
              prior=LearnedGaussian(2))  # fmt: skip
    ddp = DDP(vae)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=3e-3)
    torch.manual_seed(SEED + rank)
    _train_steps(ddp, optimizer, shard, 5)
    results["vae_params"] = _gather(_flat_params(vae))

    # A GAN: DDP wraps the modules whose forward runs, the generator and the discriminator.
    torch.manual_seed(SEED)
    gan = GAN(mlp(2, 2, width=32, depth=2), mlp(2, 1, width=32, depth=2), latent_dim=2)
    gan.generator, gan.discriminator = DDP(gan.generator), DDP(gan.discriminator)
    d_opt = torch.optim.Adam(gan.discriminator.parameters(), lr=1e-3, betas=(0.5, 0.999))
    g_opt = torch.optim.Adam(gan.generator.parameters(), lr=1e-3, betas=(0.5, 0.999))
    torch.manual_seed(SEED + rank)
    for _ in range(5):
        d_opt.zero_grad(set_to_none=True)
        gan.discriminator_loss(data.sample("8gaussians", BATCH, shard)).backward()
        d_opt.step()
        g_opt.zero_grad(set_to_none=True)
        gan.generator_loss(BATCH).backward()
        g_opt.step()
    results["gan_params"] = _gather(_flat_params(gan))
    with torch.no_grad():
        results["gan_samples"] = _gather(gan.sample(64))
    return results


def _spawn(tmp_path: pathlib.Path) -> dict:
    """Run _worker on WORLD_SIZE spawned processes; rank 0's gathered results."""
    init_method = (tmp_path / "store").as_uri()  # a FileStore: no port to pick or to clash
    context = mp.start_processes(
        _worker,
        args=(WORLD_SIZE, init_method, str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1):  # raises if a rank failed
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD_SIZE} ranks did not finish in {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    return torch.load(tmp_path / "results.pt", weights_only=True)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict:
    return _spawn(tmp_path_factory.mktemp("ddp"))


def _identical(tensors: list[torch.Tensor]) -> bool:
    return all(torch.equal(tensors[0], t) for t in tensors[1:])


def test_parameters_stay_identical_across_ranks(ranks):
    assert _identical(ranks["params_at_start"])
    assert _identical(ranks["params_after_training"])
    assert not torch.equal(ranks["params_at_start"][0], ranks["params_after_training"][0])
    assert _identical(ranks["vae_params"])
    assert _identical(ranks["gan_params"])
    assert not _identical(ranks["gan_samples"])  # per-rank noise in the GAN's sampler too


def test_the_check_sees_a_rank_that_skipped_all_reduce(ranks):
    assert not _identical(ranks["params_without_all_reduce"])


def test_each_rank_draws_its_own_noise(ranks):
    z = ranks["z_per_rank_seed"]
    assert z[0].shape == (5, 64, 2)
    assert not torch.equal(z[0], z[1])
    assert (z[0] - z[1]).abs().mean() > 0.1  # independent draws, not a rounding difference
    assert _identical(ranks["z_same_seed"])  # the noise comes from torch's seed


def test_loss_falls(ranks):
    losses = ranks["held_out_loss"]
    assert _identical(losses)  # the same model on both ranks
    before, after = losses[0].tolist()
    assert after < before - 1.0, f"held-out IWAE loss {before:.3f} -> {after:.3f} nats"


def test_example_runs_under_torchrun():
    # gloo on the CPU even where there is a GPU (the example would take one GPU per rank).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={WORLD_SIZE}", str(EXAMPLE), "--steps", "20", "--points",
               "20000", "--eval-points", "200"]  # fmt: skip
    # The log goes to a file: a rank that outlived torchrun would hold a pipe open forever.
    with tempfile.TemporaryFile("w+") as log:
        with subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True,
                              env=env, start_new_session=True) as torchrun:  # fmt: skip
            try:
                torchrun.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(torchrun.pid, signal.SIGKILL)
                subprocess.run(["pkill", "-9", "-f", str(EXAMPLE)], check=False)  # the ranks
                torchrun.wait()
        log.seek(0)
        stdout = log.read()
    if torchrun.returncode == -signal.SIGKILL:
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s:\n{stdout}")
    assert torchrun.returncode == 0, stdout
    assert f"{WORLD_SIZE} ranks on cpu (gloo)" in stdout
    bits = [float(b) for b in re.findall(r"IWAE loss \(K = 10\)\s+(\S+) bits", stdout)]
    assert len(bits) == 11, stdout  # step 1 and every 2nd step, printed by rank 0 only
    assert bits[-1] < bits[0] - 0.5, stdout
    assert re.search(r"NLL \(K = 100\) on 200 fresh points: -?\d+\.\d+ bits", stdout)
