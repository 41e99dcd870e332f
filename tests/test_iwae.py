"""iwae_loss and estimate_log_likelihood against independent plain-torch references."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import assert_close
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal

import fastvae
from fastvae.ops import gaussian, likelihood


def _diag_normal(mu, logvar):
    return Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)


def _models(x_dim=3, z_dim=2, width=8):
    torch.manual_seed(1)
    encoder = nn.Sequential(nn.Linear(x_dim, width), nn.Tanh(), nn.Linear(width, 2 * z_dim))
    decoder = nn.Sequential(nn.Linear(z_dim, width), nn.Tanh(), nn.Linear(width, 2 * x_dim))
    return encoder, decoder


def plain_torch_grads(encoder, decoder, x, eps, estimator):
    """Gradients of the mean negative IWAE bound, built from torch.distributions and autograd.

    DReG: the encoder's gradient from sum_k sg(w~_k^2) log w_k and the decoder's from
    sum_k sg(w~_k) log w_k, each taken with its own autograd.grad call.
    """
    mu, logvar = encoder(x).chunk(2, -1)
    z = mu + torch.exp(0.5 * logvar) * eps
    x_mu, x_logvar = decoder(z).chunk(2, -1)
    q_mu, q_logvar = (mu, logvar) if estimator == "iwae" else (mu.detach(), logvar.detach())
    log_w = (
        _diag_normal(x_mu, x_logvar).log_prob(x)
        + _diag_normal(torch.zeros_like(z), torch.zeros_like(z)).log_prob(z)
        - _diag_normal(q_mu, q_logvar).log_prob(z)
    )
    enc, dec = list(encoder.parameters()), list(decoder.parameters())
    if estimator != "dreg":
        loss = -(torch.logsumexp(log_w, 0) - math.log(eps.shape[0])).mean()
        return torch.autograd.grad(loss, enc + dec)
    w = torch.softmax(log_w.detach(), 0)
    enc_grads = torch.autograd.grad(-(w**2 * log_w).sum(0).mean(), enc, retain_graph=True)
    return enc_grads + torch.autograd.grad(-(w * log_w).sum(0).mean(), dec)


def fastvae_grads(encoder, decoder, x, eps, estimator):
    mu, logvar = encoder(x).chunk(2, -1)
    z = fastvae.reparameterize(mu, logvar, eps=eps, num_samples=eps.shape[0])
    x_mu, x_logvar = decoder(z).chunk(2, -1)
    log_px = fastvae.gaussian_log_prob(x, x_mu, x_logvar)
    loss = fastvae.iwae_loss(log_px, z, mu, logvar, estimator=estimator)
    return torch.autograd.grad(loss, [*encoder.parameters(), *decoder.parameters()])


@pytest.mark.parametrize("estimator", ["iwae", "stl", "dreg"])
@pytest.mark.parametrize("K", [1, 5])
def test_gradients_match_plain_torch(path, estimator, K):
    encoder, decoder = _models()
    x, eps = torch.randn(6, 3), torch.randn(K, 6, 2)
    expected = plain_torch_grads(
        encoder.double(), decoder.double(), x.double(), eps.double(), estimator
    )
    encoder, decoder = encoder.float().to(path[1]), decoder.float().to(path[1])
    ours = fastvae_grads(encoder, decoder, x.to(path[1]), eps.to(path[1]), estimator)
    names = [f"encoder.{n}" for n, _ in encoder.named_parameters()]
    names += [f"decoder.{n}" for n, _ in decoder.named_parameters()]
    for name, a, e in zip(names, ours, expected):
        assert_close(f"{estimator} grad {name}", a, e, rtol=1e-4, atol=1e-5)


def test_estimators_differ(path):
    encoder, decoder = _models()
    x, eps = torch.randn(6, 3, device=path[1]), torch.randn(5, 6, 2, device=path[1])
    encoder, decoder = encoder.to(path[1]), decoder.to(path[1])
    first = {e: fastvae_grads(encoder, decoder, x, eps, e)[0] for e in ("iwae", "stl", "dreg")}
    assert not torch.allclose(first["iwae"], first["stl"])
    assert not torch.allclose(first["stl"], first["dreg"])


def test_k1_is_the_negative_elbo_with_monte_carlo_kl(path):
    mu, logvar = torch.randn(8, 4, device=path[1]), torch.randn(8, 4, device=path[1])
    z = fastvae.reparameterize(mu, logvar, num_samples=1)
    log_px = torch.randn(1, 8, device=path[1])
    loss = fastvae.iwae_loss(log_px, z, mu, logvar, reduction="none")
    log_p = fastvae.gaussian_log_prob(
        z, torch.zeros(4, device=path[1]), torch.zeros(4, device=path[1])
    )
    elbo = log_px + log_p - fastvae.gaussian_log_prob(z, mu, logvar)
    assert_close("K=1 loss", loss, -elbo[0])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_priors(path, reduction):
    mu, logvar = torch.randn(8, 4, device=path[1]), torch.randn(8, 4, device=path[1])
    prior = (torch.randn(4, device=path[1]), torch.randn(4, device=path[1]))
    z, log_ratio = fastvae.importance_sample(mu, logvar, 5, prior=prior)
    log_px = torch.randn(5, 8, device=path[1])
    loss = fastvae.iwae_loss(log_px, z, mu, logvar, prior=prior, reduction=reduction)
    per_row = -(torch.logsumexp(log_px + log_ratio, 0) - math.log(5))
    expected = {"mean": per_row.mean(), "sum": per_row.sum(), "none": per_row}[reduction]
    assert_close(reduction, loss, expected, rtol=1e-5, atol=1e-5)


def test_all_weights_minus_inf_give_zero_gradient(path):
    mu = torch.randn(4, 3, device=path[1], requires_grad=True)
    logvar = torch.randn(4, 3, device=path[1], requires_grad=True)
    for estimator in ("iwae", "stl", "dreg"):
        z = fastvae.reparameterize(mu, logvar, num_samples=6)
        log_px = torch.full((6, 4), -math.inf, device=path[1], requires_grad=True)
        loss = fastvae.iwae_loss(log_px, z, mu, logvar, estimator=estimator, reduction="sum")
        g = torch.autograd.grad(loss, (log_px, mu, logvar))
        assert loss.item() == math.inf
        assert all(not t.isnan().any() and not t.any() for t in g), estimator


def test_dreg_is_unbiased_with_lower_variance():
    """Over 4000 replicates (one encoder per row), DReG's encoder gradient has the standard
    estimator's mean within statistical error and a smaller variance at K = 64."""
    R, K = 4000, 64
    x = torch.tensor([1.5, -0.5])
    torch.manual_seed(0)
    results = {}
    for estimator in ("iwae", "dreg"):
        scale = torch.full((R, 2), 0.3, requires_grad=True)  # the exact posterior has 0.5
        logvar = torch.full((R, 2), math.log(0.8), requires_grad=True)  # exact: log 0.5
        mu = scale * x
        z = fastvae.reparameterize(mu, logvar, num_samples=K)
        log_px = _diag_normal(z, torch.zeros_like(z)).log_prob(x)  # p(x|z) = N(z, I)
        loss = fastvae.iwae_loss(log_px, z, mu, logvar, estimator=estimator, reduction="sum")
        results[estimator] = torch.cat(torch.autograd.grad(loss, (scale, logvar)), 1).double()
    mean_gap = results["dreg"].mean(0) - results["iwae"].mean(0)
    stderr = ((results["dreg"].var(0) + results["iwae"].var(0)) / R).sqrt()
    assert (mean_gap.abs() < 4 * stderr).all(), (mean_gap, stderr)
    assert (results["dreg"].var(0) < 0.5 * results["iwae"].var(0)).all()


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"log_px_given_z": torch.zeros(3, 4)}, ValueError, "log_px_given_z has 3 samples"),
        ({"log_px_given_z": torch.zeros(2, 5)}, ValueError, "must be z.shape[:-1] = (2, 4)"),
        ({"estimator": "vimco"}, ValueError, "estimator must be one of iwae, stl, dreg"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"mu": torch.zeros(5, 2)}, ValueError, "mu of shape (5, 2)"),
        ({"prior": 3.0}, TypeError, "prior must be None"),
        ({"z": torch.zeros(2)}, ValueError, "z must be (K, ..., D)"),
    ],
)
def test_iwae_loss_bad_input(change, error, message):
    args = {
        "log_px_given_z": torch.zeros(2, 4),
        "z": torch.zeros(2, 4, 2),
        "mu": torch.zeros(4, 2),
        "logvar": torch.zeros(4, 2),
    }
    args |= change
    with pytest.raises(error) as info:
        fastvae.iwae_loss(**args)
    assert message in str(info.value)


