"""Offsets past 2**31 elements: a (4, 3) view whose columns lie 2**30 elements apart.

The buffer is 4 GiB of address space but only the few elements written are ever touched, so
this costs milliseconds; a kernel that computed column offsets in int32 would wrap around and
read out of bounds.
"""

import torch
from _helpers import assert_close

import fastvae
from fastvae.ops.gaussian import sample

N, D, COLUMN_STRIDE = 4, 3, 1 << 30


def _far_apart_columns(device):
    buffer = torch.empty((D - 1) * COLUMN_STRIDE + N, dtype=torch.float16, device=device)
    for j in range(D):
        buffer[j * COLUMN_STRIDE : j * COLUMN_STRIDE + N] = torch.arange(N) * 0.5 + j
    return buffer.as_strided((N, D), (1, COLUMN_STRIDE))


def test_column_offsets_past_int32(path):
    z = _far_apart_columns(path[1])
    dense = z.float().contiguous()
    zeros = torch.zeros(D, device=path[1])
    means, logvars = torch.zeros(2, D, device=path[1]), torch.zeros(2, D, device=path[1])
    cases = {
        "gaussian_log_prob": (fastvae.gaussian_log_prob(z, zeros, zeros),
                              fastvae.gaussian_log_prob(dense, zeros, zeros)),
        "gaussian_kl": (fastvae.gaussian_kl(z, z), fastvae.gaussian_kl(dense, dense)),
        "mixture_log_prob": (fastvae.mixture_log_prob(z, means, logvars),
                             fastvae.mixture_log_prob(dense, means, logvars)),
    }  # fmt: skip
    for name, (strided, expected) in cases.items():
        assert_close(name, strided, expected, rtol=1e-5, atol=1e-5)


def test_noise_index_past_int32(path):
    """Sample K of a stream starting near 2**31 latents: the backward regenerates the noise at
    the forward's indices (an int32 sample offset would wrap and draw other noise)."""
    mu = torch.randn(64, 1024, device=path[1], requires_grad=True)
    logvar = torch.randn(64, 1024, device=path[1], requires_grad=True)
    seed = torch.tensor([5], device=path[1])
    z, _ = sample(mu, logvar, num_samples=2, seed=seed, first_sample=(1 << 15) - 1)
    z.sum().backward()  # an expanded (stride-0) incoming gradient
    assert_close("grad logvar", logvar.grad, (0.5 * (z - mu)).sum(0), rtol=1e-5, atol=1e-5)
    assert_close("grad mu", mu.grad, torch.full_like(mu, 2.0))
