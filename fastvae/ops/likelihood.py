"""Importance-sampled log-likelihood estimates that stream over chunks of samples."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fastvae import _validate as V
from fastvae.ops.gaussian import draw_seed, noise_block
from fastvae.ops.iwae import importance_sample_chunk

# The default chunk: about this many elements (4 MiB in fp32) per chunk of z (k, B, D) or of
# what the decoder makes of it, taken as k copies of x (an image model's logits).
CHUNK_ELEMENTS = 1 << 20


def _check_chunk_size(chunk_size) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int >= 1 or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


def _encoded(encode: Callable, x) -> tuple[torch.Tensor, torch.Tensor]:
    out = encode(x)
    if not (isinstance(out, tuple | list) and len(out) == 2):
        raise TypeError(f"encode(x) must return (mu, logvar); got {type(out).__name__}")
    return out[0], out[1]


def _stream(m: torch.Tensor, s: torch.Tensor, log_w: torch.Tensor):
    """Fold a chunk of log weights (k, ...) into the running (max m, sum s of exp(. - pivot)),
    pivot = m where finite, else 0 (no inf - inf)."""
    new_m = torch.maximum(m, log_w.amax(0))
    pivot = torch.where(new_m.isinf(), 0.0, new_m)
    return new_m, s * torch.exp(m - pivot) + torch.exp(log_w - pivot).sum(0)


@torch.no_grad()
def estimate_log_likelihood(encode, log_likelihood, x, num_samples=250, *, chunk_size=None,
                            prior=None):  # fmt: skip
    """Per-example importance-sampled estimate of log p(x) with K = num_samples samples.

    encode(x) -> (mu, logvar), each (B, D) (any batch shape); log_likelihood(x, z) -> log
    p(x | z) of shape (k, B) for z of shape (k, B, D). Samples are drawn and folded in chunks
    of chunk_size (default: about 1M elements of z, or of k copies of x when x is larger, as
    the decoder's output for the chunk is; rounded up to whole noise blocks of about 65k latent
    elements) with a running (max, sum), so memory is O(chunk * B * max(D, x's size per row))
    however large K is; the noise does not depend on the chunking.
    prior: as in importance_sample. Returns (B,), float32 (float64 for float64).
    """
    V.check_callable("encode", encode)
    V.check_callable("log_likelihood", log_likelihood)
    num_samples = V.check_num_samples(num_samples, required=True)
    chunk_size = _check_chunk_size(chunk_size)
    mu, logvar = _encoded(encode, x)
    named = {"mu (from encode)": mu, "logvar (from encode)": logvar}
    for name, value in named.items():
        V.check_tensor(name, value)
    shape = V.broadcast_shape(named)
    if chunk_size is None:
        per_sample = max(shape.numel(), x.numel() if isinstance(x, torch.Tensor) else 0, 1)
        chunk_size = max(1, CHUNK_ELEMENTS // per_sample)
    block = noise_block(shape)  # chunks start on noise-block boundaries
    chunk_size = min(num_samples, -(-chunk_size // block) * block)
    seed = draw_seed(None, mu.device)
    dtype = torch.float64 if torch.float64 in (mu.dtype, logvar.dtype) else torch.float32
    m = torch.full(shape[:-1], -math.inf, dtype=dtype, device=mu.device)
    s = torch.zeros_like(m)
    for first in range(0, num_samples, chunk_size):
        k = min(chunk_size, num_samples - first)
        z, log_ratio = importance_sample_chunk(mu, logvar, k, prior, seed=seed, first_sample=first)
        log_px = log_likelihood(x, z)
        if not isinstance(log_px, torch.Tensor) or log_px.shape != log_ratio.shape:
            got = tuple(log_px.shape) if isinstance(log_px, torch.Tensor) else type(log_px)
            raise ValueError(
                f"log_likelihood(x, z) must return (k, *batch) = {tuple(log_ratio.shape)}; "
                f"got {got}"
            )
        if log_px.device != log_ratio.device:
            raise ValueError(
                f"log_likelihood(x, z) returned a tensor on {log_px.device}; z is on "
                f"{log_ratio.device}"
            )
        m, s = _stream(m, s, log_px.to(dtype) + log_ratio)
    return m + torch.log(s) - math.log(num_samples)
