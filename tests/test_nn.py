"""fastvae.nn's VAE, IWAE and priors against oracles built from torch.distributions (the GAN:
test_gan.py; wrong arguments: test_errors.py).

The models' noise is drawn inside the fused ops; each oracle recovers it from the returned z
(eps = (z - mu) / sigma) and recomputes the losses in float64 with torch.distributions and
plain autograd, z again a function of (mu, logvar). Both paths run (the `path` fixture).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _helpers import Lambda, assert_close, check_grads, mlp, round_trip
from test_discretized_logistic import oracle_elements as discretized_logistic_oracle
from torch import nn
from torch.distributions import (
    Bernoulli,
    Categorical,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
    kl_divergence,
)

import fastvae
from fastvae.nn import (
    IWAE,
    VAE,
    LearnedGaussian,
    MixturePrior,
    StandardNormal,
    VAEOutput,
    VampPrior,
)
from fastvae.ops import gaussian

X_DIM, Z_DIM = 3, 2
B, K, C = 5, 3, 3
PRIORS = ("none", "standard", "learned", "mixture", "vamp")
LIKELIHOODS = ("gaussian", "bernoulli", "discretized_logistic")
PAIRED = ("gaussian", "discretized_logistic")  # decoders that give two tensors
MODELS = ("vae", "iwae", "stl", "dreg")  # a VAE, or an IWAE with that estimator

# -- models and data -------------------------------------------------------------------------


class Recording(nn.Module):
    """A decoder that records how many rows each call gets."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.rows = []

    def forward(self, z):
        self.rows.append(z.shape[0])
        return self.inner(z)


class Affine(nn.Module):
    """x -> (x @ A + c, logvar), a (mean, logvar) pair: an exact encoder or decoder."""

    def __init__(self, A, c, logvar):
        super().__init__()
        self.register_buffer("A", A)
        self.register_buffer("c", c)
        self.register_buffer("logvar", logvar)

    def forward(self, x):
        mean = x @ self.A + self.c
        return mean, self.logvar.expand_as(mean)


def make_prior(name, encoder, dim=Z_DIM):
    """The prior called `name`, its learnable parameters moved away from their symmetric start."""
    if name == "none":
        return None
    if name == "standard":
        return StandardNormal(dim)
    if name == "vamp":
        return VampPrior(encoder, torch.randn(C, X_DIM))
    prior = LearnedGaussian(dim) if name == "learned" else MixturePrior(dim, C)
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return prior


def make_model(kind="vae", prior="standard", likelihood="gaussian", seed=1, **kwargs):
    torch.manual_seed(seed)
    encoder = mlp(X_DIM, 2 * Z_DIM)
    decoder = mlp(Z_DIM, (2 if likelihood in PAIRED else 1) * X_DIM)
    p = make_prior(prior, encoder)
    if kind == "vae":
        return VAE(encoder, decoder, likelihood=likelihood, prior=p, **kwargs)
    kwargs.setdefault("num_samples", K)
    return IWAE(encoder, decoder, likelihood=likelihood, prior=p, estimator=kind, **kwargs)


def make_x(likelihood, device, n=B, shape=(X_DIM,)):
    """Gaussian: N(0, 1) draws; Bernoulli: 0/1 floats; discretized logistic: uint8 pixels."""
    generator = torch.Generator().manual_seed(2)
    if likelihood == "discretized_logistic":
        return torch.randint(0, 256, (n, *shape), generator=generator, dtype=torch.uint8).to(device)
    x = torch.randn(n, *shape, generator=generator)
    return ((x > 0).float() if likelihood == "bernoulli" else x).to(device)


def oracle_data(x):
    """x as the float64 oracle takes it: uint8 pixels k as k / 256, as the models' encoders
    see them."""
    return x.cpu().double() / 256 if x.dtype == torch.uint8 else x.cpu().double()


def double(model):
    """A float64 CPU copy: the oracle's model, with the same weights."""
    return copy.deepcopy(model).double().cpu()


def params(model):
    return dict(model.named_parameters())


# -- the oracle ------------------------------------------------------------------------------


def diag_normal(mu, logvar, event_dims=1):
    return Independent(Normal(mu, torch.exp(0.5 * logvar)), event_dims)


def oracle_prior(model, dim):
    """p(z) of model.prior as a torch distribution."""
    prior = model.prior
    if isinstance(prior, StandardNormal):
        zero = torch.zeros(dim, dtype=torch.float64)
        return diag_normal(zero, zero)
    if isinstance(prior, LearnedGaussian):
        return diag_normal(prior.mu, prior.logvar)
    if isinstance(prior, MixturePrior):
        means, logvars, logits = prior.means, prior.logvars, prior.logits
    else:
        means, logvars = prior.encoder(prior.pseudo_inputs).chunk(2, -1)
        logits = torch.zeros(means.shape[0], dtype=means.dtype)
    return MixtureSameFamily(Categorical(logits=logits), diag_normal(means, logvars))


