"""The network-output convention the modules share."""

from __future__ import annotations

import torch


def split_pair(out: object, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A network's (a, b) output: a pair of tensors, or one tensor split in two on the last dim."""
    if isinstance(out, tuple | list) and len(out) == 2:
        a, b = out
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            return a, b
    elif isinstance(out, torch.Tensor):
        if out.dim() == 0 or out.shape[-1] % 2:
            raise ValueError(
                f"{what} returned one tensor of shape {tuple(out.shape)}; to split it in two "
                "its last dim must be even"
            )
        return out.chunk(2, dim=-1)
    raise TypeError(f"{what} must return a pair of tensors or one tensor to split in two; got "
                    f"{type(out).__name__}")  # fmt: skip
