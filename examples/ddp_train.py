"""Train an IWAE on 8 Gaussians with DistributedDataParallel: one process per GPU (or CPU rank).

Run on one machine with 2 processes (CPU and gloo here; one GPU each with NCCL when CUDA is
available):
    torchrun --nproc_per_node=2 examples/ddp_train.py [--steps N] [--batch B] [--seed S]

What DDP needs from a fastvae model is what it needs from any module; the points to get right:
- Every rank builds the same model (DDP also broadcasts rank 0's parameters when it wraps it).
- Then each rank seeds torch with seed + rank: fastvae draws the seed of its in-kernel noise
  from torch's default generator, so this gives every rank its own noise, reproducibly.
- Each rank trains on its own shard of the data (DistributedSampler); --batch is per rank, the
  global batch is batch x world size, and DDP averages the gradients over the ranks.
Several GPUs, several nodes: see "Distributed training" in the README; the code is the same.
"""

from __future__ import annotations

import argparse
import gc
import math
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from fastvae.nn import IWAE, StandardNormal
from fastvae.toy2d import data
from fastvae.toy2d.models import mlp

BITS = 1 / math.log(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=128, help="points per rank and step")
    parser.add_argument("--points", type=int, default=100_000, help="size of the dataset")
    parser.add_argument("--eval-points", type=int, default=2000, help="points for the final NLL")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # torchrun sets RANK, LOCAL_RANK (the process's index on its node) and WORLD_SIZE.
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():  # one GPU per process
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")

    try:
        # The same model on every rank: the toy-2D "typical VAE" (latent 2, Gaussian decoder
        # starting narrow) trained as an IWAE with K = 10.
        torch.manual_seed(args.seed)
        encoder, decoder = mlp(2, 4, width=256, depth=3), mlp(2, 4, width=256, depth=3)
        with torch.no_grad():
            decoder[-1].bias[2:] = -4.0
        model = IWAE(encoder, decoder, prior=StandardNormal(2), num_samples=10).to(device)
        ddp = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
        optimizer = torch.optim.Adam(ddp.parameters(), lr=args.lr)

        # From here on each rank draws its own noise: fastvae takes the seed of its in-kernel
        # noise from torch's default generator (of the CPU or of the rank's GPU).
        torch.manual_seed(args.seed + rank)

        # One dataset, the same on every rank; each rank reads its own shard of it. The
        # sampler's seed must be the same on every rank, so that the shards partition the data.
        points = data.sample("8gaussians", args.points, torch.Generator().manual_seed(args.seed))
        dataset = TensorDataset(points)
        sampler = DistributedSampler(dataset, seed=args.seed, drop_last=True)
        loader = DataLoader(dataset, args.batch, sampler=sampler, drop_last=True)

        if rank == 0:
            print(
                f"{world_size} ranks on {device.type} ({dist.get_backend()}), "
                f"{args.batch} points per rank and step, global batch {args.batch * world_size}"
            )
        step, epoch = 0, 0
        while step < args.steps:
            sampler.set_epoch(epoch)  # a new shuffle, and new shards, every epoch
            for (x,) in loader:
                loss = ddp(x.to(device)).loss  # -L_K on this rank's batch
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # DDP averages the gradients over the ranks here
                optimizer.step()
                step += 1
                if step == 1 or step % max(1, args.steps // 10) == 0 or step == args.steps:
                    mean_loss = loss.detach().clone()
                    dist.all_reduce(mean_loss)  # the mean over ranks: every rank takes part
                    if rank == 0:
                        bits = mean_loss.item() / world_size * BITS
                        print(f"step {step:5d}  IWAE loss (K = 10) {bits:7.3f} bits/point")
                if step == args.steps:
                    break
            epoch += 1

        if rank == 0:  # the model is the same on every rank: evaluate it once
            fresh = torch.Generator().manual_seed(args.seed + 1)
            x = data.sample("8gaussians", args.eval_points, fresh).to(device)
            nll = -model.log_likelihood(x, num_samples=100).mean().item() * BITS
            print(
                f"NLL (K = 100) on {args.eval_points:,} fresh points: {nll:.3f} bits/point "
                "(the data's entropy: -1.917)"
            )
        # DDP's wrapper sits in reference cycles holding the process group: free it now and
        # leave together, not in interpreter shutdown, where tearing gloo down can hang or abort
        del ddp
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
