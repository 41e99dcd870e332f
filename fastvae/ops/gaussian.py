"""Diagonal-Gaussian ops: reparameterize, gaussian_kl, reparameterize_kl, gaussian_log_prob.

Each runs one op (fastvae.ops._library: a torch.library operator pair with registered autograd)
whose forward and backward launch the Triton kernels in fastvae.kernels.gaussian (CUDA, or the
interpreter) or the torch math in fastvae.reference.
The last dimension is the latent one. z keeps the inputs' dtype; the per-row reductions (KL,
log-density) are float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.library import wrap_triton

from fastvae import _validate as V
from fastvae import reference
from fastvae._backend import use_triton
from fastvae.kernels.modes import (
    GRAD_NONE,
    GRAD_ROWS,
    GRAD_SAMPLES,
    ROW_KL,
    ROW_LOG_RATIO,
    ROW_NEG_LOG_Q,
    ROW_NONE,
)
from fastvae.ops import _cpu_loops
from fastvae.ops._launch import (
    GradTargets,
    gaussian_kernels,
    grad_buffer,
    grid,
    operand_args,
    row_layout,
    samples_per_program,
    tile,
)
from fastvae.ops._library import empty_grads, fused_op, reduced_grads, register_autograd

_SEED_RANGE = 2**62


@dataclass(frozen=True)
class SampleSpec:
    """What one call of the sample op computes.

    z has out_shape: shape (mu and logvar broadcast), or (num_samples, *shape). The row term (a
    kernels.modes ROW_* mode: the KL, log p(z) - log q(z | x), or -log q(z | x)) has
    out_shape[:-1]. Noise sample k of z is sample first_sample + k of the stream keyed by the
    seed, so chunks of one stream drawn separately equal the stream drawn at once
    (first_sample: a multiple of noise_block). An output not wanted is an empty placeholder.
    """

    shape: torch.Size
    num_samples: int | None
    want_z: bool
    row_term: int
    free_bits: float
    first_sample: int
    z_dtype: torch.dtype

    @classmethod
    def of(cls, mu, logvar, num_samples, want_z, row_term, free_bits, first_sample):
        """The spec from the op's arguments (see _triton_sample's schema)."""
        return _spec_of(mu.shape, logvar.shape, mu.dtype, logvar.dtype, num_samples, want_z,
                        row_term, free_bits, first_sample)  # fmt: skip

    def op_args(self) -> tuple:
        return (self.num_samples, self.want_z, self.row_term, self.free_bits, self.first_sample)

    @property
    def samples(self) -> int:
        return 1 if self.num_samples is None else self.num_samples

    @property
    def out_shape(self) -> torch.Size:
        return (
            self.shape if self.num_samples is None else torch.Size((self.num_samples, *self.shape))
        )

    def with_sample_dim(self, t: Tensor | None) -> Tensor | None:
        """A tensor of z's shape (or of the row term's, with a trailing 1) with its sample dim
        first: a leading 1 added without num_samples."""
        return t if t is None or self.num_samples is not None else t.unsqueeze(0)

    @property
    def noise_offset(self) -> int:
        """The index in the noise stream of z's first element."""
        return self.first_sample * self.shape.numel()

    def empty_outputs(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, row term) buffers, (0,) for an output not wanted."""
        z_shape = self.out_shape if self.want_z else (0,)
        row_shape = self.out_shape[:-1] if self.row_term != ROW_NONE else (0,)
        return (
            torch.empty(z_shape, dtype=self.z_dtype, device=device),
            torch.empty(row_shape, dtype=reference.opmath_dtype(self.z_dtype), device=device),
        )


def _per_signature(fn):
    """fn memoized per call signature (a training loop repeats a few): run uncached under a
    trace, where sizes may be symbolic (unhashable) and Dynamo would not use the cache."""
    cached = functools.lru_cache(maxsize=1024)(fn)

    @functools.wraps(fn)
    def call(*args):
        if torch.compiler.is_compiling():
            return fn(*args)
        try:
            hash(args)
        except TypeError:  # symbolic sizes
            return fn(*args)
        return cached(*args)

    return call


@_per_signature
def _spec_of(mu_shape, logvar_shape, mu_dtype, logvar_dtype, *spec_args) -> SampleSpec:
    shape = V.broadcast_shapes(mu_shape, logvar_shape)
    return SampleSpec(shape, *spec_args, torch.promote_types(mu_dtype, logvar_dtype))


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
    from sample 0 of the stream) comes from a generator seeded seed + b; a uint8 seed is a
    generator state (see _noise_key), from which the whole draw comes."""
    eps = torch.empty(spec.out_shape, device=device, dtype=dtype)
    if seed.dtype == torch.uint8:  # the default generator's state before the draw
        return eps.normal_(generator=torch.Generator(device=device).set_state(seed))
    samples = eps.unsqueeze(0) if spec.num_samples is None else eps
    block = noise_block(spec.shape)
    first_block = int(seed.item()) + spec.first_sample // block
    for i, start in enumerate(range(0, samples.shape[0], block)):
        generator = torch.Generator(device=device).manual_seed(first_block + i)
        samples[start : start + block].normal_(generator=generator)
    return eps


