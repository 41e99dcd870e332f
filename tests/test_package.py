"""Packaging: the public names, a light `import fastvae` that brings fastvae.nn, and kernels/
shipped as fastvae.kernels, never as a top-level `kernels` package."""

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


def test_nn_is_reachable_from_the_package():
    import fastvae.nn.vae

    assert fastvae.nn.IWAE is fastvae.nn.vae.IWAE
    assert {"VAE", "IWAE", "GAN", "StandardNormal", "MixturePrior"} <= set(fastvae.nn.__all__)


def _imported_under(module: str, importtime: str) -> list[str]:
    """The modules first imported while `module` was being imported, from -X importtime's
    report (each import's nested imports come before it, indented deeper)."""
    rows = []
    for line in importtime.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1][1:]
            rows.append((len(name) - len(name.lstrip()), name.strip()))
    (index,) = [i for i, (_, name) in enumerate(rows) if name == module]
    level, nested = rows[index][0], []
    for depth, name in reversed(rows[:index]):
        if depth <= level:
            break
        nested.append(name)
    return nested


def test_a_fresh_import_fastvae_brings_nn_and_nothing_heavy():
    """`import fastvae` imports fastvae.nn after the ops, and nn needs nothing they do not
    already import; the kernels (but for their plain-int modes) and the toy-2D and MNIST jobs
    stay out until used."""
    code = "import sys, fastvae; print(fastvae.nn.IWAE.__module__); print(*sorted(sys.modules))"
    env = os.environ | {"PYTHONPATH": str(pathlib.Path(fastvae.__file__).parents[1])}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    module, loaded = result.stdout.splitlines()
    assert module == "fastvae.nn.vae"
    nested = _imported_under("fastvae.nn", result.stderr)
    assert nested and all(name.startswith("fastvae.nn.") for name in nested), nested
    loaded = set(loaded.split())
    kernels = {m for m in loaded if m.startswith("fastvae.kernels.")}
    assert kernels <= {"fastvae.kernels.modes"}, kernels  # no Triton code: plain constants
    assert not loaded & {"fastvae.toy2d", "fastvae.mnist", "matplotlib"}


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
    assert {"fastvae/mnist/cli.py", "fastvae/toy2d/cli.py"} <= set(names)  # the two jobs
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
