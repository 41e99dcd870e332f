"""The Triton path's host code, timed on the CPU with every kernel launch stubbed out.

What a GPU run of fastvae costs before its kernels start: the Python host code of each op's
Triton path (argument checks, the autograd.Function, row layouts and tile sizes, output and
gradient buffers, the seed draw, torch's wrap_triton) and the torch ops it runs around its
kernels (gradient sums, casts). Known before a GPU is lent: on CPU tensors, with
stubbed_launches() in force, each op takes its Triton path and each launch
`kernel[grid](*args, **kwargs)` does nothing but count itself. The outputs are the
torch.empty buffers the kernels would fill, so every value is garbage (nothing here reads
one); the backward runs from fixed upstream gradients as in bench_iwae.py. A GPU run adds the
launches themselves (Triton's launcher, the driver), not timed here, and runs the torch ops as
launches instead of on the CPU.

One pytest-benchmark group per (op, pass, size), at the two launch-bound sizes of
bench_gaussian.py / bench_iwae.py (B = 8, D = 4 and B = 128, D = 64; K = C = 10, or
bench_gaussian's 8 samples for gaussian_log_prob), with three implementations side by side:
  triton-host  fastvae's Triton path with the kernels stubbed (CPU tensors)
  fastvae      the same op on its torch path (the normal CPU path)
  eager        the eager recipe of bench_gaussian.py / bench_iwae.py (or below, for the two
               variants they lack)
Passes: "fwd" (inputs require grad, forward only) and "fwd+bwd", as in bench_iwae.py. Every
case runs on one intra-op thread (the device in extra_info says so) and is timed in CPU time
(time.process_time): on a shared CPU, time spent waiting for a core is not the host code's.
Each row's extra_info has kind "host" (benchmarks/report.py puts them in a section of their
own, out of the op tables and targets), launches (the stubbed kernel launches of one call, by
name in launch_names) and torch_ops (the aten ops that move data, counted by traffic.py's
TorchOpCounter; by name in torch_op_names).

Run: python -m pytest benchmarks/bench_host.py --benchmark-only --benchmark-columns=median,ops
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import bench_gaussian  # benchmarks/ is on sys.path, as pytest's default import mode puts it
import bench_iwae
import pytest
import torch
import traffic
from bench_gaussian import GAUSSIAN_LOG_PROB, PASSES, REPARAMETERIZE_KL
from bench_iwae import IMPORTANCE_SAMPLE, LOG_MEAN_EXP, MIXTURE_LOG_PROB, random_inputs

import fastvae

pytestmark = bench_gaussian.pytestmark  # the same warning filter

CPU = torch.device("cpu")
STUBBED = "triton-host"
IMPLS = (STUBBED, "fastvae", "eager")

try:  # the stubs are JITFunctions to torch's wrap_triton, which then runs as for real kernels
    from triton.runtime.jit import JITFunction as _Kernel
except ImportError:  # no triton: wrap_triton, which would import it, is patched out instead
    _Kernel = None


# -- the stubs ---------------------------------------------------------------------------------


class StubKernel(_Kernel or object):
    """A kernel whose launch `stub[grid](*args, **kwargs)` only counts itself in `launches`
    (by kernel name). Where triton is installed it is a JITFunction, so that torch's
    wrap_triton treats it as fastvae's kernels (eagerly: returns it as it is); it is never
    initialized as one: there is no function to compile."""

    def __init__(self, name: str, launches: Counter):
        self._stub_name, self._stub_launches = name, launches

    def __getitem__(self, grid) -> Callable[..., None]:
        return self._launch

    def _launch(self, *args, **kwargs) -> None:
        self._stub_launches[self._stub_name] += 1

    def __repr__(self) -> str:
        return f"StubKernel({self._stub_name})"


class StubKernels:
    """Stands for a kernels module (fastvae.kernels.gaussian, ...): every *_kernel attribute is
    a StubKernel, made on first use."""

    def __init__(self, launches: Counter):
        self._launches = launches

    def __getattr__(self, name: str) -> StubKernel:
        if not name.endswith("_kernel"):
            raise AttributeError(name)
        kernel = StubKernel(name, self._launches)
        setattr(self, name, kernel)
        return kernel


# Each ops module and the kernel getter it imports by name from fastvae.ops._launch.
KERNEL_GETTERS = {
    "fastvae.ops.gaussian": "gaussian_kernels",
    "fastvae.ops.logmeanexp": "logmeanexp_kernels",
    "fastvae.ops.mixture": "mixture_kernels",
}


def _always_triton(device, dtype) -> bool:
    return True


def _identity(kernel):
    return kernel


@contextlib.contextmanager
def stubbed_launches() -> Iterator[Counter]:
    """Inside the block fastvae's ops take their Triton path on any tensor, and every kernel
    launch is a stub: in each ops module, use_triton returns True and the kernel getter a
    StubKernels; without triton, wrap_triton is the identity. Yields the launches by kernel
    name (a Counter the stubs add to); everything is restored on exit."""
    launches: Counter = Counter()
    patches = {}
    for module_name, getter in KERNEL_GETTERS.items():
        module = importlib.import_module(module_name)
        kernels = StubKernels(launches)
        patches[module, "use_triton"] = _always_triton
        patches[module, getter] = lambda kernels=kernels: kernels
        if _Kernel is None:
            patches[module, "wrap_triton"] = _identity
    saved = {key: getattr(*key) for key in patches}  # an AttributeError: fastvae changed
    try:
        for (module, name), value in patches.items():
            setattr(module, name, value)
        yield launches
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)


# -- the ops -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostOp:
    """An op timed here: bench_iwae's interface (impl(*args, **kwargs) with (args, kwargs) =
    inputs(size, device)) and its sizes, (tier, size) each."""

    name: str
    fastvae: Callable
    eager: Callable
    inputs: Callable[..., tuple[tuple, dict]]
    sizes: tuple[tuple[str, object], ...]

    @classmethod
    def of(cls, op: bench_iwae.Op) -> HostOp:
        """A bench_iwae op at its launch-bound sizes: the first two (bench_iwae's docstring)."""
        return cls(op.name, op.fastvae, op.eager, op.inputs, op.sizes[:2])

    def tier(self, size) -> str:
        return next(tier for tier, s in self.sizes if s == size)


def gaussian_inputs(input_shapes: Callable) -> Callable[..., tuple[tuple, dict]]:
    """inputs(size, device) from bench_gaussian's input_shapes(size): the same tensors as its
    build_case makes, 0.5 * N(0, 1) that require grad."""
    return lambda s, device: (random_inputs(*input_shapes(s), device=device), {})


GAUSSIAN_SIZES = tuple(
    (s.tier, s) for s in bench_gaussian.SIZES if (s.batch, s.dim) in ((8, 4), (128, 64))
)


def eager_reparameterize_kl_prior(mu, logvar, prior_mu, prior_logvar):
    """bench_gaussian's eager reparameterize_kl against a diagonal Gaussian prior."""
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    var_ratio = torch.exp(logvar - prior_logvar)
    scaled = (mu - prior_mu).pow(2) / torch.exp(prior_logvar)
    kl = 0.5 * (var_ratio + scaled - 1 - logvar + prior_logvar).sum(-1)
    return z, kl


def eager_reparameterize_samples(mu, logvar, num_samples):
    """K reparameterized samples (K, B, D) of N(mu, diag exp(logvar)), broadcasting."""
    eps = torch.randn((num_samples, *mu.shape), dtype=mu.dtype, device=mu.device)
    return mu + torch.exp(0.5 * logvar) * eps


OPS = {
    op.name: op
    for op in (
        HostOp(REPARAMETERIZE_KL.name, REPARAMETERIZE_KL.fastvae, REPARAMETERIZE_KL.eager,
               gaussian_inputs(REPARAMETERIZE_KL.input_shapes), GAUSSIAN_SIZES),
        # a learnable (D,) prior: its gradients sum over the rows
        HostOp("reparameterize_kl+prior", fastvae.reparameterize_kl, eager_reparameterize_kl_prior,
               gaussian_inputs(lambda s: ((s.batch, s.dim),) * 2 + ((s.dim,),) * 2),
               GAUSSIAN_SIZES),
        HostOp("reparameterize", fastvae.reparameterize, eager_reparameterize_samples,
               lambda s, device: (random_inputs((s.B, s.D), (s.B, s.D), device=device),
                                  {"num_samples": s.K}),
               IMPORTANCE_SAMPLE.sizes[:2]),
        HostOp(GAUSSIAN_LOG_PROB.name, GAUSSIAN_LOG_PROB.fastvae, GAUSSIAN_LOG_PROB.eager,
               gaussian_inputs(GAUSSIAN_LOG_PROB.input_shapes), GAUSSIAN_SIZES),
        HostOp.of(IMPORTANCE_SAMPLE),
        HostOp.of(traffic.IMPORTANCE_SAMPLE_PRIOR),  # the learnable-prior variant traffic counts
        HostOp.of(LOG_MEAN_EXP),
        HostOp.of(MIXTURE_LOG_PROB),
    )
}  # fmt: skip
CASES = [
    pytest.param(op.name, pass_name, size, id=f"{op.name}-{pass_name}-{size}")
    for op in OPS.values()
    for pass_name in PASSES
    for _, size in op.sizes
]


def build_case(op: HostOp, impl: str, pass_name: str, size) -> Callable[[], object]:
    """One step as a zero-argument callable, by bench_iwae.build_case on CPU tensors; the
    triton-host step is fastvae's, to be run inside stubbed_launches()."""
    return bench_iwae.build_case(
        op, "eager" if impl == "eager" else "fastvae", pass_name, size, CPU
    )


def launch_mode(impl: str) -> contextlib.AbstractContextManager[Counter]:
    """What a step of `impl` runs inside: stubbed_launches() for triton-host, else nothing
    (an empty Counter of launches)."""
    return stubbed_launches() if impl == STUBBED else contextlib.nullcontext(Counter())


def counts(step: Callable[[], object], launches: Counter) -> dict:
    """One more call of `step`: the stubbed kernel launches it adds to `launches`, and the aten
    ops that move data (traffic.TorchOpCounter: views, empty and the like left out)."""
    launches.clear()
    recorder = traffic.Recorder()
    with traffic.TorchOpCounter(recorder):
        step()
    torch_ops = recorder.summary()
    return {
        "launches": sum(launches.values()),
        "launch_names": dict(sorted(launches.items())),
        "torch_ops": torch_ops["launches"],
        "torch_op_names": torch_ops["names"],
    }


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread for every implementation: the torch ops here are small, and on a
    shared CPU a thread pool's waits swamp the host code (milliseconds instead of
    microseconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def device() -> torch.device:
    """The CPU on every machine (run_benchmark's device): the host code runs on CPU tensors."""
    return CPU


@pytest.mark.benchmark(timer=time.process_time)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("op_name", "pass_name", "size"), CASES)
def test_host_code(benchmark, run_benchmark, op_name, pass_name, size, impl):
    op = OPS[op_name]
    benchmark.group = f"host {op_name} {pass_name} {size}"
    benchmark.extra_info.update(
        kind="host", op=op_name, impl=impl, pass_name=pass_name, size=str(size), tier=op.tier(size)
    )
    step = build_case(op, impl, pass_name, size)
    with launch_mode(impl) as launches:
        run_benchmark(step, bytes_moved=0)
        benchmark.extra_info.update(counts(step, launches))
