"""Bad input raises ValueError / TypeError naming the argument and what was expected."""

from __future__ import annotations

import pytest
import torch

import fastvae

MU = torch.zeros(4, 3)
LOGVAR = torch.zeros(4, 3)

CASES = {
    "mu not a tensor": (lambda: fastvae.reparameterize([0.0], LOGVAR), TypeError, "mu must be a torch.Tensor"),
    "integer logvar": (lambda: fastvae.gaussian_kl(MU, torch.zeros(4, 3, dtype=torch.int64)), TypeError, "logvar must be a floating-point"),
    "scalar mu": (lambda: fastvae.reparameterize(torch.tensor(0.0), torch.tensor(0.0)), ValueError, "mu must have at least one dimension"),
    "shapes do not broadcast": (lambda: fastvae.reparameterize_kl(MU, torch.zeros(4, 5)), ValueError, "logvar of shape (4, 5) does not broadcast with mu"),
    "log_prob shapes": (lambda: fastvae.gaussian_log_prob(torch.zeros(2, 3), MU, LOGVAR), ValueError, "does not broadcast"),
    "integer x": (lambda: fastvae.gaussian_log_prob(torch.zeros(4, 3, dtype=torch.int32), MU, LOGVAR), TypeError, "x must be a floating-point"),
    "mixed devices": (lambda: fastvae.gaussian_kl(MU, torch.zeros(4, 3, device="meta")), ValueError, "logvar is on meta but mu is on cpu"),
    "prior of wrong size": (lambda: fastvae.gaussian_kl(MU, LOGVAR, torch.zeros(5)), ValueError, "prior_mu of shape (5,) must broadcast to the posterior's shape (4, 3)"),
    "prior that enlarges": (lambda: fastvae.gaussian_kl(MU, LOGVAR, None, torch.zeros(2, 4, 3)), ValueError, "prior_logvar of shape (2, 4, 3)"),
    "num_samples zero": (lambda: fastvae.reparameterize(MU, LOGVAR, num_samples=0), ValueError, "num_samples must be >= 1"),
    "num_samples float": (lambda: fastvae.reparameterize(MU, LOGVAR, num_samples=2.0), TypeError, "num_samples must be an int"),
    "num_samples bool": (lambda: fastvae.reparameterize(MU, LOGVAR, num_samples=True), TypeError, "num_samples must be an int"),
    "eps of wrong shape": (lambda: fastvae.reparameterize(MU, LOGVAR, eps=torch.zeros(3)), ValueError, "eps must have the shape of z, (4, 3)"),
    "eps without the sample dim": (lambda: fastvae.reparameterize(MU, LOGVAR, eps=MU, num_samples=2), ValueError, "(2, 4, 3)"),
    "eps and generator": (lambda: fastvae.reparameterize_kl(MU, LOGVAR, eps=MU, generator=torch.Generator()), ValueError, "either eps or generator"),
    "generator not a generator": (lambda: fastvae.reparameterize(MU, LOGVAR, generator=0), TypeError, "generator must be a torch.Generator"),
    "negative free_bits": (lambda: fastvae.gaussian_kl(MU, LOGVAR, free_bits=-0.1), ValueError, "free_bits must be a finite float >= 0"),
    "nan free_bits": (lambda: fastvae.gaussian_kl(MU, LOGVAR, free_bits=float("nan")), ValueError, "free_bits"),
    "unsupported device": (lambda: fastvae.gaussian_kl(MU.to("meta"), LOGVAR.to("meta")), ValueError, "fastvae supports cpu and cuda"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_a_clear_error(case):
    call, error, message = CASES[case]
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generator_of_another_device():
    mu = MU.cuda()
    with pytest.raises(ValueError, match="generator is for cpu"):
        fastvae.reparameterize(mu, mu, generator=torch.Generator())
