"""Memory traffic and launches of fastvae, the eager recipe and torch.compile: counted, not timed.

    TRITON_INTERPRET=1 python -m benchmarks.traffic [--max-elements N] [--no-compile]
                                                    [--only PATTERN] [--out FILE]

(`make traffic` runs it, then benchmarks.report, which adds a section to RESULTS.md.)

The cases: every op of bench_gaussian.py and bench_iwae.py at their sizes (CUDA-only sizes and
sizes whose eager recipe the CPU benchmarks skip are left out), plus importance_sample with a
learnable (D,) prior; and the latent part of every training workload of bench_train.py. Each
case runs one forward and one backward (the "fwd" pass is the forward alone, "fwd+bwd" both).
Per implementation:

  fastvae  the public op with backend "triton" on CPU tensors, run by Triton's interpreter.
           Every load and store of its kernels is counted as it runs (interpreter_hooks):
           "accessed" = unmasked elements x element size summed over every load / store;
           "bytes" = the distinct addresses each launch touched. Every torch op fastvae runs
           around its kernels (the seed draw, gradient sums, casts, zeros) is counted like
           eager's, and belongs to the row.
  eager    every aten op the recipe dispatches (TorchOpCounter, a TorchDispatchMode); views
           and other ops that move no data (empty, detach, ...) are left out. Bytes: every
           tensor argument read and every new output written, over its distinct elements (a
           broadcast dim counts once).
  compile  torch.compile of the eager recipe (inductor's CPU code generation, its FX graph
           and AOTAutograd caches off):
           torch._inductor.metrics.num_bytes_accessed and the scheduler nodes it generated
           code for (kernels) or called (extern kernels): inductor's own count.
  minimum  each phase reads every input once and writes every output once: the forward reads
           the op's tensor arguments and writes its outputs; the backward reads the upstream
           gradients and the forward's tensor arguments and writes the input gradients.

The latent part of a training step: bench_train's fastvae model and eager recipe with the
encoder and decoder replaced by linear layers that are not counted (MockNetwork), so what is
counted is everything between the encoder's output and the decoder's input, and from the
decoder's output to the loss: sampling, KL or log-weights, prior, likelihood, the bound, and
their backward. Its minimum: the forward reads the encoder's outputs, the decoder's outputs
and x and writes the decoder's inputs and the loss; the backward reads the gradient at the
decoder's inputs and the loss's, and the forward's inputs again, and writes the gradients at
the encoder's and the decoder's outputs.

Triton's interpreter runs one program at a time, about 0.1 s each: cases whose largest tensor
has more than --max-elements elements (default 2^19) get no fastvae count, nor a compile one
(a compile takes seconds; eager's still runs); --max-elements 0 counts everything (the CPU's
large sizes take minutes each in the interpreter). torch.compile's counts depend on the eager
recipe only: they are reused from the latest traffic file where its source is unchanged.
Writes benchmarks/results/traffic-cpu-<date>.json; benchmarks/report.py renders it with a
time MODEL (bytes / bandwidth + launches x cost, constants in benchmarks/targets.json), never a
measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

if __name__ == "__main__":
    # Triton's jit functions (triton.language's and fastvae's kernels) are interpreted only if
    # this is set before they are defined: before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import fastvae  # noqa: E402
from fastvae.ops import _cpu_loops  # noqa: E402

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the bench files import each other by name
    sys.path.insert(0, str(HERE))

import bench_gaussian  # noqa: E402
import bench_iwae  # noqa: E402
import bench_train  # noqa: E402

RESULTS_DIR = HERE / "results"
DEFAULT_MAX_ELEMENTS = 1 << 19
CPU = torch.device("cpu")

# -- counting ----------------------------------------------------------------------------------


@dataclass
class Launch:
    """One kernel launch: kind "triton" (a fastvae kernel in the interpreter) or "torch" (an
    aten op). read / write: bytes over distinct addresses (per launch); read_accessed /
    write_accessed: bytes summed over every load / store (equal to read / write for torch ops);
    in_ops: launched from inside fastvae's ops (fastvae/ops, fastvae/reference.py)."""

    kind: str
    name: str
    read: int
    write: int
    read_accessed: int
    write_accessed: int
    in_ops: bool


