"""Fused CPU loops: an op's per-element math compiled by inductor for large CPU tensors.

On the CPU the torch reference runs one ATen kernel per step of its formulas, each a pass over
the broadcast tensors. A CpuLoop holds the same per-element math as the op's Triton kernel,
written in torch ops over an (R1, R2, D) grid of its operands (one broadcast along a dim has
size 1 there: x (B, D) against K samples is read in place), which torch.compile (inductor)
turns into one vectorized C++ loop a pass. It runs on CPU tensors of at least the loop's
min_elements broadcast elements, in float32 math (not for float64), outside a compiler's
trace (a traced call fuses the reference itself). Smaller calls keep the reference: a loop's
call costs about 40 us more (the compiled call, the operands' layout).

Each loop is compiled on first use, once per operand dtypes and pattern of size-1 dims (sizes
are dynamic; Dynamo compiles once more where the first call's sizes were equal, and for
inference tensors): a few seconds in a process's first call, less from inductor's disk cache.
FASTVAE_CPU_LOOPS=0 in the environment turns the loops off; if compiling fails (no C++
compiler, say), a warning says so once and the reference runs from then on.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

from fastvae._backend import traced
from fastvae.ops._launch import row_layout
from fastvae.reference import expm1

ENABLED = os.environ.get("FASTVAE_CPU_LOOPS", "1").lower() not in ("0", "false", "off", "no")
failure: str | None = None  # why the loops were turned off, once compiling failed
# Inductor decides whether a loop runs on several threads from the sizes of the call that
# compiled it, and sizes are dynamic here: a loop first compiled for a small call would run
# on one thread ever after. Dynamic threads leave it to OpenMP at run time.
OPTIONS = {"cpp.dynamic_threads": True}


def _operands(shape: torch.Size, tensors: list) -> list[torch.Tensor | None]:
    """Each tensor broadcast to `shape` (..., D) as an (R1, R2, D) grid, compact: a dim it is
    broadcast along has size 1, and it is contiguous (a strided operand is copied). Dynamo then
    compiles a loop once per dtypes and pattern of size-1 dims, never per strides. A bool
    operand comes as its bytes (uint8): inductor's loops over bool ran 5x slower."""
    tensors = [
        t.view(torch.uint8) if t is not None and t.dtype == torch.bool else t for t in tensors
    ]
    views = _contiguous_operands(shape, tensors)
    return _strided_operands(shape, tensors) if views is None else views


