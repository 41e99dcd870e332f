"""Test set-up: Triton kernels run in the interpreter unless a GPU is present.

TRITON_INTERPRET is read when the kernels are first imported, so it is set here, before any
test imports fastvae's kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastvae  # noqa: E402
from fastvae._backend import triton_available  # noqa: E402

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


def enter_path(param, monkeypatch, thresholds):
    """A `path` fixture's body for the params PATHS and FUNCTION_FORM: yields (backend, device);
    FUNCTION_FORM sets each (module, name) size threshold of thresholds to 0."""
    backend, device, *form = param
    if form:
        for module, name in thresholds:
            monkeypatch.setattr(module, name, 0)
    with fastvae.use_backend(backend):
        yield backend, device


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