def _triton_sample(
    mu: Tensor,
    logvar: Tensor,
    prior_mu: Tensor | None,
    prior_logvar: Tensor | None,
    eps: Tensor | None,
    seed: Tensor | None,
    num_samples: int | None,
    want_z: bool,
    row_term: int,
    free_bits: float,
    first_sample: int,
) -> tuple[Tensor, Tensor]:
    """The sample op's schema and Triton implementation -> (z, row term)."""
    spec = SampleSpec.of(mu, logvar, num_samples, want_z, row_term, free_bits, first_sample)
    layout = row_layout(
        spec.shape, [mu, logvar, prior_mu, prior_logvar], [spec.with_sample_dim(eps)]
    )
    n_rows, D = layout.n_rows, layout.D
    z, row = spec.empty_outputs(mu.device)
    blocks = tile(n_rows, D, spec.samples)
    wrap_triton(gaussian_kernels().sample_fwd_kernel)[grid(n_rows, blocks["BLOCK_R"])](
        *(a for op in layout.operands for a in operand_args(op, mu)), layout.sample_strides[0],
        mu if seed is None else seed, z, row,
        n_rows, layout.R2, D, spec.samples, spec.noise_offset, spec.free_bits,
        WANT_Z=spec.want_z, ROW_TERM=spec.row_term, HAS_EPS=eps is not None,
        HAS_PRIOR_MU=prior_mu is not None, HAS_PRIOR_LV=prior_logvar is not None,
        USE_FREE_BITS=spec.free_bits > 0.0, **blocks,
    )  # fmt: skip
    return z, row


def _reference_sample(mu, logvar, prior_mu, prior_logvar, eps, seed, *spec_args):
    spec = SampleSpec.of(mu, logvar, *spec_args)
    sample_eps, out = eps, None
    if spec.want_z and eps is None:
        dtype = reference.opmath_dtype(spec.z_dtype)
        if seed is None or seed.dtype == torch.uint8:  # see _noise_key
            sample_eps = torch.empty(spec.out_shape, dtype=dtype, device=mu.device).normal_()
        else:
            sample_eps = _torch_eps(seed, spec, mu.device, dtype)
        if not reference.autograd_records(mu, logvar):  # z overwrites the noise, else kept
            out = sample_eps
    if spec.row_term in (ROW_LOG_RATIO, ROW_NEG_LOG_Q):
        z, row = reference.sample_log_ratio_forward(
            mu, logvar, prior_mu, prior_logvar, sample_eps, spec.row_term == ROW_LOG_RATIO, out
        )
    else:
        want_kl = spec.row_term == ROW_KL
        z, row = reference.sample_kl_forward(
            mu, logvar, prior_mu, prior_logvar, sample_eps, spec.free_bits, want_kl, out
        )
    row_dtype = reference.opmath_dtype(spec.z_dtype)  # placeholders for what was not wanted:
    z = mu.new_empty(0, dtype=spec.z_dtype) if z is None else z.to(spec.z_dtype)
    return z, mu.new_empty(0, dtype=row_dtype) if row is None else row


def _fake_sample(mu, logvar, prior_mu, prior_logvar, eps, seed, *spec_args):
    return SampleSpec.of(mu, logvar, *spec_args).empty_outputs(mu.device)


