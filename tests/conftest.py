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


@pytest.fixture(params=PATHS)
def path(request):
    """(backend, device) of each code path: the torch reference and the Triton kernels."""
    backend, device = request.param
    with fastvae.use_backend(backend):
        yield backend, device


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
