"""reparameterize_kl_tril against torch.distributions.MultivariateNormal (float64 oracle), on
both code paths: outputs, and the gradients of sum(z * g) + sum(kl * h) for random g and h
(the op is not the last layer) for mu, scale_tril and a given eps.

The drawn noise is checked three ways: it is, element for element, the noise
`reparameterize` draws for a z of the same shape from the same generator state (whose
distribution tests/test_noise.py checks), so the oracle can use it exactly; its moments after
solving z = mu + L eps back for eps; and it is never stored for backward.
"""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import assert_close, grads
from torch.distributions import MultivariateNormal, kl_divergence

import fastvae
from fastvae.ops import tril

FP32 = {"out": {"rtol": 1e-5, "atol": 1e-5}, "grad": {"rtol": 1e-4, "atol": 1e-5}}
LOW = {
    torch.float16: {"out": {"rtol": 2e-3, "atol": 2e-3}, "grad": {"rtol": 2e-3, "atol": 2e-3}},
    torch.bfloat16: {"out": {"rtol": 1e-2, "atol": 1e-2}, "grad": {"rtol": 1e-2, "atol": 1e-2}},
}


def oracle(mu, scale_tril, eps):
    """(z, kl) by torch.distributions in float64. KL(q || N(0, I)) depends on L L^T only, so q
    takes L with each column's sign flipped to make the diagonal positive (torch's KL takes
    log L_dd, not log |L_dd|); z = mu + L eps with L itself."""
    L = scale_tril.tril()
    signs = torch.where(L.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(L.dtype)
    q = MultivariateNormal(mu, scale_tril=L * signs.unsqueeze(-2), validate_args=False)
    eye = torch.eye(mu.shape[-1], dtype=mu.dtype).expand_as(L)
    p = MultivariateNormal(torch.zeros_like(mu), scale_tril=eye, validate_args=False)
    z = mu + (L @ eps.unsqueeze(-1)).squeeze(-1)
    if mu.shape[:-1].numel() == 0:  # torch.distributions divides by the batch size
        return z, mu.sum(-1)
    return z, kl_divergence(q, p)


def scale_tril_values(*shape, diag=1.5, off=0.3):
    """A well-conditioned (..., D, D) scale: diagonal diag +- 0.25, the rest N(0, off^2)
    (upper triangle included: the op must ignore it)."""
    D = shape[-1]
    values = off * torch.randn(*shape, D)
    values.diagonal(dim1=-2, dim2=-1).copy_(diag + 0.5 * torch.rand(*shape) - 0.25)
    return values


def posterior(*shape, eps=True):
    inputs = {"mu": torch.randn(*shape), "scale_tril": scale_tril_values(*shape)}
    if eps:
        inputs["eps"] = torch.randn(*shape)
    return inputs


def check_tril(inputs, device, dtype=torch.float32, tol=FP32, generator_seed=None):
    """Run the op on `inputs` and the oracle on the same values in float64.

    inputs: name -> base tensor, or (base tensor, view): the base is the leaf that gets a
    gradient, the view is what the op receives. Without an eps, the op draws its noise from a
    generator seeded generator_seed, and the oracle uses the noise `reparameterize` draws from
    an equal generator."""
    inputs = {k: v if isinstance(v, tuple) else (v, None) for k, v in inputs.items()}

    def leaves_and_views(dev, dt):
        leaves = {k: base.detach().to(dtype).to(dev, dt, copy=True).requires_grad_()
                  for k, (base, _) in inputs.items()}  # fmt: skip
        views = {k: view(leaves[k]) if view else leaves[k] for k, (_, view) in inputs.items()}
        return leaves, views

    ours_leaves, ours = leaves_and_views(device, dtype)
    ref_leaves, ref = leaves_and_views("cpu", torch.float64)
    kwargs = {}
    if "eps" not in ours:
        generator_seed = 0 if generator_seed is None else generator_seed
        kwargs["generator"] = torch.Generator(device).manual_seed(generator_seed)
        zeros = torch.zeros(ours["mu"].shape, device=device)
        same = torch.Generator(device).manual_seed(generator_seed)
        ref["eps"] = fastvae.reparameterize(zeros, zeros, generator=same).double().cpu()
    z, kl = fastvae.reparameterize_kl_tril(**ours, **kwargs)
    z_ref, kl_ref = oracle(**ref)
    assert z.device.type == torch.device(device).type
    assert z.dtype == torch.promote_types(ours["mu"].dtype, ours["scale_tril"].dtype)
    assert kl.dtype == (torch.float64 if z.dtype == torch.float64 else torch.float32)
    assert_close("z", z, z_ref, **tol["out"])
    assert_close("kl", kl, kl_ref, **tol["out"])
    g, h = torch.randn(z_ref.shape, dtype=torch.float64), torch.randn(kl_ref.shape).double()
    ours_grads = grads([(z, g.to(device, z.dtype)), (kl, h.to(device, kl.dtype))],
                       list(ours_leaves.values()))  # fmt: skip
    ref_grads = grads([(z_ref, g), (kl_ref, h)], list(ref_leaves.values()))
    for name, a, e in zip(ours_leaves, ours_grads, ref_grads):
        assert a is not None, f"no gradient for {name}"
        assert a.dtype == ours_leaves[name].dtype
        assert_close(f"grad {name}", a, e, **tol["grad"])
    return z, kl, dict(zip(ours_leaves, ours_grads))


# -- shapes, layouts, tiles ------------------------------------------------------------------


@pytest.mark.parametrize("D", [1, 2, 7, 33])
@pytest.mark.parametrize("B", [0, 1, 3])
def test_shapes(path, B, D):
    check_tril(posterior(B, D), path[1])


@pytest.mark.parametrize("eps", [True, False], ids=["eps", "drawn"])
def test_large_latent(path, eps):
    """D = 256: several k blocks a program in the interpreter; see test_gpu_tiles too."""
    check_tril(posterior(2, 256, eps=eps), path[1])


def test_batch_dims(path):
    check_tril(posterior(2, 3, 5), path[1])
    check_tril(posterior(2, 3, 5, eps=False), path[1])


def test_empty_latent(path):
    mu = torch.zeros(3, 0, device=path[1], requires_grad=True)
    scale_tril = torch.zeros(3, 0, 0, device=path[1], requires_grad=True)
    z, kl = fastvae.reparameterize_kl_tril(mu, scale_tril)
    assert z.shape == (3, 0) and torch.equal(kl, torch.zeros(3, device=path[1]))
    kl.sum().backward()
    assert mu.grad.shape == (3, 0) and scale_tril.grad.shape == (3, 0, 0)


def strided_scale(base_shape, view):
    """(base, view) of a scale_tril whose view is well-conditioned (its diagonal set through
    the view)."""
    base = 0.3 * torch.randn(base_shape)
    view(base).diagonal(dim1=-2, dim2=-1).copy_(1.5)
    return base, view


LAYOUTS = {
    # name -> (mu, scale_tril), each a tensor or (base, view)
    "transposed scale_tril": lambda: (
        torch.randn(4, 6),
        strided_scale((4, 6, 6), lambda t: t.transpose(-1, -2)),
    ),
    "strided": lambda: (
        (torch.randn(6, 4), lambda t: t.t()),
        strided_scale((8, 7, 12), lambda t: t[::2, 1:, ::2]),
    ),
    "shared scale_tril": lambda: (
        torch.randn(4, 6),
        (scale_tril_values(1, 6), lambda t: t.expand(4, 6, 6)),
    ),
    "unmergeable batch dims": lambda: (  # mu's (2, 2, 3) batch: operands made contiguous
        (torch.randn(2, 2, 3, 6), lambda t: t.permute(1, 0, 2, 3)),
        scale_tril_values(2, 2, 3, 6),
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts(path, layout):
    mu, scale_tril = LAYOUTS[layout]()
    shape = (mu[1](mu[0]) if isinstance(mu, tuple) else mu).shape
    eps = (torch.randn(*shape[:-1], 2 * shape[-1]), lambda t: t[..., 1::2])
    check_tril({"mu": mu, "scale_tril": scale_tril, "eps": eps}, path[1])
    check_tril({"mu": mu, "scale_tril": scale_tril}, path[1], generator_seed=5)


@pytest.mark.parametrize("blocks", [(4, 2), (2, 4), (1, 2)], ids=["4x2", "2x4", "1x2"])
def test_small_tiles(path, blocks, monkeypatch):
    """Tiles much smaller than D: several row and column blocks, the forward's per-block KL
    parts summed, the backward's zero blocks above the diagonal."""
    block_i, block_k = blocks
    tiles = {"BLOCK_I": block_i, "BLOCK_K": block_k, "num_warps": 1}
    monkeypatch.setattr(tril, "tril_tile", lambda D: tiles)
    check_tril(posterior(2, 7), path[1])
    check_tril(posterior(1, 9, eps=False), path[1])


def test_gpu_tiles(path, monkeypatch):
    """The GPU's 32 x 32 tiles (three blocks of D = 70 each way) in the interpreter."""
    monkeypatch.setattr("fastvae.ops._launch.interpreting", lambda: False)
    assert tril.tril_tile(256)["BLOCK_I"] == tril.tril_tile(256)["BLOCK_K"] == 32
    check_tril(posterior(1, 70), path[1])
    check_tril(posterior(1, 70, eps=False), path[1])


# -- dtypes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(path, dtype):
    check_tril(posterior(3, 6), path[1], dtype=dtype, tol=LOW[dtype])
    check_tril(posterior(3, 6, eps=False), path[1], dtype=dtype, tol=LOW[dtype])


def test_mixed_dtypes(path):
    """float32 mu with a float64 scale_tril computes in float64 (the torch path); bfloat16 mu
    with a float32 scale_tril gives a float32 z."""
    mu, scale_tril = torch.randn(3, 4, device=path[1]), scale_tril_values(3, 4).to(path[1])
    z, kl = fastvae.reparameterize_kl_tril(mu, scale_tril.double())
    assert z.dtype == kl.dtype == torch.float64
    z, kl = fastvae.reparameterize_kl_tril(mu.bfloat16(), scale_tril)
    assert z.dtype == kl.dtype == torch.float32


def test_float64_gradcheck():
    """float64 runs the torch path: gradcheck with a given eps, and with drawn noise (a
    generator seeded alike at every call), whose backward regenerates the noise."""
    mu, eps = (torch.randn(2, 3, dtype=torch.float64, requires_grad=True) for _ in "ab")
    scale_tril = scale_tril_values(2, 3).double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda m, s, e: fastvae.reparameterize_kl_tril(m, s, eps=e), (mu, scale_tril, eps)
    )

    def drawn(m, s):
        return fastvae.reparameterize_kl_tril(m, s, generator=torch.Generator().manual_seed(3))

    assert torch.autograd.gradcheck(drawn, (mu, scale_tril))


# -- the triangle and the diagonal -----------------------------------------------------------


@pytest.mark.parametrize("eps", [True, False], ids=["eps", "drawn"])
def test_upper_triangle_is_ignored(path, eps):
    """Any values above the diagonal (NaN and inf included) change nothing and get exactly 0."""
    device = path[1]
    mu = torch.randn(3, 5, device=device)
    lower = scale_tril_values(3, 5).tril().to(device)
    full = lower + torch.randn(3, 5, 5, device=device).triu(1) * 1e30
    full[0, 0, 4], full[1, 2, 3] = math.nan, math.inf
    noise = {"eps": torch.randn(3, 5, device=device)} if eps else {}
    results = []
    for scale_tril in (lower, full):
        scale_tril = scale_tril.detach().requires_grad_()
        gen = {} if eps else {"generator": torch.Generator(device).manual_seed(1)}
        z, kl = fastvae.reparameterize_kl_tril(mu, scale_tril, **noise, **gen)
        g = torch.arange(1.0, 16.0, device=device).view(3, 5)
        (grad,) = torch.autograd.grad((z * g).sum() + (kl * g[:, 0]).sum(), scale_tril)
        results.append((z, kl, grad))
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a, b)
    grad = results[1][2]
    below = torch.ones(5, 5, dtype=torch.bool, device=device).tril()
    assert torch.equal(grad.triu(1), torch.zeros_like(grad)) and (grad[:, below] != 0).all()


def test_negative_diagonal(path):
    """The KL takes log |L_dd|: a negative diagonal gives the KL of L with that column negated
    (the same covariance), and the gradient 1 / L_dd keeps its sign."""
    inputs = posterior(4, 5)
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0])
    inputs["scale_tril"] = inputs["scale_tril"] * signs
    check_tril(inputs, path[1])


