"""Under torch.autocast (cpu bf16; cuda bf16 and fp16) the ops take the low-precision tensors
autocast gives them, compute in float32, and return the documented dtypes: z in its inputs'
dtype, every density, KL, bound and loss in float32. Autocast changes nothing in the ops'
math: the results equal the same call outside autocast on the same inputs.
"""

from __future__ import annotations

import pytest
import torch

import fastvae
from tests._helpers import assert_close

B, D, K, C = 6, 5, 3, 4
AUTOCASTS = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    *(
        pytest.param(
            "cuda", dtype, id=f"cuda-{name}",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        )
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16))
    ),
]  # fmt: skip


def _ops(mu, logvar, mixture):
    """name -> (result of each op on the posterior (mu, logvar), its documented dtypes)."""
    low, f32 = mu.dtype, torch.float32
    prior = (mixture[0][0], mixture[1][0])  # a learnable float32 (D,) Gaussian
    eps = torch.randn(K, *mu.shape, device=mu.device)
    z_k = fastvae.reparameterize(mu, logvar, eps=eps, num_samples=K)
    log_px = -(z_k.float() - 0.5).pow(2).sum(-1)
    pixels = (torch.arange(mu.numel(), device=mu.device) * 37 % 256).reshape(mu.shape)
    eye = torch.eye(mu.shape[-1], device=mu.device, dtype=low)
    scale_tril = 0.3 * mu.unsqueeze(-1) * logvar.unsqueeze(-2) + eye  # (B, D, D) in low
    return {
        "reparameterize": (fastvae.reparameterize(mu, logvar, eps=eps[0]), (low,)),
        "reparameterize_kl": (fastvae.reparameterize_kl(mu, logvar, eps=eps[0]), (low, f32)),
        "reparameterize_kl_tril": (
            fastvae.reparameterize_kl_tril(mu, scale_tril, eps=eps[0]),
            (low, f32),
        ),
        "gaussian_kl": (fastvae.gaussian_kl(mu, logvar), (f32,)),
        "gaussian_kl float32 prior": (fastvae.gaussian_kl(mu, logvar, *prior), (f32,)),
        "gaussian_log_prob": (fastvae.gaussian_log_prob(z_k, mu, logvar), (f32,)),
        "bernoulli_log_prob": (fastvae.bernoulli_log_prob(pixels % 2 == 0, z_k), (f32,)),
        "discretized_logistic_log_prob": (
            fastvae.discretized_logistic_log_prob(pixels.to(torch.uint8), mu, logvar),
            (f32,),
        ),
        "log_mean_exp": (fastvae.log_mean_exp(mu, dim=0), (f32,)),
        "mixture_log_prob": (fastvae.mixture_log_prob(z_k, *mixture), (f32,)),
        "iwae_loss": (fastvae.iwae_loss(log_px, z_k, mu, logvar, prior=mixture), (f32,)),
    }


def _posterior(device, x_dtype=torch.float32):
    torch.manual_seed(0)
    encoder = torch.nn.Linear(7, 2 * D).to(device)
    mixture = tuple(
        torch.randn(*shape, device=device, requires_grad=True) for shape in ((C, D), (C, D), (C,))
    )
    return encoder, torch.randn(B, 7, device=device, dtype=x_dtype), mixture


@pytest.mark.parametrize(("device", "dtype"), AUTOCASTS)
def test_ops_under_autocast_return_documented_dtypes(path, device, dtype):
    if path[1] != device:
        pytest.skip(f"the {path[0]} path runs on {path[1]}")
    encoder, x, mixture = _posterior(device)
    with torch.autocast(device, dtype=dtype):
        mu, logvar = encoder(x).chunk(2, -1)
        assert mu.dtype == dtype  # autocast ran the encoder in low precision
        results = _ops(mu, logvar, mixture)
    for name, (result, dtypes) in results.items():
        outputs = result if isinstance(result, tuple) else (result,)
        assert tuple(o.dtype for o in outputs) == dtypes, name
        for out in outputs:
            assert out.float().isfinite().all(), name


@pytest.mark.parametrize(("device", "dtype"), AUTOCASTS)
def test_autocast_changes_nothing_in_the_ops(path, device, dtype):
    """Same inputs, same noise: the results and the encoder's gradients inside autocast equal
    those outside it (the ops disable autocast for their own float32 math)."""
    if path[1] != device:
        pytest.skip(f"the {path[0]} path runs on {path[1]}")
    encoder, x, mixture = _posterior(device)
    with torch.autocast(device, dtype=dtype):
        mu, logvar = encoder(x).chunk(2, -1)
    runs = []
    for autocast in (True, False):
        torch.manual_seed(1)
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            results = _ops(mu, logvar, mixture)
        outputs = [o for r, _ in results.values() for o in (r if isinstance(r, tuple) else (r,))]
        loss = sum(o.float().sum() for o in outputs)
        params = [*encoder.parameters(), *mixture]
        runs.append((outputs, torch.autograd.grad(loss, params, retain_graph=True)))
    (out_on, grads_on), (out_off, grads_off) = runs
    for i, (on, off) in enumerate(zip(out_on, out_off)):
        assert_close(f"output {i}", on, off, rtol=1e-6, atol=1e-6)
    for i, (on, off) in enumerate(zip(grads_on, grads_off)):
        assert on.dtype == torch.float32
        assert_close(f"gradient {i}", on, off, rtol=1e-5, atol=1e-5)


def test_compiled_under_autocast_agrees_with_eager():
    encoder, x, mixture = _posterior("cpu")

    def loss_fn(x):
        mu, logvar = encoder(x).chunk(2, -1)
        return sum(o.float().sum() for r, _ in _ops(mu, logvar, mixture).values()
                   for o in (r if isinstance(r, tuple) else (r,)))  # fmt: skip

    losses = []
    for fn in (loss_fn, torch.compile(loss_fn, backend="aot_eager", fullgraph=True)):
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(fn(x))
    assert losses[0].dtype == losses[1].dtype == torch.float32
    assert_close("loss", losses[1], losses[0], rtol=1e-5)
