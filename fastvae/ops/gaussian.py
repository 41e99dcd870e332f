"""Diagonal-Gaussian ops: reparameterize, gaussian_kl, reparameterize_kl, gaussian_log_prob.

Each runs one autograd.Function whose forward and backward launch the Triton kernels in
fastvae.kernels.gaussian (CUDA, or the interpreter) or the torch math in fastvae.reference.
The last dimension is the latent one. z keeps the inputs' dtype; the per-row reductions (KL,
log-density) are float32 (float64 for float64 inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastvae import _validate as V
from fastvae import reference
from fastvae._backend import use_triton
from fastvae.ops._launch import (
    gaussian_kernels,
    grad_buffer,
    grid,
    operand_args,
    reduce_grad,
    row_layout,
    tile,
)

_SEED_RANGE = 2**62
ROW_NONE, ROW_KL, ROW_LOG_RATIO = 0, 1, 2  # the per-row term, as in kernels/gaussian.py


@dataclass(frozen=True)
class SampleSpec:
    """What one call of _Sample computes.

    z has out_shape: shape, or (num_samples, *shape). The row term (KL, or log p(z) -
    log q(z | x), or -log q alone without log_p) has out_shape[:-1]. Noise sample k of z is
    sample first_sample + k of the stream keyed by the seed, so chunks of one stream drawn
    separately equal the stream drawn at once (first_sample: a multiple of noise_block).
    """

    shape: torch.Size
    out_shape: torch.Size
    z_dtype: torch.dtype
    want_z: bool
    row_term: int
    num_samples: int | None = None
    log_p: bool = True
    free_bits: float = 0.0
    first_sample: int = 0


def draw_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A (1,) int64 seed on `device` from `generator` (None: the device's default one)."""
    return torch.randint(_SEED_RANGE, (1,), generator=generator, device=device)


NOISE_BLOCK_ELEMENTS = 1 << 16  # the torch path seeds a generator per ~this many latents


