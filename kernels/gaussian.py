"""Diagonal-Gaussian kernels: reparameterized sampling, KL and log-density, forward and backward.

Operands are read as (rows, D) tiles of a broadcast (R1, R2, D) layout: row r of an operand
starts at (r // R2) * s1 + (r % R2) * s2 and column d sits at d * sd, so strided, transposed
and broadcast (stride 0) inputs are read in place. Outputs are contiguous. Arithmetic is
float32 whatever the storage type. Noise is philox N(0, 1) keyed by a seed read from memory
and offset by the element's index in z, so backward regenerates it instead of storing it.
"""

import triton
import triton.language as tl

from . import modes
from .common import load_tile, row_offsets

LOG_2PI = tl.constexpr(1.8378770664093453)


@triton.jit
def _noise(eps_ptr, eps_off, seed, index, mask, HAS_EPS: tl.constexpr):
    """The eps tile: the given one (at offsets eps_off), or N(0, 1) regenerated from (seed,
    the element's index in z)."""
    if HAS_EPS:
        eps = tl.load(eps_ptr + eps_off, mask=mask, other=0.0).to(tl.float32)
    else:
        eps = tl.randn(seed, index)
    return eps


@triton.jit
def _kl_terms(mu, logvar, prior_mu, prior_logvar):
    """Per-element KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)) and gradient pieces."""
    diff = mu - prior_mu
    var_ratio = tl.exp(logvar - prior_logvar)
    diff_over_pvar = diff * tl.exp(-prior_logvar)
    kl = 0.5 * (var_ratio + diff * diff_over_pvar - 1.0 + prior_logvar - logvar)
    return kl, diff, diff_over_pvar, var_ratio


@triton.jit
def _log_ratio_terms(eps, z, logvar, prior_mu, prior_logvar, HAS_LOG_P: tl.constexpr):
    """Per element: log p(z) - log q(z|x), or -log q(z|x) alone without HAS_LOG_P; and
    diff = z - prior_mu, t = diff / prior_var (log p's slope is -t)."""
    diff = z - prior_mu
    t = diff * tl.exp(-prior_logvar)
    if HAS_LOG_P:
        term = 0.5 * (logvar - prior_logvar + eps * eps - diff * t)  # log 2pi cancels
    else:
        term = 0.5 * (LOG_2PI + logvar + eps * eps)
    return term, diff, t


ROW_NONE = tl.constexpr(modes.ROW_NONE)
ROW_KL = tl.constexpr(modes.ROW_KL)
ROW_LOG_RATIO = tl.constexpr(modes.ROW_LOG_RATIO)
GRAD_ROWS = tl.constexpr(modes.GRAD_ROWS)
GRAD_PARTIAL = tl.constexpr(modes.GRAD_PARTIAL)


