"""Runs every case of benchmarks/bench_gaussian.py once at a tiny size on the CPU, untimed, so
that `make test` catches a broken benchmark file. Needs no pytest-benchmark."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH_FILE = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gaussian.py"


def load_module(path: Path):
    """Import a file that is not on sys.path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_smoke_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


bench = load_module(BENCH_FILE)
TINY = bench.Size(batch=4, dim=8)
pytestmark = bench.pytestmark  # the same warning filter as the benchmarks


@pytest.mark.parametrize("pass_name", bench.PASSES)
@pytest.mark.parametrize("impl", bench.IMPLS)
@pytest.mark.parametrize("op_name", bench.OPS)
def test_benchmark_case_runs(op_name, impl, pass_name):
    step = bench.build_case(bench.OPS[op_name], impl, pass_name, TINY, torch.device("cpu"))
    step()
