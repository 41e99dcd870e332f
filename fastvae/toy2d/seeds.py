"""python -m fastvae.toy2d.seeds: the toy-2D study over several seeds, and the spread.

Runs `python -m fastvae.toy2d --seed S --no-progress --out OUT/seed-S [ARGS]` for every seed
(--jobs at a time, the CPU's threads shared between them), then writes OUT/seeds.json (every
seed's NLLs and the floors each missed: the demo's, or with --long the long recipe's targets)
and prints the per-seed table. Seeds whose
OUT/seed-S/results.json exists are not run again. ARGS, the arguments after `--`, go to every
run (e.g. --no-plots, --long).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from fastvae.toy2d import data

# The demo's floors, bits per point (VAE and IWAE NLL at most these) and GAN modes (at least).
NLL_FLOORS = {
    "vae": {"8gaussians": -1.2, "checkerboard": -0.05, "2spirals": -1.2},
    "iwae": {"8gaussians": -1.6, "checkerboard": -0.4, "2spirals": -1.4},
}
GAN_MODES_FLOOR = 7
# The long recipe's targets: within 0.20 bits of the published VAE NLL, 0.10 of the IWAE's.
LONG_TARGETS = {
    kind: {d: round(data.PUBLISHED_BITS[d][f"{kind}_nll"] + margin, 2) for d in data.DATASETS}
    for kind, margin in (("vae", 0.20), ("iwae", 0.10))
}


def nll_floors(results: dict) -> dict:
    """The NLL floors a run is held to: LONG_TARGETS for a --long run, else NLL_FLOORS."""
    return LONG_TARGETS if results["config"]["long"] else NLL_FLOORS


def floors_missed(results: dict) -> list[str]:
    """The floors one run of the study (its results.json) misses, e.g. "2spirals/vae"."""
    missed = []
    for dataset in results["config"]["datasets"]:
        entry = results[dataset]
        for kind, floors in nll_floors(results).items():
            if kind in entry and entry[kind]["nll_bits"] > floors[dataset]:
                missed.append(f"{dataset}/{kind}")
        if "modes" in entry.get("gan", {}) and entry["gan"]["modes"] < GAN_MODES_FLOOR:
            missed.append(f"{dataset}/gan")
    return missed


def table(runs: list[dict]) -> str:
    """A markdown row per seed: the VAE / IWAE NLLs every run has, GAN modes (when measured),
    seconds; then the spread (min .. max) and the floors (the targets for --long runs)."""
    columns = [
        (d, kind)
        for d in data.DATASETS
        for kind in NLL_FLOORS
        if all(kind in r.get(d, {}) for r in runs)
    ]
    modes = [run.get("8gaussians", {}).get("gan", {}).get("modes") for run in runs]
    gan = any(m is not None for m in modes)
    header = ["seed", *(f"{d} {kind.upper()}" for d, kind in columns)]
    header += ["GAN modes"] * gan + ["seconds"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]

    def nll(run: dict, dataset: str, kind: str) -> float:
        return run[dataset][kind]["nll_bits"]

    for run, run_modes in zip(runs, modes):
        cells = [f"{nll(run, d, kind):.2f}" for d, kind in columns]
        cells += ["-" if run_modes is None else f"{run_modes}/8"] * gan
        lines.append(
            f"| {run['config']['seed']} | " + " | ".join(cells + [f"{run['seconds']:.0f}"]) + " |"
        )
    spread = [
        f"{min(nll(r, d, k) for r in runs):.2f} .. {max(nll(r, d, k) for r in runs):.2f}"
        for d, k in columns
    ]
    lines.append("| spread | " + " | ".join(spread + [""] * gan) + " | |")
    floors = nll_floors(runs[0])
    label = "target" if runs[0]["config"]["long"] else "floor"
    cells = [f"<= {floors[kind][d]}" for d, kind in columns] + [f">= {GAN_MODES_FLOOR}/8"] * gan
    lines.append(f"| {label} | " + " | ".join(cells) + " | |")
    return "\n".join(lines)


def _seed_list(text: str) -> list[int]:
    if "-" in text:
        first, last = text.split("-")
        return list(range(int(first), int(last) + 1))
    return [int(s) for s in text.split(",")]


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(
        prog="python -m fastvae.toy2d.seeds", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seeds", type=_seed_list, default="0-4", help="e.g. 0-4 or 0,3")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--out", type=Path, default=Path("toy2d-seeds"), help="output folder")
    args = parser.parse_args(argv[:split])
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    return args, argv[split + 1 :]


def run(argv=None) -> dict:
    """Run the missing seeds, then write and return seeds.json's content."""
    args, study_args = parse_args(argv)
    threads = max(1, torch.get_num_threads() // args.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    pending = [s for s in args.seeds if not (args.out / f"seed-{s}" / "results.json").exists()]
    running: list[subprocess.Popen] = []
    failed = 0
    for seed in pending:
        if len(running) == args.jobs:
            failed += running.pop(0).wait() != 0
        command = [sys.executable, "-m", "fastvae.toy2d", "--seed", str(seed), "--no-progress"]
        command += ["--out", str(args.out / f"seed-{seed}"), *study_args]
        running.append(subprocess.Popen(command, env=env))
    failed += sum(process.wait() != 0 for process in running)
    if failed:
        raise SystemExit(f"{failed} run(s) failed")
    runs = load_runs(args.out, args.seeds)
    summary = {
        "seeds": args.seeds,
        "nll_bits": {
            str(run["config"]["seed"]): {
                f"{d}/{kind}": run[d][kind]["nll_bits"]
                for d in run["config"]["datasets"]
                for kind in NLL_FLOORS
                if kind in run[d]
            }
            for run in runs
        },
        "floors_missed": {str(run["config"]["seed"]): floors_missed(run) for run in runs},
    }
    (args.out / "seeds.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table(runs))
    return summary


def load_runs(out: Path, seeds: list[int]) -> list[dict]:
    """The results.json of each seed's run under out."""
    return [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in seeds]


if __name__ == "__main__":
    run()