def _contiguous_operands(shape: torch.Size, tensors: list) -> list[torch.Tensor | None] | None:
    """_operands of contiguous tensors, each of `shape`, of its trailing dims (broadcast over
    the leading ones: one size of them), or of shape[:-1] + (1,) (one value a row), as views;
    None for any other case. (row_layout's grid for them, without its cost.)"""
    D = shape[-1]
    rows = shape.numel() // D
    inner = rows
    for t in tensors:
        if t is not None and t.shape != shape and t.shape == shape[len(shape) - t.dim() :]:
            if inner not in (rows, t.numel() // D):  # two different trailing shapes
                return None
            inner = t.numel() // D
    views = []
    for t in tensors:
        if t is None:
            views.append(None)
            continue
        if not t.is_contiguous():
            return None
        if t.shape == shape:
            views.append(t.view(rows // inner, inner, D))
        elif t.dim() == len(shape) and t.shape[:-1] == shape[:-1] and t.shape[-1] == 1:
            views.append(t.view(rows // inner, inner, 1))
        elif t.numel() == inner * D and t.shape == shape[len(shape) - t.dim() :]:
            views.append(t.view(1, inner, D))
        else:
            return None
    return views


def _strided_operands(shape: torch.Size, tensors: list) -> list[torch.Tensor | None]:
    """_operands by row_layout. A grid dim that every operand is broadcast along (expanded
    inputs) keeps its size in the first operand (a copy), so that the grid stays `shape`'s."""
    layout = row_layout(shape, tensors)
    size = (layout.n_rows // layout.R2, layout.R2, layout.D)
    present = [(op.s1, op.s2, op.sd) for op in layout.operands if op is not None]
    shared = [all(strides[dim] == 0 for strides in present) for dim in range(3)]
    out = []
    for op in layout.operands:
        if op is not None:
            strides = (op.s1, op.s2, op.sd)
            first = not any(t is not None for t in out)
            compact = [
                n if stride != 0 or (first and everyone) else 1
                for n, stride, everyone in zip(size, strides, shared)
            ]
            op = op.tensor.as_strided(compact, strides, op.tensor.storage_offset()).contiguous()
        out.append(op)
    return out


def expanded(t: torch.Tensor) -> bool:
    """Whether t is a view broadcast along a dim (stride 0, size > 1), as torch's expand gives:
    its gradient must be per element, not summed to a size-1 dim."""
    return any(stride == 0 and n > 1 for n, stride in zip(t.shape, t.stride()))


def _pattern(t: torch.Tensor | None) -> tuple | None:
    """What Dynamo compiles an operand of _operands for: its dtype and size-1 dims."""
    return None if t is None else (t.dtype, *(n == 1 for n in t.shape))


class CpuLoop:
    """fn(*operands, *flags) -> a result or a tuple of them (None for one not wanted), each per
    element (R1, R2, D), per row (R1, R2), a scalar, or an operand's gradient summed to its
    compact grid in the loop (sum_to_size): compiled on first use; it runs on at least
    min_elements broadcast elements. With on_grid=False the operands are the tensors
    themselves (contiguous) and the results come back as fn gives them; gradients=True marks
    a backward's loop."""

    def __init__(self, fn: Callable, min_elements: int, *, on_grid=True, gradients=False):
        self.fn, self.min_elements, self.on_grid, self.compiled = fn, min_elements, on_grid, None
        self.refused: set = set()  # signatures Dynamo would not compile again (its limit)
        # A loop's results carry no autograd history: a backward that must be differentiable
        # again (create_graph: grad mode on) runs the reference's torch ops instead.
        self.gradients = gradients

    def applies(self, shape: torch.Size, tensors: list) -> bool:
        """Whether the loop runs on these tensors (None among them: absent), broadcast to
        `shape`: CPU tensors, none float64 (float64 math stays the reference's). The size
        comes first: small calls, where the loops never run, pay one comparison."""
        if shape.numel() < max(self.min_elements, 1) or not ENABLED or failure is not None:
            return False
        if self.gradients and torch.is_grad_enabled():  # a backward with create_graph
            return False
        present = [t for t in tensors if t is not None]
        if traced(present):
            return False
        return all(t.device.type == "cpu" and t.dtype != torch.float64 for t in present)

    def __call__(self, shape: torch.Size, tensors: list, *flags):
        """fn's results in `shape` ((R1, R2) ones as shape[:-1]), or None where the loop does
        not run: the reference runs instead."""
        if not self.applies(shape, tensors):
            return None
        # (whether an operand requires grad is part of what Dynamo compiles for)
        tensors = [None if t is None else t.detach() for t in tensors]
        operands = _operands(shape, tensors) if self.on_grid else [t.contiguous() for t in tensors]
        signature = (*(_pattern(t) for t in operands), *flags)
        if signature in self.refused:
            return None
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=True, fullgraph=True, options=OPTIONS)
        try:
            with torch.no_grad():  # (grad mode is part of what Dynamo compiles a loop for)
                result = self.compiled(*operands, *flags)
        except Exception as error:  # inductor's failures have no common type
            if type(error).__name__ == "FailOnRecompileLimitHit":  # Dynamo's limit per function
                self.refused.add(signature)  # keeps the reference; the others keep their loop
            else:
                _turn_off(error)
            return None
        if not self.on_grid:
            return result
        if isinstance(result, torch.Tensor):
            return _in_shape(result, shape)
        return tuple(None if r is None else _in_shape(r, shape) for r in result)


def _in_shape(result: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A loop's result on the (R1, R2, D) grid in `shape`: per row (2 dims) as shape[:-1], per
    element (3 dims) as `shape`; a scalar, or a gradient summed to its operand's compact grid
    (fewer elements), as it is (reduced_grads views it as its input)."""
    if result.dim() == 2:
        return result.view(shape[:-1])
    return result.view(shape) if result.numel() == shape.numel() else result


def _turn_off(error: Exception) -> None:
    global failure
    failure = f"{type(error).__name__}: {error}"
    warnings.warn(
        "fastvae: a fused CPU loop failed (compiling it, most likely), so the ops' torch "
        "reference runs from now on (slower on large CPU tensors; FASTVAE_CPU_LOOPS=0 skips "
        f"the attempt): {failure}",
        RuntimeWarning,
        stacklevel=3,
    )


# -- per-element helpers: float32 accuracy in both tails ---------------------------------------
# Inductor stores a value computed with a transcendental in a buffer of its own (a pass more)
# where the value is used twice, so the helpers use each one once where they can; constants are
# literals (Dynamo makes a global float an input of the compiled code).


def _twice_atanh(s: torch.Tensor) -> torch.Tensor:
    """2 atanh(s) for |s| <= 1/3, by its series to s^15 (the rest < 2e-8 of it): log1p(y)
    is 2 atanh(y / (2 + y)), about twice as fast as a vectorized log1p."""
    s2 = s * s
    p = 1.0 / 15.0
    for n in (13, 11, 9, 7, 5, 3, 1):
        p = s2 * p + 1.0 / n
    return 2.0 * s * p


def log1p_exp_neg(a: torch.Tensor) -> torch.Tensor:
    """log(1 + e^-a) for a >= 0 (0 for a = inf)."""
    return _twice_atanh(1.0 / (1.0 + 2.0 * torch.exp(a)))


def softplus(t: torch.Tensor) -> torch.Tensor:
    """log(1 + e^t) for any t: max(t, 0) + log1p(e^-|t|)."""
    return t.clamp(min=0.0) + log1p_exp_neg(t.abs())


def log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 - e^-d) for d >= 0, from q = 1 - e^-d: log q up to ln 2, beyond it log1p(q - 1)
    (q >= 1/2: q - 1 is exact)."""
    q = -expm1(-d)
    return torch.where(d <= 0.6931471805599453, torch.log(q), _twice_atanh((q - 1.0) / (q + 1.0)))
