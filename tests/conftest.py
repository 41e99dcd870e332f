"""Test set-up: Triton kernels run in the interpreter unless a GPU is present.

TRITON_INTERPRET is read when the kernels are first imported, so it is set here, before any
test imports fastvae's kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The torch path's reference everywhere but in the CPU_LOOPS params (and tests that say so).
os.environ.setdefault("FASTVAE_CPU_LOOPS", "0")

import fastvae  # noqa: E402
from fastvae._backend import triton_available  # noqa: E402
from fastvae.ops import _cpu_loops  # noqa: E402

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

PATHS = [
    pytest.param(("torch", "cpu"), id="torch"),
    pytest.param(
        ("triton", KERNEL_DEVICE),
        id=f"triton-{KERNEL_DEVICE}",
        marks=pytest.mark.skipif(not triton_available(), reason="triton is not installed"),
    ),
]


# The torch path with the op's autograd.Function at every size: below a size threshold the
# torch path of some ops runs as torch ops that autograd differentiates (FusedOp.plain_autograd).
FUNCTION_FORM = pytest.param(("torch", "cpu", "function"), id="torch-function")


@pytest.fixture(params=PATHS)
def path(request):
    """(backend, device) of each code path: the torch reference and the Triton kernels."""
    backend, device = request.param
    with fastvae.use_backend(backend):
        yield backend, device


# The torch path's fused CPU loops (fastvae.ops._cpu_loops) at every size. The tests meet more
# dtypes and broadcast patterns than a training run, each a compilation of a loop.
torch._dynamo.config.recompile_limit = 64
CPU_LOOPS = pytest.param(("torch", "cpu", "loops"), id="torch-loops")


def run_cpu_loops(monkeypatch, loops) -> None:
    """Turn the CPU loops on, each of `loops` (CpuLoops) from one element up."""
    monkeypatch.setattr(_cpu_loops, "ENABLED", True)
    for loop in loops:
        monkeypatch.setattr(loop, "min_elements", 0)


def enter_path(param, monkeypatch, thresholds=(), loops=()):
    """A `path` fixture's body for the params PATHS, FUNCTION_FORM and CPU_LOOPS (or a param
    whose form names both): yields (backend, device); FUNCTION_FORM sets each (module, name)
    size threshold of thresholds to 0, CPU_LOOPS runs `loops` at every size."""
    backend, device, *form = param
    if "function" in form:
        for module, name in thresholds:
            monkeypatch.setattr(module, name, 0)
    if "loops" in form:
        run_cpu_loops(monkeypatch, loops)
    with fastvae.use_backend(backend):
        yield backend, device
    assert _cpu_loops.failure is None, _cpu_loops.failure


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