class Recorder:
    """The launches counted inside `counting()`; torch ops are not counted while paused()
    (networks that are not part of the count) or while a Triton kernel runs (the interpreter
    copies its arguments with torch ops of its own)."""

    def __init__(self) -> None:
        self.launches: list[Launch] = []
        self.kernel: _KernelTraffic | None = None
        self._paused = 0

    @property
    def counting_torch(self) -> bool:
        return self._paused == 0 and self.kernel is None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @contextlib.contextmanager
    def triton_launch(self, name: str) -> Iterator[None]:
        outer, self.kernel = self.kernel, _KernelTraffic()
        try:
            yield
            if self._paused == 0:
                self.launches.append(self.kernel.launch(name))
        finally:
            self.kernel = outer

    def summary(self, start: int = 0, stop: int | None = None) -> dict:
        """Totals of launches[start:stop], as stored in the traffic file."""
        launches = self.launches[start:stop]
        names = Counter(launch.name for launch in launches)
        in_ops = Counter(launch.name for launch in launches if launch.in_ops)
        return {
            "launches": len(launches),
            "by_kind": dict(Counter(launch.kind for launch in launches)),
            "in_ops": sum(launch.in_ops for launch in launches),
            "read": sum(launch.read for launch in launches),
            "write": sum(launch.write for launch in launches),
            "read_accessed": sum(launch.read_accessed for launch in launches),
            "write_accessed": sum(launch.write_accessed for launch in launches),
            "names": dict(sorted(names.items())),
            "in_ops_names": dict(sorted(in_ops.items())),
        }


class _Addresses:
    """A set of (address, element size) pairs, kept as sorted unique arrays per size; new
    addresses are merged in batches."""

    MERGE_AT = 1 << 22

    def __init__(self) -> None:
        self.unique: dict[int, np.ndarray] = {}
        self.pending: dict[int, list[np.ndarray]] = {}
        self.n_pending = 0

    def add(self, addresses: np.ndarray, itemsize: int) -> None:
        self.pending.setdefault(itemsize, []).append(addresses.astype(np.uint64, copy=False))
        self.n_pending += addresses.size
        if self.n_pending >= self.MERGE_AT:
            self._merge()

    def _merge(self) -> None:
        for itemsize, parts in self.pending.items():
            if itemsize in self.unique:
                parts = [self.unique[itemsize], *parts]
            self.unique[itemsize] = np.unique(np.concatenate(parts))
        self.pending, self.n_pending = {}, 0

    def nbytes(self) -> int:
        self._merge()
        return sum(itemsize * int(a.size) for itemsize, a in self.unique.items())


class _KernelTraffic:
    """The loads and stores of one Triton launch."""

    def __init__(self) -> None:
        self.loads, self.stores = _Addresses(), _Addresses()
        self.read_accessed = self.write_accessed = 0

    def access(self, ptrs, mask, store: bool) -> None:
        """ptrs, mask: the interpreter's TensorHandles (numpy arrays of addresses / bools)."""
        addresses = np.asarray(ptrs.data)
        if mask is not None:
            addresses = addresses[
                np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)
            ]
        else:
            addresses = addresses.ravel()
        itemsize = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        nbytes = int(addresses.size) * itemsize
        if store:
            self.stores.add(addresses, itemsize)
            self.write_accessed += nbytes
        else:
            self.loads.add(addresses, itemsize)
            self.read_accessed += nbytes

    def launch(self, name: str) -> Launch:
        return Launch("triton", name, self.loads.nbytes(), self.stores.nbytes(),
                      self.read_accessed, self.write_accessed, in_fastvae_ops())  # fmt: skip


_BUILDER_HOOKS = ("create_masked_load", "create_masked_store", "create_atomic_rmw",
                  "create_atomic_cas")  # fmt: skip


@contextlib.contextmanager
def interpreter_hooks(recorder: Recorder) -> Iterator[None]:
    """Count the loads, stores and launches of Triton kernels run by the interpreter.

    Patches triton.runtime.interpreter: the builder's masked load / store (create_load,
    create_store, the atomics' loads / stores and tensor descriptors go through them) and
    the atomic read-modify-writes, and GridExecutor.__call__ (one launch). Raises if any of
    them is missing: a Triton version whose interpreter works differently.
    """
    try:
        from triton.runtime import interpreter
    except ImportError as exc:
        raise RuntimeError(f"counting Triton kernels needs triton's interpreter: {exc}") from exc
    builder = getattr(interpreter, "interpreter_builder", None)
    executor = getattr(interpreter, "GridExecutor", None)
    missing = [name for name in _BUILDER_HOOKS if not callable(getattr(builder, name, None))]
    if executor is None or not callable(getattr(executor, "__call__", None)):  # noqa: B004
        missing.append("GridExecutor.__call__")
    if builder is None or missing:
        raise RuntimeError(
            f"triton {_version('triton')}'s interpreter lacks "
            f"{', '.join(missing) or 'interpreter_builder'}: benchmarks/traffic.py's "
            "interpreter_hooks must be updated for it"
        )
    original = {name: getattr(builder, name) for name in _BUILDER_HOOKS}
    own = {name: builder.__dict__[name] for name in _BUILDER_HOOKS if name in builder.__dict__}
    original_call = executor.__call__

    def access(ptrs, mask, store: bool) -> None:
        if recorder.kernel is not None:
            recorder.kernel.access(ptrs, mask, store)

    def masked_load(ptrs, mask, other, *args, **kwargs):
        access(ptrs, mask, store=False)
        return original["create_masked_load"](ptrs, mask, other, *args, **kwargs)

    def masked_store(ptrs, value, mask, *args, **kwargs):
        access(ptrs, mask, store=True)
        return original["create_masked_store"](ptrs, value, mask, *args, **kwargs)

    def atomic_rmw(op, ptr, val, mask, *args, **kwargs):
        access(ptr, mask, store=False)
        access(ptr, mask, store=True)
        return original["create_atomic_rmw"](op, ptr, val, mask, *args, **kwargs)

    def atomic_cas(ptr, cmp, val, *args, **kwargs):
        access(ptr, None, store=False)
        access(ptr, None, store=True)
        return original["create_atomic_cas"](ptr, cmp, val, *args, **kwargs)

    def grid_call(self, *args, **kwargs):
        with recorder.triton_launch(getattr(self.fn, "__name__", "kernel")):
            return original_call(self, *args, **kwargs)

    hooks = {"create_masked_load": masked_load, "create_masked_store": masked_store,
             "create_atomic_rmw": atomic_rmw, "create_atomic_cas": atomic_cas}  # fmt: skip
    for name, hook in hooks.items():
        setattr(builder, name, hook)
    executor.__call__ = grid_call
    try:
        yield
    finally:
        executor.__call__ = original_call
        for name in _BUILDER_HOOKS:
            if name in own:
                setattr(builder, name, own[name])
            else:
                delattr(builder, name)