def test_zero_diagonal_gives_infinite_kl(path):
    """log |0| = -inf: the KL is +inf (not an error); z stays finite."""
    device = path[1]
    scale_tril = scale_tril_values(3, 4).to(device)
    scale_tril[1, 2, 2] = 0.0
    z, kl = fastvae.reparameterize_kl_tril(torch.randn(3, 4, device=device), scale_tril)
    assert kl[1] == math.inf and kl[[0, 2]].isfinite().all() and z.isfinite().all()


def test_nan_in_nan_out(path):
    device = path[1]
    mu = torch.randn(3, 4, device=device)
    scale_tril = scale_tril_values(3, 4).to(device)
    mu[0, 1] = math.nan
    scale_tril[2, 3, 1] = math.nan  # in the lower triangle: z_3 = ... + L_31 eps_1
    z, kl = fastvae.reparameterize_kl_tril(mu, scale_tril)
    assert z.isnan().nonzero().tolist() == [[0, 1], [2, 3]]
    assert kl.isnan().tolist() == [True, False, True]


# -- the drawn noise -------------------------------------------------------------------------


def test_drawn_noise_is_regenerated_in_backward(path):
    """With drawn noise the gradient of L is g_z eps^T below the diagonal, eps the noise
    that drew z (recovered by solving z - mu = L eps)."""
    device = path[1]
    mu = torch.randn(4, 6, device=device, requires_grad=True)
    scale_tril = scale_tril_values(4, 6).to(device).requires_grad_()
    z, _ = fastvae.reparameterize_kl_tril(mu, scale_tril)
    g = torch.randn_like(z)
    g_mu, g_scale = torch.autograd.grad((z * g).sum(), (mu, scale_tril))
    L = scale_tril.detach().double().cpu().tril()
    deviation = (z - mu).detach().double().cpu().unsqueeze(-1)
    eps = torch.linalg.solve_triangular(L, deviation, upper=False).squeeze(-1)
    expected = (g.double().cpu().unsqueeze(-1) * eps.unsqueeze(-2)).tril()
    assert_close("grad mu", g_mu, g)
    assert_close("grad scale_tril", g_scale, expected, rtol=1e-4, atol=1e-5)