# -- estimate_log_likelihood -----------------------------------------------------------------


class LinearGaussian:
    """p(z) = N(0, I_2), p(x|z) = N(W z + b, s^2 I_3): log p(x) and the posterior in closed form.

    W's columns are orthogonal, so the posterior covariance is diagonal and q can be exact.
    """

    def __init__(self, dtype=torch.float64, device="cpu"):
        g = torch.Generator().manual_seed(3)
        columns = torch.linalg.qr(torch.randn(3, 2, generator=g, dtype=torch.float64))[0]
        self.W = (columns * torch.tensor([1.5, 0.7], dtype=torch.float64)).to(device, dtype)
        self.b = torch.randn(3, generator=g, dtype=dtype).to(device)
        self.s2 = 0.5
        eye = torch.eye(2, dtype=dtype, device=device)
        self.post_cov = torch.linalg.inv(eye + self.W.T @ self.W / self.s2)

    def log_px(self, x):
        cov = self.W @ self.W.T + self.s2 * torch.eye(3, dtype=x.dtype, device=x.device)
        return MultivariateNormal(self.b, cov).log_prob(x)

    def encode(self, x, shift=0.0):
        mu = (x - self.b) @ self.W @ self.post_cov.T / self.s2
        logvar = self.post_cov.diagonal().log().expand_as(mu)
        return mu + shift, logvar + shift

    def log_likelihood(self, x, z):
        mean = z @ self.W.T + self.b
        return _diag_normal(mean, torch.full_like(mean, math.log(self.s2))).log_prob(x)


