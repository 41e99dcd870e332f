"""Host-side helpers shared by every kernel launch: operand layout, tile sizes, grad buffers."""

from __future__ import annotations

import functools
import importlib
import itertools
from typing import NamedTuple

import torch
from torch.library import wrap_triton

from fastvae._backend import interpreting
from fastvae.kernels import modes


class Operand(NamedTuple):
    """A tensor as a kernel reads it: base pointer and (row-dim-1, row-dim-2, column) strides."""

    tensor: torch.Tensor
    s1: int
    s2: int
    sd: int


class Layout(NamedTuple):
    n_rows: int
    R2: int
    D: int
    operands: list[Operand | None]
    sample_strides: list[int]  # of the `sampled` tensors of row_layout, along their dim 0
    copied: bool = False  # the operands are contiguous copies (no strides merged the rows)


def _collapse(sizes: list[int], strides: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """Merge adjacent leading dims wherever every operand's strides allow it."""
    out_sizes: list[int] = []
    out_strides: list[list[int]] = []
    for size, dim_strides in zip(sizes, zip(*strides, strict=True), strict=True):
        if size == 1:
            continue
        if out_sizes and all(
            prev == cur * size for prev, cur in zip(out_strides[-1], dim_strides, strict=True)
        ):
            out_sizes[-1] *= size
            out_strides[-1] = list(dim_strides)
        else:
            out_sizes.append(size)
            out_strides.append(list(dim_strides))
    return out_sizes, out_strides


def row_layout(
    shape: torch.Size, tensors: list, sampled: list | tuple = (), matrices: list | tuple = ()
) -> Layout:
    """Read every tensor, broadcast to `shape` (..., D), as rows of an (R1, R2, D) grid.

    Leading dims collapse into two row dims without copying where strides allow (broadcast,
    strided and transposed inputs included); where some operand prevents it, all are made
    contiguous. `sampled` tensors broadcast to (K, *shape) and are read a sample at a time:
    their operands (after those of `tensors`) are sample 0, their strides along K are
    Layout.sample_strides. `matrices` have the shape (*shape, D), a D x D matrix per row:
    their operands (last) hold the matrix, its row stride as sd (the column stride is the
    tensor's stride(-1)).
    """
    full = (-1, *shape)
    sampled = [None if t is None else t.expand(full) for t in sampled]
    for contiguous in (False, True):
        if contiguous:
            tensors = [None if t is None else t.expand(shape).contiguous() for t in tensors]
            sampled = [None if t is None else t.contiguous() for t in sampled]
            matrices = [None if t is None else t.contiguous() for t in matrices]
        views = [None if t is None else t.expand(shape) for t in tensors]
        views += [None if t is None else t.select(0, 0) for t in sampled]
        views += [None if t is None else t.select(-1, 0) for t in matrices]
        present = [v for v in views if v is not None]
        sizes, strides = _collapse(list(shape[:-1]), [list(v.stride()[:-1]) for v in present])
        if len(sizes) <= 2:
            break
    while len(sizes) < 2:
        sizes.insert(0, 1)
        strides.insert(0, [0] * len(present))
    by_operand = iter(zip(*strides, strict=True))
    operands = [None if v is None else Operand(v, *next(by_operand), v.stride(-1)) for v in views]
    first = len(views) - len(matrices)
    for i, matrix in enumerate(matrices, first):
        operands[i] = None if matrix is None else operands[i]._replace(tensor=matrix)
    sample_strides = [0 if t is None else t.stride(0) for t in sampled]
    return Layout(sizes[0] * sizes[1], sizes[1], shape[-1], operands, sample_strides, contiguous)


def operand_args(op: Operand | None, placeholder: torch.Tensor) -> tuple:
    """Kernel arguments of an operand: (pointer, s1, s2, sd); an absent one reads nothing."""
    return (placeholder, 0, 0, 0) if op is None else tuple(op)


def launch_rows(kernel, layout: Layout, *args, per_row: int = 0, **constexprs) -> None:
    """Run a row kernel, one program per BLOCK_R rows of `layout`:
    kernel(*operands, *args, n_rows, R2, D, **constexprs, BLOCK_R, BLOCK_D). Each operand
    passes (pointer, s1, s2, sd); the last `per_row` ones, one value a row (an incoming
    gradient (..., 1)), pass (pointer, s1, s2)."""
    blocks = tile(layout.n_rows, layout.D)
    n_tiled = len(layout.operands) - per_row
    wrap_triton(kernel)[grid(layout.n_rows, blocks["BLOCK_R"])](
        *(a for op in layout.operands[:n_tiled] for a in op),
        *(a for op in layout.operands[n_tiled:] for a in op[:3]),
        *args, layout.n_rows, layout.R2, layout.D, **constexprs, **blocks,
    )  # fmt: skip


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def tile(n_rows: int, D: int, samples: int = 1, per_thread: int = 8) -> dict:
    """Block sizes and warps for a (rows x columns) tile; larger tiles in the interpreter,
    whose cost is per program. On a GPU a tile holds up to per_thread elements for each thread
    of 8 warps (fewer for a kernel that keeps more values live per element, so that ptxas
    need not spill). A kernel that loops over `samples` in each program gets fewer rows a
    program on a GPU, so that about 2 programs per SM run where rows allow (a guess: never
    timed on a GPU)."""
    gpu_elements = 8 * 32 * per_thread
    elements = 16384 if interpreting() else gpu_elements
    block_d = min(_next_power_of_2(D), elements)
    block_r = min(elements // block_d, _next_power_of_2(n_rows))
    if samples > 1 and not interpreting():
        rows_per_program = max(1, n_rows // (2 * _sm_count()))
        block_r = min(block_r, 1 << rows_per_program.bit_length() - 1)
    return {
        "BLOCK_R": block_r,
        "BLOCK_D": block_d,
        "num_warps": 8 if block_r * block_d >= gpu_elements else 4,
    }


def samples_per_program(row_programs: int, samples: int) -> int:
    """How many of `samples` each program of a kernel that loops over them takes: all of them
    in the interpreter, whose cost is per program; on a GPU few enough that the row programs
    times the sample chunks make about 2 programs per SM (a guess: never timed on a GPU)."""
    if samples <= 1 or interpreting():
        return max(samples, 1)
    chunks = min(samples, -(-2 * _sm_count() // row_programs))
    return -(-samples // chunks)


@functools.cache
def _sm_count() -> int:
    """Streaming multiprocessors of the current GPU (an H100's 132 without one)."""
    if not torch.cuda.is_available():
        return 132
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def tril_tile(D: int) -> dict:
    """Block sizes and warps of the full-covariance kernels' (BLOCK_I x BLOCK_K) tiles of a
    D x D matrix. On a GPU at most 32 x 32 whatever D (D = 256: 8 x 8 tiles), at most 80
    registers a thread on sm_90 (64 x 64 tiles took 230-255, with the loads the compiler
    pipelines); in the interpreter, whose cost is per program and per tile op, up to 16384
    elements."""
    block_k = min(_next_power_of_2(D), 64 if interpreting() else 32)
    block_i = min(_next_power_of_2(D), 16384 // block_k if interpreting() else 32)
    return {
        "BLOCK_I": block_i,
        "BLOCK_K": block_k,
        "num_warps": max(1, min(4, block_i * block_k // 256)),
    }


def grid(n_rows: int, block_r: int) -> tuple[int]:
    return ((n_rows + block_r - 1) // block_r,)


def grad_buffer(like: torch.Tensor, shape: torch.Size, float64: bool = False) -> torch.Tensor:
    """Where a kernel writes an input's gradient in the broadcast shape: float32 (float64 with
    `float64`) when it will be summed down to a smaller input, else the input's dtype."""
    summed = torch.float64 if float64 else torch.float32
    dtype = like.dtype if like.shape == shape else summed
    return torch.empty(shape, dtype=dtype, device=like.device)


class GradTargets:
    """Where a backward kernel writes each input's gradient, as kernels.modes GRAD_* modes: not
    at all where it is not needed; as per-program float64 partial sums where the input is one
    row broadcast over every row (a learnable (D,) prior), in one (inputs, n_programs, D) buffer
    that finish() adds up with one sum and one cast for them all; else in a buffer of the
    broadcast `shape`, summed down to the input's shape by finish()."""

    def __init__(self, inputs, needs, shape: torch.Size, n_programs: int, float64=()):
        """float64: for each input, whether a buffer of the broadcast shape that will be
        summed down to it is float64 (else float32)."""
        self.inputs, self.shape = inputs, shape
        self.modes = [
            modes.GRAD_NONE if t is None or not need
            else modes.GRAD_PARTIAL if t.numel() == t.shape[-1]  # one row
            else modes.GRAD_ROWS
            for t, need in zip(inputs, needs)
        ]  # fmt: skip
        n_partial = self.modes.count(modes.GRAD_PARTIAL)
        self.partials = None
        if n_partial:
            device = next(t.device for t in inputs if t is not None)
            size = (n_partial, n_programs, shape[-1])
            self.partials = torch.empty(size, dtype=torch.float64, device=device)
        partials = iter(range(n_partial))
        self.buffers = [
            self.partials.select(0, next(partials)) if mode == modes.GRAD_PARTIAL
            else grad_buffer(t, shape, wide) if mode == modes.GRAD_ROWS
            else None
            for t, mode, wide in itertools.zip_longest(inputs, self.modes, float64)
        ]  # fmt: skip

    def finish(self) -> list[torch.Tensor | None]:
        """Each input's gradient in its shape and dtype (None where none was computed)."""
        sums = None
        if self.partials is not None:
            p = self.partials
            sums = (p.select(1, 0) if p.shape[1] == 1 else p.sum(1)).to(torch.float32)
            sums = iter(sums.unbind(0))
        grads = []
        for t, mode, buffer in zip(self.inputs, self.modes, self.buffers):
            if mode == modes.GRAD_PARTIAL:
                buffer = next(sums).view((1,) * (len(self.shape) - 1) + (self.shape[-1],))
            grads.append(reduce_grad(buffer, t))
        return grads


def reduce_grad(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    """A gradient in the broadcast shape, summed down to `like`'s shape and cast to its dtype."""
    if grad is None or like is None:
        return None
    if grad.shape != like.shape:
        same = grad.numel() == like.numel()  # only size-1 dims differ: a view, no launch
        if not same and grad.dim() < like.dim():  # summed over a dim `like` keeps as size 1
            grad = grad.view((1,) * (like.dim() - grad.dim()) + grad.shape)
        grad = grad.view(like.shape) if same else grad.sum_to_size(like.shape)
    return grad if grad.dtype == like.dtype else grad.to(like.dtype)  # no call when it matches


@functools.cache
def kernel_module(name: str):
    """fastvae.kernels.<name>, imported on first use (after TRITON_INTERPRET is read)."""
    return importlib.import_module(f"fastvae.kernels.{name}")


def gaussian_kernels():
    return kernel_module("gaussian")


def logmeanexp_kernels():
    return kernel_module("logmeanexp")


def mixture_kernels():
    return kernel_module("mixture")


def tril_kernels():
    return kernel_module("tril")
