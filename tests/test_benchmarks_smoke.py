"""Runs every case of benchmarks/bench_*.py once at a tiny size on the CPU, untimed, so that
`make test` catches a broken benchmark file. Needs no pytest-benchmark."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

# The benchmark files import each other by name, as pytest's default import mode lets them.
sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = importlib.import_module("bench_gaussian")
bench_iwae = importlib.import_module("bench_iwae")

TINY = bench.Size(batch=4, dim=8)
TINY_IWAE = {
    "log_mean_exp": bench_iwae.Size(K=3, B=5),
    "importance_sample": bench_iwae.Size(B=4, D=8, K=3),
    "mixture_log_prob": bench_iwae.Size(N=6, C=3, D=4),
    "estimate_log_likelihood": bench_iwae.Size(K=7, B=4, D=3),
}
pytestmark = bench.pytestmark  # the same warning filter as the benchmarks


@pytest.mark.parametrize("pass_name", bench.PASSES)
@pytest.mark.parametrize("impl", bench.IMPLS)
@pytest.mark.parametrize("op_name", bench.OPS)
def test_benchmark_case_runs(op_name, impl, pass_name):
    step = bench.build_case(bench.OPS[op_name], impl, pass_name, TINY, torch.device("cpu"))
    step()


IWAE_CASES = [(name, p) for name, op in bench_iwae.OPS.items() for p in op.passes]


@pytest.mark.parametrize("impl", bench_iwae.IMPLS)
@pytest.mark.parametrize(("op_name", "pass_name"), IWAE_CASES)
def test_iwae_benchmark_case_runs(op_name, pass_name, impl):
    op, size = bench_iwae.OPS[op_name], TINY_IWAE[op_name]
    step = bench_iwae.build_case(op, impl, pass_name, size, torch.device("cpu"))
    step()


def test_iwae_tiny_sizes_cover_every_op():
    assert TINY_IWAE.keys() == bench_iwae.OPS.keys()