def _triton_sample_backward(
    grad_z: Tensor | None,
    grad_row: Tensor | None,
    mu: Tensor,
    logvar: Tensor,
    prior_mu: Tensor | None,
    prior_logvar: Tensor | None,
    eps: Tensor | None,
    seed: Tensor | None,
    z: Tensor | None,
    needs: list[bool],
    num_samples: int | None,
    want_z: bool,
    row_term: int,
    free_bits: float,
    first_sample: int,
) -> list[Tensor]:
    """The sample backward op's schema and Triton implementation -> the gradients of (mu,
    logvar, prior_mu, prior_logvar), by reduced_grads. The kernel sums them over the samples,
    and over the rows for an input broadcast over every row (a learnable (D,) prior)."""
    spec = SampleSpec.of(mu, logvar, num_samples, want_z, row_term, free_bits, first_sample)
    row_grad = None if grad_row is None else grad_row.unsqueeze(-1)
    inputs = (mu, logvar, prior_mu, prior_logvar)
    sampled = [spec.with_sample_dim(t) for t in (eps, grad_z, row_grad)]
    layout = row_layout(spec.shape, list(inputs), sampled)
    n_rows, D = layout.n_rows, layout.D
    # 4 elements a thread: at 8 this kernel took 240-255 registers on sm_90, spilling with a
    # learnable prior
    blocks = tile(n_rows, D, spec.samples, per_thread=4)
    programs = grid(n_rows, blocks["BLOCK_R"])
    sum_gplv = prior_logvar is not None and prior_logvar.numel() < spec.shape.numel()
    targets = GradTargets(inputs, needs, spec.shape, programs[0], (False,) * 3 + (sum_gplv,))
    eps_op, gz_op, grow_op = layout.operands[4:]
    sk_eps, sk_gz, sk_grow = layout.sample_strides
    wrap_triton(gaussian_kernels().sample_bwd_kernel)[programs](
        *(a for op in layout.operands[:4] for a in operand_args(op, mu)),
        *operand_args(eps_op, mu), sk_eps, *operand_args(gz_op, mu), sk_gz,
        *operand_args(grow_op, mu)[:3], sk_grow,
        mu if seed is None else seed, *(mu if b is None else b for b in targets.buffers),
        n_rows, layout.R2, D, spec.samples, spec.noise_offset, spec.free_bits,
        HAS_GZ=grad_z is not None, HAS_GROW=grad_row is not None, ROW_TERM=spec.row_term,
        HAS_EPS=eps is not None, HAS_PRIOR_MU=prior_mu is not None,
        HAS_PRIOR_LV=prior_logvar is not None, USE_FREE_BITS=spec.free_bits > 0.0,
        GMU=targets.modes[0], GLV=targets.modes[1], GPMU=targets.modes[2],
        GPLV=targets.modes[3], SUM_GPLV=sum_gplv, **blocks,
    )  # fmt: skip
    return reduced_grads(targets.finish(), inputs, needs)


def _reference_sample_backward(grad_z, grad_row, mu, logvar, prior_mu, prior_logvar, eps, seed,
                               z, needs, *spec_args):  # fmt: skip
    spec = SampleSpec.of(mu, logvar, *spec_args)
    log_ratio = spec.row_term in (ROW_LOG_RATIO, ROW_NEG_LOG_Q)
    deviation = None
    if grad_z is not None or log_ratio:
        deviation = _deviation(mu, logvar, eps, seed, z, spec)
    saved = (mu, logvar, prior_mu, prior_logvar, deviation)
    if log_ratio:
        grads = reference.sample_log_ratio_backward(
            grad_z, grad_row, *saved, spec.row_term == ROW_LOG_RATIO
        )
    else:
        grads = reference.sample_kl_backward(grad_z, grad_row, *saved, spec.free_bits)
    return reduced_grads(grads, (mu, logvar, prior_mu, prior_logvar), needs)


def _fake_sample_backward(grad_z, grad_row, mu, logvar, prior_mu, prior_logvar, eps, seed, z,
                          needs, *spec_args):  # fmt: skip
    return empty_grads((mu, logvar, prior_mu, prior_logvar), needs)


def _deviation(mu, logvar, eps, seed, z, spec: SampleSpec) -> torch.Tensor:
    """z - mu = exp(logvar / 2) * eps for the torch path's backward: from the given eps, else
    from the saved float32/64 z (exact up to z's rounding; the drawn eps is not kept), else
    (half-precision z) from the regenerated noise."""
    if z is not None:
        return reference.opmath(z) - reference.opmath(mu)
    if eps is None:
        eps = _torch_eps(seed, spec, mu.device, reference.opmath_dtype(spec.z_dtype))
    return reference.opmath(eps) * torch.exp(0.5 * reference.opmath(logvar))


def noise_in_graph(shape, dtype: torch.dtype, device) -> Tensor:
    """N(0, 1) noise drawn in a traced graph from the default generator, as normal_(): inductor
    keeps ATen's vectorized kernel for it (the same numbers as eager mode's draw), while it
    lowers torch.randn to a per-element Philox loop, about 6x slower on a CPU."""
    return torch.empty(shape, dtype=dtype, device=device).normal_()


