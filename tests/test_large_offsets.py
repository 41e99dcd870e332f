"""Offsets past 2**31 elements: a (4, 3) view whose columns lie 2**30 elements apart.

The buffer is 4 GiB of address space but only the few elements written are ever touched, so
this costs milliseconds; a kernel that computed column offsets in int32 would wrap around and
read out of bounds.
"""

import torch
from _helpers import assert_close

import fastvae

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