# Ops that launch nothing: allocations and metadata. (Views are found by func.is_view.)
NO_DATA = frozenset(
    {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach",
     "alias", "lift_fresh", "resize_", "set_", "sym_size", "sym_stride", "sym_numel",
     "sym_storage_offset", "_reshape_alias", "record_stream", "_unsafe_view"}
)  # fmt: skip
# In-place ops that write their mutated argument without reading it.
WRITE_ONLY = frozenset(
    {"fill_", "zero_", "normal_", "uniform_", "random_", "exponential_", "geometric_",
     "cauchy_", "log_normal_", "bernoulli_", "copy_"}
)  # fmt: skip
COUNTED_NAMESPACES = ("aten", "prims")


def footprint(value) -> int:
    """Bytes of the distinct elements of a tensor (a stride-0, broadcast dim counts once); the
    sum over a list of tensors; 0 for anything else."""
    if isinstance(value, list | tuple):
        return sum(footprint(v) for v in value)
    if not isinstance(value, torch.Tensor) or value.numel() == 0:
        return 0
    if value.layout != torch.strided:
        return value.numel() * value.element_size()
    distinct = math.prod(s for s, st in zip(value.shape, value.stride()) if st != 0)
    return distinct * value.element_size()


def moves_data(func) -> bool:
    name = func.overloadpacket.__name__
    return not (func.is_view or name in NO_DATA or torch.Tag.inplace_view in func.tags)


def op_bytes(func, args: tuple, kwargs: dict, out) -> tuple[int, int]:
    """(bytes read, bytes written) of one aten op: its tensor arguments are read (not the
    template of a *_like / new_* constructor, nor an argument it only writes: out=, fill_,
    copy_'s destination...); its mutated arguments and new (non-aliasing) outputs written."""
    schema = func._schema
    name = func.overloadpacket.__name__
    template_only = name.endswith("_like") or name.startswith("new_")
    values = list(args) + [kwargs.get(a.name) for a in schema.arguments[len(args) :]]
    read = written = 0
    for arg, value in zip(schema.arguments, values):
        nbytes = footprint(value)
        is_write = arg.alias_info is not None and arg.alias_info.is_write
        if is_write:
            written += nbytes
            if not arg.kwarg_only and name not in WRITE_ONLY:
                read += nbytes
        elif not template_only:
            read += nbytes
    outputs = out if isinstance(out, tuple | list) else (out,)
    returns = schema.returns
    if len(returns) == 1 and len(outputs) > 1:  # one Tensor[] return
        returns = returns * len(outputs)
    for ret, value in zip(returns, outputs):
        if ret.alias_info is None:
            written += footprint(value)
    return read, written


