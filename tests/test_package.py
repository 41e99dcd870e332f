"""Packaging: kernels/ ships as fastvae.kernels, never as a top-level `kernels` package."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

import fastvae

ROOT = pathlib.Path(__file__).resolve().parents[1]
PUBLIC = {
    "reparameterize", "gaussian_kl", "reparameterize_kl", "gaussian_log_prob",
    "set_backend", "get_backend", "use_backend",
}  # fmt: skip


def test_public_names():
    assert set(fastvae.__all__) >= PUBLIC
    for name in fastvae.__all__:
        assert getattr(fastvae, name).__doc__, f"fastvae.{name} has no docstring"


def test_kernels_import_as_a_subpackage():
    import fastvae.kernels.gaussian as kernels

    assert pathlib.Path(kernels.__file__).parent.name == "kernels"
    assert "kernels" not in sys.modules


@pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(), reason="needs the source tree")
def test_wheel_contents(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("fastvae-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastvae/kernels/gaussian.py" in names
    assert "fastvae/kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)

    # A regular install: the kernels import from the installed copy, not from the source tree.
    target = tmp_path / "site"
    pip_install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target"]
    subprocess.run([*pip_install, str(target), str(wheel)], check=True)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import fastvae, fastvae.kernels.gaussian "
        "as k; print(fastvae.__file__); print(k.__file__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(target)], capture_output=True, text=True, cwd=tmp_path,
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    package_file, kernels_file = result.stdout.split()
    assert package_file.startswith(str(target)) and kernels_file.startswith(str(target))