def test_likelihood_converges_to_the_true_value():
    model = LinearGaussian()
    x = torch.randn(64, 3, dtype=torch.float64) + model.b
    truth = model.log_px(x)

    def error(num_samples):
        estimate = fastvae.estimate_log_likelihood(
            lambda x: model.encode(x, shift=0.3), model.log_likelihood, x, num_samples
        )
        return (estimate - truth).abs().mean().item()

    errors = [error(k) for k in (1, 50, 5000)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.02, errors


def test_exact_posterior_gives_the_exact_value():
    model = LinearGaussian()
    x = torch.randn(16, 3, dtype=torch.float64)
    estimate = fastvae.estimate_log_likelihood(model.encode, model.log_likelihood, x, 3)
    assert_close("log p(x)", estimate, model.log_px(x), rtol=1e-10, atol=1e-10)


def test_chunked_equals_unchunked(path, monkeypatch):
    monkeypatch.setattr(gaussian, "NOISE_BLOCK_ELEMENTS", 40)  # blocks of 2 samples of (10, 2)
    model = LinearGaussian(torch.float32, path[1])
    x = torch.randn(10, 3, device=path[1])
    seen = []

    def log_likelihood(x, z):
        seen.append(z.shape[0])
        return model.log_likelihood(x, z)

    def estimate(chunk_size):
        torch.manual_seed(11)
        return fastvae.estimate_log_likelihood(
            lambda x: model.encode(x, 0.5), log_likelihood, x, 23, chunk_size=chunk_size
        )

    whole = estimate(None)
    assert seen == [23]
    chunked = estimate(5)  # rounded up to 3 whole blocks
    assert seen[1:] == [6, 6, 6, 5]
    assert_close("chunked", chunked, whole, rtol=1e-6, atol=1e-6)
    assert not whole.requires_grad


def test_estimate_default_chunk_bounds_the_decoder_output_as_well_as_z():
    """The default chunk holds about CHUNK_ELEMENTS elements of z or of k copies of x, the
    larger, rounded up to whole noise blocks: MNIST-like rows (50 latents, 784 pixels) get
    about an eighth of the samples per chunk that their latents alone would."""
    latent = torch.Size([10, 50])
    block = gaussian.noise_block(latent)
    seen = []

    def log_likelihood(x, z):
        seen.append(z.shape[0])
        return z.sum(-1)

    def first_chunk(x_dim):
        seen.clear()
        zeros = torch.zeros(latent)
        fastvae.estimate_log_likelihood(
            lambda x: (zeros, zeros), log_likelihood, torch.zeros(10, x_dim), 20_000
        )
        assert sum(seen) == 20_000
        return seen[0]

    def in_whole_blocks(samples):
        return -(-samples // block) * block

    assert first_chunk(8) == in_whole_blocks(likelihood.CHUNK_ELEMENTS // latent.numel())
    assert first_chunk(784) == in_whole_blocks(likelihood.CHUNK_ELEMENTS // (10 * 784))
    assert first_chunk(784) * 8 <= first_chunk(8)


def test_estimate_bad_input():
    x = torch.zeros(4, 3)
    with pytest.raises(TypeError, match="encode\\(x\\) must return \\(mu, logvar\\)"):
        fastvae.estimate_log_likelihood(lambda x: x, lambda x, z: z.sum(-1), x)
    with pytest.raises(ValueError, match="log_likelihood\\(x, z\\) must return"):
        fastvae.estimate_log_likelihood(lambda x: (x, x), lambda x, z: z, x)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        fastvae.estimate_log_likelihood(lambda x: (x, x), lambda x, z: z.sum(-1), x, chunk_size=0)


@pytest.mark.parametrize("offset", [-5000.0, 800.0])
def test_streaming_is_stable_for_huge_log_weights(path, offset):
    """A log-likelihood shifted by a constant shifts the estimate by it exactly (no overflow)."""
    model = LinearGaussian(torch.float32, path[1])
    x = torch.randn(10, 3, device=path[1])

    def estimate(shift):
        torch.manual_seed(2)
        return fastvae.estimate_log_likelihood(
            lambda x: model.encode(x, 0.5), lambda x, z: model.log_likelihood(x, z) + shift, x, 40,
            chunk_size=7,
        )  # fmt: skip

    assert_close("shifted", estimate(offset), estimate(0.0) + offset, rtol=1e-6, atol=1e-3)


def test_dreg_refuses_what_it_cannot_rescale(path):
    mu = torch.randn(4, 3, device=path[1], requires_grad=True)
    logvar = torch.randn(4, 3, device=path[1], requires_grad=True)
    z = fastvae.reparameterize(mu, logvar, num_samples=5)
    log_px = torch.randn(5, 4, device=path[1])
    fastvae.iwae_loss(log_px, z, mu, logvar, estimator="dreg")
    with pytest.raises(ValueError, match="one such loss per z"):
        fastvae.iwae_loss(log_px, z, mu, logvar, estimator="dreg")
    fastvae.iwae_loss(log_px, z, mu, logvar)  # other estimators add no hook
    with pytest.raises(ValueError, match="not a leaf, not a view"):
        fastvae.iwae_loss(log_px, z.view(5, 4, 3), mu, logvar, estimator="dreg")
    leaf = torch.randn(5, 4, 3, device=path[1], requires_grad=True)
    with pytest.raises(ValueError, match="not a leaf"):
        fastvae.iwae_loss(log_px, leaf, mu, logvar, estimator="dreg")
    with torch.no_grad():  # no gradient, no hook, no complaint
        fastvae.iwae_loss(log_px, z, mu, logvar, estimator="dreg")
