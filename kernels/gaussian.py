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
GRAD_NONE = tl.constexpr(modes.GRAD_NONE)
GRAD_ROWS = tl.constexpr(modes.GRAD_ROWS)
GRAD_PARTIAL = tl.constexpr(modes.GRAD_PARTIAL)
GRAD_SAMPLES = tl.constexpr(modes.GRAD_SAMPLES)


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
def _sample_tile(ptr, row, cols, sd, sk, s, mask, shared, ONCE: tl.constexpr):
    """An operand's tile at sample s: `shared` (loaded before the sample loop) when ONCE (its
    sample stride is 0), else loaded here."""
    return shared if ONCE else load_tile(ptr + s * sk, row, cols, sd, mask, True)


@triton.jit
def log_prob_fwd_kernel(
    x_ptr, x_s1, x_s2, x_sd, x_sk,
    mu_ptr, mu_s1, mu_s2, mu_sd, mu_sk,
    lv_ptr, lv_s1, lv_s2, lv_sd, lv_sk, fixed_lv,
    out_ptr, n_rows, R2, D, n_samples, per_program,
    HAS_LOGVAR: tl.constexpr, X_ONCE: tl.constexpr, MU_ONCE: tl.constexpr,
    LV_ONCE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """log N(x; mu, diag exp(logvar)) summed over D: (n_samples, n_rows) float32. Without
    HAS_LOGVAR every element's logvar is fixed_lv (a float). Program (i, j) takes row block i
    and samples j * per_program onwards; an operand with sample stride 0 (X_ONCE, ...: one
    posterior against K samples) is read once a tile for all of them."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    x_row = row_offsets(rows, R2, x_s1, x_s2)
    mu_row = row_offsets(rows, R2, mu_s1, mu_s2)
    lv_row = row_offsets(rows, R2, lv_s1, lv_s2)
    first = tl.program_id(1) * per_program
    last = tl.minimum(first + per_program, n_samples)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = row_mask[:, None] & (cols < D)[None, :]
        x0 = load_tile(x_ptr, x_row, cols, x_sd, mask, X_ONCE)
        mu0 = load_tile(mu_ptr, mu_row, cols, mu_sd, mask, MU_ONCE)
        lv0 = load_tile(lv_ptr, lv_row, cols, lv_sd, mask, HAS_LOGVAR and LV_ONCE)
        for sample in range(first, last):
            s = tl.cast(sample, tl.int64)
            x = _sample_tile(x_ptr, x_row, cols, x_sd, x_sk, s, mask, x0, X_ONCE)
            mu = _sample_tile(mu_ptr, mu_row, cols, mu_sd, mu_sk, s, mask, mu0, MU_ONCE)
            diff = x - mu
            if HAS_LOGVAR:
                logvar = _sample_tile(lv_ptr, lv_row, cols, lv_sd, lv_sk, s, mask, lv0, LV_ONCE)
                term = LOG_2PI + logvar + diff * diff * tl.exp(-logvar)
            else:
                term = diff * diff * tl.exp(-fixed_lv) + (LOG_2PI + fixed_lv)
            part = -0.5 * tl.sum(tl.where(mask, term, 0.0), axis=1)
            out_rows = s * n_rows + rows  # D past one block: add to the earlier blocks' sums
            previous = tl.load(out_ptr + out_rows, mask=row_mask & (d0 > 0), other=0.0)
            tl.store(out_ptr + out_rows, previous + part, mask=row_mask)


@triton.jit
def _store_sample_grad(ptr, g, acc, s_offs, mask, MODE: tl.constexpr):
    """A log-density gradient tile at one sample: stored at s_offs (GRAD_ROWS), or added to
    `acc` (GRAD_SAMPLES: the operand is broadcast over the samples), which is returned."""
    if MODE == GRAD_ROWS:
        tl.store(ptr + s_offs, g.to(ptr.dtype.element_ty), mask=mask)
    if MODE == GRAD_SAMPLES:
        acc += g
    return acc


@triton.jit
def _store_summed_grad(ptr, acc, offs, mask, MODE: tl.constexpr):
    """Write a GRAD_SAMPLES gradient tile, summed over the samples (nothing for other modes)."""
    if MODE == GRAD_SAMPLES:
        tl.store(ptr + offs, acc.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def log_prob_bwd_kernel(
    x_ptr, x_s1, x_s2, x_sd, x_sk,
    mu_ptr, mu_s1, mu_s2, mu_sd, mu_sk,
    lv_ptr, lv_s1, lv_s2, lv_sd, lv_sk, fixed_lv,
    g_ptr, g_s1, g_s2, g_sk,
    gx_ptr, gmu_ptr, glv_ptr, n_rows, R2, D, n_samples, per_program,
    HAS_LOGVAR: tl.constexpr, X_ONCE: tl.constexpr, MU_ONCE: tl.constexpr,
    LV_ONCE: tl.constexpr, GX: tl.constexpr, GMU: tl.constexpr, GLV: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Gradients of log_prob for x, mu and logvar (GLV needs HAS_LOGVAR), each written as GX /
    GMU / GLV say (a kernels.modes GRAD_* mode): per sample (n_samples, n_rows, D), or, for
    an operand broadcast over the samples, summed over a program's samples (chunk j of
    (n_chunks, n_rows, D)). Programs as in log_prob_fwd_kernel."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    x_row = row_offsets(rows, R2, x_s1, x_s2)
    mu_row = row_offsets(rows, R2, mu_s1, mu_s2)
    lv_row = row_offsets(rows, R2, lv_s1, lv_s2)
    g_row = row_offsets(rows, R2, g_s1, g_s2)
    first = tl.program_id(1) * per_program
    last = tl.minimum(first + per_program, n_samples)
    chunk_offs = tl.program_id(1).to(tl.int64) * n_rows * D  # of the summed gradients
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = row_mask[:, None] & (cols < D)[None, :]
        offs = rows[:, None] * D + cols[None, :]
        x0 = load_tile(x_ptr, x_row, cols, x_sd, mask, X_ONCE)
        mu0 = load_tile(mu_ptr, mu_row, cols, mu_sd, mask, MU_ONCE)
        lv0 = load_tile(lv_ptr, lv_row, cols, lv_sd, mask, HAS_LOGVAR and LV_ONCE)
        g_x = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        g_mu = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        g_lv = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        for sample in range(first, last):
            s = tl.cast(sample, tl.int64)
            g = tl.load(g_ptr + s * g_sk + g_row, mask=row_mask).to(tl.float32)[:, None]
            x = _sample_tile(x_ptr, x_row, cols, x_sd, x_sk, s, mask, x0, X_ONCE)
            mu = _sample_tile(mu_ptr, mu_row, cols, mu_sd, mu_sk, s, mask, mu0, MU_ONCE)
            diff = x - mu
            if HAS_LOGVAR:
                logvar = _sample_tile(lv_ptr, lv_row, cols, lv_sd, lv_sk, s, mask, lv0, LV_ONCE)
                scaled = diff * tl.exp(-logvar)
            else:
                scaled = diff * tl.exp(-fixed_lv)
            s_offs = s * n_rows * D + offs
            g_x = _store_sample_grad(gx_ptr, -g * scaled, g_x, s_offs, mask, GX)
            g_mu = _store_sample_grad(gmu_ptr, g * scaled, g_mu, s_offs, mask, GMU)
            if GLV != GRAD_NONE:
                g_half = g * 0.5 * (diff * scaled - 1.0)
                g_lv = _store_sample_grad(glv_ptr, g_half, g_lv, s_offs, mask, GLV)
        _store_summed_grad(gx_ptr, g_x, chunk_offs + offs, mask, GX)
        _store_summed_grad(gmu_ptr, g_mu, chunk_offs + offs, mask, GMU)
        _store_summed_grad(glv_ptr, g_lv, chunk_offs + offs, mask, GLV)