def tensors_in(value) -> list[torch.Tensor]:
    """The tensors in a tensor, or in tuples, lists and dict values of them (nested)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [t for v in value for t in tensors_in(v)]
    return []


class TorchOpCounter(TorchDispatchMode):
    """Counts every aten op that moves data into `recorder` (a TorchDispatchMode sees them
    after autograd, in the forward and the backward). A custom op (another namespace) is not
    a launch itself: the ops inside it are counted instead."""

    def __init__(self, recorder: Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace not in COUNTED_NAMESPACES:  # its kernel, with this mode back on
            below = torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.Python)
            tensors = tensors_in((args, kwargs))
            keys = torch._C._dispatch_keys(tensors[0]) & below if tensors else below
            with self:
                return func.redispatch(keys, *args, **kwargs)
        out = func(*args, **kwargs)
        if self.recorder.counting_torch and moves_data(func):
            read, written = op_bytes(func, args, kwargs, out)
            if read + written == 0:  # no tensor data (promote_types, an empty tensor)
                return out
            self.recorder.launches.append(
                Launch("torch", str(func), read, written, read, written, in_fastvae_ops())
            )
        return out


_FASTVAE_DIR = Path(fastvae.__file__).parent
_OPS_PREFIXES = tuple(
    {str(p) for base in (_FASTVAE_DIR, _FASTVAE_DIR.resolve())
     for p in (base / "ops", base / "reference.py")}
)  # fmt: skip


def in_fastvae_ops() -> bool:
    """Whether the caller runs inside fastvae's ops (a frame of fastvae/ops or reference.py on
    the Python stack): their forward, or their backward (an autograd.Function's, in Python)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.startswith(_OPS_PREFIXES):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def counting() -> Iterator[Recorder]:
    """Count the Triton launches (interpreter) and torch ops run inside the block."""
    recorder = Recorder()
    _ACTIVE.append(recorder)
    try:
        with interpreter_hooks(recorder), TorchOpCounter(recorder):
            yield recorder
    finally:
        _ACTIVE.remove(recorder)


_ACTIVE: list[Recorder] = []  # the recorders of the counting() blocks in progress


@contextlib.contextmanager
def uncounted() -> Iterator[None]:
    """Nothing inside the block is counted (by any counting() in progress)."""
    with contextlib.ExitStack() as stack:
        for recorder in _ACTIVE:
            stack.enter_context(recorder.paused())
        yield


def check_interpreter() -> None:
    """fastvae's kernels must run in Triton's interpreter, which a jit function gets only if
    TRITON_INTERPRET=1 was set when it was defined (triton.language's own: at import)."""
    from fastvae._backend import interpreting

    if not interpreting():
        raise RuntimeError("set TRITON_INTERPRET=1 before running benchmarks.traffic")
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from fastvae.ops import _launch

    probes = {
        "triton.language.zeros": getattr(tl, "zeros", None),
        "fastvae's log_prob_fwd_kernel": _launch.gaussian_kernels().log_prob_fwd_kernel,
    }
    for name, fn in probes.items():
        if isinstance(fn, JITFunction) and not isinstance(fn, InterpretedFunction):
            raise RuntimeError(
                f"{name} was defined before TRITON_INTERPRET=1 was set: it would not run in the "
                "interpreter; run benchmarks.traffic in a fresh process with TRITON_INTERPRET=1"
            )


# -- inductor's counts -------------------------------------------------------------------------


@contextlib.contextmanager
def inductor_counting() -> Iterator[Callable[[], dict]]:
    """Inductor's metrics of what is compiled inside the block; yields a snapshot function.

    The metrics logger is switched on (inductor counts bytes only then) with its output
    dropped, and the FX graph and AOTAutograd caches are off (a cached graph brings back its
    byte count but not its nodes; the C++ kernels' cache stays on)."""
    from torch._functorch import config as functorch_config
    from torch._inductor import compile_fx, metrics
    from torch._inductor import config as inductor_config
    from torch._inductor import scheduler as inductor_scheduler

    logger = getattr(compile_fx, "inductor_metrics_log", None)
    nop = getattr(inductor_scheduler, "NopKernelSchedulerNode", None)
    needed = ("num_bytes_accessed", "nodes_num_elem", "generated_kernel_count", "reset")
    if logger is None or nop is None or not all(hasattr(metrics, n) for n in needed):
        raise RuntimeError(
            f"torch {torch.__version__}'s inductor lacks the metrics benchmarks/traffic.py "
            "reads (compile_fx.inductor_metrics_log, metrics.num_bytes_accessed, ...)"
        )

    def snapshot() -> dict:
        nodes = [node for node, _ in metrics.nodes_num_elem if not isinstance(node, nop)]
        nodes = [n for n in nodes if type(n.node).__name__ not in NO_LAUNCH_NODES]
        extern = [n for n in nodes if n.is_extern()]
        names = Counter(
            str(getattr(n.node, "python_kernel_name", None) or type(n.node).__name__)
            for n in extern
        )
        return {
            "launches": len(nodes),
            "by_kind": {"inductor": len(nodes) - len(extern), "extern": len(extern)},
            "bytes": int(metrics.num_bytes_accessed),
            "generated_kernel_count": int(metrics.generated_kernel_count),
            "names": dict(sorted(names.items())),
        }

    metrics.reset()
    level, propagate = logger.level, logger.propagate
    handler = logging.NullHandler()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        with (
            inductor_config.patch(fx_graph_cache=False, fx_graph_remote_cache=False),
            functorch_config.patch(enable_autograd_cache=False),
        ):
            yield snapshot
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


NO_LAUNCH_NODES = frozenset({"MultiOutput"})  # extern nodes that pick a call's outputs apart


def difference(after: dict, before: dict) -> dict:
    """after - before of two snapshots or summaries (numbers and their by-kind / name dicts)."""
    out = {}
    for key, value in after.items():
        if isinstance(value, dict):
            sub = {k: v - before.get(key, {}).get(k, 0) for k, v in value.items()}
            out[key] = {k: v for k, v in sub.items() if v}
        else:
            out[key] = value - before.get(key, 0)
    return out


# -- the cases ---------------------------------------------------------------------------------


class Bench:
    """What a case runs for each implementation ("fastvae", "eager", "compile"): forward(impl)
    -> outputs; backward(impl, outputs), if has_backward; minimum() -> each phase's minimum
    {"read": bytes, "write": bytes}."""

    has_backward: bool

    def forward(self, impl: str):
        raise NotImplementedError

    def backward(self, impl: str, outputs) -> None:
        raise NotImplementedError

    def minimum(self) -> dict:
        raise NotImplementedError


@dataclass
class Case:
    """A row group of the traffic file: an op at a size (kind "op") or a training workload's
    latent part ("train"); elements: its largest tensor's, for --max-elements."""

    kind: str
    name: str
    size: str
    tier: str
    elements: int
    make: Callable[[], Bench]
    recipe: tuple = ()  # what torch.compile's counts depend on: functions (their source), text

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.name}/{self.size}"

    def recipe_hash(self) -> str | None:
        """A hash of the eager recipe's source, the case and torch's version: a compile count
        with the same hash is reused (the recipe, not fastvae, decides it). None: unknown."""
        parts = [self.id, torch.__version__]
        for part in self.recipe:
            if isinstance(part, str):
                parts.append(part)
            elif inspect.isbuiltin(part):  # no source: its name
                parts.append(f"{part.__module__}.{part.__qualname__}")
            else:
                try:
                    parts.append(inspect.getsource(part))
                except (OSError, TypeError):
                    return None
        return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


