"""Every kernel launch of the public ops compiles for an NVIDIA Hopper GPU, without a GPU.

The interpreter runs the kernels' math but not the GPU compiler; scripts/compile_kernels.py
compiles each launch the ops make (in a fresh process: this one imported the kernels for the
interpreter).
"""

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "compile_kernels.py"


@pytest.mark.skipif(
    importlib.util.find_spec("triton.backends.nvidia") is None,
    reason="triton has no NVIDIA backend here",
)
def test_every_kernel_launch_compiles_for_sm90():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True)
    failures = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert result.returncode == 0 and not failures, "\n".join(failures) or result.stderr[-3000:]
    assert " 0 failed to compile" in result.stdout
    compiled = set(re.findall(r"^(?:ok|SPILL) +(\w+)\[", result.stdout, flags=re.MULTILINE))
    assert compiled == kernel_names(), "kernels no op launched: exercise them in the script"


def kernel_names() -> set[str]:
    """The @triton.jit functions named *_kernel in fastvae.kernels, the ones launched."""
    names = set()
    for path in (pathlib.Path(__file__).resolve().parents[1] / "kernels").glob("*.py"):
        names.update(re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", path.read_text()))
    assert len(names) >= 16, names  # the pattern still finds them
    return names
