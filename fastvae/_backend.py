"""Which path runs an op: the Triton kernels or the pure-torch reference.

"auto" (the default) runs Triton on CUDA tensors and torch on everything else. "triton" also
sends CPU tensors to the kernels, which needs Triton's interpreter (TRITON_INTERPRET=1 set
before fastvae's kernels are first imported): that is how the kernels are tested without a GPU.
"torch" always runs the reference. float64 always runs the reference.

Choose with the environment variable FASTVAE_BACKEND, `set_backend(name)` or
`with use_backend(name): ...`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch

from fastvae._validate import check_choice

BACKENDS = ("auto", "torch", "triton")
_current = check_choice("FASTVAE_BACKEND", os.environ.get("FASTVAE_BACKEND") or "auto", BACKENDS)


def get_backend() -> str:
    """The backend in force: "auto", "torch" or "triton"."""
    return _current


def set_backend(name: str) -> None:
    """Set the backend for every later call ("auto", "torch" or "triton")."""
    global _current
    _current = check_choice("backend", name, BACKENDS)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the body with `name` as the backend, then restore the previous one."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether an op on `device` computing in `dtype` runs the Triton kernels."""
    if _current == "torch" or dtype == torch.float64:
        return False
    if _current == "auto":
        return device.type == "cuda" and triton_available()
    if not triton_available():
        raise RuntimeError("backend 'triton' was requested but triton is not installed")
    if device.type == "cuda" or interpreting():
        return True
    raise RuntimeError(
        f"backend 'triton' on {device.type} tensors needs Triton's interpreter: set "
        "TRITON_INTERPRET=1 before fastvae is imported, or use CUDA tensors"
    )


PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def traced(args) -> bool:
    """Whether a compiler is tracing args: Dynamo, or AOTAutograd / make_fx, whose tensors are
    fake or functional subclasses (their values cannot be read, nor met with cached tensors)."""
    return torch.compiler.is_compiling() or any(
        isinstance(a, torch.Tensor) and type(a) not in PLAIN_TENSORS for a in args
    )