class OpBench(Bench):
    """One op: impl(*args, **kwargs), then the gradients of the tensor arguments that require
    grad for fixed upstream gradients (N(0, 1), shaped like the outputs of fastvae's torch path;
    made here, not counted). The minimum: see the module's docstring."""

    def __init__(self, fastvae_fn, eager_fn, args: tuple, kwargs: dict, backward: bool, grads=None):
        self.fns = {"fastvae": fastvae_fn, "eager": eager_fn}
        self.compiled = torch.compile(eager_fn, dynamic=False)
        self.args, self.kwargs = args, kwargs
        self.wrt = tuple(t for t in args if isinstance(t, torch.Tensor) and t.requires_grad)
        self.has_backward = backward and bool(self.wrt)
        with fastvae.use_backend("torch"), torch.no_grad():
            self.outputs = fastvae_fn(*args, **kwargs)
        self.grads = None
        if self.has_backward:
            self.grads = grads or tuple(torch.randn_like(t) for t in tensors_in(self.outputs))

    def forward(self, impl: str):
        fn = self.compiled if impl == "compile" else self.fns[impl]
        return fn(*self.args, **self.kwargs)

    def backward(self, impl: str, outputs) -> None:
        torch.autograd.grad(tensors_in(outputs), self.wrt, self.grads)

    def minimum(self) -> dict:
        inputs = footprint(tensors_in(self.args))
        out = {"fwd": {"read": inputs, "write": footprint(tensors_in(self.outputs))}}
        if self.has_backward:
            out["bwd"] = {"read": footprint(self.grads) + inputs, "write": footprint(self.wrt)}
        return out

    def elements(self) -> int:
        return max(t.numel() for t in tensors_in((self.args, self.outputs)))


def gaussian_cases(sizes=None, ops=None) -> list[Case]:
    """bench_gaussian.py's ops (or those named) at its sizes (or `sizes`), not the CUDA-only."""
    cases = []
    for op in bench_gaussian.OPS.values():
        if ops is not None and op.name not in ops:
            continue
        for size in bench_gaussian.SIZES if sizes is None else sizes:
            if size.only == "cuda":
                continue

            def make(op=op, size=size) -> OpBench:
                torch.manual_seed(0)
                shapes = op.input_shapes(size)
                inputs = tuple((0.5 * torch.randn(s)).requires_grad_() for s in shapes)
                with torch.no_grad():
                    grads = tensors_in(op.output_grads(op.eager(*inputs)))
                return OpBench(op.fastvae, op.eager, inputs, {}, True, tuple(grads))

            elements = max(math.prod(s) for s in op.input_shapes(size))
            recipe = (op.eager, op.output_grads, str(op.input_shapes(size)))
            cases.append(Case("op", op.name, str(size), size.tier, elements, make, recipe))
    return cases


def eager_importance_sample_prior(mu, logvar, prior_mu, prior_logvar, num_samples):
    """bench_iwae's eager importance_sample with a diagonal Gaussian prior for N(0, I)."""
    std = torch.exp(0.5 * logvar)
    mu_k, std_k = mu.repeat(num_samples, 1, 1), std.repeat(num_samples, 1, 1)
    z = mu_k + std_k * torch.randn_like(mu_k)
    prior = torch.distributions.Normal(prior_mu, torch.exp(0.5 * prior_logvar))
    log_q = torch.distributions.Normal(mu_k, std_k).log_prob(z).sum(-1)
    return z, prior.log_prob(z).sum(-1) - log_q