def oracle_log_px(model, x, z):
    """log p(x | z) summed over x's event dims, z (..., B, D) -> (..., B)."""
    out = model.decoder(z.reshape(-1, z.shape[-1]))
    out = out.reshape(*z.shape[:-1], *out.shape[1:])
    if model.likelihood == "gaussian":
        return diag_normal(*out.chunk(2, -1), event_dims=x.dim() - 1).log_prob(x)
    if model.likelihood == "bernoulli":
        return Independent(Bernoulli(logits=out), x.dim() - 1).log_prob(x)
    k = torch.round(x * 256) if x.is_floating_point() else x
    return discretized_logistic_oracle(k, *out.chunk(2, -1)).flatten(z.dim() - 1).sum(-1)


def oracle_log_w(model, x, z, q_mu, q_logvar):
    """log p(x | z) + log p(z) - log q(z | x)."""
    log_p = oracle_prior(model, z.shape[-1]).log_prob(z)
    return oracle_log_px(model, x, z) + log_p - diag_normal(q_mu, q_logvar).log_prob(z)


def encode(model, x):
    return model.encoder(x).chunk(2, -1)


def redraw(mu, logvar, z_drawn):
    """mu + sigma * eps with the eps that drew z_drawn: the same z, as a function of mu, logvar."""
    eps = ((z_drawn.detach().cpu().double() - mu) * torch.exp(-0.5 * logvar)).detach()
    return mu + torch.exp(0.5 * logvar) * eps


def vae_oracle(model, x, z_drawn):
    """(loss, reconstruction, kl) of a float64 VAE with the noise that drew z_drawn."""
    mu, logvar = encode(model, x)
    z = redraw(mu, logvar, z_drawn)
    reconstruction = oracle_log_px(model, x, z)
    prior = oracle_prior(model, mu.shape[-1])
    if model.prior.closed_form:
        kl = kl_divergence(diag_normal(mu, logvar), prior)
        kl_loss = kl
        if model.free_bits:
            kl_d = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), prior.base_dist)
            kl_loss = kl_d.clamp_min(model.free_bits).sum(-1)
    else:
        kl = kl_loss = diag_normal(mu, logvar).log_prob(z) - prior.log_prob(z)
    return (model.beta * kl_loss - reconstruction).mean(), reconstruction, kl


def iwae_oracle(model, x, z_drawn, g):
    """(log p(x|z), log w, L_K) of a float64 IWAE with the noise that drew z_drawn, and the
    gradients of sum(g * L_K) for model's parameters under model.estimator.

    "stl": log q's parameters held fixed. "dreg": everything that reaches the parameters
    through z weighted by w~_k^2 (evaluated with a frozen copy of the model), the direct
    paths (decoder, prior, VampPrior's pseudo-inputs) by w~_k.
    """
    mu, logvar = encode(model, x)
    z = redraw(mu, logvar, z_drawn)
    q_mu, q_logvar = (mu, logvar) if model.estimator == "iwae" else (mu.detach(), logvar.detach())
    log_px = oracle_log_px(model, x, z)
    log_w = log_px + oracle_prior(model, z.shape[-1]).log_prob(z)
    log_w = log_w - diag_normal(q_mu, q_logvar).log_prob(z)
    bound = torch.logsumexp(log_w, 0) - math.log(z.shape[0])
    if model.estimator != "dreg":
        surrogate = (g * bound).sum()
    else:
        w = torch.softmax(log_w.detach(), 0)
        frozen = copy.deepcopy(model).requires_grad_(False)
        through_z = oracle_log_w(frozen, x, z, q_mu, q_logvar)
        direct = oracle_log_w(model, x, z.detach(), q_mu, q_logvar)
        surrogate = (g * (w**2 * through_z + w * direct).sum(0)).sum()
    grads = torch.autograd.grad(surrogate, list(params(model).values()), allow_unused=True)
    return log_px, log_w, bound, grads