def noise_block(shape: torch.Size) -> int:
    """Samples per noise block of the torch path (about NOISE_BLOCK_ELEMENTS latents); a chunk
    of samples that starts on a block boundary draws the same noise as one whole draw."""
    return max(1, NOISE_BLOCK_ELEMENTS // max(1, shape.numel()))


def _torch_eps(seed: torch.Tensor, spec: SampleSpec, device, dtype) -> torch.Tensor:
    """The torch path's N(0, 1) noise of z's shape: block b of noise_block samples (counted
    from sample 0 of the stream) comes from a generator seeded seed + b."""
    eps = torch.empty(spec.out_shape, device=device, dtype=dtype)
    samples = eps.unsqueeze(0) if spec.num_samples is None else eps
    block = noise_block(spec.shape)
    first_block = int(seed.item()) + spec.first_sample // block
    for i, start in enumerate(range(0, samples.shape[0], block)):
        generator = torch.Generator(device=device).manual_seed(first_block + i)
        samples[start : start + block].normal_(generator=generator)
    return eps


def _triton_sample_fwd(mu, logvar, prior_mu, prior_logvar, eps, seed, spec: SampleSpec):
    layout = row_layout(spec.out_shape, [mu, logvar, prior_mu, prior_logvar, eps])
    n_rows, D = layout.n_rows, layout.D
    z = torch.empty(spec.out_shape, dtype=spec.z_dtype, device=mu.device) if spec.want_z else mu
    row = mu
    if spec.row_term != ROW_NONE:
        row = torch.empty(spec.out_shape[:-1], dtype=torch.float32, device=mu.device)
    blocks = tile(n_rows, D)
    gaussian_kernels().sample_fwd_kernel[grid(n_rows, blocks["BLOCK_R"])](
        *(a for op in layout.operands for a in operand_args(op, mu)),
        mu if seed is None else seed, z, row,
        n_rows, layout.R2, D, spec.first_sample * spec.shape.numel(), spec.free_bits,
        WANT_Z=spec.want_z, ROW_TERM=spec.row_term, HAS_EPS=eps is not None,
        HAS_PRIOR_MU=prior_mu is not None, HAS_PRIOR_LV=prior_logvar is not None,
        HAS_LOG_P=spec.log_p, USE_FREE_BITS=spec.free_bits > 0.0, **blocks,
    )  # fmt: skip
    return (z if spec.want_z else None), (row if spec.row_term != ROW_NONE else None)


def _triton_sample_bwd(grad_z, grad_row, saved, seed, needs_prior, spec: SampleSpec):
    mu, logvar, prior_mu, prior_logvar, eps = saved
    shape = spec.out_shape
    layout = row_layout(
        shape,
        [mu, logvar, prior_mu, prior_logvar, eps, grad_z,
         None if grad_row is None else grad_row.unsqueeze(-1)],
    )  # fmt: skip
    n_rows, D = layout.n_rows, layout.D
    grads = [grad_buffer(mu, shape), grad_buffer(logvar, shape)]
    grads += [grad_buffer(p, shape) if need else None for p, need in zip(saved[2:4], needs_prior)]
    blocks = tile(n_rows, D)
    gaussian_kernels().sample_bwd_kernel[grid(n_rows, blocks["BLOCK_R"])](
        *(a for op in layout.operands[:6] for a in operand_args(op, mu)),
        *operand_args(layout.operands[6], mu)[:3],
        mu if seed is None else seed,
        *(mu if g is None else g for g in grads),
        n_rows, layout.R2, D, spec.first_sample * spec.shape.numel(), spec.free_bits,
        HAS_GZ=grad_z is not None, HAS_GROW=grad_row is not None, ROW_TERM=spec.row_term,
        HAS_EPS=eps is not None, HAS_PRIOR_MU=prior_mu is not None,
        HAS_PRIOR_LV=prior_logvar is not None, HAS_LOG_P=spec.log_p,
        USE_FREE_BITS=spec.free_bits > 0.0,
        WANT_GPMU=grads[2] is not None, WANT_GPLV=grads[3] is not None, **blocks,
    )  # fmt: skip
    return grads


def _torch_sample_fwd(mu, logvar, prior_mu, prior_logvar, eps, spec: SampleSpec, out):
    if spec.row_term == ROW_LOG_RATIO:
        return reference.sample_log_ratio_forward(
            mu, logvar, prior_mu, prior_logvar, eps, spec.log_p, out
        )
    return reference.sample_kl_forward(
        mu, logvar, prior_mu, prior_logvar, eps, spec.free_bits, spec.row_term == ROW_KL, out
    )


def _torch_sample_bwd(grad_z, grad_row, saved, spec: SampleSpec):
    if spec.row_term == ROW_LOG_RATIO:
        return reference.sample_log_ratio_backward(grad_z, grad_row, *saved, spec.log_p)
    return reference.sample_kl_backward(grad_z, grad_row, *saved, spec.free_bits)


def _deviation(mu, logvar, eps, seed, z, spec: SampleSpec) -> torch.Tensor:
    """z - mu = exp(logvar / 2) * eps for the torch path's backward: from the given eps, else
    from the saved float32/64 z (exact up to z's rounding; the drawn eps is not kept), else
    (half-precision z) from the regenerated noise."""
    if z is not None:
        return reference.opmath(z) - reference.opmath(mu)
    if eps is None:
        eps = _torch_eps(seed, spec, mu.device, reference.opmath_dtype(spec.z_dtype))
    return reference.opmath(eps) * torch.exp(0.5 * reference.opmath(logvar))


class _Sample(torch.autograd.Function):
    """(mu, logvar, prior_mu, prior_logvar, eps | seed) -> (z, row term); either output may
    be skipped (see SampleSpec). The Triton path's backward regenerates the noise from the
    seed; the torch path's uses the output z, or eps when it was given."""

    @staticmethod
    def forward(ctx, mu, logvar, prior_mu, prior_logvar, eps, seed, spec: SampleSpec):
        ctx.set_materialize_grads(False)
        ctx.spec = spec
        ctx.triton = use_triton(mu.device, spec.z_dtype) and spec.out_shape.numel() > 0
        z_for_backward = None
        if ctx.triton:
            z, row = _triton_sample_fwd(mu, logvar, prior_mu, prior_logvar, eps, seed, spec)
        else:
            sample_eps, out = eps, None
            if spec.want_z and eps is None:  # draw the noise into z's buffer
                dtype = reference.opmath_dtype(spec.z_dtype)
                sample_eps = out = _torch_eps(seed, spec, mu.device, dtype)
            z, row = _torch_sample_fwd(mu, logvar, prior_mu, prior_logvar, sample_eps, spec, out)
            if spec.want_z:
                z = z.to(spec.z_dtype)
                if eps is None and z.dtype in (torch.float32, torch.float64):
                    z_for_backward = z
            row = None if row is None else row.to(reference.opmath_dtype(spec.z_dtype))
        ctx.save_for_backward(mu, logvar, prior_mu, prior_logvar, eps, seed, z_for_backward)
        return z, row

    @staticmethod
    def backward(ctx, grad_z, grad_row):
        spec = ctx.spec
        mu, logvar, prior_mu, prior_logvar, eps, seed, z = ctx.saved_tensors
        if grad_z is None and grad_row is None:
            return None, None, None, None, None, None, None
        if ctx.triton:
            saved = (mu, logvar, prior_mu, prior_logvar, eps)
            grads = _triton_sample_bwd(
                grad_z, grad_row, saved, seed, ctx.needs_input_grad[2:4], spec
            )
        else:
            deviation = None
            if grad_z is not None or spec.row_term == ROW_LOG_RATIO:
                deviation = _deviation(mu, logvar, eps, seed, z, spec)
            saved = (mu, logvar, prior_mu, prior_logvar, deviation)
            grads = _torch_sample_bwd(grad_z, grad_row, saved, spec)
        grad_eps = None
        if grad_z is not None and ctx.needs_input_grad[4]:
            grad_eps = grad_z * torch.exp(0.5 * reference.opmath(logvar))
        inputs = (mu, logvar, prior_mu, prior_logvar, eps)
        return (*(reduce_grad(g, t) for g, t in zip((*grads, grad_eps), inputs)), None, None)


def _triton_log_prob_fwd(x, mu, logvar, shape):
    layout = row_layout(shape, [x, mu, logvar])
    out = torch.empty(shape[:-1], dtype=torch.float32, device=x.device)
    blocks = tile(layout.n_rows, layout.D)
    gaussian_kernels().log_prob_fwd_kernel[grid(layout.n_rows, blocks["BLOCK_R"])](
        *(a for op in layout.operands for a in operand_args(op, x)),
        out, layout.n_rows, layout.R2, layout.D, **blocks,
    )  # fmt: skip
    return out


def _triton_log_prob_bwd(grad, x, mu, logvar, needs, shape):
    layout = row_layout(shape, [x, mu, logvar, grad.unsqueeze(-1)])
    grads = [grad_buffer(t, shape) if need else None for t, need in zip((x, mu, logvar), needs)]
    blocks = tile(layout.n_rows, layout.D)
    gaussian_kernels().log_prob_bwd_kernel[grid(layout.n_rows, blocks["BLOCK_R"])](
        *(a for op in layout.operands[:3] for a in operand_args(op, x)),
        *operand_args(layout.operands[3], x)[:3],
        *(x if g is None else g for g in grads),
        layout.n_rows, layout.R2, layout.D,
        WANT_GX=needs[0], WANT_GMU=needs[1], WANT_GLV=needs[2], **blocks,
    )  # fmt: skip
    return grads


class _GaussianLogProb(torch.autograd.Function):
    """(x, mu, logvar) -> log N(x; mu, diag exp(logvar)) summed over the last dim."""

    @staticmethod
    def forward(ctx, x, mu, logvar, shape: torch.Size):
        ctx.shape = shape
        dtype = torch.promote_types(torch.promote_types(x.dtype, mu.dtype), logvar.dtype)
        ctx.triton = use_triton(x.device, dtype) and shape.numel() > 0
        if ctx.triton:
            out = _triton_log_prob_fwd(x, mu, logvar, shape)
        else:
            out = reference.log_prob_forward(x, mu, logvar).to(reference.opmath_dtype(dtype))
        ctx.save_for_backward(x, mu, logvar)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, mu, logvar = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if ctx.triton:
            grads = _triton_log_prob_bwd(grad, x, mu, logvar, needs, ctx.shape)
        else:
            grads = reference.log_prob_backward(grad, x, mu, logvar)
        inputs = (x, mu, logvar)
        return (*(reduce_grad(g, t) if n else None for g, t, n in zip(grads, inputs, needs)), None)


def sample(mu, logvar, prior_mu=None, prior_logvar=None, *, eps=None, num_samples=None,
           generator=None, seed=None, want_z=True, row_term=ROW_NONE, **spec_fields):  # fmt: skip
    """Validate the arguments of the sampling ops and run _Sample -> (z, row term).

    The noise comes from `eps`, else from `seed` ((1,) int64 on the device), else from a seed
    drawn from `generator`. spec_fields: log_p, free_bits, first_sample (see SampleSpec).
    """
    named = {"mu": mu, "logvar": logvar, "prior_mu": prior_mu, "prior_logvar": prior_logvar}
    for name, value in named.items():
        if value is not None or name in ("mu", "logvar"):
            V.check_tensor(name, value)
    if eps is not None:
        V.check_tensor("eps", eps)
    device = V.check_same_device({**named, "eps": eps})
    V.check_generator(generator, device)
    if eps is not None and generator is not None:
        raise ValueError("pass either eps or generator, not both: eps fixes the noise")
    if row_term == ROW_LOG_RATIO and eps is not None and eps.requires_grad:
        raise ValueError("eps takes no gradient when the log importance ratio is computed")
    num_samples = V.check_num_samples(num_samples)
    if "free_bits" in spec_fields:
        spec_fields["free_bits"] = V.check_nonnegative_float("free_bits", spec_fields["free_bits"])
    shape = V.broadcast_shape({"mu": mu, "logvar": logvar})
    V.check_broadcasts_to("prior_mu", prior_mu, shape, "the posterior's shape")
    V.check_broadcasts_to("prior_logvar", prior_logvar, shape, "the posterior's shape")
    out_shape = shape if num_samples is None else torch.Size((num_samples, *shape))
    V.check_exact_shape("eps", eps, out_shape, "z")
    if spec_fields.get("first_sample", 0) % noise_block(shape):
        raise ValueError(f"first_sample must be a multiple of noise_block = {noise_block(shape)}")
    if want_z and eps is None and seed is None:
        seed = draw_seed(generator, device)
    spec = SampleSpec(
        shape=shape,
        out_shape=out_shape,
        z_dtype=torch.promote_types(mu.dtype, logvar.dtype),
        want_z=want_z,
        row_term=row_term,
        num_samples=num_samples,
        **spec_fields,
    )
    return _Sample.apply(mu, logvar, prior_mu, prior_logvar, eps, seed, spec)


def reparameterize(mu, logvar, *, eps=None, num_samples=None, generator=None):
    """z = mu + exp(logvar / 2) * eps with eps ~ N(0, I).

    mu, logvar: (..., D), broadcastable. eps: optional, the shape of z. Returns z of shape
    (..., D), or (num_samples, ..., D) when num_samples is given, in the inputs' dtype.
    Without eps the noise is drawn inside the kernel from a seed taken from `generator` (or
    torch's default generator of the device) and never stored: the Triton backward regenerates
    it, the CPU backward uses z - mu.
    """
    return sample(mu, logvar, eps=eps, num_samples=num_samples, generator=generator)[0]


def gaussian_kl(mu, logvar, prior_mu=None, prior_logvar=None, *, free_bits=0.0):
    """KL(N(mu, diag e^logvar) || N(prior_mu, diag e^prior_logvar)) summed over the last dim.

    mu, logvar: (..., D). prior_mu, prior_logvar: broadcastable to it (e.g. a learnable (D,)),
    None meaning 0. free_bits: each element's KL becomes max(KL_d, free_bits). Returns (...),
    float32 (float64 for float64 inputs).
    """
    return sample(
        mu, logvar, prior_mu, prior_logvar, want_z=False, row_term=ROW_KL, free_bits=free_bits
    )[1]


def reparameterize_kl(mu, logvar, prior_mu=None, prior_logvar=None, *, eps=None, generator=None,
                      free_bits=0.0):  # fmt: skip
    """(z, kl) of reparameterize and gaussian_kl in one pass over mu and logvar."""
    return sample(mu, logvar, prior_mu, prior_logvar, eps=eps, generator=generator,
                  row_term=ROW_KL, free_bits=free_bits)  # fmt: skip


def gaussian_log_prob(x, mu, logvar):
    """log N(x; mu, diag exp(logvar)) summed over the last dim.

    x, mu, logvar broadcast together to (..., D) (e.g. K samples (K, B, D) against one
    posterior (B, D)). Returns (...), float32 (float64 for float64 inputs).
    """
    named = {"x": x, "mu": mu, "logvar": logvar}
    for name, value in named.items():
        V.check_tensor(name, value)
    V.check_same_device(named)
    shape = V.broadcast_shape(named)
    return _GaussianLogProb.apply(x, mu, logvar, shape)
