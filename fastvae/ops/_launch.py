"""Host-side helpers shared by every kernel launch: operand layout, tile sizes, grad buffers."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

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
    return Layout(sizes[0] * sizes[1], sizes[1], shape[-1], operands, sample_strides)


def operand_args(op: Operand | None, placeholder: torch.Tensor) -> tuple:
    """Kernel arguments of an operand: (pointer, s1, s2, sd); an absent one reads nothing."""
    return (placeholder, 0, 0, 0) if op is None else tuple(op)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def tile(n_rows: int, D: int, samples: int = 1) -> dict:
    """Block sizes and warps for a (rows x columns) tile; larger tiles in the interpreter,
    whose cost is per program. A kernel that loops over `samples` in each program gets
    fewer rows a program on a GPU, so that at least ~2 programs per SM run where rows allow."""
    elements = 16384 if interpreting() else 2048
    block_d = min(_next_power_of_2(D), elements)
    block_r = min(elements // block_d, _next_power_of_2(n_rows))
    if samples > 1 and not interpreting():
        block_r = min(block_r, 1 << max(n_rows // 264, 1).bit_length() - 1)
    return {
        "BLOCK_R": block_r,
        "BLOCK_D": block_d,
        "num_warps": 8 if block_r * block_d >= 2048 else 4,
    }


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


def grad_buffer(like: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Where a kernel writes an input's gradient in the broadcast shape: float32 when it will be
    summed down to a smaller input, else the input's dtype."""
    dtype = like.dtype if like.shape == shape else torch.float32
    return torch.empty(shape, dtype=dtype, device=like.device)


def grad_target(like: torch.Tensor | None, need: bool, shape: torch.Size, n_programs: int):
    """(kernels.modes GRAD_* mode, buffer) for the gradient of input `like` (None: absent) of a
    kernel over `shape` in n_programs row blocks: none where not needed;
    (n_programs, D) float64 partial sums where the input is one row broadcast over every row
    (a learnable (D,) prior), added up by finish_grad; else a buffer in the broadcast `shape`."""
    if like is None or not need:
        return modes.GRAD_NONE, None
    if like.numel() == like.shape[-1]:  # one row, broadcast over all of them
        partials = torch.empty((n_programs, shape[-1]), dtype=torch.float64, device=like.device)
        return modes.GRAD_PARTIAL, partials
    return modes.GRAD_ROWS, grad_buffer(like, shape)


def finish_grad(mode: int, buffer: torch.Tensor | None, like: torch.Tensor | None, shape):
    """An input's gradient from grad_target's buffer: partial sums added up, then summed down
    to `like`'s shape and cast to its dtype (reduce_grad); None where none was computed."""
    if mode == modes.GRAD_PARTIAL:
        summed = buffer[0] if buffer.shape[0] == 1 else buffer.sum(0)
        buffer = summed.view((1,) * (len(shape) - 1) + (shape[-1],))
    return reduce_grad(buffer, like)


def reduce_grad(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    """A gradient in the broadcast shape, summed down to `like`'s shape and cast to its dtype."""
    if grad is None or like is None:
        return None
    if grad.shape != like.shape:
        grad = grad.sum_to_size(like.shape)
    return grad.to(like.dtype)


@functools.cache
def gaussian_kernels():
    """fastvae.kernels.gaussian, imported on first use (after TRITON_INTERPRET is read)."""
    from fastvae.kernels import gaussian

    return gaussian


@functools.cache
def logmeanexp_kernels():
    """fastvae.kernels.logmeanexp, imported on first use (after TRITON_INTERPRET is read)."""
    from fastvae.kernels import logmeanexp

    return logmeanexp


@functools.cache
def mixture_kernels():
    """fastvae.kernels.mixture, imported on first use (after TRITON_INTERPRET is read)."""
    from fastvae.kernels import mixture

    return mixture


@functools.cache
def tril_kernels():
    """fastvae.kernels.tril, imported on first use (after TRITON_INTERPRET is read)."""
    from fastvae.kernels import tril

    return tril
