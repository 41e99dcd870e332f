"""Argument checks shared by every op: clear errors that name the argument and what was expected."""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
MAX_BINS = 1 << 24  # bin indices are exact in float32 up to here


class Meta(NamedTuple):
    """What the shape, dtype and device checks read of a tensor: these checks take a Meta
    wherever they take a tensor, so that their outcome can be cached per signature."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


def _shape(shape: torch.Size) -> str:
    return str(tuple(shape))


def check_tensor(name: str, value: object, allow_scalar: bool = False) -> torch.Tensor:
    """A floating-point tensor with at least one (latent) dimension, unless allow_scalar."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {value.dtype}"
        )
    if value.dim() == 0 and not allow_scalar:
        raise ValueError(f"{name} must have at least one dimension (the latent one), got a scalar")
    return value


def check_data_tensor(name: str, value: object, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    """Data: a tensor of a floating-point dtype or one of `dtypes`, with at least one dimension."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES + dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES + dtypes)
        raise TypeError(f"{name} must be a tensor of one of {names}; got {value.dtype}")
    if value.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    return value


def check_same_device(named: dict[str, torch.Tensor | None]) -> torch.device:
    """All given tensors live on one device; returns it."""
    items = [(n, t) for n, t in named.items() if t is not None]
    first_name, first = items[0]
    for name, tensor in items[1:]:
        if tensor.device != first.device:
            raise ValueError(
                f"{name} is on {tensor.device} but {first_name} is on {first.device}; "
                "all tensors must be on one device"
            )
    if first.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{first_name} is on {first.device}; fastvae supports cpu and cuda")
    return first.device


def broadcast_shapes(*shapes) -> torch.Size | None:
    """The broadcast of `shapes`, or None where they do not broadcast (plain tuples: several
    times faster than torch.broadcast_shapes, which matters on small tensors)."""
    ndim = max(len(s) for s in shapes)
    out = [1] * ndim
    for shape in shapes:
        for i, size in enumerate(shape, ndim - len(shape)):
            if size != out[i]:
                if out[i] != 1 and size != 1:
                    return None
                out[i] = size if out[i] == 1 else out[i]
    return torch.Size(out)


def broadcast_shape(named: dict[str, torch.Tensor | None]) -> torch.Size:
    """The common shape of the given tensors under broadcasting."""
    items = [(n, t) for n, t in named.items() if t is not None]
    shape = items[0][1].shape
    seen = items[0][0]
    for name, tensor in items[1:]:
        common = broadcast_shapes(shape, tensor.shape)
        if common is None:
            raise ValueError(
                f"{name} of shape {_shape(tensor.shape)} does not broadcast with {seen} "
                f"(shape {_shape(shape)})"
            )
        shape = common
        seen = f"{seen} and {name}"
    return shape


def check_broadcasts_to(name: str, tensor: torch.Tensor | None, shape: torch.Size, what: str):
    """`tensor` broadcasts to `shape` without enlarging it."""
    if tensor is None:
        return
    if broadcast_shapes(tensor.shape, shape) != shape:
        raise ValueError(
            f"{name} of shape {_shape(tensor.shape)} must broadcast to {what} {_shape(shape)}"
        )


def check_exact_shape(name: str, tensor: torch.Tensor | None, shape: torch.Size, what: str):
    if tensor is not None and tensor.shape != shape:
        raise ValueError(
            f"{name} must have the shape of {what}, {_shape(shape)}; got {_shape(tensor.shape)}"
        )


def check_num_samples(num_samples: object, required: bool = False) -> int | None:
    if num_samples is None and not required:
        return None
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise TypeError(f"num_samples must be an int >= 1, got {type(num_samples).__name__}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return int(num_samples)


def check_bins(bins: object) -> int:
    """A number of bins: an int in [2, MAX_BINS]."""
    if isinstance(bins, bool) or not isinstance(bins, numbers.Integral):
        raise TypeError(f"bins must be an int >= 2, got {type(bins).__name__}")
    if not 2 <= bins <= MAX_BINS:
        raise ValueError(f"bins must be an int in [2, 2^24], got {bins}")
    return int(bins)


def check_optional_bool(name: str, value: object) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be None, True or False, got {type(value).__name__}")
    return value


def check_generator(generator: object, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(
            f"generator is for {generator.device.type} but the tensors are on {device}; "
            "pass a generator of the tensors' device"
        )


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """`value` is one of the strings `choices`; returns it."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def check_nonnegative_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float >= 0, got {type(value).__name__}")
    value = float(value)
    if not value >= 0.0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite float >= 0, got {value}")
    return value


def check_callable(name: str, value: object) -> None:
    """A network (an nn.Module) or any function."""
    if not callable(value):
        raise TypeError(
            f"{name} must be callable (an nn.Module or a function), got {type(value).__name__}"
        )


def module_device(module: object) -> torch.device | None:
    """The device of a module's first parameter or buffer; None for a module without any, or
    a plain function."""
    if not isinstance(module, torch.nn.Module):
        return None
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return None


def module_float_dtype(module: object) -> torch.dtype:
    """The dtype of a module's first floating-point parameter; float32 for a module without
    one, or a plain function."""
    if isinstance(module, torch.nn.Module):
        for tensor in module.parameters():
            if tensor.is_floating_point():
                return tensor.dtype
    return torch.float32


def check_module_device(name: str, tensor: torch.Tensor, module: object, owner: str) -> None:
    """`tensor` lives where `module`'s parameters do (anything goes for a plain function)."""
    device = module_device(module)
    if device is not None and tensor.device != device:
        raise ValueError(
            f"{name} is on {tensor.device} but the {owner}'s parameters are on {device}; "
            "move one of them"
        )
