"""Noise drawn inside the ops: its distribution, its reproducibility, and that it is not stored."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from scipy import stats

import fastvae
from fastvae.ops.gaussian import AUTOGRAD_SAMPLE_ELEMENTS


def _fused_backward_shape(path, shape):
    """`shape`, or on the torch path a shape above AUTOGRAD_SAMPLE_ELEMENTS, where the op's own
    backward runs (below it autograd differentiates torch ops, which keep the noise)."""
    if path[0] == "triton":
        return shape
    return (shape[0], AUTOGRAD_SAMPLE_ELEMENTS // shape[0] + shape[1])


def _standard_posterior(shape, device):
    """mu = 0, logvar = 0: z is the noise itself."""
    return torch.zeros(shape, device=device), torch.zeros(shape, device=device)


@pytest.mark.parametrize("num_samples", [None, 2])
def test_noise_is_standard_normal(path, num_samples):
    mu, logvar = _standard_posterior((64, 500), path[1])
    eps = fastvae.reparameterize(mu, logvar, num_samples=num_samples).double().flatten().cpu()
    n = eps.numel()
    assert abs(eps.mean().item()) < 5 / n**0.5
    assert abs(eps.std().item() - 1.0) < 5 / (2 * n) ** 0.5
    assert stats.kstest(eps.numpy(), "norm").pvalue > 1e-3


def test_noise_is_scaled_and_shifted(path):
    mu = torch.full((200, 300), 3.0, device=path[1])
    logvar = torch.full((200, 300), 2 * torch.tensor(0.5).log().item(), device=path[1])
    z = fastvae.reparameterize(mu, logvar).double().cpu()
    assert abs(z.mean().item() - 3.0) < 0.01 and abs(z.std().item() - 0.5) < 0.01


def test_noise_elements_are_independent(path):
    """Neighbouring elements, rows and samples are uncorrelated (no repeated noise)."""
    mu, logvar = _standard_posterior((300, 64), path[1])
    z = fastvae.reparameterize(mu, logvar, num_samples=2).double().cpu()
    pairs = [(z[0, :, :-1], z[0, :, 1:]), (z[0, :-1], z[0, 1:]), (z[0], z[1])]
    for a, b in pairs:
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(corr) < 5 / a.numel() ** 0.5


def test_manual_seed_reproduces_and_calls_differ(path):
    mu, logvar = (torch.randn(16, 9, device=path[1]) for _ in range(2))
    torch.manual_seed(123)
    first = fastvae.reparameterize(mu, logvar)
    second = fastvae.reparameterize(mu, logvar)
    torch.manual_seed(123)
    assert torch.equal(fastvae.reparameterize(mu, logvar), first)
    assert not torch.equal(first, second)
    assert (first != second).all()


def test_generator_argument(path):
    mu, logvar = (torch.randn(16, 9, device=path[1]) for _ in range(2))
    default_state = torch.random.get_rng_state()
    gen_a = torch.Generator(device=path[1]).manual_seed(7)
    gen_b = torch.Generator(device=path[1]).manual_seed(7)
    z_a = fastvae.reparameterize_kl(mu, logvar, generator=gen_a)[0]
    assert torch.equal(z_a, fastvae.reparameterize_kl(mu, logvar, generator=gen_b)[0])
    assert not torch.equal(z_a, fastvae.reparameterize_kl(mu, logvar, generator=gen_a)[0])
    assert torch.equal(torch.random.get_rng_state(), default_state)


@pytest.mark.parametrize("op", ["reparameterize", "reparameterize_kl"])
def test_backward_saves_no_noise(path, op):
    """The tensors saved for backward are the inputs, a seed and (torch path) the output z,
    never an eps-sized buffer of their own."""
    shape = _fused_backward_shape(path, (32, 100))
    mu = torch.randn(shape, device=path[1], requires_grad=True)
    logvar = torch.randn(shape, device=path[1], requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = getattr(fastvae, op)(mu, logvar)
    z = out[0] if isinstance(out, tuple) else out
    allowed = {mu.data_ptr(), logvar.data_ptr(), z.data_ptr()}
    large = [t for t in saved if t.numel() > 1]
    assert large, "backward must keep mu and logvar"
    assert all(t.data_ptr() in allowed for t in large), [tuple(t.shape) for t in large]
    assert sum(t.numel() for t in saved if t.numel() <= 1) <= 1


def test_no_noise_buffer_stays_alive(path):
    """Between forward and backward no tensor of z's size lives besides mu, logvar and z."""
    shape = _fused_backward_shape(path, (24, 77))
    mu = torch.randn(shape, device=path[1], requires_grad=True)
    logvar = torch.randn(shape, device=path[1], requires_grad=True)
    z, kl = fastvae.reparameterize_kl(mu, logvar)
    gc.collect()
    known = {mu.data_ptr(), logvar.data_ptr(), z.data_ptr()}
    with warnings.catch_warnings():  # isinstance() on some gc objects warns of deprecations
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    alive = [t for t in tensors if t.numel() == z.numel() and t.data_ptr() not in known]
    assert not alive, [tuple(t.shape) for t in alive]
    (z.sum() + kl.sum()).backward()