def _traced_sample_args(mu, logvar, prior_mu, prior_logvar, eps, seed, *spec_args):
    """The sample op's arguments under a trace, on the torch path: noise to draw becomes eps
    drawn in the graph (noise_in_graph: torch.manual_seed reproduces a compiled run, and
    without a generator it draws what eager mode draws; not the per-block draws of a seed)."""
    spec = SampleSpec.of(mu, logvar, *spec_args)
    if spec.want_z and eps is None:
        dtype = reference.opmath_dtype(spec.z_dtype)
        eps, seed = noise_in_graph(spec.out_shape, dtype, mu.device), None
    return mu, logvar, prior_mu, prior_logvar, eps, seed, *spec_args


# Up to this many elements of z, the torch path of a sample with no prior and no log ratio runs
# as torch ops that autograd differentiates: cheaper there than an autograd.Function's Python
# layers, while the Function's fused backward wins on larger tensors.
AUTOGRAD_SAMPLE_ELEMENTS = 1 << 15


def _autograd_sample(mu, logvar, prior_mu, prior_logvar, eps, seed, *spec_args) -> bool:
    """Whether autograd differentiates the torch path's sample (see AUTOGRAD_SAMPLE_ELEMENTS)."""
    spec = SampleSpec.of(mu, logvar, *spec_args)
    return (
        spec.row_term in (ROW_NONE, ROW_KL)
        and prior_mu is None
        and prior_logvar is None
        and spec.out_shape.numel() <= AUTOGRAD_SAMPLE_ELEMENTS
    )


_SAMPLE = fused_op("sample", reference=_reference_sample, triton=_triton_sample,
                   fake=_fake_sample, traced_args=_traced_sample_args,
                   plain_autograd=_autograd_sample)  # fmt: skip
_SAMPLE_BACKWARD = fused_op("sample_backward", reference=_reference_sample_backward,
                            triton=_triton_sample_backward, fake=_fake_sample_backward)  # fmt: skip


def _setup_sample(ctx, inputs, output):
    """Saves the inputs; the torch path also keeps a float32/64 z drawn in-op (its backward
    takes z - mu from it); the Triton path regenerates the noise from the seed instead."""
    mu, logvar, prior_mu, prior_logvar, eps, seed, *spec_args = inputs
    spec = SampleSpec.of(mu, logvar, *spec_args)
    z = output[0]
    keep_z = not ctx.triton and spec.want_z and eps is None
    keep_z = keep_z and z.dtype in (torch.float32, torch.float64)
    ctx.spec_args = spec_args
    ctx.save_for_backward(mu, logvar, prior_mu, prior_logvar, eps, seed, z if keep_z else None)


def _sample_backward(ctx, grad_z, grad_row):
    mu, logvar, prior_mu, prior_logvar, eps, seed, z = ctx.saved_tensors
    spec = SampleSpec.of(mu, logvar, *ctx.spec_args)
    grad_z = grad_z if spec.want_z else None
    grad_row = grad_row if spec.row_term != ROW_NONE else None
    no_grads = (None,) * (6 + len(ctx.spec_args))
    if grad_z is None and grad_row is None:
        return no_grads
    needs = list(ctx.needs_input_grad[:4])
    grads = _SAMPLE_BACKWARD(ctx.triton, grad_z, grad_row, mu, logvar, prior_mu, prior_logvar,
                             eps, seed, z, needs, *ctx.spec_args)  # fmt: skip
    grad_eps = None
    if grad_z is not None and ctx.needs_input_grad[4]:
        grad_eps = (grad_z * torch.exp(0.5 * reference.opmath(logvar))).to(eps.dtype)
    grads = [g if need else None for g, need in zip(grads, needs)]
    return (*grads, grad_eps, *no_grads[5:])


register_autograd(_SAMPLE, _setup_sample, _sample_backward)


def _log_prob_dtype(x, mu, logvar) -> torch.dtype:
    dtype = torch.promote_types(x.dtype, mu.dtype)
    return reference.opmath_dtype(
        dtype if logvar is None else torch.promote_types(dtype, logvar.dtype)
    )


def _log_prob_shape(x, mu, logvar) -> torch.Size:
    return V.broadcast_shapes(*(t.shape for t in (x, mu, logvar) if t is not None))


def _fake_log_prob(x, mu, logvar, fixed_logvar):
    shape = _log_prob_shape(x, mu, logvar)
    return x.new_empty(shape[:-1], dtype=_log_prob_dtype(x, mu, logvar))