# -- 1, 2. forward and backward against the oracle --------------------------------------------


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("kind", MODELS)
def test_forward_backward_match_torch_distributions(path, kind, prior, likelihood):
    device = path[1]
    model = make_model(kind, prior, likelihood, **({"beta": 0.7} if kind == "vae" else {}))
    model = model.to(device)
    reference = double(model)
    x = make_x(likelihood, device)
    g = torch.randn(B, dtype=torch.float64)
    torch.manual_seed(3)
    out = model(x)

    assert isinstance(out, VAEOutput)
    rows = (B,) if kind == "vae" else (K, B)
    assert out.loss.shape == ()
    assert out.elbo.shape == (B,)
    assert out.reconstruction.shape == rows and out.kl.shape == rows
    assert out.z.shape == (*rows, Z_DIM)
    assert torch.isfinite(out.loss)
    assert model.latent_dim == Z_DIM

    named = params(model)
    x64 = oracle_data(x)
    surrogate = (out.elbo * g.to(device, out.elbo.dtype)).sum()
    if kind == "vae":
        surrogate = surrogate + 1.3 * out.loss
        loss, rec, kl = vae_oracle(reference, x64, out.z)
        expected = {"loss": loss, "elbo": rec - kl, "reconstruction": rec, "kl": kl}
        ref_surrogate = (g * (rec - kl)).sum() + 1.3 * loss
        ref_grads = torch.autograd.grad(ref_surrogate, list(params(reference).values()))
    else:
        log_px, log_w, bound, ref_grads = iwae_oracle(reference, x64, out.z, g)
        expected = {"loss": -bound.mean(), "elbo": bound, "reconstruction": log_px}
        expected["kl"] = log_px - log_w
    for name, value in expected.items():
        assert_close(name, getattr(out, name), value, rtol=1e-5, atol=1e-5)
    ours = torch.autograd.grad(surrogate, list(named.values()), allow_unused=True)
    check_grads(named, ours, ref_grads)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_multidimensional_events(path, likelihood):
    """x (B, 2, 2): log p(x | z) sums over both event dims; sample and reconstruct keep them."""
    device = path[1]
    torch.manual_seed(1)
    width = 4 if likelihood in PAIRED else 2  # a paired decoder's last dim splits in two
    encoder = nn.Sequential(nn.Flatten(), mlp(4, 2 * Z_DIM))
    decoder = nn.Sequential(mlp(Z_DIM, 2 * width), nn.Unflatten(1, (2, width)))
    model = IWAE(encoder, decoder, likelihood=likelihood, num_samples=K, estimator="dreg")
    model = model.to(device)
    reference = double(model)
    x = make_x(likelihood, device, shape=(2, 2))
    g = torch.randn(B, dtype=torch.float64)
    torch.manual_seed(3)
    out = model(x)
    log_px, _, bound, ref_grads = iwae_oracle(reference, oracle_data(x), out.z, g)
    assert_close("reconstruction", out.reconstruction, log_px, rtol=1e-5, atol=1e-5)
    assert_close("elbo", out.elbo, bound, rtol=1e-5, atol=1e-5)
    named = params(model)
    ours = torch.autograd.grad((out.elbo * g.to(device).float()).sum(), list(named.values()))
    check_grads(named, ours, ref_grads)
    assert model.sample(3).shape == (3, 2, 2)
    assert model.reconstruct(x).shape == (B, 2, 2)


def test_posterior_draws_follow_q(path):
    """The draws behind the loss are mu + sigma * eps with eps ~ N(0, I): moments of z for an
    encoder that ignores x (a z = mu bug would pass the oracle, which recovers eps from z)."""
    device = path[1]
    mu = torch.tensor([1.0, -1.0], device=device)
    logvar = torch.tensor([math.log(0.25), 0.0], device=device)
    encoder = Lambda(lambda x: (mu.expand(len(x), -1), logvar.expand(len(x), -1)))
    torch.manual_seed(1)
    decoder = mlp(Z_DIM, 2 * X_DIM).to(device)
    for model, n in ((VAE(encoder, decoder), 2000), (IWAE(encoder, decoder, num_samples=4), 500)):
        z = model(torch.zeros(n, X_DIM, device=device)).z.reshape(-1, Z_DIM).double().cpu()
        std = torch.exp(0.5 * logvar).double().cpu()
        assert_close("mean of z", z.mean(0), mu.double().cpu(), rtol=0, atol=0.1)
        assert_close("std of z", z.std(0), std, rtol=0.08)


# -- 3. free bits and beta -------------------------------------------------------------------


