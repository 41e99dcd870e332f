"""Compile, for an NVIDIA Hopper GPU (sm_90a), every Triton kernel launch the public ops make,
without a GPU.

Triton's CPU interpreter runs the kernels' math but not the GPU compiler: code that only the
compiler rejects, and register spills, show up here instead. The ops run on small CPU tensors
with the launches captured rather than executed (outputs are garbage and unused); each distinct
launch is compiled, and ptxas reports its registers and spills.

Run: python scripts/compile_kernels.py    (exit status 1 when a kernel fails to compile)
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)  # real JIT functions, not interpreted ones

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import fastvae  # noqa: E402
from fastvae import _backend  # noqa: E402
from fastvae.ops import _launch, gaussian, logmeanexp, mixture, tril  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# Triton's newest PTX needs the newer of the two assemblers it ships, where it ships both.
PTXAS = next(
    (p for p in (os.path.join(_BIN, n) for n in ("ptxas-blackwell", "ptxas")) if os.path.exists(p)),
    None,
)
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
         torch.float64: "fp64", torch.uint8: "u8", torch.int32: "i32"}  # fmt: skip


KERNEL_MODULES = ("gaussian", "logmeanexp", "mixture", "tril", "bernoulli", "discretized_logistic")


class _Capture:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, kernel, launches: dict):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            constants = {k: v for k, v in kwargs.items() if k != "num_warps"}
            signature = self._signature(args, constants)
            key = (self.kernel.__name__, tuple(signature.items()), tuple(constants.items()))
            self.launches[key] = (self.kernel, signature, constants, kwargs.get("num_warps", 4))

        return launch

    def _signature(self, args, constants) -> dict[str, str]:
        names = [n for n in self.kernel.arg_names if n not in constants]
        return {name: _type(value) for name, value in zip(names, args, strict=True)} | {
            name: "constexpr" for name in constants
        }


def _type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    return "fp32"


@contextlib.contextmanager
def captured_launches() -> Iterator[dict]:
    """Every kernel of fastvae.kernels replaced by a _Capture; yields the launches seen."""
    launches: dict = {}
    modules = [_launch.kernel_module(name) for name in KERNEL_MODULES]
    saved = []
    for module in modules:
        for name, kernel in vars(module).items():
            if isinstance(kernel, triton.runtime.jit.JITFunction) and not name.startswith("_"):
                saved.append((module, name, kernel))
                setattr(module, name, _Capture(kernel, launches))
    for module in (
        gaussian,
        logmeanexp,
        mixture,
        tril,
        _launch,
    ):  # their wrap_triton(kernel) takes it
        saved.append((module, "wrap_triton", module.wrap_triton))
        module.wrap_triton = lambda kernel: kernel
    interpreting, _backend.interpreting = _backend.interpreting, lambda: True
    try:
        with fastvae.use_backend("triton"):
            yield launches
    finally:
        _backend.interpreting = interpreting
        for module, name, kernel in saved:
            setattr(module, name, kernel)


def _exercise_ops() -> None:
    """Call every public op, forward and backward, on the shapes and dtypes that pick distinct
    kernel variants and tile sizes."""
    for dtype in (torch.float32, torch.bfloat16):
        for batch, dim in ((64, 64), (1000, 1), (2, 5000)):
            mu, logvar = (torch.zeros(batch, dim, dtype=dtype, requires_grad=True) for _ in "ab")
            prior = (torch.zeros(dim, requires_grad=True), torch.zeros(dim, requires_grad=True))
            z, kl = fastvae.reparameterize_kl(mu, logvar, *prior)
            (z.float().sum() + kl.sum()).backward()
            fastvae.gaussian_kl(mu, logvar, free_bits=0.1).sum().backward()
            fastvae.reparameterize(mu, logvar, eps=torch.zeros(batch, dim)).sum().backward()
            mixture = (torch.zeros(3, dim, requires_grad=True), torch.zeros(3, dim), None)
            for prior_arg in (None, prior, mixture):
                z, ratio = fastvae.importance_sample(mu, logvar, 4, prior=prior_arg)
                (z.float().sum() + ratio.sum()).backward()
            fastvae.gaussian_log_prob(z.detach(), mu, logvar).sum().backward()
            fastvae.gaussian_log_prob(z.detach(), mu, None).sum().backward()
            samples = z.detach().requires_grad_()  # K samples / K decoder outputs, all with grads
            fastvae.gaussian_log_prob(samples, mu, logvar).sum().backward()
            fastvae.gaussian_log_prob(mu, samples, samples).sum().backward()
            for k in (5, 5000):
                log_w = torch.zeros(k, batch, dtype=dtype, requires_grad=True)
                fastvae.log_mean_exp(log_w).sum().backward()
            for x in (torch.zeros(batch, dim, dtype=torch.uint8), torch.zeros(batch, dim)):
                logits = mu.expand(4, batch, dim)
                fastvae.bernoulli_log_prob(x, logits).sum().backward()
                fastvae.bernoulli_log_prob(x.float().requires_grad_(), mu).sum().backward()
                x_int = x.int() if x.is_floating_point() else x  # uint8, int32 bins; k / 256
                for data in (x_int, x / 256):
                    log_p = fastvae.discretized_logistic_log_prob(data, mu, logvar[:1])
                    log_p.sum().backward()
        for dim in (16, 256):  # one block a row; 4 x 4 blocks
            mu = torch.zeros(8, dim, dtype=dtype, requires_grad=True)
            scale_tril = torch.zeros(8, dim, dim, dtype=dtype, requires_grad=True)
            for eps in (None, torch.zeros(8, dim, requires_grad=True)):
                z, kl = fastvae.reparameterize_kl_tril(mu, scale_tril, eps=eps)
                (z.float().sum() + kl.sum()).backward()


def _registers_and_spills(ptx: str) -> tuple[int, int]:
    """(registers, bytes of spill stores) that ptxas reports for sm_90a."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        result = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", source.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True)  # fmt: skip
    registers = re.search(r"Used (\d+) registers", result.stderr)
    stores = re.search(r"(\d+) bytes spill stores", result.stderr)
    return int(registers.group(1)), int(stores.group(1))


