"""Full-covariance Gaussian kernels: z = mu + L eps and KL(N(mu, L L^T) || N(0, I)), forward and
backward.

mu, eps and the incoming gradients are read as rows of a broadcast (R1, R2, D) layout
(kernels/common.py); row r of scale_tril is a D x D matrix whose element (i, k) sits at
row_offset(r) + i * si + k * sk. Only its lower triangle (k <= i) is ever loaded: the upper
one is ignored. A program takes one row and a block of matrix rows i (forward) or columns k
(backward), and loops over the other index in blocks, so a tile is BLOCK_I x BLOCK_K whatever
D. Products are summed elementwise in float32 (no tl.dot, so no TF32). Noise is philox
N(0, 1) keyed by a seed and the element's index r * D + k in z, regenerated in backward.
"""

import triton
import triton.language as tl

from .common import row_offsets
from .gaussian import _noise


@triton.jit
def _lower(i, k, D):
    """(BLOCK_I, BLOCK_K) mask of the lower triangle, k <= i < D."""
    return (i < D)[:, None] & (k[None, :] <= i[:, None])


@triton.jit
def tril_fwd_kernel(
    mu_ptr, mu_s1, mu_s2, mu_sd,
    eps_ptr, eps_s1, eps_s2, eps_sd,
    L_ptr, L_s1, L_s2, L_si, L_sk,
    seed_ptr, z_ptr, kl_ptr, R2, D,
    HAS_EPS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """z_i = mu_i + sum_{k <= i} L_ik eps_k for the dims i of block program_id(1) of row
    program_id(0), and that block's part of the row's KL, at kl[row * n_blocks + block]:
    (sum_i mu_i^2 + sum_{k <= i} L_ik^2 - 1 - 2 log|L_ii|) / 2."""
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    i = block.to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_mask = i < D
    eps_row = row_offsets(row, R2, eps_s1, eps_s2)
    L_row = L_ptr + row_offsets(row, R2, L_s1, L_s2)
    seed = 0
    if not HAS_EPS:
        seed = tl.load(seed_ptr)
    acc = tl.zeros([BLOCK_I], tl.float32)
    squares = tl.zeros([BLOCK_I], tl.float32)
    for k0 in range(0, tl.minimum((block + 1) * BLOCK_I, D), BLOCK_K):  # k <= i only
        k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        L = tl.load(L_row + i[:, None] * L_si + k[None, :] * L_sk, mask=_lower(i, k, D),
                    other=0.0).to(tl.float32)  # fmt: skip
        eps = _noise(eps_ptr, eps_row + k * eps_sd, seed, row * D + k, k < D, HAS_EPS)
        acc += tl.sum(L * eps[None, :], axis=1)
        squares += tl.sum(L * L, axis=1)
    mu = tl.load(mu_ptr + row_offsets(row, R2, mu_s1, mu_s2) + i * mu_sd, mask=i_mask,
                 other=0.0).to(tl.float32)  # fmt: skip
    diag = tl.load(L_row + i * (L_si + L_sk), mask=i_mask, other=1.0).to(tl.float32)
    tl.store(z_ptr + row * D + i, (mu + acc).to(z_ptr.dtype.element_ty), mask=i_mask)
    kl = tl.where(i_mask, mu * mu + squares - 1.0 - 2.0 * tl.log(tl.abs(diag)), 0.0)
    tl.store(kl_ptr + row * tl.num_programs(1) + block, 0.5 * tl.sum(kl, axis=0))


@triton.jit
def tril_bwd_kernel(
    mu_ptr, mu_s1, mu_s2, mu_sd,
    eps_ptr, eps_s1, eps_s2, eps_sd,
    gz_ptr, gz_s1, gz_s2, gz_sd,
    gkl_ptr, gkl_s1, gkl_s2,
    L_ptr, L_s1, L_s2, L_si, L_sk,
    seed_ptr, gmu_ptr, gL_ptr, geps_ptr, R2, D,
    HAS_GZ: tl.constexpr, HAS_GKL: tl.constexpr, HAS_EPS: tl.constexpr,
    WANT_GMU: tl.constexpr, WANT_GL: tl.constexpr, WANT_GEPS: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The gradients of the dims k of block program_id(1) of row program_id(0), from g_z and
    the KL's g: mu_k's (g_z_k + g mu_k), eps_k's (sum_{i >= k} g_z_i L_ik), and column k of
    L's, g_z_i eps_k + g (L_ik - [i = k] / L_kk) below the diagonal and 0 above it. Each
    written contiguous: (n_rows, D), and (n_rows, D, D) for L."""
    row = tl.program_id(0).to(tl.int64)
    k0 = tl.program_id(1).to(tl.int64) * BLOCK_K
    k = k0 + tl.arange(0, BLOCK_K)
    k_mask = k < D
    gz_row = row_offsets(row, R2, gz_s1, gz_s2)
    L_row = L_ptr + row_offsets(row, R2, L_s1, L_s2)
    g = 0.0  # the KL's incoming gradient
    if HAS_GKL:
        g = tl.load(gkl_ptr + row_offsets(row, R2, gkl_s1, gkl_s2)).to(tl.float32)
    if WANT_GMU:
        g_mu = tl.zeros([BLOCK_K], tl.float32)
        if HAS_GZ:
            g_mu = tl.load(gz_ptr + gz_row + k * gz_sd, mask=k_mask, other=0.0).to(tl.float32)
        if HAS_GKL:
            mu_off = row_offsets(row, R2, mu_s1, mu_s2) + k * mu_sd
            g_mu += g * tl.load(mu_ptr + mu_off, mask=k_mask, other=0.0).to(tl.float32)
        tl.store(gmu_ptr + row * D + k, g_mu.to(gmu_ptr.dtype.element_ty), mask=k_mask)
    USES_L: tl.constexpr = WANT_GEPS or (WANT_GL and HAS_GKL)
    gL_row = gL_ptr + row * D * D
    if WANT_GL:
        eps = tl.zeros([BLOCK_K], tl.float32)
        if HAS_GZ:
            seed = 0
            if not HAS_EPS:
                seed = tl.load(seed_ptr)
            eps_off = row_offsets(row, R2, eps_s1, eps_s2) + k * eps_sd
            eps = _noise(eps_ptr, eps_off, seed, row * D + k, k_mask, HAS_EPS)
        inv_diag = tl.zeros([BLOCK_K], tl.float32)
        if HAS_GKL:
            diag = tl.load(L_row + k * (L_si + L_sk), mask=k_mask, other=1.0).to(tl.float32)
            inv_diag = 1.0 / diag
        for i0 in range(0, k0, BLOCK_I):  # matrix rows above this block's diagonal: zeros
            i = i0 + tl.arange(0, BLOCK_I)
            zeros = tl.zeros([BLOCK_I, BLOCK_K], gL_ptr.dtype.element_ty)
            tl.store(gL_row + i[:, None] * D + k[None, :], zeros,
                     mask=(i < k0)[:, None] & k_mask[None, :])  # fmt: skip
    g_eps = tl.zeros([BLOCK_K], tl.float32)
    if WANT_GL or WANT_GEPS:
        for i0 in range(k0, D, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            lower = _lower(i, k, D)
            g_z = tl.zeros([BLOCK_I], tl.float32)
            if HAS_GZ:
                g_z = tl.load(gz_ptr + gz_row + i * gz_sd, mask=i < D, other=0.0).to(tl.float32)
            L = tl.zeros([BLOCK_I, BLOCK_K], tl.float32)
            if USES_L:
                L = tl.load(L_row + i[:, None] * L_si + k[None, :] * L_sk, mask=lower,
                            other=0.0).to(tl.float32)  # fmt: skip
            if WANT_GEPS:
                g_eps += tl.sum(g_z[:, None] * L, axis=0)
            if WANT_GL:
                g_L = g_z[:, None] * eps[None, :]
                if HAS_GKL:
                    on_diag = i[:, None] == k[None, :]
                    g_L += g * (L - tl.where(on_diag, inv_diag[None, :], 0.0))
                g_L = tl.where(lower, g_L, 0.0)
                tl.store(gL_row + i[:, None] * D + k[None, :], g_L.to(gL_ptr.dtype.element_ty),
                         mask=(i < D)[:, None] & k_mask[None, :])  # fmt: skip
    if WANT_GEPS:
        tl.store(geps_ptr + row * D + k, g_eps.to(geps_ptr.dtype.element_ty), mask=k_mask)