@pytest.mark.parametrize("prior", ["standard", "learned"])
def test_free_bits(path, prior):
    device = path[1]
    x = make_x("gaussian", device)
    probe = double(make_model("vae", prior))
    mu, logvar = encode(probe, x.cpu().double())
    kl_d = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), oracle_prior(probe, 2).base_dist)
    values = kl_d.flatten().sort().values
    free_bits = 0.5 * (values[4] + values[5]).item()  # half the dims below, half above
    model = make_model("vae", prior, free_bits=free_bits, beta=1.5).to(device)
    torch.manual_seed(3)
    out = model(x)
    loss, rec, kl = vae_oracle(double(model), x.cpu().double(), out.z)
    assert_close("kl (the true KL)", out.kl, kl, rtol=1e-5, atol=1e-5)
    assert_close("elbo", out.elbo, rec - kl, rtol=1e-5, atol=1e-5)
    assert_close("loss", out.loss, loss, rtol=1e-5, atol=1e-5)
    clamped = kl_d.clamp_min(free_bits).sum(-1)
    assert (clamped > kl + 1e-3).any()  # the floor is active in some rows
    assert_close("loss", out.loss, (1.5 * clamped - rec).mean(), rtol=1e-5, atol=1e-5)

    named = params(model)
    ours = torch.autograd.grad(out.loss, list(named.values()))
    reference = double(model)
    expected = torch.autograd.grad(
        vae_oracle(reference, x.cpu().double(), out.z)[0], list(params(reference).values())
    )
    check_grads(named, ours, expected)

    plain = make_model("vae", prior, beta=1.5).to(device)
    torch.manual_seed(3)
    plain_out = plain(x)
    assert_close("same draws", plain_out.z, out.z, rtol=1e-6, atol=1e-7)
    assert_close(
        "free bits raise the loss by beta * the floor's excess",
        out.loss - plain_out.loss,
        1.5 * (clamped - kl).mean(),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize("prior", ["mixture", "vamp"])
def test_free_bits_needs_a_closed_form_kl(prior):
    with pytest.raises(ValueError, match="free_bits"):
        make_model("vae", prior, free_bits=0.1)


@pytest.mark.parametrize("prior", ["learned", "mixture"])
def test_beta_scales_the_kl(path, prior):
    device = path[1]
    model = make_model("vae", prior).to(device)
    x = make_x("gaussian", device)
    outs, prior_grads = {}, {}
    for beta in (0.0, 1.0, 2.5):
        model.beta = beta  # KL warm-up changes beta between steps
        torch.manual_seed(3)
        outs[beta] = out = model(x)
        assert_close(f"loss at beta={beta}", out.loss, (beta * out.kl - out.reconstruction).mean())
        prior_grads[beta] = torch.autograd.grad(
            out.loss, list(model.prior.parameters()), allow_unused=True
        )
    assert_close("same elbo", outs[2.5].elbo, outs[0.0].elbo, rtol=0, atol=0)
    assert_close(
        "beta * kl",
        outs[2.5].loss - outs[0.0].loss,
        2.5 * outs[0.0].kl.mean(),
        rtol=1e-5,
        atol=1e-5,
    )
    assert all(g is None or not g.any() for g in prior_grads[0.0])
    for g1, g25 in zip(prior_grads[1.0], prior_grads[2.5], strict=True):
        assert g1.abs().max() > 0
        assert_close("prior grads scale with beta", g25, 2.5 * g1, rtol=1e-4, atol=1e-6)


# -- 3b. a full-covariance posterior ---------------------------------------------------------


class FullEncoder(nn.Module):
    """x -> (mu (B, D), scale_tril (B, D, D)): an MLP's outputs, the matrix near the identity
    (its upper triangle too, which the VAE must ignore)."""

    def __init__(self, dim=Z_DIM):
        super().__init__()
        self.dim, self.net = dim, mlp(X_DIM, dim + dim * dim)

    def forward(self, x):
        out = self.net(x)
        eye = torch.eye(self.dim, dtype=out.dtype, device=out.device)
        return out[:, : self.dim], 0.5 * out[:, self.dim :].unflatten(-1, (self.dim,) * 2) + eye


def full_vae(likelihood="gaussian", **kwargs):
    torch.manual_seed(1)
    decoder = mlp(Z_DIM, (2 if likelihood == "gaussian" else 1) * X_DIM)
    return VAE(FullEncoder(), decoder, likelihood=likelihood, posterior="full", **kwargs)


def full_vae_oracle(model, x, z_drawn):
    """(loss, reconstruction, kl) of a float64 full-covariance VAE with the noise that drew
    z_drawn (solved for from z = mu + L eps), by MultivariateNormal."""
    mu, scale_tril = model.encoder(x)
    L = scale_tril.tril()
    deviation = (z_drawn.detach().cpu().double() - mu).detach().unsqueeze(-1)
    eps = torch.linalg.solve_triangular(L.detach(), deviation, upper=False).squeeze(-1)
    z = mu + (L @ eps.unsqueeze(-1)).squeeze(-1)
    reconstruction = oracle_log_px(model, x, z)
    signs = L.diagonal(dim1=-2, dim2=-1).detach().sign()  # KL takes log |L_dd|
    q = MultivariateNormal(mu, scale_tril=L * signs.unsqueeze(-2))
    eye = torch.eye(mu.shape[-1], dtype=mu.dtype)
    kl = kl_divergence(q, MultivariateNormal(torch.zeros_like(mu), scale_tril=eye))
    return (model.beta * kl - reconstruction).mean(), reconstruction, kl, eps


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])  # the posterior's part
def test_full_posterior_matches_torch_distributions(path, likelihood):
    device = path[1]
    model = full_vae(likelihood, beta=0.7).to(device)
    reference = double(model)
    x = make_x(likelihood, device)
    g = torch.randn(B, dtype=torch.float64)
    torch.manual_seed(3)
    out = model(x)
    assert out.z.shape == (B, Z_DIM) and out.kl.shape == out.elbo.shape == (B,)
    loss, rec, kl, eps = full_vae_oracle(reference, x.cpu().double(), out.z)
    assert eps.std() > 0.3  # z is mu plus noise (the oracle would pass z = mu too)
    expected = {"loss": loss, "elbo": rec - kl, "reconstruction": rec, "kl": kl}
    for name, value in expected.items():
        assert_close(name, getattr(out, name), value, rtol=1e-5, atol=1e-5)
    named = params(model)
    ours = torch.autograd.grad((out.elbo * g.to(device).float()).sum() + 1.3 * out.loss,
                               list(named.values()))  # fmt: skip
    ref_grads = torch.autograd.grad((g * (rec - kl)).sum() + 1.3 * loss,
                                    list(params(reference).values()))  # fmt: skip
    check_grads(named, ours, ref_grads)