def fastvae_importance_sample_prior(mu, logvar, prior_mu, prior_logvar, num_samples):
    return fastvae.importance_sample(mu, logvar, num_samples, prior=(prior_mu, prior_logvar))


# importance_sample with a learnable (D,) prior: its gradients sum over the K x B rows.
IMPORTANCE_SAMPLE_PRIOR = replace(
    bench_iwae.IMPORTANCE_SAMPLE,
    name="importance_sample+prior",
    fastvae=fastvae_importance_sample_prior,
    eager=eager_importance_sample_prior,
    inputs=lambda s, device: (
        bench_iwae.random_inputs((s.B, s.D), (s.B, s.D), (s.D,), (s.D,), device=device),
        {"num_samples": s.K},
    ),
)


def iwae_cases(sizes: dict | None = None) -> list[Case]:
    """bench_iwae.py's ops at their CPU sizes (none the CPU benchmarks skip), and
    importance_sample with a learnable prior at importance_sample's; sizes: op name -> a list
    of (tier, size) to run instead (ops not in it are left out)."""
    cases = []
    for op in (*bench_iwae.OPS.values(), IMPORTANCE_SAMPLE_PRIOR):
        if sizes is not None and op.name not in sizes:
            continue
        for tier, size in (*op.sizes, *op.cpu_sizes) if sizes is None else sizes[op.name]:
            if op.cpu_skip_reason(size):
                continue

            def make(op=op, size=size) -> OpBench:
                torch.manual_seed(0)
                args, kwargs = op.inputs(size, CPU)
                backward = "fwd+bwd" in op.passes
                return OpBench(op.fastvae, op.eager, args, kwargs, backward)

            elements, recipe = _iwae_elements(op, size), (op.eager, op.inputs)
            cases.append(Case("op", op.name, str(size), tier, elements, make, recipe))
    return cases


def _iwae_elements(op, size) -> int:
    """The largest tensor of a bench_iwae case, from its dims: K x B x D samples, K x B
    log-weights, the mixture's N x D, C x D and its backward's N x C."""
    dims = vars(size)
    if "C" in dims:
        n, c, d = dims["N"], dims["C"], dims["D"]
        return max(n * d, c * d, n * c)
    return math.prod(dims.values())


# -- training steps: the latent part -----------------------------------------------------------


class _Uncounted(torch.autograd.Function):
    """x @ weight^T + bias, forward and backward not counted; the backward returns the
    gradient of x only (where the net passes it on: the decoder's z), none for the weights, so
    that autograd accumulates nothing. Each call's boundary tensors go to net.log."""

    @staticmethod
    def forward(ctx, x, weight, bias, net):
        with uncounted():
            out = x @ weight.T + bias
        ctx.save_for_backward(weight)
        ctx.net = net
        net.record("fwd", x, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_x = None
        if ctx.net.passes_gradient and ctx.needs_input_grad[0]:
            with uncounted():
                grad_x = grad @ weight
        ctx.net.record("bwd", grad_x, grad)
        return grad_x, None, None, None


@torch.compiler.disable
def _uncounted_linear(x, weight, bias, net):
    return _Uncounted.apply(x, weight, bias, net)


class MockNetwork(nn.Module):
    """A linear layer standing in for an encoder ("encoder": its input is data, not part of
    the count) or a decoder ("decoder": its input z comes from the latent part). Not counted,
    and a graph break for torch.compile. log: when a list, gets (phase, role, bytes) of the
    boundary: what the latent part reads and writes at this network."""

    def __init__(self, fan_in: int, fan_out: int, role: str):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_out, fan_in) / math.sqrt(4 * fan_in))
        self.bias = nn.Parameter(torch.zeros(fan_out))
        self.role = role
        self.passes_gradient = role == "decoder"
        self.log: list | None = None

    def forward(self, x):
        return _uncounted_linear(x, self.weight, self.bias, self)

    def record(self, phase: str, inner, outer) -> None:
        """Forward: inner = the input, outer = the output; backward: their gradients."""
        if self.log is None:
            return
        if phase == "fwd":  # the latent part reads the output, writes a decoder's input
            self.log.append(("fwd", "read", footprint(outer)))
            if self.role == "decoder":
                self.log.append(("fwd", "write", footprint(inner)))
        else:  # it wrote the gradient at the output, reads the one at a decoder's input
            self.log.append(("bwd", "write", footprint(outer)))
            if self.role == "decoder":
                self.log.append(("bwd", "read", footprint(inner)))