def test_noise_moments(path):
    """L = I_64 (x) A for a dense lower-triangular 4 x 4 A, D = 256: each row holds 64
    independent draws of N(0, A A^T). The noise solved back from z has mean 0 and covariance
    I, and z's 4-dim blocks have covariance A A^T."""
    device = path[1]
    A = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.8, 0, 0], [-0.7, 0.3, 0.6, 0], [0.2, -0.4, 0.9, 1.2]])
    L = torch.kron(torch.eye(64), A)
    B = 16
    mu = torch.full((B, 256), 0.5)
    z, _ = fastvae.reparameterize_kl_tril(mu.to(device), L.expand(B, 256, 256).to(device))
    deviation = z.double().cpu() - 0.5
    eps = torch.linalg.solve_triangular(L.double(), deviation.unsqueeze(-1), upper=False)
    eps = eps.reshape(-1, 4)  # 1024 draws of 4 independent N(0, 1)
    n = eps.shape[0]
    assert eps.mean(0).abs().max() < 5 / n**0.5
    assert_close("cov eps", torch.cov(eps.t()), torch.eye(4).double(), rtol=0, atol=6 / n**0.5)
    sigma = (A @ A.t()).double()
    cov_z = torch.cov(deviation.reshape(-1, 4).t())
    assert_close("cov z", cov_z, sigma, rtol=0, atol=6 * sigma.diagonal().max().item() / n**0.5)