def _logvar_tensor(x, mu, logvar, fixed_logvar) -> Tensor:
    """logvar, or the fixed value as a (1,) tensor, for the reference's tensor formulas."""
    if logvar is not None:
        return logvar
    return x.new_full((1,), fixed_logvar, dtype=_log_prob_dtype(x, mu, None))


def _loop_log_prob(x, mu, logvar):
    """The log-density per row, (R1, R2): -((x - mu)^2 e^-logvar + logvar + log 2 pi) / 2."""
    x, mu, logvar = (t.to(torch.float32) for t in (x, mu, logvar))
    quad = (x - mu).square() * torch.exp(-logvar)
    return (quad + logvar + 1.8378770664093453).sum(-1) * -0.5


def _loop_log_prob_grads(x, mu, logvar, grad, wants: tuple[bool, bool, bool], summed: bool):
    """(-g s, g s, g (diff s - 1) / 2) with diff = x - mu, s = diff e^-logvar (None where not
    wanted), each summed to its operand's grid in the loop where `summed` (e.g. mu's over K
    samples), else per element."""
    inputs = (x, mu, logvar)
    x, mu, logvar, g = (t.to(torch.float32) for t in (x, mu, logvar, grad))
    diff = x - mu
    scaled = diff * torch.exp(-logvar)
    grads = (-g * scaled, g * scaled, 0.5 * g * (diff * scaled - 1.0))
    return tuple(
        None if not want else grad.sum_to_size(t.shape) if summed else grad
        for grad, t, want in zip(grads, inputs, wants)
    )


LOG_PROB_LOOP_ELEMENTS = 1 << 18  # from here the CPU loops' speed pays for their fixed cost
_LOG_PROB_LOOP = _cpu_loops.CpuLoop(_loop_log_prob, LOG_PROB_LOOP_ELEMENTS)
_LOG_PROB_GRADS_LOOP = _cpu_loops.CpuLoop(
    _loop_log_prob_grads, LOG_PROB_LOOP_ELEMENTS, gradients=True
)


def _reference_log_prob(x, mu, logvar, fixed_logvar):
    full_logvar = _logvar_tensor(x, mu, logvar, fixed_logvar)
    shape = _log_prob_shape(x, mu, logvar)
    out = _LOG_PROB_LOOP(shape, [x, mu, full_logvar])
    return reference.log_prob_forward(x, mu, full_logvar) if out is None else out


class _LogProbPlan(NamedTuple):
    """How the log-density kernels read x, mu, logvar and the incoming gradient: `samples` x
    n_rows (R2 the inner row dim, see row_layout) x D, `per_program` samples a program, on
    `programs`; each operand a tensor (or None) with its (s1, s2, sd, sample stride)."""

    tensors: list[Tensor | None]
    strides: tuple[tuple[int, int, int, int], ...]
    n_rows: int
    R2: int
    D: int
    samples: int
    per_program: int
    summed: tuple[bool, bool, bool]  # x, mu, logvar: broadcast over the samples
    blocks: dict
    programs: tuple[int, int]

    def operand_args(self, i: int, placeholder: Tensor) -> tuple:
        """Operand i's (pointer, s1, s2, sd, sample stride); an absent one reads nothing."""
        t = self.tensors[i]
        return (placeholder if t is None else t, *self.strides[i])

    def read_once(self) -> dict:
        """Which of x, mu, logvar have sample stride 0: each tile is loaded once for every
        sample."""
        return {f"{name}_ONCE": s[3] == 0 for name, s in zip(("X", "MU", "LV"), self.strides)}


@_per_signature
def _sampled_geometry(sampled_shape: torch.Size, metas: tuple) -> tuple | None:
    """(n_rows, R2, D, per-operand strides) of row_layout over sampled_shape[1:] for operands
    of the given (shape, stride) metas (None: absent), read a sample at a time; None where
    the rows merge only in contiguous copies."""
    tensors = [
        None if m is None else torch.empty_strided(*m, device="meta").expand(sampled_shape)
        for m in metas
    ]
    layout = row_layout(sampled_shape[1:], [], tensors)
    if layout.copied:
        return None
    strides = tuple(
        (0, 0, 0, 0) if op is None else (op.s1, op.s2, op.sd, sk)
        for op, sk in zip(layout.operands, layout.sample_strides)
    )
    return layout.n_rows, layout.R2, layout.D, strides


def _meta(t: Tensor | None) -> tuple | None:
    return None if t is None else (tuple(t.shape), t.stride())


