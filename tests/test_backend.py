"""The backend switch: environment variable, setter, context manager, and routing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastvae
from fastvae.ops import gaussian


def _run(code: str, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-c", code], env={**environment, **env}, capture_output=True, text=True
    )


def test_set_and_use_backend():
    start = fastvae.get_backend()
    with fastvae.use_backend("torch"):
        assert fastvae.get_backend() == "torch"
        with fastvae.use_backend("triton"):
            assert fastvae.get_backend() == "triton"
        assert fastvae.get_backend() == "torch"
    assert fastvae.get_backend() == start
    with pytest.raises(ValueError, match="backend must be one of auto, torch, triton"):
        fastvae.set_backend("cuda")


def test_environment_variable():
    code = "import fastvae; print(fastvae.get_backend())"
    assert _run(code, FASTVAE_BACKEND="torch").stdout.strip() == "torch"
    assert _run(code).stdout.strip() == "auto"
    bad = _run(code, FASTVAE_BACKEND="gpu")
    assert bad.returncode != 0 and "FASTVAE_BACKEND must be one of" in bad.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only routing")
def test_triton_on_cpu_needs_the_interpreter():
    code = "import torch, fastvae; fastvae.gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3))"
    result = _run(code, FASTVAE_BACKEND="triton")
    assert result.returncode != 0 and "TRITON_INTERPRET=1" in result.stderr


@pytest.mark.parametrize(
    ("backend", "dtype", "kernels_run"),
    [
        ("auto", torch.float32, torch.cuda.is_available()),
        ("torch", torch.float32, False),
        ("triton", torch.float32, True),
        ("triton", torch.float64, False),
    ],
)
def test_routing(monkeypatch, backend, dtype, kernels_run):
    launched = []
    real = gaussian.gaussian_kernels

    def spy():
        launched.append(True)
        return real()

    monkeypatch.setattr(gaussian, "gaussian_kernels", spy)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mu = torch.zeros(3, 4, device=device, dtype=dtype)
    with fastvae.use_backend(backend):
        fastvae.reparameterize_kl(mu, mu)
        fastvae.gaussian_log_prob(mu, mu, mu)
    assert bool(launched) == kernels_run