def test_manual_seed_reproduces_and_calls_differ(path):
    mu, scale_tril = torch.randn(3, 5, device=path[1]), scale_tril_values(3, 5).to(path[1])
    torch.manual_seed(123)
    first = fastvae.reparameterize_kl_tril(mu, scale_tril)[0]
    second = fastvae.reparameterize_kl_tril(mu, scale_tril)[0]
    torch.manual_seed(123)
    assert torch.equal(fastvae.reparameterize_kl_tril(mu, scale_tril)[0], first)
    assert (first != second).all()


def test_generator_argument(path):
    mu, scale_tril = torch.randn(3, 5, device=path[1]), scale_tril_values(3, 5).to(path[1])
    default_state = torch.random.get_rng_state()
    gen_a = torch.Generator(device=path[1]).manual_seed(7)
    gen_b = torch.Generator(device=path[1]).manual_seed(7)
    z_a = fastvae.reparameterize_kl_tril(mu, scale_tril, generator=gen_a)[0]
    assert torch.equal(z_a, fastvae.reparameterize_kl_tril(mu, scale_tril, generator=gen_b)[0])
    assert not torch.equal(z_a, fastvae.reparameterize_kl_tril(mu, scale_tril, generator=gen_a)[0])
    assert torch.equal(torch.random.get_rng_state(), default_state)