def _log_prob_plan(shape, x, mu, logvar, grad=None) -> _LogProbPlan:
    """The plan of a log-density launch on x, mu, logvar (and grad, shape[:-1]) of the broadcast
    `shape`. Where one of them is broadcast over shape's first dim (K samples scored against
    one (B, D) posterior, or K decoder outputs against one x), that dim is the kernels' sample
    loop: the operand is read once a tile, and its gradient summed over the samples in the
    kernel. Otherwise every row is its own and there is one sample. The strides are computed
    once per signature."""
    summed = tuple(
        t is not None and len(shape) > 2 and (t.dim() < len(shape) or t.shape[0] == 1)
        for t in (x, mu, logvar)
    )
    sampled_shape = shape if shape[0] > 1 and any(summed) else torch.Size((1, *shape))
    tensors = [x, mu, logvar, None if grad is None else grad.unsqueeze(-1)]
    geometry = _sampled_geometry(sampled_shape, tuple(_meta(t) for t in tensors))
    if geometry is None:  # no strides merge the rows: read contiguous copies
        tensors = [None if t is None else t.expand(sampled_shape).contiguous() for t in tensors]
        geometry = _sampled_geometry(sampled_shape, tuple(_meta(t) for t in tensors))
    n_rows, R2, D, strides = geometry
    samples = sampled_shape[0]
    # 4 elements a thread: at 8, the backward's sample loop (its per-sample addresses and the
    # summed gradients) took 255 registers on sm_90 and spilled
    blocks = tile(n_rows, D, per_thread=4)
    row_programs = grid(n_rows, blocks["BLOCK_R"])[0]
    per_program = samples_per_program(row_programs, samples)
    programs = (row_programs, -(-samples // per_program))
    return _LogProbPlan(tensors, strides, n_rows, R2, D, samples, per_program, summed, blocks,
                        programs)  # fmt: skip


def _triton_log_prob(x: Tensor, mu: Tensor, logvar: Tensor | None, fixed_logvar: float) -> Tensor:
    """The log_prob op's schema and Triton implementation; logvar None: every element's is
    fixed_logvar."""
    shape = _log_prob_shape(x, mu, logvar)
    plan = _log_prob_plan(shape, x, mu, logvar)
    out = torch.empty(shape[:-1], dtype=torch.float32, device=x.device)
    wrap_triton(gaussian_kernels().log_prob_fwd_kernel)[plan.programs](
        *(a for i in range(3) for a in plan.operand_args(i, x)), fixed_logvar, out,
        plan.n_rows, plan.R2, plan.D, plan.samples, plan.per_program,
        HAS_LOGVAR=logvar is not None, **plan.read_once(), **plan.blocks,
    )  # fmt: skip
    return out


def _triton_log_prob_backward(
    grad: Tensor, x: Tensor, mu: Tensor, logvar: Tensor | None, fixed_logvar: float,
    needs: list[bool],
) -> list[Tensor]:  # fmt: skip
    """Gradients of x, mu and logvar: one written per sample, or, for an operand broadcast over
    the samples, summed over them by the kernel (per chunk of samples where the programs split
    them, then added up here)."""
    shape = _log_prob_shape(x, mu, logvar)
    plan = _log_prob_plan(shape, x, mu, logvar, grad)
    chunks = plan.programs[1]
    inputs = (x, mu, logvar)
    modes = [
        GRAD_NONE if not need else GRAD_SAMPLES if summed else GRAD_ROWS
        for need, summed in zip(needs, plan.summed)
    ]  # fmt: skip
    row_shape = shape[1:]
    grads = [
        None if mode == GRAD_NONE
        else grad_buffer(t, shape) if mode == GRAD_ROWS
        else grad_buffer(t, row_shape) if chunks == 1
        else torch.empty((chunks, *row_shape), dtype=torch.float32, device=t.device)
        for t, mode in zip(inputs, modes)
    ]  # fmt: skip
    wrap_triton(gaussian_kernels().log_prob_bwd_kernel)[plan.programs](
        *(a for i in range(3) for a in plan.operand_args(i, x)), fixed_logvar,
        *plan.operand_args(3, x)[:3], plan.strides[3][3],
        *(x if g is None else g for g in grads),
        plan.n_rows, plan.R2, plan.D, plan.samples, plan.per_program,
        HAS_LOGVAR=logvar is not None, **plan.read_once(),
        GX=modes[0], GMU=modes[1], GLV=modes[2], **plan.blocks,
    )  # fmt: skip
    if chunks > 1:
        grads = [g.sum(0) if m == GRAD_SAMPLES else g for g, m in zip(grads, modes)]
    return reduced_grads(grads, inputs, needs)


def _reference_log_prob_backward(grad, x, mu, logvar, fixed_logvar, needs):
    full_logvar = _logvar_tensor(x, mu, logvar, fixed_logvar)
    shape = _log_prob_shape(x, mu, logvar)
    tensors = [x, mu, full_logvar, grad.unsqueeze(-1)]
    if _LOG_PROB_GRADS_LOOP.applies(shape, tensors):
        # An expanded input's gradient is per element (its expand's backward sums it), the
        # others' are summed in the loop (an expanded one that takes none does not matter).
        inputs = (x, mu, logvar)
        summed = not any(need and _cpu_loops.expanded(t) for t, need in zip(inputs, needs))
        grads = _LOG_PROB_GRADS_LOOP(shape, tensors, tuple(needs), summed)
    else:
        grads = None
    if grads is None:
        grads = reference.log_prob_backward(grad, x, mu, full_logvar, needs)
    return reduced_grads(grads, (x, mu, logvar), needs)


def _fake_log_prob_backward(grad, x, mu, logvar, fixed_logvar, needs):
    return empty_grads((x, mu, logvar), needs)


_LOG_PROB = fused_op("gaussian_log_prob", reference=_reference_log_prob,
                     triton=_triton_log_prob, fake=_fake_log_prob)  # fmt: skip
_LOG_PROB_BACKWARD = fused_op(
    "gaussian_log_prob_backward", reference=_reference_log_prob_backward,
    triton=_triton_log_prob_backward, fake=_fake_log_prob_backward,
)  # fmt: skip


def _setup_log_prob(ctx, inputs, output):
    x, mu, logvar, ctx.fixed_logvar = inputs
    ctx.save_for_backward(x, mu, logvar)


def _log_prob_backward(ctx, grad):
    if grad is None:
        return None, None, None, None
    needs = list(ctx.needs_input_grad[:3])
    grads = _LOG_PROB_BACKWARD(ctx.triton, grad, *ctx.saved_tensors, ctx.fixed_logvar, needs)
    return *(g if need else None for g, need in zip(grads, needs)), None


register_autograd(_LOG_PROB, _setup_log_prob, _log_prob_backward)


def sample(mu, logvar, prior_mu=None, prior_logvar=None, *, eps=None, num_samples=None,
           generator=None, seed=None, want_z=True, row_term=ROW_NONE, free_bits=0.0,
           first_sample=0):  # fmt: skip
    """Validate the arguments of the sampling ops and run the sample op -> (z, row term), an
    output not wanted being an empty placeholder.

    The noise comes from `eps`, else from `seed` ((1,) int64 on the device), else from a seed
    drawn from `generator`. row_term, free_bits, first_sample: see SampleSpec.
    """
    tensors = (mu, logvar, prior_mu, prior_logvar, eps)
    for name, value in zip(_SAMPLE_TENSORS, tensors):
        if value is not None or name in ("mu", "logvar"):
            V.check_tensor(name, value)
    if generator is not None:
        V.check_generator(generator, mu.device)
        if eps is not None:
            raise ValueError("pass either eps or generator, not both: eps fixes the noise")
    if row_term in (ROW_LOG_RATIO, ROW_NEG_LOG_Q) and eps is not None and eps.requires_grad:
        raise ValueError("eps takes no gradient when the log importance ratio is computed")
    if num_samples is not None:
        num_samples = V.check_num_samples(num_samples)
        if row_term == ROW_KL:  # the row term would be (K, ...) on one path, (...) on the other
            raise ValueError("num_samples takes no KL: the KL does not depend on the samples")
    if free_bits != 0.0 or type(free_bits) is not float:
        free_bits = V.check_nonnegative_float("free_bits", free_bits)
    metas = tuple(None if t is None else V.Meta(t.shape, t.dtype, t.device) for t in tensors)
    spec = _checked_spec(metas, num_samples, want_z, row_term, free_bits, first_sample)
    if first_sample:
        if seed is None:
            raise ValueError("first_sample needs seed: it picks samples of a seed's stream")
        if first_sample % noise_block(spec.shape):
            block = noise_block(spec.shape)
            raise ValueError(f"first_sample must be a multiple of noise_block = {block}")
    triton = use_triton(mu.device, spec.z_dtype) and spec.out_shape.numel() > 0
    if want_z and eps is None and seed is None:
        seed = _noise_key(triton, generator, spec, mu.device)
    return _SAMPLE(triton, mu, logvar, prior_mu, prior_logvar, eps, seed, *spec.op_args())


_SAMPLE_TENSORS = ("mu", "logvar", "prior_mu", "prior_logvar", "eps")


@_per_signature
def _checked_spec(metas, num_samples, want_z, row_term, free_bits, first_sample) -> SampleSpec:
    """The spec of a sample call after the checks that depend only on its tensors' shapes,
    dtypes and devices (metas: V.Meta or None each, as _SAMPLE_TENSORS)."""
    named = dict(zip(_SAMPLE_TENSORS, metas))
    V.check_same_device(named)
    shape = V.broadcast_shape({"mu": named["mu"], "logvar": named["logvar"]})
    V.check_broadcasts_to("prior_mu", named["prior_mu"], shape, "the posterior's shape")
    V.check_broadcasts_to("prior_logvar", named["prior_logvar"], shape, "the posterior's shape")
    z_dtype = torch.promote_types(named["mu"].dtype, named["logvar"].dtype)
    spec = SampleSpec(shape, num_samples, want_z, row_term, free_bits, first_sample, z_dtype)
    V.check_exact_shape("eps", named["eps"], spec.out_shape, "z")
    return spec


def _noise_key(triton: bool, generator, spec: SampleSpec, device) -> Tensor | None:
    """What drawn noise is keyed by: a seed drawn from the generator for the kernels (whose
    backward regenerates the noise) and for a caller's generator. The torch path otherwise
    draws from the default generator itself: None, or for a half-precision z (whose backward
    regenerates the noise rather than keep it in float32) that generator's state before the
    draw, so that the noise is the same as a float32 z's."""
    if triton or generator is not None:
        return draw_seed(generator, device)
    if spec.z_dtype in (torch.float32, torch.float64) or torch.compiler.is_compiling():
        return None
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.random.get_rng_state()


def reparameterize(mu, logvar, *, eps=None, num_samples=None, generator=None):
    """z = mu + exp(logvar / 2) * eps with eps ~ N(0, I).

    mu, logvar: (..., D), broadcastable. eps: optional, the shape of z. Returns z of shape
    (..., D), or (num_samples, ..., D) when num_samples is given, in the inputs' dtype.
    Without eps the noise comes from `generator` (or torch's default generator of the device)
    and the kernels never store it: they draw it from a seed taken from the generator and their
    backward regenerates it; the torch path draws it into z's buffer and its backward uses
    z - mu (below AUTOGRAD_SAMPLE_ELEMENTS it runs under autograd, which keeps the noise).
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


def _check_logvar(logvar) -> tuple[Tensor | None, float]:
    """gaussian_log_prob's logvar as the op takes it: (a tensor, or None with the fixed value)."""
    if logvar is None:
        return None, 0.0
    if isinstance(logvar, numbers.Real) and not isinstance(logvar, bool):
        return None, float(logvar)
    if not isinstance(logvar, torch.Tensor):
        raise TypeError(
            f"logvar must be a torch.Tensor, a float or None, got {type(logvar).__name__}"
        )
    return V.check_tensor("logvar", logvar, allow_scalar=True), 0.0


def gaussian_log_prob(x, mu, logvar):
    """log N(x; mu, diag exp(logvar)) summed over the last dim.

    x, mu, logvar broadcast together to (..., D) (e.g. K samples (K, B, D) against one
    posterior (B, D)). logvar may also be one value for every element, at about the cost of
    a squared error: None (unit variance: the "MSE" decoder), a float, or a 0-dim tensor (which
    gets its gradient). Returns (...), float32 (float64 for float64 inputs).
    On the torch path one value runs as plain torch ops (reference.fixed_variance_log_prob),
    which autograd differentiates: cheaper there than an op's Python layers.
    """
    named = {"x": x, "mu": mu}
    for name, value in named.items():
        V.check_tensor(name, value)
    logvar, fixed_logvar = _check_logvar(logvar)
    named["logvar"] = logvar
    V.check_same_device(named)
    shape = V.broadcast_shape(named)
    triton = use_triton(x.device, _log_prob_dtype(x, mu, logvar)) and shape.numel() > 0
    if not triton and (logvar is None or logvar.dim() == 0):
        fixed = fixed_logvar if logvar is None else logvar
        return reference.fixed_variance_log_prob(x, mu, fixed, shape)
    return _LOG_PROB(triton, x, mu, logvar, fixed_logvar)
