"""fastvae.nn.GAN: its losses against the formulas written out in float64, finite for any
logit, with gradients reaching only the network each loss trains; sampling; state_dict round
trips. Both paths run (the `path` fixture). Wrong arguments: test_errors.py."""

from __future__ import annotations

import pytest
import torch
from _helpers import Lambda, assert_close, check_grads, mlp, round_trip
from torch import nn

from fastvae.nn import GAN

X_DIM, Z_DIM = 3, 2
B = 5


class Scaled(nn.Module):
    """scale * (a linear map close to 1): logits of about `scale` whatever the input."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale
        self.linear = nn.Linear(X_DIM, 1)
        with torch.no_grad():
            self.linear.weight.fill_(1e-3)
            self.linear.bias.fill_(1.0)

    def forward(self, x):
        return self.scale * self.linear(x)


def make_gan(loss="nonsaturating", discriminator=None, seed=1):
    torch.manual_seed(seed)
    generator = mlp(Z_DIM, X_DIM)
    return GAN(generator, discriminator or mlp(X_DIM, 1), Z_DIM, loss=loss)


def gan_formulas(loss, real_logits, fake_logits):
    """(generator loss, discriminator loss) written out, in float64."""
    r, f = real_logits.double().reshape(-1), fake_logits.double().reshape(-1)
    if loss == "hinge":
        return -f.mean(), (1 - r).clamp_min(0).mean() + (1 + f).clamp_min(0).mean()
    zero = torch.zeros_like(r)
    # -log sigmoid(f), -log sigmoid(r) - log(1 - sigmoid(f)), as log(1 + e^-t)
    return torch.logaddexp(zero, -f).mean(), (
        torch.logaddexp(zero, -r).mean() + torch.logaddexp(zero, f).mean()
    )


@pytest.mark.parametrize("loss", ["nonsaturating", "hinge"])
def test_gan_losses_match_formulas(path, loss):
    device = path[1]
    gan = make_gan(loss).to(device)
    real = torch.randn(B, X_DIM, device=device)
    gen_params = list(gan.generator.parameters())

    torch.manual_seed(8)
    g_loss = gan.generator_loss(B)
    torch.manual_seed(8)
    fake = gan.generate(B)
    expected = gan_formulas(loss, gan.discriminator(real), gan.discriminator(fake))
    assert g_loss.shape == ()
    assert_close("generator loss", g_loss, expected[0], rtol=1e-5, atol=1e-6)
    ours = torch.autograd.grad(g_loss, gen_params)
    check_grads(
        [n for n, _ in gan.generator.named_parameters()],
        ours,
        torch.autograd.grad(expected[0], gen_params),
    )
    torch.manual_seed(8)
    assert_close("a real batch sets the size", gan.generator_loss(real), g_loss, rtol=0, atol=0)

    torch.manual_seed(9)
    d_loss = gan.discriminator_loss(real)
    torch.manual_seed(9)
    fake = gan.generate(B).detach()
    expected = gan_formulas(loss, gan.discriminator(real), gan.discriminator(fake))
    assert_close("discriminator loss", d_loss, expected[1], rtol=1e-5, atol=1e-6)
    d_loss.backward()
    assert all(p.grad is None for p in gen_params), "discriminator_loss reached the generator"
    named = dict(gan.discriminator.named_parameters())
    # hinge: the last bias's gradient is #(r < 1) - #(f > -1), 0 when every |logit| < 1
    check_grads(
        named,
        [p.grad for p in named.values()],
        torch.autograd.grad(expected[1], list(named.values())),
        nonzero=loss != "hinge",
    )
    assert named["0.weight"].grad.abs().max() > 0


def r1_oracle(discriminator: nn.Module, params: dict, real: torch.Tensor) -> torch.Tensor:
    """mean over rows of ||grad_x D(x)||^2 for D with the given parameters, each row's gradient
    taken on its own through torch.func."""

    def logit_of_row(x):
        return torch.func.functional_call(discriminator, params, (x[None],)).sum()

    return torch.func.vmap(torch.func.grad(logit_of_row))(real).pow(2).sum(1).mean()


@pytest.mark.parametrize("loss", ["nonsaturating", "hinge"])
@pytest.mark.parametrize("linear", [True, False], ids=["linear", "mlp"])
def test_gan_r1_adds_the_gradient_penalty_on_real_data(loss, linear):
    """discriminator_loss with r1 = gamma is the plain loss + gamma / 2 * mean ||grad_x D||^2 on
    the real rows, value and parameter gradients against a float64 torch.func oracle; for a
    linear D = w.x + b the penalty is gamma / 2 * ||w||^2."""
    gamma = 0.3
    discriminator = nn.Linear(X_DIM, 1) if linear else mlp(X_DIM, 1)
    plain = make_gan(loss, discriminator)
    penalised = GAN(plain.generator, discriminator, Z_DIM, loss=loss, r1=gamma)
    real = torch.randn(B, X_DIM)
    named = dict(discriminator.named_parameters())
    params64 = {n: p.detach().double().requires_grad_() for n, p in named.items()}
    penalty = 0.5 * gamma * r1_oracle(discriminator, params64, real.double())
    if linear:
        assert_close("linear penalty", penalty, 0.5 * gamma * params64["weight"].pow(2).sum())
    losses = []
    for gan in (plain, penalised):
        torch.manual_seed(9)
        losses.append(gan.discriminator_loss(real))
    assert_close("penalised loss", losses[1], losses[0] + penalty)
    plain_grads, penalised_grads = (torch.autograd.grad(v, list(named.values())) for v in losses)
    check_grads(
        named,
        [a - b for a, b in zip(penalised_grads, plain_grads)],
        torch.autograd.grad(penalty, list(params64.values()), materialize_grads=True),
        nonzero=False,
    )
    with torch.no_grad():
        torch.manual_seed(9)
        assert_close("under no_grad", penalised.discriminator_loss(real), losses[1])


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("loss", ["nonsaturating", "hinge"])
def test_gan_losses_are_finite_for_huge_logits(path, loss, sign):
    device = path[1]
    gan = make_gan(loss, Scaled(sign * 1e4)).to(device)
    real = torch.randn(B, X_DIM, device=device)
    torch.manual_seed(8)
    g_loss = gan.generator_loss(B)
    torch.manual_seed(9)
    d_loss = gan.discriminator_loss(real)
    with torch.no_grad():
        torch.manual_seed(8)
        fake_g = gan.discriminator(gan.generate(B))
        torch.manual_seed(9)
        fake_d = gan.discriminator(gan.generate(B))
        real_logits = gan.discriminator(real)
    assert (real_logits.abs() > 9e3).all()
    assert_close("generator loss", g_loss, gan_formulas(loss, real_logits, fake_g)[0], rtol=1e-6)
    assert_close(
        "discriminator loss", d_loss, gan_formulas(loss, real_logits, fake_d)[1], rtol=1e-6
    )
    assert torch.isfinite(g_loss) and torch.isfinite(d_loss)
    g_grads = torch.autograd.grad(g_loss, list(gan.generator.parameters()))
    d_grads = torch.autograd.grad(d_loss, list(gan.discriminator.parameters()))
    assert all(torch.isfinite(t).all() for t in (*g_grads, *d_grads))
    if loss == "hinge" or sign < 0:  # the generator's loss is not saturated here
        assert all(t.abs().max() > 0 for t in g_grads)


def test_gan_sample_and_discriminator_shapes(path):
    device = path[1]
    gan = make_gan().to(device)
    a = gan.sample(4, generator=torch.Generator(device).manual_seed(1))
    b = gan.sample(4, generator=torch.Generator(device).manual_seed(1))
    assert a.shape == (4, X_DIM) and not a.requires_grad and torch.equal(a, b)
    assert gan.generate(4).requires_grad
    flat = make_gan(discriminator=Lambda(lambda x: x.sum(-1))).to(device)  # (n,) logits
    torch.manual_seed(8)
    loss = flat.generator_loss(3)
    torch.manual_seed(8)
    expected = torch.logaddexp(torch.zeros(3), -flat.generate(3).sum(-1).double().cpu()).mean()
    assert_close("(n,) logits", loss, expected, rtol=1e-5)


def test_gan_sample_zero():
    assert make_gan().sample(0).shape == (0, X_DIM)


def test_gan_state_dict_round_trip(path):
    device = path[1]
    gan = make_gan(seed=1).to(device)
    fresh = make_gan(seed=2).to(device)
    real = torch.randn(B, X_DIM, device=device)

    def outputs(m):
        torch.manual_seed(5)
        return m.sample(4), m.generator_loss(B), m.discriminator_loss(real)

    expected = outputs(gan)
    assert not torch.allclose(outputs(fresh)[0], expected[0])
    fresh.load_state_dict(round_trip(gan.state_dict()))
    assert fresh.latent_dim == Z_DIM
    for name, a, e in zip(("sample", "g loss", "d loss"), outputs(fresh), expected, strict=True):
        assert_close(name, a, e, rtol=0, atol=0)
