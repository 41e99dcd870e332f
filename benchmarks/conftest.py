"""Fixtures for the benchmarks: the device, and a timer that also records memory and bandwidth.

Every benchmark's extra_info gets peak_bytes, the device, the torch / triton versions and the
fastvae backend; on CUDA also the median time and the bandwidth achieved against the minimum
bytes the op must move (docs/math.md, "Bytes moved, for a roofline").

The --benchmark-json file also gets, at its top level, "environment" (the device and the
versions, as above) and "skipped" (each skipped case's parameters and reason: a missing peer
library, a size for the other device), which benchmarks/report.py shows.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import platform
from collections.abc import Callable

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fastvae

SKIPPED: list[dict] = []  # the skipped cases of this session, for the JSON


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(report.longrepr, tuple):
        callspec = getattr(item, "callspec", None)
        params = {k: str(v) for k, v in callspec.params.items()} if callspec else {}
        tier = getattr(callspec.params.get("size"), "tier", None) if callspec else None
        if isinstance(tier, str):
            params["tier"] = tier
        reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        SKIPPED.append({"name": item.nodeid, "params": params, "reason": reason})


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    output_json["environment"] = {
        **environment(device),
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
    }
    output_json["skipped"] = SKIPPED


@pytest.fixture(scope="session")
def device() -> torch.device:
    """CUDA when there is a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def run_benchmark(benchmark, device):
    """`run(step, bytes_moved)`: warm `step` up, measure its peak memory, then time it."""

    def run(step: Callable[[], object], bytes_moved: int) -> None:
        step = synchronized(step, device)
        step()  # warm-up: kernel JIT and autotuning, allocator caches
        benchmark.extra_info.update(environment(device), peak_bytes=peak_bytes(step, device))
        benchmark(step)
        if device.type == "cuda" and benchmark.stats is not None:
            median_s = benchmark.stats.stats.median
            benchmark.extra_info.update(
                median_s=median_s, bytes_moved=bytes_moved, gbps=bytes_moved / median_s / 1e9
            )

    return run


def synchronized(step: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """`step`, followed on CUDA by a device sync so that a timer sees the kernels finish."""
    if device.type != "cuda":
        return step

    def step_and_sync():
        result = step()
        torch.cuda.synchronize(device)
        return result

    return step_and_sync


def environment(device: torch.device) -> dict[str, str | None]:
    """What a result depends on besides the code: device, library versions, fastvae backend."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu {platform.machine()}, {torch.get_num_threads()} threads"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": _installed_version("triton"),
        "fastvae_backend": fastvae.get_backend(),
    }


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def peak_bytes(step: Callable[[], object], device: torch.device) -> int:
    """Peak memory allocated during one call of `step`, above what was allocated before it."""
    if device.type == "cuda":
        return _cuda_peak_bytes(step, device)
    return _cpu_peak_bytes(step)


def _cuda_peak_bytes(step: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _cpu_peak_bytes(step: Callable[[], object]) -> int:
    """An estimate: the peak of the running sum, in time order, of the profiler's per-allocation
    memory events (+bytes on allocation, -bytes on free) for CPU tensors.

    It sees what goes through c10's CPU allocator, not scratch memory inside oneDNN/MKL calls.
    The raw records are used because the per-op totals of prof.events() charge a free that
    happens inside an enclosing op (an autograd.Function, say) at that op's start.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocations = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    return max(itertools.accumulate((nbytes for _, nbytes in allocations), initial=0))
