"""importance_sample: z and log p(z) - log q(z|x) in one pass, against torch.distributions."""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_close, grads
from torch.distributions import Independent, Normal

import fastvae
from fastvae.kernels.modes import ROW_LOG_RATIO
from fastvae.ops import gaussian
from fastvae.ops.gaussian import sample
from fastvae.ops.iwae import importance_sample_chunk


def _diag_normal(mu, logvar):
    return Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)


def oracle_log_ratio(mu, logvar, eps, prior_mu=None, prior_logvar=None):
    """z = mu + sigma * eps and log p(z) - log q(z|x) in float64, z depending on mu, logvar."""
    z = mu + torch.exp(0.5 * logvar) * eps
    prior_mu = torch.zeros_like(z) if prior_mu is None else prior_mu
    prior_logvar = torch.zeros_like(z) if prior_logvar is None else prior_logvar
    log_p = _diag_normal(prior_mu, prior_logvar).log_prob(z)
    return z, log_p - _diag_normal(mu, logvar).log_prob(z)


def small_tiles(n_rows, D, samples=1, per_thread=8):
    """2 x 4 tiles: many row blocks (partial sums of a broadcast prior's gradient over several
    programs) and several column blocks a row (row terms added up block by block)."""
    return {"BLOCK_R": 2, "BLOCK_D": 4, "num_warps": 4}


@pytest.mark.parametrize("D", [1, 37, 1000])
@pytest.mark.parametrize("prior_shape", [None, "row", "full"])
def test_log_ratio_and_gradients(path, D, prior_shape):
    check_log_ratio(path[1], D, prior_shape)


@pytest.mark.parametrize("prior_shape", [None, "row", "full"])
def test_log_ratio_in_small_tiles(path, prior_shape, monkeypatch):
    monkeypatch.setattr(gaussian, "tile", small_tiles)
    check_log_ratio(path[1], 11, prior_shape, B=7)


def check_log_ratio(device, D, prior_shape, K=3, B=11):
    """sample(row_term=ROW_LOG_RATIO) with K samples against oracle_log_ratio; the prior
    (D,) ("row", broadcast over the batch), (B, D) ("full") or None."""
    base = {"mu": torch.randn(B, D), "logvar": torch.randn(B, D), "eps": torch.randn(K, B, D)}
    if prior_shape is not None:
        pshape = (B, D) if prior_shape == "full" else (D,)
        base |= {"prior_mu": torch.randn(pshape), "prior_logvar": torch.randn(pshape)}
    leaves = {k: v.clone().to(device).requires_grad_(k != "eps") for k, v in base.items()}
    ref = {k: v.double().requires_grad_(k != "eps") for k, v in base.items()}
    z, log_ratio = sample(**leaves, num_samples=K, row_term=ROW_LOG_RATIO)
    z_ref, log_ratio_ref = oracle_log_ratio(**ref)
    assert_close("z", z, z_ref)
    assert_close("log_ratio", log_ratio, log_ratio_ref, rtol=1e-5, atol=1e-4)
    g_z, g_r = torch.randn(K, B, D, dtype=torch.float64), torch.randn(K, B, dtype=torch.float64)
    names = [k for k in base if k != "eps"]
    ours = grads([(z, g_z.to(z)), (log_ratio, g_r.to(log_ratio))], [leaves[k] for k in names])
    expected = grads([(z_ref, g_z), (log_ratio_ref, g_r)], [ref[k] for k in names])
    for name, a, e in zip(names, ours, expected):
        assert_close(f"grad {name}", a, e, rtol=1e-4, atol=1e-4)