@triton.jit
def sample_fwd_kernel(
    mu_ptr, mu_s1, mu_s2, mu_sd,
    lv_ptr, lv_s1, lv_s2, lv_sd,
    pmu_ptr, pmu_s1, pmu_s2, pmu_sd,
    plv_ptr, plv_s1, plv_s2, plv_sd,
    eps_ptr, eps_s1, eps_s2, eps_sd, eps_sk,
    seed_ptr, z_ptr, row_ptr,
    n_rows, R2, D, n_samples, noise_offset, free_bits,
    WANT_Z: tl.constexpr, ROW_TERM: tl.constexpr, HAS_EPS: tl.constexpr,
    HAS_PRIOR_MU: tl.constexpr, HAS_PRIOR_LV: tl.constexpr, USE_FREE_BITS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """z = mu + exp(logvar / 2) * eps (n_samples, n_rows, D) and a per-row term (n_samples,
    n_rows): the KL, log p(z) - log q(z | x) or -log q(z | x). Each program reads its tile of
    mu, logvar and the prior once and draws every sample of it."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    mu_row = row_offsets(rows, R2, mu_s1, mu_s2)
    lv_row = row_offsets(rows, R2, lv_s1, lv_s2)
    pmu_row = row_offsets(rows, R2, pmu_s1, pmu_s2)
    plv_row = row_offsets(rows, R2, plv_s1, plv_s2)
    eps_row = row_offsets(rows, R2, eps_s1, eps_s2)
    seed = 0
    if WANT_Z and not HAS_EPS:
        seed = tl.load(seed_ptr)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = row_mask[:, None] & (cols < D)[None, :]
        mu = load_tile(mu_ptr, mu_row, cols, mu_sd, mask, True)
        logvar = load_tile(lv_ptr, lv_row, cols, lv_sd, mask, True)
        prior_mu = load_tile(pmu_ptr, pmu_row, cols, pmu_sd, mask, HAS_PRIOR_MU)
        prior_lv = load_tile(plv_ptr, plv_row, cols, plv_sd, mask, HAS_PRIOR_LV)
        sigma = tl.exp(0.5 * logvar)
        part = tl.zeros([BLOCK_R], tl.float32)
        if ROW_TERM == ROW_KL:
            kl = _kl_terms(mu, logvar, prior_mu, prior_lv)[0]
            if USE_FREE_BITS:
                kl = tl.where(kl < free_bits, free_bits, kl)  # NaN stays NaN
            part = tl.sum(tl.where(mask, kl, 0.0), axis=1)
        for sample in range(n_samples):
            s = tl.cast(sample, tl.int64)  # s * n_rows * D passes 2**31 for large K
            out_rows = s * n_rows + rows
            if WANT_Z:
                offs = out_rows[:, None] * D + cols[None, :]
                eps_off = (s * eps_sk + eps_row)[:, None] + cols[None, :] * eps_sd
                eps = _noise(eps_ptr, eps_off, seed, noise_offset + offs, mask, HAS_EPS)
                z = mu + sigma * eps
                tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=mask)
                if ROW_TERM >= ROW_LOG_RATIO:
                    term = _log_ratio_terms(eps, z, logvar, prior_mu, prior_lv,
                                            ROW_TERM == ROW_LOG_RATIO)[0]  # fmt: skip
                    part = tl.sum(tl.where(mask, term, 0.0), axis=1)
            if ROW_TERM != ROW_NONE:  # D past one block: add to the earlier blocks' sums
                previous = tl.load(row_ptr + out_rows, mask=row_mask & (d0 > 0), other=0.0)
                tl.store(row_ptr + out_rows, previous + part, mask=row_mask)


@triton.jit
def _store_grad(ptr, g, offs, cols, mask, D, MODE: tl.constexpr):
    """Write a gradient tile: per row (GRAD_ROWS), or summed in float64 over the tile's rows
    into this program's row of partial sums (GRAD_PARTIAL: an input broadcast over every row)."""
    if MODE == GRAD_ROWS:
        tl.store(ptr + offs, g.to(ptr.dtype.element_ty), mask=mask)
    if MODE == GRAD_PARTIAL:
        partial = tl.sum(tl.where(mask, g.to(tl.float64), 0.0), axis=0)
        tl.store(ptr + tl.program_id(0).to(tl.int64) * D + cols, partial, mask=cols < D)


@triton.jit
def sample_bwd_kernel(
    mu_ptr, mu_s1, mu_s2, mu_sd,
    lv_ptr, lv_s1, lv_s2, lv_sd,
    pmu_ptr, pmu_s1, pmu_s2, pmu_sd,
    plv_ptr, plv_s1, plv_s2, plv_sd,
    eps_ptr, eps_s1, eps_s2, eps_sd, eps_sk,
    gz_ptr, gz_s1, gz_s2, gz_sd, gz_sk,
    grow_ptr, grow_s1, grow_s2, grow_sk,
    seed_ptr, gmu_ptr, glv_ptr, gpmu_ptr, gplv_ptr,
    n_rows, R2, D, n_samples, noise_offset, free_bits,
    HAS_GZ: tl.constexpr, HAS_GROW: tl.constexpr, ROW_TERM: tl.constexpr,
    HAS_EPS: tl.constexpr, HAS_PRIOR_MU: tl.constexpr, HAS_PRIOR_LV: tl.constexpr,
    USE_FREE_BITS: tl.constexpr,
    GMU: tl.constexpr, GLV: tl.constexpr, GPMU: tl.constexpr, GPLV: tl.constexpr,
    SUM_GPLV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Gradients of (z, row term) for mu, logvar and the prior, summed over the samples in
    the kernel; each written as GMU / GLV / GPMU / GPLV say (a kernels.modes GRAD_* mode).
    SUM_GPLV: prior_logvar's gradient will be summed over rows (it is smaller than the
    broadcast shape), so its KL part is computed in float64."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    mu_row = row_offsets(rows, R2, mu_s1, mu_s2)
    lv_row = row_offsets(rows, R2, lv_s1, lv_s2)
    pmu_row = row_offsets(rows, R2, pmu_s1, pmu_s2)
    plv_row = row_offsets(rows, R2, plv_s1, plv_s2)
    eps_row = row_offsets(rows, R2, eps_s1, eps_s2)
    gz_row = row_offsets(rows, R2, gz_s1, gz_s2)
    grow_row = row_offsets(rows, R2, grow_s1, grow_s2)
    NEEDS_Z: tl.constexpr = HAS_GZ or (HAS_GROW and ROW_TERM >= ROW_LOG_RATIO)
    seed = 0
    if NEEDS_Z and not HAS_EPS:
        seed = tl.load(seed_ptr)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = row_mask[:, None] & (cols < D)[None, :]
        offs = rows[:, None] * D + cols[None, :]
        mu = load_tile(mu_ptr, mu_row, cols, mu_sd, mask, True)
        logvar = load_tile(lv_ptr, lv_row, cols, lv_sd, mask, True)
        prior_mu = load_tile(pmu_ptr, pmu_row, cols, pmu_sd, mask, HAS_PRIOR_MU)
        prior_lv = load_tile(plv_ptr, plv_row, cols, plv_sd, mask, HAS_PRIOR_LV)
        sigma = tl.exp(0.5 * logvar)
        g_mu = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        g_lv = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        g_pmu = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        g_plv = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        g_kl = tl.zeros([BLOCK_R, 1], tl.float32)  # the KL's incoming gradient, all samples
        for sample in range(n_samples):
            s = tl.cast(sample, tl.int64)
            g = tl.zeros([BLOCK_R, 1], tl.float32)
            if HAS_GROW:
                g = tl.load(grow_ptr + s * grow_sk + grow_row, mask=row_mask, other=0.0)
                g = g.to(tl.float32)[:, None]
            if HAS_GROW and ROW_TERM == ROW_KL:
                g_kl += g
            if NEEDS_Z:
                g_z = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)  # total gradient at z
                if HAS_GZ:
                    gz_off = (s * gz_sk + gz_row)[:, None] + cols[None, :] * gz_sd
                    g_z = tl.load(gz_ptr + gz_off, mask=mask, other=0.0).to(tl.float32)
                index = noise_offset + s * n_rows * D + offs
                eps_off = (s * eps_sk + eps_row)[:, None] + cols[None, :] * eps_sd
                eps = _noise(eps_ptr, eps_off, seed, index, mask, HAS_EPS)
                if HAS_GROW and ROW_TERM >= ROW_LOG_RATIO:
                    z = mu + sigma * eps
                    _, diff, t = _log_ratio_terms(eps, z, logvar, prior_mu, prior_lv,
                                                  ROW_TERM == ROW_LOG_RATIO)  # fmt: skip
                    if ROW_TERM == ROW_LOG_RATIO:
                        g_z -= g * t
                        g_pmu += g * t
                        g_plv += g * 0.5 * (t * diff - 1.0)
                    g_lv += 0.5 * g  # -log q(z|x) = (log 2pi + logvar + eps^2) / 2 at fixed eps
                g_mu += g_z
                g_lv += g_z * eps * (0.5 * sigma)
        if HAS_GROW and ROW_TERM == ROW_KL:
            kl_d, diff, diff_over_pvar, var_ratio = _kl_terms(mu, logvar, prior_mu, prior_lv)
            g = tl.broadcast_to(g_kl, [BLOCK_R, BLOCK_D])
            if USE_FREE_BITS:
                g = tl.where(kl_d < free_bits, 0.0, g)
            g_mu += g * diff_over_pvar
            g_lv += g * 0.5 * (var_ratio - 1.0)
            g_pmu = -g * diff_over_pvar
            if SUM_GPLV:  # summed: in float64, so that terms beyond float32 of both signs
                # add up to the sum's +-inf (or a finite value), not to NaN
                diff64, plv64 = diff.to(tl.float64), prior_lv.to(tl.float64)
                var_ratio = tl.exp(logvar.to(tl.float64) - plv64)
                diff_over_pvar = diff64 * tl.exp(-plv64)
            g_plv = g * 0.5 * (1.0 - var_ratio - diff_over_pvar * diff)
        _store_grad(gmu_ptr, g_mu, offs, cols, mask, D, GMU)
        _store_grad(glv_ptr, g_lv, offs, cols, mask, D, GLV)
        _store_grad(gpmu_ptr, g_pmu, offs, cols, mask, D, GPMU)
        _store_grad(gplv_ptr, g_plv, offs, cols, mask, D, GPLV)