def test_full_posterior_draws_come_from_the_op(path):
    """The module's z and KL are reparameterize_kl_tril's on the encoder's output, same
    seed; sample and reconstruct work as with a diagonal posterior."""
    device = path[1]
    model = full_vae().to(device)
    x = make_x("gaussian", device)
    torch.manual_seed(5)
    out = model(x)
    torch.manual_seed(5)
    z, kl = fastvae.reparameterize_kl_tril(*model.encoder(x))
    assert torch.equal(out.z, z) and torch.equal(out.kl, kl)
    assert model.sample(4).shape == (4, X_DIM)
    assert_close("reconstruct", model.reconstruct(x), model.decoder(model.encoder(x)[0])[:, :X_DIM])


# -- 4. log-likelihood -----------------------------------------------------------------------


def linear_gaussian(prior, device):
    """A VAE and an IWAE with p(x | z) = N(W z + b, s2 I), their encoder q(z | x) the exact
    posterior (W's columns are orthogonal, so it is diagonal) under the prior N(m, diag v),
    and the exact log p(x) as a function of x."""
    f64 = {"dtype": torch.float64}
    g = torch.Generator().manual_seed(3)
    W = torch.linalg.qr(torch.randn(X_DIM, Z_DIM, generator=g, **f64))[0]
    W = W * torch.tensor([1.5, 0.7], **f64)
    b = torch.randn(X_DIM, generator=g, **f64)
    s2 = 0.5
    if prior in ("none", "standard"):
        m, v = torch.zeros(Z_DIM, **f64), torch.ones(Z_DIM, **f64)
    else:
        m, v = torch.tensor([0.5, -1.0], **f64), torch.tensor([2.0, 0.5], **f64)
    post_var = 1.0 / (1.0 / v + (W * W).sum(0) / s2)
    encoder = Affine(W * post_var / s2, post_var * (m / v - b @ W / s2), post_var.log())
    decoder = Affine(W.T.contiguous(), b, torch.full((X_DIM,), math.log(s2), **f64))
    cov = W @ torch.diag(v) @ W.T + s2 * torch.eye(X_DIM, **f64)
    marginal = MultivariateNormal(W @ m + b, cov)
    p = {"none": None, "standard": StandardNormal(Z_DIM)}.get(prior)
    if prior == "learned":
        p = LearnedGaussian(Z_DIM)
        p.mu.data, p.logvar.data = m.float(), v.log().float()
    elif prior == "mixture":  # one component: the same Gaussian through the mixture path
        p = MixturePrior(Z_DIM, 1)
        p.means.data, p.logvars.data = m[None].float(), v.log()[None].float()
    models = [cls(encoder, decoder, prior=p) for cls in (VAE, IWAE)]
    return [model.float().to(device) for model in models], marginal.log_prob


@pytest.mark.parametrize("prior", ["none", "standard", "learned", "mixture"])
def test_log_likelihood_is_exact_with_the_exact_posterior(path, prior):
    """With q(z | x) the exact posterior every importance weight is p(x): the estimate equals
    log p(x) for any K, and so does the IWAE bound."""
    device = path[1]
    (vae, iwae), log_px = linear_gaussian(prior, device)
    x = torch.randn(6, X_DIM, generator=torch.Generator().manual_seed(4)) * 2
    truth = log_px(x.double())
    estimate = vae.log_likelihood(x.to(device), num_samples=5)
    assert estimate.shape == (6,) and not estimate.requires_grad
    assert_close("log p(x)", estimate, truth, rtol=1e-5, atol=1e-4)
    assert_close("L_K", iwae(x.to(device)).elbo, truth, rtol=1e-5, atol=1e-4)
    if prior == "mixture":  # a Monte Carlo KL: the one-sample ELBO is log p(x) too
        assert_close("ELBO", vae(x.to(device)).elbo, truth, rtol=1e-5, atol=1e-4)


def test_log_likelihood_streams_over_noise_blocks():
    """Torch path, no patching: B * D = 24 gives noise blocks of 2730 samples, so K = 5500 in
    chunks of (rounded up) 2730 draws the same noise as one chunk of 5500."""
    with fastvae.use_backend("torch"):
        torch.manual_seed(1)
        encoder = mlp(X_DIM, 6)
        decoder = Recording(mlp(3, 2 * X_DIM))
        model = VAE(encoder, decoder, prior=MixturePrior(3, C))
        x = torch.randn(8, X_DIM)
        assert gaussian.noise_block(torch.Size((8, 3))) == 2730
        torch.manual_seed(4)
        whole = model.log_likelihood(x, num_samples=5500)
        assert decoder.rows == [5500 * 8]
        torch.manual_seed(4)
        chunked = model.log_likelihood(x, num_samples=5500, chunk_size=1000)
        assert decoder.rows[1:] == [2730 * 8, 2730 * 8, 40 * 8]
        assert_close("chunked", chunked, whole, rtol=1e-6, atol=1e-5)
        torch.manual_seed(5)
        assert not torch.equal(model.log_likelihood(x, num_samples=5500), whole)


