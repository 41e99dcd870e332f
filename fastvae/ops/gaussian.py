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


@dataclass(frozen=True)
class _SampleSpec:
    """What one call of _SampleKL computes. z has out_shape; kl has shape[:-1]."""

    shape: torch.Size
    out_shape: torch.Size
    z_dtype: torch.dtype
    want_z: bool
    want_kl: bool
    free_bits: float
    generator: torch.Generator | None


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    return torch.default_generator


def _torch_noise(spec: _SampleSpec, device: torch.device, dtype: torch.dtype):
    """Noise for the torch path: eps drawn from the generator, and a function that replays
    the draw from the generator's earlier state, so that backward need not keep eps alive."""
    generator = spec.generator or _default_generator(device)
    state = generator.get_state()

    def draw(source: torch.Generator) -> torch.Tensor:
        return torch.randn(spec.out_shape, generator=source, device=device, dtype=dtype)

    def regenerate() -> torch.Tensor:
        replay = torch.Generator(device=device)
        replay.set_state(state)
        return draw(replay)

    return draw(generator), regenerate


def _triton_sample_kl_fwd(mu, logvar, prior_mu, prior_logvar, eps, seed, spec: _SampleSpec):
    layout = row_layout(spec.out_shape, [mu, logvar, prior_mu, prior_logvar, eps])
    n_rows, D = layout.n_rows, layout.D
    z = torch.empty(spec.out_shape, dtype=spec.z_dtype, device=mu.device) if spec.want_z else mu
    kl = torch.empty(spec.shape[:-1], dtype=torch.float32, device=mu.device) if spec.want_kl else mu
    blocks = tile(n_rows, D)
    gaussian_kernels().sample_kl_fwd_kernel[grid(n_rows, blocks["BLOCK_R"])](
        *(a for op in layout.operands for a in operand_args(op, mu)),
        mu if seed is None else seed, z, kl,
        n_rows, layout.R2, D, spec.free_bits,
        WANT_Z=spec.want_z, WANT_KL=spec.want_kl, HAS_EPS=eps is not None,
        HAS_PRIOR_MU=prior_mu is not None, HAS_PRIOR_LV=prior_logvar is not None,
        USE_FREE_BITS=spec.free_bits > 0.0, **blocks,
    )  # fmt: skip
    return (z if spec.want_z else None), (kl if spec.want_kl else None)


def _triton_sample_kl_bwd(grad_z, grad_kl, saved, seed, needs_prior, spec: _SampleSpec):
    mu, logvar, prior_mu, prior_logvar, eps = saved
    shape = spec.out_shape
    layout = row_layout(
        shape,
        [mu, logvar, prior_mu, prior_logvar, eps, grad_z,
         None if grad_kl is None else grad_kl.unsqueeze(-1)],
    )  # fmt: skip
    n_rows, D = layout.n_rows, layout.D
    grads = [grad_buffer(mu, shape), grad_buffer(logvar, shape)]
    grads += [grad_buffer(p, shape) if need else None for p, need in zip(saved[2:4], needs_prior)]
    gkl_op = layout.operands[6]
    blocks = tile(n_rows, D)
    gaussian_kernels().sample_kl_bwd_kernel[grid(n_rows, blocks["BLOCK_R"])](
        *(a for op in layout.operands[:6] for a in operand_args(op, mu)),
        *operand_args(gkl_op, mu)[:3],
        mu if seed is None else seed,
        *(mu if g is None else g for g in grads),
        n_rows, layout.R2, D, spec.free_bits,
        HAS_GZ=grad_z is not None, HAS_GKL=grad_kl is not None, HAS_EPS=eps is not None,
        HAS_PRIOR_MU=prior_mu is not None, HAS_PRIOR_LV=prior_logvar is not None,
        USE_FREE_BITS=spec.free_bits > 0.0,
        WANT_GPMU=grads[2] is not None, WANT_GPLV=grads[3] is not None, **blocks,
    )  # fmt: skip
    return grads