class TrainBench(Bench):
    """The latent part of one training step of a bench_train workload: its fastvae model and
    eager recipe (and torch.compile of the recipe) around MockNetwork encoder and decoder;
    loss, then loss.backward()."""

    has_backward = True

    def __init__(self, workload):
        w = workload
        torch.manual_seed(0)
        self.workload = w
        self.encoder = MockNetwork(w.x_dim, 2 * w.latent, "encoder")
        self.decoder = MockNetwork(w.latent, w.x_dim, "decoder")
        self.x = torch.rand(w.batch, w.x_dim)
        pseudo = torch.rand(w.components, w.x_dim) if w.model == "vamp" else None
        setup = bench_train.Setup(w, self.encoder, self.decoder, self.x, pseudo)
        self.model = bench_train.fastvae_model(setup)
        self.pseudo = None if pseudo is None else nn.Parameter(pseudo.clone())
        loss = functools.partial(bench_train.eager_loss, w, self.encoder, self.decoder)
        self.losses = {"eager": loss, "compile": torch.compile(loss, dynamic=False)}
        self.log: list = []

    def forward(self, impl: str):
        if impl == "fastvae":
            return self.model(self.x).loss
        if impl == "eager":  # the minimum is taken from the recipe's boundary
            self.log.clear()
            self.encoder.log = self.decoder.log = self.log
        try:
            return self.losses[impl](self.x, self.pseudo)
        finally:
            self.encoder.log = self.decoder.log = None

    def backward(self, impl: str, outputs) -> None:
        if impl == "eager":
            self.encoder.log = self.decoder.log = self.log
        try:
            outputs.backward()
        finally:
            self.encoder.log = self.decoder.log = None

    def minimum(self) -> dict:
        """Forward: the networks' outputs and x read, the decoder's input and the loss (4 bytes)
        written; backward: the gradients at the decoder's input and the loss read and the
        forward's inputs again, the gradients at the networks' outputs written."""
        total = {(p, rw): 0 for p in ("fwd", "bwd") for rw in ("read", "write")}
        for phase, rw, nbytes in self.log:
            total[phase, rw] += nbytes
        x, loss = footprint(self.x), 4
        fwd_read = total["fwd", "read"] + x
        return {
            "fwd": {"read": fwd_read, "write": total["fwd", "write"] + loss},
            "bwd": {"read": total["bwd", "read"] + loss + fwd_read, "write": total["bwd", "write"]},
        }


def train_cases(workloads: dict | None = None) -> list[Case]:
    """The latent part of every bench_train workload at its CPU size (or of `workloads`)."""
    cases = []
    for name, w in (bench_train.WORKLOADS if workloads is None else workloads).items():
        elements = max(w.samples * w.batch * max(w.x_dim, w.latent), w.components * w.x_dim)
        make = functools.partial(TrainBench, w)
        recipe = (bench_train.eager_loss, MockNetwork, _Uncounted, TrainBench, repr(w))
        cases.append(Case("train", name, str(w), "", elements, make, recipe))
    return cases


def all_cases() -> list[Case]:
    return gaussian_cases() + iwae_cases() + train_cases()


# -- running -----------------------------------------------------------------------------------

IMPLS = ("fastvae", "eager", "compile")


def measure(
    case: Case,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    compile: bool = True,
    previous: dict | None = None,
) -> dict:
    """One case's counts: per implementation and phase ("fwd", "bwd") a summary
    (Recorder.summary, or inductor_counting's snapshot for "compile"), the minimum, and the
    implementations skipped with the reason. previous: case id -> the case in an earlier
    traffic file, whose compile counts are taken when its recipe hash is the same."""
    bench = case.make()
    recipe = case.recipe_hash()
    result = {
        "kind": case.kind, "name": case.name, "size": case.size, "tier": case.tier,
        "elements": case.elements, "phases": ["fwd", "bwd"] if bench.has_backward else ["fwd"],
        "recipe": recipe, "impls": {}, "skipped": {}, "seconds": {}, "reused": {},
    }  # fmt: skip
    earlier = (previous or {}).get(case.id) or {}
    too_large = bool(max_elements) and case.elements > max_elements
    for impl in IMPLS:
        if impl == "fastvae" and too_large:
            result["skipped"][impl] = (
                f"{case.elements} elements > --max-elements {max_elements}: too slow in the "
                "Triton interpreter"
            )
            continue
        if impl == "compile" and not compile:
            result["skipped"][impl] = "--no-compile"
            continue
        if impl == "compile" and too_large:  # a compile takes seconds: where it is compared
            result["skipped"][impl] = "no fastvae count to compare with (--max-elements)"
            continue
        reusable = recipe and earlier.get("recipe") == recipe
        if impl == "compile" and reusable and "compile" in earlier.get("impls", {}):
            result["impls"][impl] = earlier["impls"]["compile"]
            result["reused"][impl] = earlier.get("file", "an earlier traffic file")
            continue
        started = time.perf_counter()
        try:
            result["impls"][impl] = count_impl(bench, impl)
        except Exception as exc:
            if impl != "compile":
                raise
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            result["skipped"][impl] = f"torch.compile failed: {first_line[:300]}"
        else:
            result["seconds"][impl] = round(time.perf_counter() - started, 2)
    result["minimum"] = bench.minimum()
    return result