def test_public_function_matches_its_samples(path):
    mu, logvar = torch.randn(2, 5, 4, device=path[1]), torch.randn(2, 5, 4, device=path[1])
    prior = (torch.randn(4, device=path[1]), torch.randn(4, device=path[1]))
    z, log_ratio = fastvae.importance_sample(mu, logvar, 6, prior=prior)
    assert z.shape == (6, 2, 5, 4) and log_ratio.shape == (6, 2, 5)
    z64 = z.double().cpu()
    expected = _diag_normal(*(p.double().cpu() for p in prior)).log_prob(z64)
    expected -= _diag_normal(mu.double().cpu(), logvar.double().cpu()).log_prob(z64)
    assert_close("log_ratio", log_ratio, expected, rtol=1e-4, atol=1e-4)


def test_prior_with_log_prob(path):
    """Any object with log_prob(z), e.g. a torch distribution, is added to -log q."""
    mu, logvar = torch.randn(7, 3, device=path[1]), torch.randn(7, 3, device=path[1])
    prior = _diag_normal(torch.ones(3, device=path[1]), torch.zeros(3, device=path[1]))
    torch.manual_seed(5)
    z, log_ratio = fastvae.importance_sample(mu, logvar, 4, prior=prior)
    torch.manual_seed(5)
    z2, log_ratio2 = fastvae.importance_sample(
        mu, logvar, 4, prior=(prior.mean, torch.zeros(3, device=path[1]))
    )
    assert torch.equal(z, z2)
    assert_close("log_ratio", log_ratio, log_ratio2, rtol=1e-5, atol=1e-5)


def test_mixture_prior(path):
    mu, logvar = torch.randn(9, 2, device=path[1]), torch.randn(9, 2, device=path[1])
    means, logvars = torch.randn(5, 2, device=path[1]), torch.randn(5, 2, device=path[1])
    log_weights = torch.randn(5, device=path[1])
    z, log_ratio = fastvae.importance_sample(mu, logvar, 3, prior=(means, logvars, log_weights))
    expected = fastvae.mixture_log_prob(z, means, logvars, log_weights)
    expected = expected - fastvae.gaussian_log_prob(z, mu, logvar)
    assert_close("log_ratio", log_ratio, expected, rtol=1e-5, atol=1e-5)


def test_noise_does_not_depend_on_chunking(path, monkeypatch):
    monkeypatch.setattr(gaussian, "NOISE_BLOCK_ELEMENTS", 30)  # one sample of (6, 5) a block
    mu, logvar = torch.randn(6, 5, device=path[1]), torch.randn(6, 5, device=path[1])
    seed = torch.tensor([1234], device=path[1])
    whole = importance_sample_chunk(mu, logvar, 10, seed=seed)
    parts = [
        importance_sample_chunk(mu, logvar, k, seed=seed, first_sample=f)
        for f, k in ((0, 4), (4, 1), (5, 5))
    ]
    for i in range(2):
        assert torch.equal(whole[i], torch.cat([p[i] for p in parts]))


def test_reads_the_posterior_once(path):
    """No K-fold copy: backward keeps mu, logvar, the seed and at most the output z."""
    mu = torch.randn(16, 8, device=path[1], requires_grad=True)
    logvar = torch.randn(16, 8, device=path[1], requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        z, _ = fastvae.importance_sample(mu, logvar, 32)
    large = {t.data_ptr() for t in saved if t.numel() > 1}
    assert (
        {mu.data_ptr(), logvar.data_ptr()}
        <= large
        <= {mu.data_ptr(), logvar.data_ptr(), z.data_ptr()}
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_samples": 0}, ValueError, "num_samples must be >= 1"),
        ({"num_samples": None}, TypeError, "num_samples must be an int"),
        ({"num_samples": 2, "prior": "normal"}, TypeError, "prior must be None"),
        (
            {"num_samples": 2, "prior": (torch.zeros(3), torch.zeros(3))},
            ValueError,
            "prior_mu of shape (3,)",
        ),
    ],
)
def test_bad_input(kwargs, error, message):
    with pytest.raises(error) as info:
        fastvae.importance_sample(torch.zeros(4, 2), torch.zeros(4, 2), **kwargs)
    assert message in str(info.value)