@pytest.mark.parametrize("prior", PRIORS)
def test_log_likelihood_chunked_equals_whole(path, prior, monkeypatch):
    monkeypatch.setattr(gaussian, "NOISE_BLOCK_ELEMENTS", 2 * B * Z_DIM)  # blocks of 2 samples
    device = path[1]
    model = make_model("vae", prior).to(device)
    model.decoder = Recording(model.decoder)
    x = make_x("gaussian", device)

    def estimate(chunk_size):
        torch.manual_seed(11)
        return model.log_likelihood(x, num_samples=7, chunk_size=chunk_size)

    whole = estimate(None)
    chunked = estimate(3)  # rounded up to 2 blocks
    assert model.decoder.rows == [7 * B, 4 * B, 3 * B]
    assert whole.shape == (B,) and torch.isfinite(whole).all()
    assert_close("chunked", chunked, whole, rtol=1e-6, atol=1e-5)


# -- a fixed-variance Gaussian decoder -------------------------------------------------------


class WithLogvar(nn.Module):
    """A mean-only decoder as a (mean, logvar) one, logvar filled with one value."""

    def __init__(self, decoder, logvar):
        super().__init__()
        self.decoder, self.logvar = decoder, logvar

    def forward(self, z):
        mean = self.decoder(z)
        return mean, torch.full_like(mean, self.logvar)


@pytest.mark.parametrize("decoder_logvar", [0.0, -1.3])
@pytest.mark.parametrize("kind", ["vae", "dreg"])
def test_fixed_variance_decoder_equals_the_full_density(path, kind, decoder_logvar):
    """decoder_logvar=c with a mean-only decoder gives what a decoder returning (mean, c
    everywhere) gives: outputs, gradients, log p(x) and samples."""
    device = path[1]
    x = make_x("gaussian", device)
    results = []
    for fixed in (True, False):
        torch.manual_seed(1)
        encoder, decoder = mlp(X_DIM, 2 * Z_DIM), mlp(Z_DIM, X_DIM)
        kwargs = {"prior": LearnedGaussian(Z_DIM)}
        if fixed:
            kwargs["decoder_logvar"] = decoder_logvar
        else:
            decoder = WithLogvar(decoder, decoder_logvar)
        if kind == "vae":
            model = VAE(encoder, decoder, **kwargs)
        else:
            model = IWAE(encoder, decoder, num_samples=K, estimator=kind, **kwargs)
        model = model.to(device)
        torch.manual_seed(3)
        out = model(x)
        grads = torch.autograd.grad(out.loss, list(model.parameters()))
        log_px = model.log_likelihood(x, num_samples=5)
        samples = model.sample(4, generator=torch.Generator(device).manual_seed(5))
        results.append([*out, *grads, log_px, samples])
    for i, (a, e) in enumerate(zip(*results, strict=True)):
        assert_close(f"result {i}", a, e, rtol=1e-5, atol=1e-5)


