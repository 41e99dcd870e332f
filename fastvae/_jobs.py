"""What the example jobs (fastvae.toy2d, fastvae.mnist) share: the demo extra's check,
progress bars, and the environment a results.json records."""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

import fastvae

# The "demo" extra's packages, each with the option (its argparse dest) that runs without it.
DEMO_PACKAGES = {"tqdm": "no_progress", "matplotlib": "no_plots"}


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def missing_demo_packages(args: argparse.Namespace) -> list[str]:
    """The demo extra's packages this run needs (progress bars, figures) that do not import."""
    return [
        name
        for name, without in DEMO_PACKAGES.items()
        if not getattr(args, without) and not _importable(name)
    ]


def check_demo_packages(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with status 2 and what to install when a needed demo package is missing."""
    missing = missing_demo_packages(args)
    if missing:
        options = " ".join("--" + DEMO_PACKAGES[name].replace("_", "-") for name in missing)
        parser.error(
            f"missing {' and '.join(missing)} (the demo extra): "
            f'pip install "fastvae[demo]", or run with {options}'
        )


def resolve_device(device: str) -> str:
    """ "auto": CUDA when present, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


GLIBC_M_TRIM_THRESHOLD, GLIBC_M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters
KEEP_FREED_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse freed memory instead of returning it to the OS (Linux only).

    The CPU path allocates and frees tensors of tens of MB each step; by default glibc maps
    each afresh and the kernel zeroes its pages (half the CPU time spent in the system in an
    MNIST evaluation; 1.4x faster without). Returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(
        libc.mallopt(param, KEEP_FREED_BYTES) == 1
        for param in (GLIBC_M_MMAP_THRESHOLD, GLIBC_M_TRIM_THRESHOLD)
    )


class _Quiet:
    """range(total) with tqdm's set_postfix as a no-op: no bar, no tqdm."""

    def __init__(self, total: int):
        self.total = total

    def __iter__(self):
        return iter(range(self.total))

    def set_postfix(self, **_) -> None:
        pass


def progress(total: int, desc: str, enabled: bool):
    """range(total), as a tqdm bar when enabled (tqdm is imported only then)."""
    if not enabled:
        return _Quiet(total)
    from tqdm.auto import tqdm

    return tqdm(range(total), desc=desc, dynamic_ncols=True, leave=True, mininterval=0.5)


def environment(device: str) -> dict:
    """Versions, the device's name, threads and the date, for a results.json config."""
    return {
        "versions": {
            "fastvae": fastvae.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "device_name": torch.cuda.get_device_name(0)
        if device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(results: dict, out: Path) -> None:
    """results.json in out."""
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def report(results: dict, out: Path, caption: str, table: str) -> None:
    """Write results.json, then print the caption, the table and the wall-clock."""
    write_results(results, out)
    print(f"\n{caption}\n{table}")
    print(f"\n{results['seconds']:.0f} s; wrote {out / 'results.json'}")