def previous_cases(path: Path | None) -> dict:
    """case id -> case of a traffic file (with "file": its name); {} if there is none."""
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    cases = {}
    for case in data.get("cases", []):
        case_id = f"{case['kind']}/{case['name']}/{case['size']}"
        cases[case_id] = {**case, "file": path.name}
    return cases


def latest_traffic_file(directory: Path = RESULTS_DIR) -> Path | None:
    """The newest traffic-<device>-<date>.json in `directory` (by date, then mtime)."""
    files = sorted(directory.glob("traffic-*-[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9].json"),
                   key=lambda p: (p.stem[-10:], p.stat().st_mtime))  # fmt: skip
    return files[-1] if files else None


def count_impl(bench: Bench, impl: str) -> dict:
    """The counts of one implementation of a case, per phase."""
    if impl == "compile":
        torch._dynamo.reset()
        with inductor_counting() as snapshot:
            outputs = bench.forward(impl)
            phases = {"fwd": snapshot()}
            if bench.has_backward:
                bench.backward(impl, outputs)
                phases["bwd"] = difference(snapshot(), phases["fwd"])
        return phases
    backend = "triton" if impl == "fastvae" else "auto"
    with fastvae.use_backend(backend), counting() as recorder:
        outputs = bench.forward(impl)
        mark = len(recorder.launches)
        if bench.has_backward:
            bench.backward(impl, outputs)
    phases = {"fwd": recorder.summary(0, mark)}
    if bench.has_backward:
        phases["bwd"] = recorder.summary(mark)
    return phases


def environment(args: argparse.Namespace) -> dict:
    commit, dirty = "unknown", None
    try:
        commit = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        pass
    return {
        "device": f"cpu {platform.machine()}, Triton interpreter",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "commit": commit,
        "dirty": dirty,
        "datetime": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "max_elements": args.max_elements,
        "compile": not args.no_compile,
    }


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _version(package: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None, cases: list[Case] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--max-elements", type=int, default=DEFAULT_MAX_ELEMENTS,
        help="no fastvae row for cases with a larger tensor (0: no limit)",
    )  # fmt: skip
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument(
        "--only", metavar="PATTERN", action="append",
        help="run the cases whose id (kind/name/size) matches (fnmatch)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="the traffic file to write")
    parser.add_argument(
        "--reuse", type=Path, metavar="FILE",
        help="take torch.compile's counts from this traffic file where the recipe is unchanged "
        "(default: the latest one in benchmarks/results)",
    )  # fmt: skip
    parser.add_argument("--recompile", action="store_true", help="reuse no compile counts")
    args = parser.parse_args(argv)
    check_interpreter()
    # What is counted is the Triton kernels and the recipes' aten ops: the CPU loops (compiled
    # code, which cannot run under the counting dispatch mode) stay off, or a failed attempt
    # at one would be counted besides the reference that then runs.
    _cpu_loops.ENABLED = False
    cases = all_cases() if cases is None else cases
    if args.only:
        cases = [c for c in cases if any(fnmatch.fnmatchcase(c.id, p) for p in args.only)]
    out = args.out or RESULTS_DIR / f"traffic-cpu-{datetime.now().date().isoformat()}.json"
    previous = {} if args.recompile else previous_cases(args.reuse or latest_traffic_file())
    started = time.perf_counter()
    results = []
    for case in cases:
        t0 = time.perf_counter()
        results.append(measure(case, args.max_elements, not args.no_compile, previous))
        print(summary_line(results[-1], time.perf_counter() - t0), flush=True)
    data = {
        "traffic": 1,
        "environment": environment(args),
        "seconds": round(time.perf_counter() - started, 1),
        "cases": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out} ({data['seconds']:.0f} s)")
    return out


def summary_line(result: dict, seconds: float) -> str:
    """One line per case: launches and bytes of each implementation over all phases."""
    parts = []
    minimum = sum(p["read"] + p["write"] for p in result["minimum"].values())
    for impl in IMPLS:
        phases = result["impls"].get(impl)
        if phases is None:
            parts.append(f"{impl} -")
            continue
        launches = sum(p["launches"] for p in phases.values())
        nbytes = sum(p.get("bytes", p.get("read", 0) + p.get("write", 0)) for p in phases.values())
        parts.append(f"{impl} {launches} launches {nbytes / 1024:.1f} KiB")
    name = f"{result['kind']} {result['name']} {result['size']}"
    if result["reused"]:
        parts.append(f"reused {', '.join(result['reused'])}")
    return (
        f"{name:50s} " + ", ".join(parts) + f", minimum {minimum / 1024:.1f} KiB ({seconds:.1f} s)"
    )


if __name__ == "__main__":
    main()