def test_backward_saves_no_noise(path):
    """The tensors saved for backward are mu, scale_tril and a one-element seed: neither the
    noise nor z."""
    mu = torch.randn(6, 40, device=path[1], requires_grad=True)
    scale_tril = scale_tril_values(6, 40).to(path[1]).requires_grad_()
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z, kl = fastvae.reparameterize_kl_tril(mu, scale_tril)
    large = [t for t in saved if t.numel() > 1]
    assert sorted(t.data_ptr() for t in large) == sorted((mu.data_ptr(), scale_tril.data_ptr()))
    assert [t.numel() for t in saved if t.numel() <= 1] == [1]
    (z.sum() + kl.sum()).backward()


def test_offsets_past_int32(path):
    """A scale_tril whose columns lie 2**30 elements apart (float16, 4 GiB of address space of
    which a few elements are touched): offsets computed in int32 would wrap around."""
    N, D, stride = 4, 3, 1 << 30
    buffer = torch.empty((D - 1) * stride + N * D, dtype=torch.float16, device=path[1])
    values = scale_tril_values(N, D).half()
    far = buffer.as_strided((N, D, D), (D, 1, stride))
    for k in range(D):
        far[:, :, k] = values[:, :, k]
    mu, eps = torch.randn(N, D, device=path[1]), torch.randn(N, D, device=path[1])
    got = fastvae.reparameterize_kl_tril(mu, far, eps=eps)
    expected = fastvae.reparameterize_kl_tril(mu, values.to(path[1]), eps=eps)
    for a, e in zip(got, expected):
        assert_close("far apart columns", a, e, rtol=0, atol=0)