class _SampleKL(torch.autograd.Function):
    """(mu, logvar, prior_mu, prior_logvar, eps) -> (z, kl); either output may be skipped."""

    @staticmethod
    def forward(ctx, mu, logvar, prior_mu, prior_logvar, eps, spec: _SampleSpec):
        ctx.set_materialize_grads(False)
        ctx.spec = spec
        ctx.triton = use_triton(mu.device, spec.z_dtype) and spec.out_shape.numel() > 0
        draw = spec.want_z and eps is None
        seed = sample_eps = regenerate = None
        if ctx.triton:
            if draw:
                seed = torch.randint(_SEED_RANGE, (1,), generator=spec.generator, device=mu.device)
            z, kl = _triton_sample_kl_fwd(mu, logvar, prior_mu, prior_logvar, eps, seed, spec)
        else:
            if draw:
                dtype = reference.opmath_dtype(spec.z_dtype)
                sample_eps, regenerate = _torch_noise(spec, mu.device, dtype)
            elif spec.want_z:
                sample_eps = eps
            z, kl = reference.sample_kl_forward(
                mu, logvar, prior_mu, prior_logvar, sample_eps, spec.free_bits, spec.want_kl
            )
            z = None if z is None else z.to(spec.z_dtype)
            kl = None if kl is None else kl.to(reference.opmath_dtype(spec.z_dtype))
        ctx.regenerate_eps = regenerate
        ctx.save_for_backward(mu, logvar, prior_mu, prior_logvar, eps, seed)
        return z, kl

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        spec = ctx.spec
        mu, logvar, prior_mu, prior_logvar, eps, seed = ctx.saved_tensors
        if not spec.want_z:
            grad_z = None
        if not spec.want_kl:
            grad_kl = None
        if grad_z is None and grad_kl is None:
            return None, None, None, None, None, None
        if ctx.triton:
            grads = _triton_sample_kl_bwd(
                grad_z, grad_kl, (mu, logvar, prior_mu, prior_logvar, eps), seed,
                ctx.needs_input_grad[2:4], spec,
            )  # fmt: skip
        else:
            sample_eps = None
            if grad_z is not None:
                sample_eps = eps if eps is not None else ctx.regenerate_eps()
            grads = reference.sample_kl_backward(
                grad_z, grad_kl, mu, logvar, prior_mu, prior_logvar, sample_eps, spec.free_bits
            )
        grad_eps = None
        if grad_z is not None and ctx.needs_input_grad[4]:
            grad_eps = grad_z * torch.exp(0.5 * reference.opmath(logvar))
        inputs = (mu, logvar, prior_mu, prior_logvar, eps)
        return (*(reduce_grad(g, t) for g, t in zip((*grads, grad_eps), inputs)), None)


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


def _sample_kl(mu, logvar, prior_mu, prior_logvar, *, eps, num_samples, generator, free_bits,
               want_z, want_kl):  # fmt: skip
    """Validate the arguments of the sampling / KL ops and run _SampleKL."""
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
    num_samples = V.check_num_samples(num_samples)
    free_bits = V.check_nonnegative_float("free_bits", free_bits)
    shape = V.broadcast_shape({"mu": mu, "logvar": logvar})
    V.check_broadcasts_to("prior_mu", prior_mu, shape, "the posterior's shape")
    V.check_broadcasts_to("prior_logvar", prior_logvar, shape, "the posterior's shape")
    out_shape = shape if num_samples is None else torch.Size((num_samples, *shape))
    V.check_exact_shape("eps", eps, out_shape, "z")
    spec = _SampleSpec(
        shape=shape,
        out_shape=out_shape,
        z_dtype=torch.promote_types(mu.dtype, logvar.dtype),
        want_z=want_z,
        want_kl=want_kl,
        free_bits=free_bits,
        generator=generator,
    )
    return _SampleKL.apply(mu, logvar, prior_mu, prior_logvar, eps, spec)


def reparameterize(mu, logvar, *, eps=None, num_samples=None, generator=None):
    """z = mu + exp(logvar / 2) * eps with eps ~ N(0, I).

    mu, logvar: (..., D), broadcastable. eps: optional, the shape of z. Returns z of shape
    (..., D), or (num_samples, ..., D) when num_samples is given, in the inputs' dtype.
    Without eps the noise is drawn inside the kernel from a seed taken from `generator` (or
    torch's default generator of the device), and backward regenerates it instead of storing it.
    """
    return _sample_kl(
        mu, logvar, None, None, eps=eps, num_samples=num_samples, generator=generator,
        free_bits=0.0, want_z=True, want_kl=False,
    )[0]  # fmt: skip


def gaussian_kl(mu, logvar, prior_mu=None, prior_logvar=None, *, free_bits=0.0):
    """KL(N(mu, diag e^logvar) || N(prior_mu, diag e^prior_logvar)) summed over the last dim.

    mu, logvar: (..., D). prior_mu, prior_logvar: broadcastable to it (e.g. a learnable (D,)),
    None meaning 0. free_bits: each element's KL becomes max(KL_d, free_bits). Returns (...),
    float32 (float64 for float64 inputs).
    """
    return _sample_kl(
        mu, logvar, prior_mu, prior_logvar, eps=None, num_samples=None, generator=None,
        free_bits=free_bits, want_z=False, want_kl=True,
    )[1]  # fmt: skip


def reparameterize_kl(mu, logvar, prior_mu=None, prior_logvar=None, *, eps=None, generator=None):
    """(z, kl) of reparameterize and gaussian_kl in one pass over mu and logvar."""
    return _sample_kl(
        mu, logvar, prior_mu, prior_logvar, eps=eps, num_samples=None, generator=generator,
        free_bits=0.0, want_z=True, want_kl=True,
    )  # fmt: skip


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