# -- 5. sampling and reconstruction ----------------------------------------------------------


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("prior", PRIORS)
def test_sample_and_reconstruct(path, prior, likelihood):
    device = path[1]
    model = make_model("vae", prior, likelihood).to(device)
    x = make_x(likelihood, device)
    if prior in ("none", "vamp"):
        assert model.latent_dim is None
    if prior == "none":
        with pytest.raises(ValueError, match=r"sample\(n, dim=D\)"):
            model.sample(2)
        model(x)  # learns D
    samples = []
    for global_seed in (100, 200, 100):
        torch.manual_seed(global_seed)  # the generator alone decides the draws
        generator = torch.Generator(device).manual_seed(4 + len(samples) // 2)
        samples.append(model.sample(64, generator=generator))
    a, b, c = samples
    assert a.shape == (64, X_DIM) and not a.requires_grad
    assert torch.equal(a, b), "same generator seed, different samples"
    assert not torch.equal(a, c)
    if likelihood == "bernoulli":
        assert set(a.unique().tolist()) == {0.0, 1.0}
    elif likelihood == "discretized_logistic":  # bin values k / 256
        assert torch.equal(a * 256, (a * 256).round()) and a.min() >= 0 and a.max() <= 255 / 256
    else:
        assert a.unique().numel() == a.numel()

    recon = model.reconstruct(x)
    assert recon.shape == x.shape and not recon.requires_grad
    with torch.no_grad():
        encoder_x = oracle_data(x).float().to(device)  # pixels k as k / 256
        first = model.decoder(model.encoder(encoder_x).chunk(2, -1)[0])
        expected = torch.sigmoid(first) if likelihood == "bernoulli" else first.chunk(2, -1)[0]
    assert_close("reconstruct", recon, expected)
    if likelihood == "bernoulli":
        assert ((recon > 0) & (recon < 1)).all()


@pytest.mark.parametrize(
    "prior",
    [
        "none",
        "standard",
        "learned",
        "mixture",
        "vamp",
    ],
)
def test_sample_zero(path, prior):
    model = make_model("vae", prior).to(path[1])
    model(make_x("gaussian", path[1]))
    assert model.prior.sample(0, dim=Z_DIM).shape == (0, Z_DIM)
    assert model.sample(0).shape == (0, X_DIM)


@pytest.mark.parametrize("prior", ["standard", "learned", "mixture", "vamp"])
def test_prior_sample_is_reproducible(path, prior):
    model = make_model("vae", prior).to(path[1])
    draws = [
        model.prior.sample(6, generator=torch.Generator(path[1]).manual_seed(s)) for s in (1, 1, 2)
    ]
    assert draws[0].shape == (6, Z_DIM)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


@pytest.mark.parametrize(
    "prior",
    ["standard", "learned", "mixture", "vamp"],
)
def test_prior_log_prob(path, prior):
    model = make_model("vae", prior).to(path[1])
    reference = double(model)
    z = torch.randn(4, B, Z_DIM)
    out = model.prior.log_prob(z.to(path[1]))
    expected = oracle_prior(reference, Z_DIM).log_prob(z.double())
    assert_close("log p(z)", out, expected, rtol=1e-5, atol=1e-5)
    named = [n for n, _ in model.prior.named_parameters()]
    if named:
        g = torch.randn(4, B, dtype=torch.float64)
        ours = torch.autograd.grad((out * g.to(out)).sum(), list(model.prior.parameters()))
        ref = torch.autograd.grad((expected * g).sum(), list(reference.prior.parameters()))
        check_grads(named, ours, ref)


def test_prior_sample_dim():
    assert StandardNormal().sample(3, dim=2).shape == (3, 2)
    with pytest.raises(ValueError, match="StandardNormal"):
        StandardNormal().sample(3)
    for prior in (StandardNormal(2), LearnedGaussian(2), MixturePrior(2, 3)):
        with pytest.raises(ValueError, match="dim = 3"):
            prior.sample(3, dim=3)
        for n in (-1, 2.0, True):
            with pytest.raises(ValueError, match="n must be an int >= 0"):
                prior.sample(n)


def _fractions(samples, centers):
    nearest = torch.cdist(samples, centers).argmin(1)
    return torch.bincount(nearest, minlength=len(centers)).double() / len(samples)


def test_sample_moments():
    """n = 20000 draws (torch path): each prior's and the decoder's moments."""
    n = 20000
    with fastvae.use_backend("torch"):
        z = StandardNormal(2).sample(n).double()
        assert_close("N(0, I) mean", z.mean(0), torch.zeros(2).double(), atol=0.05)
        assert_close("N(0, I) std", z.std(0), torch.ones(2).double(), rtol=0.03)

        prior = LearnedGaussian(2)
        prior.mu.data = torch.tensor([1.0, -2.0])
        prior.logvar.data = torch.tensor([0.25, 4.0]).log()
        z = prior.sample(n).double()
        assert_close("learned mean", z.mean(0), prior.mu.double(), atol=0.06)
        assert_close("learned std", z.std(0), torch.tensor([0.5, 2.0]).double(), rtol=0.03)

        prior = MixturePrior(2, 3)
        centers = torch.tensor([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0]])
        prior.means.data = centers.clone()
        prior.logvars.data = torch.tensor([[-2.0, 0.0], [-2.0, -2.0], [-2.0, -2.0]])
        prior.logits.data = torch.tensor([30.0, 0.0, 0.0])  # all mass on component 0
        z = prior.sample(n).double()
        assert_close("one component's mean", z.mean(0), centers[0].double(), atol=0.03)
        assert_close("its std", z.std(0), torch.tensor([math.exp(-1), 1.0]).double(), rtol=0.03)
        prior.logits.data = torch.tensor([math.log(0.25), math.log(0.75), -50.0])
        frac = _fractions(prior.sample(n), centers)
        assert_close("weights", frac, torch.tensor([0.25, 0.75, 0.0]).double(), atol=0.015)

        encoder = Lambda(lambda u: (u, torch.full_like(u, -4.0)))  # q(z | u) = N(u, e^-4)
        z = VampPrior(encoder, centers).sample(n)
        assert_close(
            "uniform components",
            _fractions(z, centers),
            torch.full((3,), 1 / 3).double(),
            atol=0.015,
        )
        assert_close(
            "tight",
            (z - centers[torch.cdist(z, centers).argmin(1)]).std(0),
            torch.full((2,), math.exp(-2)),
            rtol=0.05,
        )

        mean, logvar = torch.tensor([3.0, -1.0, 0.0]), torch.tensor([1.0, 4.0, 0.01]).log()
        decoder = Lambda(lambda z: (mean.expand(len(z), -1), logvar.expand(len(z), -1)))
        x = VAE(mlp(X_DIM, 4), decoder, prior=StandardNormal(2)).sample(n).double()
        assert_close("p(x) mean", x.mean(0), mean.double(), atol=0.06)
        assert_close("p(x) std", x.std(0), torch.tensor([1.0, 2.0, 0.1]).double(), rtol=0.03)
        p = torch.tensor([0.2, 0.9, 0.5])
        decoder = Lambda(lambda z: torch.logit(p).expand(len(z), -1))
        vae = VAE(mlp(X_DIM, 4), decoder, likelihood="bernoulli", prior=StandardNormal(2))
        assert_close("Bernoulli means", vae.sample(n).double().mean(0), p.double(), atol=0.015)