_VARIANTS: list = []  # the captured launches, set before the workers fork (kernels do not pickle)


def _compile(index: int) -> tuple[str, bool, bool]:
    """(report line, failed, spilled) of the captured launch _VARIANTS[index]."""
    kernel, signature, constants, num_warps = _VARIANTS[index]
    flags = ", ".join(f"{k}={v}" for k, v in constants.items())
    label = f"{kernel.__name__}[{flags}, num_warps={num_warps}]"
    try:
        source = ASTSource(kernel, signature, constants)
        compiled = triton.compile(source, target=TARGET, options={"num_warps": num_warps})
    except Exception as error:  # noqa: BLE001 - report every failing variant
        return (
            f"FAIL {label}: {type(error).__name__}: {str(error).splitlines()[0][:300]}",
            True,
            False,
        )
    if PTXAS is None:
        return f"ok   {label}", False, False
    registers, spilled = _registers_and_spills(compiled.asm["ptx"])
    line = f"{'SPILL' if spilled else 'ok  '} {label}: {registers} registers, {spilled} B spilled"
    return line, False, spilled > 0


def main() -> int:
    with captured_launches() as launches:
        _exercise_ops()
    # One process per core, forked after the capture: each compiles its share of the variants.
    _VARIANTS[:] = launches.values()
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=os.cpu_count(), mp_context=context) as pool:
        reports = list(pool.map(_compile, range(len(_VARIANTS))))
    for line, _, _ in reports:
        print(line)
    failures = sum(failed for _, failed, _ in reports)
    spilling = sum(spilled for _, _, spilled in reports)
    print(
        f"{len(launches)} kernel variants, {failures} failed to compile, {spilling} spill registers"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