@triton.jit
def log_prob_fwd_kernel(
    x_ptr, x_s1, x_s2, x_sd,
    mu_ptr, mu_s1, mu_s2, mu_sd,
    lv_ptr, lv_s1, lv_s2, lv_sd, fixed_lv,
    out_ptr, n_rows, R2, D,
    HAS_LOGVAR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """log N(x; mu, diag exp(logvar)) summed over D: (n_rows,) float32. Without HAS_LOGVAR
    every element's logvar is fixed_lv (a float)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    x_row = row_offsets(rows, R2, x_s1, x_s2)
    mu_row = row_offsets(rows, R2, mu_s1, mu_s2)
    lv_row = row_offsets(rows, R2, lv_s1, lv_s2)
    acc = tl.zeros([BLOCK_R], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = row_mask[:, None] & (cols < D)[None, :]
        x = load_tile(x_ptr, x_row, cols, x_sd, mask, True)
        mu = load_tile(mu_ptr, mu_row, cols, mu_sd, mask, True)
        diff = x - mu
        if HAS_LOGVAR:
            logvar = load_tile(lv_ptr, lv_row, cols, lv_sd, mask, True)
            term = LOG_2PI + logvar + diff * diff * tl.exp(-logvar)
        else:
            term = diff * diff
        acc += tl.sum(tl.where(mask, term, 0.0), axis=1)
    if not HAS_LOGVAR:
        acc = acc * tl.exp(-fixed_lv) + D * (LOG_2PI + fixed_lv)
    tl.store(out_ptr + rows, -0.5 * acc, mask=row_mask)


@triton.jit
def log_prob_bwd_kernel(
    x_ptr, x_s1, x_s2, x_sd,
    mu_ptr, mu_s1, mu_s2, mu_sd,
    lv_ptr, lv_s1, lv_s2, lv_sd, fixed_lv,
    g_ptr, g_s1, g_s2,
    gx_ptr, gmu_ptr, glv_ptr, n_rows, R2, D,
    HAS_LOGVAR: tl.constexpr,
    WANT_GX: tl.constexpr, WANT_GMU: tl.constexpr, WANT_GLV: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Gradients of log_prob for x, mu and logvar (WANT_GLV needs HAS_LOGVAR), each written
    as (n_rows, D)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    x_row = row_offsets(rows, R2, x_s1, x_s2)
    mu_row = row_offsets(rows, R2, mu_s1, mu_s2)
    lv_row = row_offsets(rows, R2, lv_s1, lv_s2)
    g = tl.load(g_ptr + row_offsets(rows, R2, g_s1, g_s2), mask=row_mask).to(tl.float32)
    g = g[:, None]
    if not HAS_LOGVAR:
        g = g * tl.exp(-fixed_lv)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = row_mask[:, None] & (cols < D)[None, :]
        offs = rows[:, None] * D + cols[None, :]
        x = load_tile(x_ptr, x_row, cols, x_sd, mask, True)
        mu = load_tile(mu_ptr, mu_row, cols, mu_sd, mask, True)
        diff = x - mu
        scaled = diff  # times 1 / var: in g when the variance is fixed
        if HAS_LOGVAR:
            logvar = load_tile(lv_ptr, lv_row, cols, lv_sd, mask, True)
            scaled = diff * tl.exp(-logvar)
        if WANT_GX:
            tl.store(gx_ptr + offs, (-g * scaled).to(gx_ptr.dtype.element_ty), mask=mask)
        if WANT_GMU:
            tl.store(gmu_ptr + offs, (g * scaled).to(gmu_ptr.dtype.element_ty), mask=mask)
        if WANT_GLV:
            g_lv = g * 0.5 * (diff * scaled - 1.0)
            tl.store(glv_ptr + offs, g_lv.to(glv_ptr.dtype.element_ty), mask=mask)