def test_discretized_logistic_samples_follow_its_likelihood():
    """n = 20000 draws of 8-bit data from fixed (mean, log_scale) per pixel: each bin's
    frequency matches P(bin) of discretized_logistic_log_prob, the edge bins (which hold the
    tails) included, within 5 standard errors."""
    n = 20000
    mean, log_scale = torch.tensor([0.3, 0.001, 0.97]), torch.tensor([0.02, 0.01, 0.05]).log()
    decoder = Lambda(lambda z: (mean.expand(len(z), -1), log_scale.expand(len(z), -1)))
    vae = VAE(mlp(X_DIM, 4), decoder, likelihood="discretized_logistic", prior=StandardNormal(2))
    k = (vae.sample(n) * 256).round().long()  # (n, 3)
    bins = torch.arange(256, dtype=torch.uint8).view(256, 1, 1).expand(256, X_DIM, 1)
    p = fastvae.discretized_logistic_log_prob(bins, mean[:, None], log_scale[:, None]).exp()
    assert_close("P sums to 1", p.sum(0).double(), torch.ones(X_DIM).double(), atol=1e-5)
    for d in range(X_DIM):
        freq = torch.bincount(k[:, d], minlength=256).double() / n
        se = (p[:, d].double() * (1 - p[:, d].double()) / n).sqrt()
        assert ((freq - p[:, d]).abs() <= 5 * se + 1e-4).all(), f"pixel {d}"
    assert k[:, 1].eq(0).float().mean() > 0.5 and k[:, 2].eq(255).float().mean() > 0.3


@pytest.mark.parametrize(
    ("likelihood", "variants"),
    [
        ("bernoulli", (torch.bool, torch.uint8)),
        ("discretized_logistic", (torch.int64, "k / 256")),
    ],
)
def test_data_dtypes_give_the_same_model(path, likelihood, variants):
    """Binarized data as 0/1 floats, bool or uint8, and 8-bit data as uint8, int64 or k / 256
    floats: the same losses and gradients, bit for bit (the encoder sees the same floats)."""
    device = path[1]
    model = make_model("iwae", "standard", likelihood).to(device)
    x = make_x(likelihood, device)
    runs = []
    for data in (x, *(x.float() / 256 if v == "k / 256" else x.to(v) for v in variants)):
        torch.manual_seed(3)
        out = model(data)
        runs.append((out.loss, *torch.autograd.grad(out.loss, list(model.parameters()))))
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_float64_models_stay_float64(likelihood):
    model = make_model("vae", "standard", likelihood).double()
    x = make_x(likelihood, "cpu")
    x = x.double() if x.is_floating_point() else x
    out = model(x)
    assert out.reconstruction.dtype == torch.float64
    expected = oracle_log_px(model, x, out.z.detach())
    assert_close("float64 log p(x|z)", out.reconstruction, expected, rtol=1e-13, atol=1e-13)


# -- 6. state_dict round trips ---------------------------------------------------------------


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("kind", ["vae", "dreg"])
def test_state_dict_round_trip(path, kind, prior):
    device = path[1]
    x = make_x("gaussian", device)
    model = make_model(kind, prior, seed=1).to(device)
    torch.manual_seed(5)
    before = model(x)
    state = round_trip(model.state_dict())
    assert state["_extra_state"] == {"latent_dim": Z_DIM}

    other = make_model(kind, prior, seed=2).to(device)
    torch.manual_seed(5)
    assert not torch.allclose(other(x).elbo, before.elbo), "the seeds give the same model"

    fresh = make_model(kind, prior, seed=2).to(device)
    fresh.load_state_dict(state)
    assert fresh.latent_dim == Z_DIM
    samples = [
        m.sample(4, generator=torch.Generator(device).manual_seed(6)) for m in (model, fresh)
    ]
    assert_close("sample", samples[1], samples[0], rtol=0, atol=0)
    torch.manual_seed(5)
    after = fresh(x)
    for name in VAEOutput._fields:
        assert_close(name, getattr(after, name), getattr(before, name), rtol=0, atol=0)
