"""torch.library registration of the fused ops, so that torch.compile traces them whole.

Each op is a pair of operators with one schema:
- fastvae::<name>, the torch reference, for every device, opaque to the compiler (shapes and
  dtypes from its fake kernel): torch.ops.fastvae.<name> for direct use.
- fastvae::<name>_triton, a triton_op: inductor traces its host code and schedules its
  wrap_triton launches itself (CUDA; in Triton's interpreter it runs eagerly only).
A forward pair gets its gradient from register_autograd, computed by a backward pair.

FusedOp runs an op. Outside a trace, either path runs through one plain autograd.Function of
its implementation, setup_context and backward: the dispatcher's Python layers cost about
100 us a call (3x a small op's eager time on a CPU) and wrap_triton's eager dispatch more.
Where an op's plain_autograd says so (small tensors), the torch path runs its reference under
autograd instead, which costs less than the Function's layers there.
Under a trace the Triton path is the triton_op, and the torch path the same autograd.Function,
which Dynamo traces through: inductor sees the reference's torch math and fuses it with the
code around it, forward and backward. An op's `traced_args` may first rewrite its arguments
there (the sample op draws its noise in the graph).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._library.triton import set_wrap_triton_enabled

from fastvae._backend import PLAIN_TENSORS
from fastvae.ops._launch import reduce_grad


def _scan(args) -> tuple[bool, bool]:
    """(whether a compiler traces args, as fastvae._backend.traced; whether autograd records the
    op: grad mode and an input that requires grad), in one pass: the common eager call pays a
    few microseconds for it."""
    tracing = torch.compiler.is_compiling()
    requires_grad = False
    for a in args:
        if isinstance(a, torch.Tensor):
            tracing = tracing or type(a) not in PLAIN_TENSORS
            requires_grad = requires_grad or a.requires_grad
    return tracing, requires_grad and torch.is_grad_enabled()


class FusedOp:
    """The torch-reference and Triton operators of one op; `op(triton, *args)` runs one."""

    def __init__(self, name: str, operators: tuple, impls: tuple, traced_args: Callable | None,
                 plain_autograd: Callable | None):  # fmt: skip
        self.name, self.operators, self.impls = name, operators, impls  # (reference, triton)
        self.traced_args, self.plain_autograd = traced_args, plain_autograd
        self.functions: tuple[type, type] | None = None  # autograd.Functions, register_autograd

    def __call__(self, triton: bool, *args):
        tracing, wants_grad = _scan(args)
        if tracing:
            if triton:
                return self.operators[True](*args)
            if self.traced_args is not None:  # draws no tensor that requires grad
                args = self.traced_args(*args)
            args = _distinct(args)
        if self.functions is not None and wants_grad:
            plain = not (triton or tracing) and self.plain_autograd is not None
            if not (plain and self.plain_autograd(*args)):
                return self.functions[triton].apply(*args)
        return self.impls[triton](*args)


def _distinct(args: tuple) -> tuple:
    """args with a tensor passed again replaced by a view of it: Dynamo traces an
    autograd.Function only where each tensor input is a distinct tensor."""
    tensors: list[torch.Tensor] = []
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            if any(a is t for t in tensors):
                a = a.view_as(a)
            tensors.append(a)
        out.append(a)
    return tuple(out)


def _function(name: str, impl: Callable, setup_context: Callable, backward: Callable,
              triton: bool) -> type[torch.autograd.Function]:  # fmt: skip
    """An autograd.Function of one path of an op: impl, then setup_context(ctx, inputs,
    output); backward(ctx, *grads)."""

    def forward(ctx, *args):
        output = impl(*args)
        _setup(ctx, setup_context, triton, args, output)
        return output

    methods = {"forward": staticmethod(forward), "backward": staticmethod(backward)}
    return type(f"{name}_{'triton' if triton else 'torch'}", (torch.autograd.Function,), methods)


def _setup(ctx, setup_context: Callable, triton: bool, inputs, output) -> None:
    ctx.triton = triton
    ctx.set_materialize_grads(False)
    setup_context(ctx, inputs, output)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def in_layout(t: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """t, or a copy of it into `expected` (an empty tensor of its shape) where their strides
    differ: what an operator returns must have the strides its fake kernel promised."""
    return t if t.stride() == expected.stride() else expected.copy_(t)


def _as_promised(result, promised, inputs: tuple):
    """The reference's result in the layout of the fake kernel's `promised` one, with a copy of
    each tensor that shares memory with an input or an earlier output: an operator may return
    neither (the reference's math sometimes passes a tensor through, e.g. d z / d mu = 1)."""
    seen = {_storage(t) for t in inputs if isinstance(t, torch.Tensor)}

    def fresh(t: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
        t = in_layout(t, expected)
        if _storage(t) in seen:
            t = expected.copy_(t)
        seen.add(_storage(t))
        return t

    if isinstance(result, torch.Tensor):
        return fresh(result, promised)
    return type(result)(fresh(t, e) for t, e in zip(result, promised, strict=True))


def fused_op(name: str, *, reference: Callable, triton: Callable, fake: Callable,
             traced_args: Callable | None = None,
             plain_autograd: Callable | None = None) -> FusedOp:  # fmt: skip
    """Register fastvae::name_triton (`triton`, whose annotations give the schema and which is
    its own fake kernel) and fastvae::name (`reference`, run with autocast off: it computes in
    float32 itself; `fake` gives its outputs' shapes, dtypes and strides). traced_args(*args)
    -> args: what the torch path runs on under a trace, where that differs.
    plain_autograd(*args) -> whether an eager call on the torch path runs `reference` under
    autograd (which then differentiates its torch ops) instead of the op's autograd.Function."""
    schema = torch.library.infer_schema(triton, mutates_args=())

    def reference_eager(*args):
        if torch._C._is_any_autocast_enabled():  # one call; the device's own check when on
            device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
            if torch.is_autocast_enabled(device):
                with torch.autocast(device, enabled=False):
                    return reference(*args)
        return reference(*args)

    def reference_operator(*args):
        return _as_promised(reference_eager(*args), fake(*args), args)

    def triton_eager(*args):
        with set_wrap_triton_enabled(False):  # launch the kernels directly, as triton_op does
            return triton(*args)

    reference_op = torch.library.custom_op(
        f"fastvae::{name}", reference_operator, mutates_args=(), schema=schema
    )
    reference_op.register_fake(fake)
    triton_op = torch.library.triton_op(f"fastvae::{name}_triton", triton, mutates_args=())
    operators, impls = (reference_op, triton_op), (reference_eager, triton_eager)
    return FusedOp(name, operators, impls, traced_args, plain_autograd)


def register_autograd(forward: FusedOp, setup_context: Callable, backward: Callable) -> None:
    """Differentiate `forward`: setup_context(ctx, inputs, output) and backward(ctx, *grads)
    see ctx.triton, which implementation ran."""
    forward.functions = tuple(
        _function(forward.name, impl, setup_context, backward, bool(triton))
        for triton, impl in enumerate(forward.impls)
    )
    for triton, op in enumerate(forward.operators):

        def setup(ctx, inputs, output, triton=bool(triton)):
            _setup(ctx, setup_context, triton, inputs, output)

        op.register_autograd(backward, setup_context=setup)


def _placeholder(inputs) -> torch.Tensor:
    device = next(t.device for t in inputs if t is not None)
    return torch.empty(0, device=device)


def reduced_grads(grads, inputs, needs) -> list[torch.Tensor]:
    """A backward operator's result: each gradient summed down to its input's shape and dtype,
    contiguous (zeros where needed but not computed: the input had no effect); an empty
    placeholder for an input that needs none. empty_grads is its fake kernel."""
    return [
        _placeholder(inputs) if not need or t is None  # one each: outputs may not alias
        else torch.zeros_like(t, memory_format=torch.contiguous_format) if g is None
        else reduce_grad(g, t).contiguous()
        for g, t, need in zip(grads, inputs, needs)
    ]  # fmt: skip


def empty_grads(inputs, needs) -> list[torch.Tensor]:
    """The fake kernel of a backward operator returning reduced_grads."""
    return [
        torch.empty(t.shape, dtype=t.dtype, device=t.device) if need and t is not None
        else _placeholder(inputs)
        for t, need in zip(inputs, needs)
    ]  # fmt: skip
