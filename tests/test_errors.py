"""Bad input raises ValueError / TypeError naming the argument and what was expected.

One table per public surface: every function in fastvae.__all__, the backend switches,
fastvae.nn's modules (constructors and methods), and what the user's networks return to VAE
and IWAE. Each case: (call, error, a substring of the message that names the argument).
"meta" tensors stand for "another device".
"""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import Lambda
from torch import nn

import fastvae
from fastvae.nn import GAN, IWAE, VAE, LearnedGaussian, MixturePrior, StandardNormal, VampPrior

MU = torch.zeros(4, 3)
LOGVAR = torch.zeros(4, 3)
META = torch.zeros(4, 3, device="meta")
INT = torch.zeros(4, 3, dtype=torch.int64)
Z = torch.zeros(2, 4, 3)  # K = 2 samples of (4, 3)
LOG_PX = torch.zeros(2, 4)
MEANS, LOGVARS, LOG_WEIGHTS = torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2)
TRIL = torch.eye(3).expand(4, 3, 3)


def _log_lik(x, z):
    return z.sum(-1)


def _estimate(encode=lambda x: (MU, LOGVAR), log_likelihood=_log_lik, *args, **kwargs):
    return fastvae.estimate_log_likelihood(encode, log_likelihood, MU, *args, **kwargs)


class _Prior:
    """An object with log_prob(z) returning whatever it was given."""

    def __init__(self, fn):
        self.log_prob = fn


# -- the ops ---------------------------------------------------------------------------------

CASES = {
    # reparameterize
    "mu not a tensor": (lambda: fastvae.reparameterize([0.0], LOGVAR), TypeError, "mu must be a torch.Tensor"),
    "logvar not a tensor": (lambda: fastvae.reparameterize(MU, 0.0), TypeError, "logvar must be a torch.Tensor"),
    "integer mu": (lambda: fastvae.reparameterize(INT, LOGVAR), TypeError, "mu must be a floating-point"),
    "bool logvar": (lambda: fastvae.reparameterize(MU, LOGVAR.bool()), TypeError, "logvar must be a floating-point"),
    "complex mu": (lambda: fastvae.reparameterize(MU.to(torch.complex64), LOGVAR), TypeError, "mu must be a floating-point"),
    "scalar mu": (lambda: fastvae.reparameterize(torch.tensor(0.0), torch.tensor(0.0)), ValueError, "mu must have at least one dimension"),
    "reparameterize shapes": (lambda: fastvae.reparameterize(MU, torch.zeros(2, 3)), ValueError, "logvar of shape (2, 3) does not broadcast with mu"),
    "logvar on another device": (lambda: fastvae.reparameterize(MU, META), ValueError, "logvar is on meta but mu is on cpu"),
    "both on an unsupported device": (lambda: fastvae.reparameterize(META, META), ValueError, "mu is on meta; fastvae supports cpu and cuda"),
    "eps not a tensor": (lambda: fastvae.reparameterize(MU, LOGVAR, eps=[0.0]), TypeError, "eps must be a torch.Tensor"),
    "integer eps": (lambda: fastvae.reparameterize(MU, LOGVAR, eps=INT), TypeError, "eps must be a floating-point"),
    "eps on another device": (lambda: fastvae.reparameterize(MU, LOGVAR, eps=META), ValueError, "eps is on meta but mu is on cpu"),
    "eps of wrong shape": (lambda: fastvae.reparameterize(MU, LOGVAR, eps=torch.zeros(3)), ValueError, "eps must have the shape of z, (4, 3)"),
    "eps without the sample dim": (lambda: fastvae.reparameterize(MU, LOGVAR, eps=MU, num_samples=2), ValueError, "(2, 4, 3)"),
    "num_samples zero": (lambda: fastvae.reparameterize(MU, LOGVAR, num_samples=0), ValueError, "num_samples must be >= 1"),
    "num_samples negative": (lambda: fastvae.reparameterize(MU, LOGVAR, num_samples=-3), ValueError, "num_samples must be >= 1"),
    "num_samples float": (lambda: fastvae.reparameterize(MU, LOGVAR, num_samples=2.0), TypeError, "num_samples must be an int"),
    "num_samples bool": (lambda: fastvae.reparameterize(MU, LOGVAR, num_samples=True), TypeError, "num_samples must be an int"),
    "num_samples str": (lambda: fastvae.reparameterize(MU, LOGVAR, num_samples="2"), TypeError, "num_samples must be an int"),
    "generator not a generator": (lambda: fastvae.reparameterize(MU, LOGVAR, generator=0), TypeError, "generator must be a torch.Generator"),
    # gaussian_kl
    "integer logvar": (lambda: fastvae.gaussian_kl(MU, INT), TypeError, "logvar must be a floating-point"),
    "scalar logvar": (lambda: fastvae.gaussian_kl(MU, torch.tensor(0.0)), ValueError, "logvar must have at least one dimension"),
    "mixed devices": (lambda: fastvae.gaussian_kl(MU, META), ValueError, "logvar is on meta but mu is on cpu"),
    "unsupported device": (lambda: fastvae.gaussian_kl(META, META), ValueError, "fastvae supports cpu and cuda"),
    "prior_mu not a tensor": (lambda: fastvae.gaussian_kl(MU, LOGVAR, [0.0] * 3), TypeError, "prior_mu must be a torch.Tensor"),
    "integer prior_logvar": (lambda: fastvae.gaussian_kl(MU, LOGVAR, None, torch.zeros(3, dtype=torch.int32)), TypeError, "prior_logvar must be a floating-point"),
    "prior_mu on another device": (lambda: fastvae.gaussian_kl(MU, LOGVAR, torch.zeros(3, device="meta")), ValueError, "prior_mu is on meta but mu is on cpu"),
    "prior of wrong size": (lambda: fastvae.gaussian_kl(MU, LOGVAR, torch.zeros(5)), ValueError, "prior_mu of shape (5,) must broadcast to the posterior's shape (4, 3)"),
    "prior that enlarges": (lambda: fastvae.gaussian_kl(MU, LOGVAR, None, torch.zeros(2, 4, 3)), ValueError, "prior_logvar of shape (2, 4, 3)"),
    "negative free_bits": (lambda: fastvae.gaussian_kl(MU, LOGVAR, free_bits=-0.1), ValueError, "free_bits must be a finite float >= 0"),
    "nan free_bits": (lambda: fastvae.gaussian_kl(MU, LOGVAR, free_bits=math.nan), ValueError, "free_bits"),
    "inf free_bits": (lambda: fastvae.gaussian_kl(MU, LOGVAR, free_bits=math.inf), ValueError, "free_bits must be a finite float >= 0"),
    "str free_bits": (lambda: fastvae.gaussian_kl(MU, LOGVAR, free_bits="0.1"), TypeError, "free_bits must be a float"),
    "bool free_bits": (lambda: fastvae.gaussian_kl(MU, LOGVAR, free_bits=True), TypeError, "free_bits must be a float"),
    # reparameterize_kl
    "reparameterize_kl shapes": (lambda: fastvae.reparameterize_kl(MU, torch.zeros(4, 5)), ValueError, "logvar of shape (4, 5) does not broadcast with mu"),
    "reparameterize_kl integer prior_mu": (lambda: fastvae.reparameterize_kl(MU, LOGVAR, INT), TypeError, "prior_mu must be a floating-point"),
    "reparameterize_kl prior_logvar device": (lambda: fastvae.reparameterize_kl(MU, LOGVAR, None, META), ValueError, "prior_logvar is on meta"),
    "reparameterize_kl prior shape": (lambda: fastvae.reparameterize_kl(MU, LOGVAR, torch.zeros(4, 2)), ValueError, "prior_mu of shape (4, 2)"),
    "reparameterize_kl eps shape": (lambda: fastvae.reparameterize_kl(MU, LOGVAR, eps=torch.zeros(4, 1)), ValueError, "eps must have the shape of z"),
    "reparameterize_kl integer eps": (lambda: fastvae.reparameterize_kl(MU, LOGVAR, eps=INT), TypeError, "eps must be a floating-point"),
    "eps and generator": (lambda: fastvae.reparameterize_kl(MU, LOGVAR, eps=MU, generator=torch.Generator()), ValueError, "either eps or generator"),
    "reparameterize_kl generator": (lambda: fastvae.reparameterize_kl(MU, LOGVAR, generator="seed"), TypeError, "generator must be a torch.Generator"),
    "reparameterize_kl free_bits": (lambda: fastvae.reparameterize_kl(MU, LOGVAR, free_bits=-1), ValueError, "free_bits"),
    # gaussian_log_prob
    "log_prob shapes": (lambda: fastvae.gaussian_log_prob(torch.zeros(2, 3), MU, LOGVAR), ValueError, "does not broadcast"),
    "x not a tensor": (lambda: fastvae.gaussian_log_prob([0.0], MU, LOGVAR), TypeError, "x must be a torch.Tensor"),
    "integer x": (lambda: fastvae.gaussian_log_prob(torch.zeros(4, 3, dtype=torch.int32), MU, LOGVAR), TypeError, "x must be a floating-point"),
    "scalar x": (lambda: fastvae.gaussian_log_prob(torch.tensor(0.0), MU, LOGVAR), ValueError, "x must have at least one dimension"),
    "log_prob mu on another device": (lambda: fastvae.gaussian_log_prob(MU, META, LOGVAR), ValueError, "mu is on meta but x is on cpu"),
    "log_prob logvar not a tensor": (lambda: fastvae.gaussian_log_prob(MU, MU, "0.0"), TypeError, "logvar must be a torch.Tensor, a float or None, got str"),
    "log_prob bool logvar": (lambda: fastvae.gaussian_log_prob(MU, MU, True), TypeError, "logvar must be a torch.Tensor, a float or None, got bool"),
    "log_prob integer 0-dim logvar": (lambda: fastvae.gaussian_log_prob(MU, MU, torch.tensor(0)), TypeError, "logvar must be a floating-point"),
    "log_prob 0-dim logvar on another device": (lambda: fastvae.gaussian_log_prob(MU, MU, torch.tensor(0.0, device="meta")), ValueError, "logvar is on meta but x is on cpu"),
    "log_prob integer logvar": (lambda: fastvae.gaussian_log_prob(MU, MU, INT), TypeError, "logvar must be a floating-point"),
    # bernoulli_log_prob
    "bernoulli x not a tensor": (lambda: fastvae.bernoulli_log_prob([0.0], MU), TypeError, "x must be a torch.Tensor"),
    "bernoulli int64 x": (lambda: fastvae.bernoulli_log_prob(INT, MU), TypeError, "x must be a tensor of one of float16, bfloat16, float32, float64, bool, uint8; got torch.int64"),
    "bernoulli complex x": (lambda: fastvae.bernoulli_log_prob(MU.to(torch.complex64), MU), TypeError, "x must be a tensor of one of"),
    "bernoulli scalar x": (lambda: fastvae.bernoulli_log_prob(torch.tensor(1.0), MU), ValueError, "x must have at least one dimension"),
    "bernoulli logits not a tensor": (lambda: fastvae.bernoulli_log_prob(MU, 0.5), TypeError, "logits must be a torch.Tensor"),
    "bernoulli integer logits": (lambda: fastvae.bernoulli_log_prob(MU, INT), TypeError, "logits must be a floating-point"),
    "bernoulli bool logits": (lambda: fastvae.bernoulli_log_prob(MU, MU.bool()), TypeError, "logits must be a floating-point"),
    "bernoulli shapes": (lambda: fastvae.bernoulli_log_prob(torch.zeros(2, 3, dtype=torch.uint8), MU), ValueError, "logits of shape (4, 3) does not broadcast with x (shape (2, 3))"),
    "bernoulli logits on another device": (lambda: fastvae.bernoulli_log_prob(MU, META), ValueError, "logits is on meta but x is on cpu"),
    # discretized_logistic_log_prob
    "discretized x not a tensor": (lambda: fastvae.discretized_logistic_log_prob([0.0], MU, LOGVAR), TypeError, "x must be a torch.Tensor"),
    "discretized bool x": (lambda: fastvae.discretized_logistic_log_prob(MU.bool(), MU, LOGVAR), TypeError, "x must be a tensor of one of float16, bfloat16, float32, float64, uint8, int8, int16, int32, int64; got torch.bool"),
    "discretized scalar x": (lambda: fastvae.discretized_logistic_log_prob(torch.tensor(3), MU, LOGVAR), ValueError, "x must have at least one dimension"),
    "discretized integer mean": (lambda: fastvae.discretized_logistic_log_prob(MU, INT, LOGVAR), TypeError, "mean must be a floating-point"),
    "discretized log_scale not a tensor": (lambda: fastvae.discretized_logistic_log_prob(MU, MU, -3.0), TypeError, "log_scale must be a torch.Tensor"),
    "discretized shapes": (lambda: fastvae.discretized_logistic_log_prob(MU, MU, torch.zeros(5, 3)), ValueError, "log_scale of shape (5, 3) does not broadcast with x and mean (shape (4, 3))"),
    "discretized mean on another device": (lambda: fastvae.discretized_logistic_log_prob(MU, META, LOGVAR), ValueError, "mean is on meta but x is on cpu"),
    "discretized bins one": (lambda: fastvae.discretized_logistic_log_prob(MU, MU, LOGVAR, bins=1), ValueError, "bins must be an int in [2, 2^24], got 1"),
    "discretized bins too many": (lambda: fastvae.discretized_logistic_log_prob(MU, MU, LOGVAR, bins=2**25), ValueError, "bins must be an int in [2, 2^24]"),
    "discretized bins float": (lambda: fastvae.discretized_logistic_log_prob(MU, MU, LOGVAR, bins=256.0), TypeError, "bins must be an int >= 2, got float"),
    "discretized bins bool": (lambda: fastvae.discretized_logistic_log_prob(MU, MU, LOGVAR, bins=True), TypeError, "bins must be an int >= 2, got bool"),
    "discretized bins tensor": (lambda: fastvae.discretized_logistic_log_prob(MU, MU, LOGVAR, bins=torch.tensor(256)), TypeError, "bins must be an int >= 2, got Tensor"),
    "discretized validate str": (lambda: fastvae.discretized_logistic_log_prob(MU, MU, LOGVAR, validate="yes"), TypeError, "validate must be None, True or False, got str"),
    "discretized x off the bins": (lambda: fastvae.discretized_logistic_log_prob(MU + 0.3, MU, LOGVAR), ValueError, "x must hold bin values k / bins with k an integer in [0, 256) (bins = 256); got 0.3"),
    "discretized x past the bins": (lambda: fastvae.discretized_logistic_log_prob(INT + 300, MU, LOGVAR), ValueError, "x must hold bin indices k in [0, bins) = [0, 256); got 300"),
    "discretized x below the bins": (lambda: fastvae.discretized_logistic_log_prob(INT - 1, MU, LOGVAR, bins=3), ValueError, "[0, 3); got -1"),
    # log_mean_exp
    "log_mean_exp x not a tensor": (lambda: fastvae.log_mean_exp([0.0, 1.0]), TypeError, "x must be a torch.Tensor"),
    "log_mean_exp integer x": (lambda: fastvae.log_mean_exp(INT), TypeError, "x must be a floating-point"),
    "log_mean_exp unsupported device": (lambda: fastvae.log_mean_exp(META), ValueError, "x is on meta"),
    "log_mean_exp dim float": (lambda: fastvae.log_mean_exp(MU, 1.0), TypeError, "dim must be an int"),
    "log_mean_exp dim None": (lambda: fastvae.log_mean_exp(MU, None), TypeError, "dim must be an int"),
    "log_mean_exp dim out of range": (lambda: fastvae.log_mean_exp(MU, 2), ValueError, "dim must be in [-2, 1]"),
    "log_mean_exp empty dim": (lambda: fastvae.log_mean_exp(torch.zeros(0, 3)), ValueError, "dim 0 of x is empty"),
    # importance_sample
    "importance_sample mu not a tensor": (lambda: fastvae.importance_sample([0.0], LOGVAR, 2), TypeError, "mu must be a torch.Tensor"),
    "importance_sample integer logvar": (lambda: fastvae.importance_sample(MU, INT, 2), TypeError, "logvar must be a floating-point"),
    "importance_sample mu on another device": (lambda: fastvae.importance_sample(META, LOGVAR, 2), ValueError, "mu is on meta"),
    "importance_sample num_samples zero": (lambda: fastvae.importance_sample(MU, LOGVAR, 0), ValueError, "num_samples must be >= 1"),
    "importance_sample num_samples None": (lambda: fastvae.importance_sample(MU, LOGVAR, None), TypeError, "num_samples must be an int"),
    "importance_sample num_samples float": (lambda: fastvae.importance_sample(MU, LOGVAR, 1.5), TypeError, "num_samples must be an int"),
    "importance_sample generator": (lambda: fastvae.importance_sample(MU, LOGVAR, 2, generator="g"), TypeError, "generator must be a torch.Generator"),
    "importance_sample prior str": (lambda: fastvae.importance_sample(MU, LOGVAR, 2, prior="normal"), TypeError, "prior must be None"),
    "importance_sample prior 4-tuple": (lambda: fastvae.importance_sample(MU, LOGVAR, 2, prior=(MU,) * 4), TypeError, "prior must be None"),
    "importance_sample prior 1-tuple": (lambda: fastvae.importance_sample(MU, LOGVAR, 2, prior=(MU,)), TypeError, "prior must be None"),
    "importance_sample prior pair shape": (lambda: fastvae.importance_sample(MU, LOGVAR, 2, prior=(torch.zeros(5), torch.zeros(5))), ValueError, "prior_mu of shape (5,)"),
    "importance_sample prior pair integer": (lambda: fastvae.importance_sample(MU, LOGVAR, 2, prior=(MU, INT)), TypeError, "prior_logvar must be a floating-point"),
    "importance_sample prior pair device": (lambda: fastvae.importance_sample(MU, LOGVAR, 2, prior=(META, LOGVAR)), ValueError, "prior_mu is on meta"),
    "importance_sample mixture D": (lambda: fastvae.importance_sample(MU, LOGVAR, 2, prior=(torch.zeros(2, 5), torch.zeros(2, 5), None)), ValueError, "means must have shape (C, D)"),
    "importance_sample mixture integer weights": (lambda: fastvae.importance_sample(MU, LOGVAR, 2, prior=(MEANS, LOGVARS, LOG_WEIGHTS.long())), TypeError, "log_weights must be a floating-point"),
    "importance_sample mixture device": (lambda: fastvae.importance_sample(MU, LOGVAR, 2, prior=(MEANS, LOGVARS.to("meta"), None)), ValueError, "logvars is on meta"),
    "importance_sample log_prob shape": (lambda: fastvae.importance_sample(MU, LOGVAR, 2, prior=_Prior(lambda z: z)), ValueError, "prior.log_prob(z) must return z.shape[:-1] = (2, 4)"),
    "importance_sample log_prob not a tensor": (lambda: fastvae.importance_sample(MU, LOGVAR, 2, prior=_Prior(lambda z: 0.0)), ValueError, "prior.log_prob(z) must return"),
    # iwae_loss
    "iwae_loss log_px not a tensor": (lambda: fastvae.iwae_loss([0.0], Z, MU, LOGVAR), TypeError, "log_px_given_z must be a torch.Tensor"),
    "iwae_loss integer log_px": (lambda: fastvae.iwae_loss(LOG_PX.long(), Z, MU, LOGVAR), TypeError, "log_px_given_z must be a floating-point"),
    "iwae_loss z not a tensor": (lambda: fastvae.iwae_loss(LOG_PX, [0.0], MU, LOGVAR), TypeError, "z must be a torch.Tensor"),
    "iwae_loss integer z": (lambda: fastvae.iwae_loss(LOG_PX, Z.long(), MU, LOGVAR), TypeError, "z must be a floating-point"),
    "iwae_loss z without samples": (lambda: fastvae.iwae_loss(LOG_PX, torch.zeros(3), MU, LOGVAR), ValueError, "z must be (K, ..., D)"),
    "iwae_loss mu on another device": (lambda: fastvae.iwae_loss(LOG_PX, Z, META, LOGVAR), ValueError, "mu is on meta but log_px_given_z is on cpu"),
    "iwae_loss logvar shape": (lambda: fastvae.iwae_loss(LOG_PX, Z, MU, torch.zeros(5, 3)), ValueError, "logvar of shape (5, 3)"),
    "iwae_loss log_px samples": (lambda: fastvae.iwae_loss(torch.zeros(3, 4), Z, MU, LOGVAR), ValueError, "log_px_given_z has 3 samples"),
    "iwae_loss log_px shape": (lambda: fastvae.iwae_loss(torch.zeros(2, 5), Z, MU, LOGVAR), ValueError, "log_px_given_z of shape (2, 5) must be z.shape[:-1]"),
    "iwae_loss estimator": (lambda: fastvae.iwae_loss(LOG_PX, Z, MU, LOGVAR, estimator="vimco"), ValueError, "estimator must be one of iwae, stl, dreg"),
    "iwae_loss estimator None": (lambda: fastvae.iwae_loss(LOG_PX, Z, MU, LOGVAR, estimator=None), ValueError, "estimator must be one of"),
    "iwae_loss reduction": (lambda: fastvae.iwae_loss(LOG_PX, Z, MU, LOGVAR, reduction="avg"), ValueError, "reduction must be one of"),
    "iwae_loss reduction int": (lambda: fastvae.iwae_loss(LOG_PX, Z, MU, LOGVAR, reduction=1), ValueError, "reduction must be one of"),
    "iwae_loss prior str": (lambda: fastvae.iwae_loss(LOG_PX, Z, MU, LOGVAR, prior=3.0), TypeError, "prior must be None"),
    "iwae_loss prior pair shape": (lambda: fastvae.iwae_loss(LOG_PX, Z, MU, LOGVAR, prior=(torch.zeros(5), torch.zeros(5))), ValueError, "prior"),
    "iwae_loss prior pair integer": (lambda: fastvae.iwae_loss(LOG_PX, Z, MU, LOGVAR, prior=(INT, LOGVAR)), TypeError, "prior"),
    "iwae_loss mixture D": (lambda: fastvae.iwae_loss(LOG_PX, Z, MU, LOGVAR, prior=(torch.zeros(2, 5), torch.zeros(2, 5), None)), ValueError, "means must have shape (C, D)"),
    "iwae_loss dreg on a leaf z": (lambda: fastvae.iwae_loss(LOG_PX, Z.clone().requires_grad_(), MU, LOGVAR, estimator="dreg"), ValueError, "estimator='dreg' needs z"),
    # mixture_log_prob
    "mixture z not a tensor": (lambda: fastvae.mixture_log_prob([0.0], MEANS, LOGVARS), TypeError, "z must be a torch.Tensor"),
    "mixture integer means": (lambda: fastvae.mixture_log_prob(MU, MEANS.long(), LOGVARS), TypeError, "means must be a floating-point"),
    "mixture logvars not a tensor": (lambda: fastvae.mixture_log_prob(MU, MEANS, 0.0), TypeError, "logvars must be a torch.Tensor"),
    "mixture scalar z": (lambda: fastvae.mixture_log_prob(torch.tensor(0.0), MEANS, LOGVARS), ValueError, "z must have at least one dimension"),
    "mixture means D": (lambda: fastvae.mixture_log_prob(MU, torch.zeros(2, 4), torch.zeros(2, 4)), ValueError, "means must have shape (C, D) with D = z.shape[-1] = 3"),
    "mixture no components": (lambda: fastvae.mixture_log_prob(MU, torch.zeros(0, 3), torch.zeros(0, 3)), ValueError, "means must have at least one component"),
    "mixture logvars shape": (lambda: fastvae.mixture_log_prob(MU, MEANS, torch.zeros(3, 3)), ValueError, "logvars must have the shape of means"),
    "mixture log_weights length": (lambda: fastvae.mixture_log_prob(MU, MEANS, LOGVARS, torch.zeros(3)), ValueError, "log_weights must have shape (C,) = (2,)"),
    "mixture integer log_weights": (lambda: fastvae.mixture_log_prob(MU, MEANS, LOGVARS, LOG_WEIGHTS.int()), TypeError, "log_weights must be a floating-point"),
    "mixture log_weights device": (lambda: fastvae.mixture_log_prob(MU, MEANS, LOGVARS, LOG_WEIGHTS.to("meta")), ValueError, "log_weights is on meta but z is on cpu"),
    "mixture means device": (lambda: fastvae.mixture_log_prob(MU, MEANS.to("meta"), LOGVARS), ValueError, "means is on meta but z is on cpu"),
    "mixture unsupported device": (lambda: fastvae.mixture_log_prob(META, MEANS.to("meta"), LOGVARS.to("meta")), ValueError, "z is on meta; fastvae supports cpu and cuda"),
    # estimate_log_likelihood
    "estimate encode not callable": (lambda: _estimate(encode=3), TypeError, "encode"),
    "estimate log_likelihood not callable": (lambda: _estimate(log_likelihood="ll"), TypeError, "log_likelihood"),
    "estimate encode returns three": (lambda: _estimate(encode=lambda x: (MU, MU, MU)), TypeError, "encode(x) must return (mu, logvar)"),
    "estimate encode returns a tensor": (lambda: _estimate(encode=lambda x: MU), TypeError, "encode(x) must return (mu, logvar)"),
    "estimate encode not tensors": (lambda: _estimate(encode=lambda x: ([0.0], MU)), TypeError, "mu (from encode) must be a torch.Tensor"),
    "estimate encode integers": (lambda: _estimate(encode=lambda x: (MU, INT)), TypeError, "logvar (from encode) must be a floating-point"),
    "estimate encode shapes": (lambda: _estimate(encode=lambda x: (MU, torch.zeros(5))), ValueError, "logvar (from encode) of shape (5,) does not broadcast"),
    "estimate encode device": (lambda: _estimate(encode=lambda x: (META, LOGVAR)), ValueError, "mu is on meta"),
    "estimate log_likelihood shape": (lambda: _estimate(log_likelihood=lambda x, z: z), ValueError, "log_likelihood(x, z) must return (k, *batch)"),
    "estimate log_likelihood not a tensor": (lambda: _estimate(log_likelihood=lambda x, z: [0.0]), ValueError, "log_likelihood(x, z) must return"),
    "estimate log_likelihood device": (lambda: _estimate(log_likelihood=lambda x, z: z.sum(-1).to("meta")), ValueError, "log_likelihood(x, z)"),
    "estimate num_samples zero": (lambda: _estimate(num_samples=0), ValueError, "num_samples must be >= 1"),
    "estimate num_samples float": (lambda: _estimate(num_samples=2.5), TypeError, "num_samples must be an int"),
    "estimate num_samples None": (lambda: _estimate(num_samples=None), TypeError, "num_samples must be an int"),
    "estimate chunk_size zero": (lambda: _estimate(num_samples=3, chunk_size=0), ValueError, "chunk_size must be >= 1"),
    "estimate chunk_size float": (lambda: _estimate(num_samples=3, chunk_size=1.5), TypeError, "chunk_size must be an int"),
    "estimate chunk_size bool": (lambda: _estimate(num_samples=3, chunk_size=True), TypeError, "chunk_size must be an int"),
    "estimate prior": (lambda: _estimate(num_samples=3, prior="normal"), TypeError, "prior must be None"),
    "estimate prior pair shape": (lambda: _estimate(num_samples=3, prior=(torch.zeros(5), torch.zeros(5))), ValueError, "prior_mu of shape (5,)"),
    # reparameterize_kl_tril (TRIL: mu's (4, 3) with a 3 x 3 matrix a row)
    "tril mu not a tensor": (lambda: fastvae.reparameterize_kl_tril([0.0], TRIL), TypeError, "mu must be a torch.Tensor"),
    "tril scale_tril not a tensor": (lambda: fastvae.reparameterize_kl_tril(MU, [[1.0]]), TypeError, "scale_tril must be a torch.Tensor"),
    "tril integer mu": (lambda: fastvae.reparameterize_kl_tril(INT, TRIL), TypeError, "mu must be a floating-point"),
    "tril integer scale_tril": (lambda: fastvae.reparameterize_kl_tril(MU, TRIL.long()), TypeError, "scale_tril must be a floating-point"),
    "tril scalar mu": (lambda: fastvae.reparameterize_kl_tril(torch.tensor(0.0), TRIL), ValueError, "mu must have at least one dimension"),
    "tril scale_tril (B, D)": (lambda: fastvae.reparameterize_kl_tril(MU, LOGVAR), ValueError, "scale_tril must have shape (..., D, D) = (4, 3, 3) to match mu of shape (4, 3); got (4, 3)"),
    "tril scale_tril of another D": (lambda: fastvae.reparameterize_kl_tril(MU, torch.zeros(4, 2, 2)), ValueError, "scale_tril must have shape (..., D, D) = (4, 3, 3)"),
    "tril scale_tril not square": (lambda: fastvae.reparameterize_kl_tril(MU, torch.zeros(4, 3, 4)), ValueError, "got (4, 3, 4)"),
    "tril scale_tril of another batch": (lambda: fastvae.reparameterize_kl_tril(MU, torch.zeros(5, 3, 3)), ValueError, "got (5, 3, 3)"),
    "tril scale_tril shared, not broadcast": (lambda: fastvae.reparameterize_kl_tril(MU, torch.eye(3)), ValueError, "scale_tril must have shape (..., D, D) = (4, 3, 3)"),
    "tril scale_tril on another device": (lambda: fastvae.reparameterize_kl_tril(MU, TRIL.to("meta")), ValueError, "scale_tril is on meta but mu is on cpu"),
    "tril unsupported device": (lambda: fastvae.reparameterize_kl_tril(META, TRIL.to("meta")), ValueError, "mu is on meta; fastvae supports cpu and cuda"),
    "tril eps of wrong shape": (lambda: fastvae.reparameterize_kl_tril(MU, TRIL, eps=torch.zeros(4, 1)), ValueError, "eps must have the shape of z, (4, 3); got (4, 1)"),
    "tril integer eps": (lambda: fastvae.reparameterize_kl_tril(MU, TRIL, eps=INT), TypeError, "eps must be a floating-point"),
    "tril eps on another device": (lambda: fastvae.reparameterize_kl_tril(MU, TRIL, eps=META), ValueError, "eps is on meta but mu is on cpu"),
    "tril eps and generator": (lambda: fastvae.reparameterize_kl_tril(MU, TRIL, eps=MU, generator=torch.Generator()), ValueError, "either eps or generator"),
    "tril generator not a generator": (lambda: fastvae.reparameterize_kl_tril(MU, TRIL, generator=1), TypeError, "generator must be a torch.Generator"),
    # set_backend, use_backend, get_backend
    "set_backend name": (lambda: fastvae.set_backend("cuda"), ValueError, "backend must be one of auto, torch, triton; got 'cuda'"),
    "set_backend int": (lambda: fastvae.set_backend(3), ValueError, "backend must be one of"),
    "set_backend None": (lambda: fastvae.set_backend(None), ValueError, "backend must be one of"),
    "use_backend name": (lambda: fastvae.use_backend("jax").__enter__(), ValueError, "backend must be one of auto, torch, triton; got 'jax'"),
    "get_backend takes no argument": (lambda: fastvae.get_backend("torch"), TypeError, "get_backend() takes 0 positional arguments"),
}  # fmt: skip


# Case -> the exact problem, for cases in code this change does not touch (fastvae/ops).
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_a_clear_error(case):
    call, error, message = CASES[case]
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value)


def test_every_public_function_has_cases():
    """Each name in fastvae.__all__ appears in the table above (as 'name ...' or in a call)."""
    import inspect

    source = inspect.getsource(inspect.getmodule(test_every_public_function_has_cases))
    for name in fastvae.__all__:
        assert f"fastvae.{name}(" in source, name


def test_failed_backend_switch_changes_nothing():
    before = fastvae.get_backend()
    with pytest.raises(ValueError):
        fastvae.set_backend("cuda")
    with pytest.raises(ValueError), fastvae.use_backend("jax"):
        pass
    assert fastvae.get_backend() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generator_of_another_device():
    mu = MU.cuda()
    with pytest.raises(ValueError, match="generator is for cpu"):
        fastvae.reparameterize(mu, mu, generator=torch.Generator())


# -- fastvae.nn ------------------------------------------------------------------------------
# x: (B, 3); encoder: (B, 3) -> (B, 2 * 2); decoder: (N, 2) -> (N, 2 * 3); latent size 2.

X = torch.zeros(5, 3)


def _enc():
    return nn.Linear(3, 4)


def _dec():
    return nn.Linear(2, 6)


def _vae(**kwargs):
    return VAE(_enc(), _dec(), **kwargs)


def _known_vae():
    return _vae(prior=StandardNormal(2))  # the latent size is known before any encode


def _iwae(**kwargs):
    return IWAE(_enc(), _dec(), **kwargs)


def _gan(**kwargs):
    return GAN(nn.Linear(2, 3), nn.Linear(3, 1), 2, **kwargs)


def _vamp(pseudo_inputs=None, encoder=None):
    return VampPrior(
        encoder or _enc(), torch.zeros(4, 3) if pseudo_inputs is None else pseudo_inputs
    )


NN_CASES = {
    # VAE / IWAE constructors
    "VAE encoder not callable": (lambda: VAE(3, _dec()), TypeError, "encoder must be callable"),
    "VAE decoder None": (lambda: VAE(_enc(), None), TypeError, "decoder must be callable"),
    "IWAE encoder not callable": (lambda: IWAE("encoder", _dec()), TypeError, "encoder must be callable"),
    "VAE likelihood": (lambda: _vae(likelihood="poisson"), ValueError, "likelihood must be one of"),
    "VAE prior not a prior": (lambda: _vae(prior="normal"), TypeError, "prior must be a fastvae.nn prior"),
    "VAE prior a pair": (lambda: _vae(prior=(torch.zeros(2),) * 2), TypeError, "prior must be a fastvae.nn prior"),
    "VAE beta negative": (lambda: _vae(beta=-1.0), ValueError, "beta must be a finite float >= 0"),
    "VAE beta nan": (lambda: _vae(beta=math.nan), ValueError, "beta must be a finite float >= 0, got nan"),
    "VAE beta str": (lambda: _vae(beta="1"), TypeError, "beta must be a float"),
    "VAE free_bits negative": (lambda: _vae(free_bits=-0.5), ValueError, "free_bits must be a finite float >= 0"),
    "VAE free_bits inf": (lambda: _vae(free_bits=math.inf), ValueError, "free_bits must be a finite float >= 0, got inf"),
    "VAE free_bits with a mixture": (lambda: _vae(prior=MixturePrior(2, 3), free_bits=0.1), ValueError, "free_bits needs a prior with a closed-form KL"),
    "VAE posterior": (lambda: _vae(posterior="cholesky"), ValueError, "posterior must be one of diagonal, full; got 'cholesky'"),
    "VAE full posterior with a learned prior": (lambda: _vae(posterior="full", prior=LearnedGaussian(2)), ValueError, 'posterior="full" needs the StandardNormal prior (or None); got LearnedGaussian'),
    "VAE full posterior with a mixture prior": (lambda: _vae(posterior="full", prior=MixturePrior(2, 3)), ValueError, 'posterior="full" needs the StandardNormal prior'),
    "VAE full posterior with free bits": (lambda: _vae(posterior="full", free_bits=0.1), ValueError, 'free_bits is per dimension of a diagonal posterior; posterior="full" takes none'),
    "VAE full posterior encoder gives a logvar": (lambda: _vae(posterior="full")(X), ValueError, 'encoder(x) must give mu (B, D) and scale_tril (B, D, D) with B = 5 for posterior="full"; got (5, 2) and (5, 2)'),
    "VAE full posterior encoder gives another batch": (lambda: VAE(Lambda(lambda x: (torch.zeros(4, 2), torch.zeros(4, 2, 2))), _dec(), posterior="full")(X), ValueError, "with B = 5"),
    "VAE full posterior log_likelihood": (lambda: _vae(posterior="full").log_likelihood(X, 2), ValueError, "log_likelihood needs a diagonal posterior"),
    "IWAE num_samples zero": (lambda: _iwae(num_samples=0), ValueError, "num_samples must be >= 1"),
    "IWAE num_samples float": (lambda: _iwae(num_samples=2.0), TypeError, "num_samples must be an int"),
    "IWAE num_samples None": (lambda: _iwae(num_samples=None), TypeError, "num_samples must be an int"),
    "IWAE estimator": (lambda: _iwae(estimator="vimco"), ValueError, "estimator must be one of"),
    "IWAE estimator None": (lambda: _iwae(estimator=None), ValueError, "estimator must be one of"),
    # VAE / IWAE forward, encode, reconstruct, log_likelihood: x
    "VAE x not a tensor": (lambda: _vae()([[0.0] * 3]), TypeError, "x must be a torch.Tensor"),
    "VAE integer x": (lambda: _vae()(X.long()), TypeError, "x must be a floating-point"),
    "VAE x without a batch dim": (lambda: _vae()(torch.zeros(3)), ValueError, "x must be (B, *event)"),
    "VAE x on another device": (lambda: _vae()(X.to("meta")), ValueError, "x is on meta but the encoder's parameters are on cpu"),
    "IWAE x on another device": (lambda: _iwae()(X.to("meta")), ValueError, "x is on meta"),
    "IWAE integer x": (lambda: _iwae()(X.int()), TypeError, "x must be a floating-point"),
    "IWAE x without a batch dim": (lambda: _iwae()(torch.zeros(3)), ValueError, "x must be (B, *event)"),
    "VAE bernoulli int64 x": (lambda: VAE(_enc(), nn.Linear(2, 3), likelihood="bernoulli")(X.long()), TypeError, "x must be a tensor of one of float16, bfloat16, float32, float64, bool, uint8; got torch.int64"),
    "IWAE discretized bool x": (lambda: _iwae(likelihood="discretized_logistic")(X.bool()), TypeError, "x must be a tensor of one of float16, bfloat16, float32, float64, uint8, int8, int16, int32, int64; got torch.bool"),
    "VAE discretized x off the bins": (lambda: _vae(likelihood="discretized_logistic")(X + 0.3), ValueError, "x must hold bin values k / bins"),
    "IWAE discretized x past the bins": (lambda: _iwae(likelihood="discretized_logistic")(X.int() + 256), ValueError, "x must hold bin indices k in [0, bins) = [0, 256); got 256"),
    "VAE encode x on another device": (lambda: _vae().encode(X.to("meta")), ValueError, "x is on meta"),
    "VAE reconstruct integer x": (lambda: _vae().reconstruct(X.long()), TypeError, "x must be a floating-point"),
    "VAE reconstruct x on another device": (lambda: _vae().reconstruct(X.to("meta")), ValueError, "x is on meta"),
    "VAE log_likelihood x not a tensor": (lambda: _vae().log_likelihood([0.0], 2), TypeError, "x must be a torch.Tensor"),
    "VAE log_likelihood x on another device": (lambda: _vae().log_likelihood(X.to("meta"), 2), ValueError, "x is on meta"),
    "VAE log_likelihood num_samples zero": (lambda: _vae().log_likelihood(X, num_samples=0), ValueError, "num_samples must be >= 1"),
    "VAE log_likelihood num_samples float": (lambda: _vae().log_likelihood(X, num_samples=2.5), TypeError, "num_samples must be an int"),
    "VAE log_likelihood chunk_size": (lambda: _vae().log_likelihood(X, 3, chunk_size=0), ValueError, "chunk_size must be >= 1"),
    "VAE log_likelihood chunk_size str": (lambda: _vae().log_likelihood(X, 3, chunk_size="a"), TypeError, "chunk_size must be an int"),
    "IWAE log_likelihood num_samples": (lambda: _iwae().log_likelihood(X, num_samples=-1), ValueError, "num_samples must be >= 1"),
    # decode: z
    "VAE decode z not a tensor": (lambda: _vae().decode([0.0, 0.0]), TypeError, "z must be a torch.Tensor"),
    "VAE decode integer z": (lambda: _vae().decode(torch.zeros(3, 2, dtype=torch.long)), TypeError, "z must be a floating-point"),
    "VAE decode z on another device": (lambda: _vae().decode(torch.zeros(3, 2, device="meta")), ValueError, "z is on meta but the decoder's parameters are on cpu"),
    "VAE decode z of another D": (lambda: _known_vae().decode(torch.zeros(3, 5)), ValueError, "z must be (..., D) with D = 2"),
    # sample: n, generator
    "VAE sample n negative": (lambda: _known_vae().sample(-1), ValueError, "n must be an int >= 0"),
    "VAE sample n float": (lambda: _known_vae().sample(2.5), ValueError, "n must be an int >= 0"),
    "VAE sample generator": (lambda: _known_vae().sample(2, generator="g"), TypeError, "generator must be a torch.Generator"),
    "VAE sample before D is known": (lambda: _vae().sample(2), ValueError, "sample(n, dim=D)"),
    "IWAE sample n": (lambda: IWAE(_enc(), _dec(), prior=LearnedGaussian(2)).sample(-2), ValueError, "n must be an int >= 0"),
    # GAN
    "GAN generator not callable": (lambda: GAN(3, nn.Linear(3, 1), 2), TypeError, "generator must be callable"),
    "GAN discriminator not callable": (lambda: GAN(nn.Linear(2, 3), "d", 2), TypeError, "discriminator must be callable"),
    "GAN latent_dim zero": (lambda: GAN(nn.Linear(2, 3), nn.Linear(3, 1), 0), ValueError, "latent_dim must be an int >= 1"),
    "GAN latent_dim str": (lambda: GAN(nn.Linear(2, 3), nn.Linear(3, 1), "2"), ValueError, "latent_dim must be an int >= 1"),
    "GAN latent_dim float": (lambda: GAN(nn.Linear(2, 3), nn.Linear(3, 1), 2.0), ValueError, "latent_dim must be an int >= 1"),
    "GAN latent_dim bool": (lambda: GAN(nn.Linear(2, 3), nn.Linear(3, 1), True), ValueError, "latent_dim must be an int >= 1, got True"),
    "GAN loss": (lambda: _gan(loss="wgan"), ValueError, "loss must be one of nonsaturating, hinge; got 'wgan'"),
    "GAN loss None": (lambda: _gan(loss=None), ValueError, "loss must be one of"),
    "GAN r1 negative": (lambda: _gan(r1=-1), ValueError, "r1 must be a finite float >= 0, got -1.0"),
    "GAN r1 str": (lambda: _gan(r1="0.1"), TypeError, "r1 must be a float >= 0, got str"),
    "GAN generator_loss batch negative": (lambda: _gan().generator_loss(-1), ValueError, "batch must be an int >= 1"),
    "GAN generator_loss batch float": (lambda: _gan().generator_loss(2.5), ValueError, "batch must be an int >= 1"),
    "GAN generator_loss batch empty": (lambda: _gan().generator_loss(torch.zeros(0, 3)), ValueError, "batch must be an int >= 1"),
    "GAN generator_loss batch zero": (lambda: _gan().generator_loss(0), ValueError, "batch must be an int >= 1"),
    "GAN generator_loss batch bool": (lambda: _gan().generator_loss(True), ValueError, "batch must be an int >= 1"),
    "GAN generator_loss batch scalar tensor": (lambda: _gan().generator_loss(torch.tensor(3.0)), ValueError, "batch must be an int >= 1"),
    "GAN discriminator two logits a row": (lambda: GAN(nn.Linear(2, 3), nn.Linear(3, 2), 2).generator_loss(3), ValueError, "discriminator(x) must give one logit per row, (3,); got (3, 2)"),
    "GAN discriminator_loss real not a tensor": (lambda: _gan().discriminator_loss([[0.0] * 3]), TypeError, "real must be a torch.Tensor"),
    "GAN discriminator_loss integer real": (lambda: _gan().discriminator_loss(X.long()), TypeError, "real must be a floating-point"),
    "GAN discriminator_loss scalar real": (lambda: _gan().discriminator_loss(torch.tensor(1.0)), ValueError, "real must have at least one dimension"),
    "GAN discriminator_loss empty real": (lambda: _gan().discriminator_loss(torch.zeros(0, 3)), ValueError, "real must be a non-empty batch"),
    "GAN discriminator_loss real on another device": (lambda: _gan().discriminator_loss(X.to("meta")), ValueError, "real is on meta but the discriminator's parameters are on cpu"),
    "GAN sample n": (lambda: _gan().sample(-1), ValueError, "n must be an int >= 0"),
    "GAN sample n float": (lambda: _gan().sample(1.5), ValueError, "n must be an int >= 0"),
    "GAN sample generator": (lambda: _gan().sample(2, generator=1), TypeError, "generator must be a torch.Generator"),
    "GAN generate n": (lambda: _gan().generate(-1), ValueError, "n must be an int >= 0"),
    # StandardNormal
    "StandardNormal dim zero": (lambda: StandardNormal(0), ValueError, "dim must be an int >= 1"),
    "StandardNormal dim str": (lambda: StandardNormal("2"), ValueError, "dim must be an int >= 1"),
    "StandardNormal sample dim": (lambda: StandardNormal(2).sample(3, dim=5), ValueError, "dim = 5 asked of a prior over 2 dimensions"),
    "StandardNormal sample without dim": (lambda: StandardNormal().sample(3), ValueError, "sample(n, dim=D)"),
    "StandardNormal sample n": (lambda: StandardNormal(2).sample(-1), ValueError, "n must be an int >= 0"),
    "StandardNormal sample generator": (lambda: StandardNormal(2).sample(3, generator="g"), TypeError, "generator must be a torch.Generator"),
    "StandardNormal log_prob z not a tensor": (lambda: StandardNormal(2).log_prob([0.0, 0.0]), TypeError, "z must be a torch.Tensor"),
    "StandardNormal log_prob integer z": (lambda: StandardNormal(2).log_prob(torch.zeros(3, 2, dtype=torch.long)), TypeError, "z must be a floating-point"),
    "StandardNormal log_prob z on another device": (lambda: StandardNormal(2).log_prob(torch.zeros(3, 2, device="meta")), ValueError, "z is on meta but the prior's parameters are on cpu"),
    "StandardNormal log_prob z of another D": (lambda: StandardNormal(2).log_prob(torch.zeros(3, 5)), ValueError, "z must be (..., D) with D = 2"),
    # LearnedGaussian
    "LearnedGaussian dim zero": (lambda: LearnedGaussian(0), ValueError, "dim must be an int >= 1"),
    "LearnedGaussian dim float": (lambda: LearnedGaussian(1.5), ValueError, "dim must be an int >= 1"),
    "LearnedGaussian sample dim": (lambda: LearnedGaussian(2).sample(3, dim=3), ValueError, "dim = 3 asked of a prior over 2 dimensions"),
    "LearnedGaussian sample n": (lambda: LearnedGaussian(2).sample(-1), ValueError, "n must be an int >= 0"),
    "LearnedGaussian log_prob integer z": (lambda: LearnedGaussian(2).log_prob(torch.zeros(3, 2, dtype=torch.long)), TypeError, "z must be a floating-point"),
    "LearnedGaussian log_prob z on another device": (lambda: LearnedGaussian(2).log_prob(torch.zeros(3, 2, device="meta")), ValueError, "z is on meta"),
    "LearnedGaussian log_prob z of another D": (lambda: LearnedGaussian(2).log_prob(torch.zeros(3, 5)), ValueError, "z must be (..., D) with D = 2"),
    # MixturePrior
    "MixturePrior dim zero": (lambda: MixturePrior(0, 2), ValueError, "dim must be an int >= 1"),
    "MixturePrior components zero": (lambda: MixturePrior(2, 0), ValueError, "components must be an int >= 1"),
    "MixturePrior components str": (lambda: MixturePrior(2, "3"), ValueError, "components must be an int >= 1"),
    "MixturePrior sample dim": (lambda: MixturePrior(2, 3).sample(3, dim=4), ValueError, "dim = 4 asked of a prior over 2 dimensions"),
    "MixturePrior sample n": (lambda: MixturePrior(2, 3).sample(-1), ValueError, "n must be an int >= 0"),
    "MixturePrior sample generator": (lambda: MixturePrior(2, 3).sample(3, generator="g"), TypeError, "generator"),
    "MixturePrior log_prob integer z": (lambda: MixturePrior(2, 3).log_prob(torch.zeros(3, 2, dtype=torch.long)), TypeError, "z must be a floating-point"),
    "MixturePrior log_prob z on another device": (lambda: MixturePrior(2, 3).log_prob(torch.zeros(3, 2, device="meta")), ValueError, "z is on meta"),
    "MixturePrior log_prob z of another D": (lambda: MixturePrior(2, 3).log_prob(torch.zeros(3, 5)), ValueError, "z must be (..., D) with D = 2"),
    # VampPrior
    "VampPrior encoder not callable": (lambda: _vamp(encoder=3), TypeError, "encoder must be callable"),
    "VampPrior pseudo_inputs 1-d": (lambda: _vamp(torch.zeros(3)), ValueError, "pseudo_inputs must be a tensor (C, *x_shape)"),
    "VampPrior pseudo_inputs list": (lambda: _vamp([[0.0] * 3]), ValueError, "pseudo_inputs must be a tensor"),
    "VampPrior no pseudo_inputs": (lambda: _vamp(torch.zeros(0, 3)), ValueError, "pseudo_inputs must hold at least one"),
    "VampPrior integer pseudo_inputs": (lambda: _vamp(torch.zeros(4, 3, dtype=torch.long)), TypeError, "pseudo_inputs must be a floating-point"),
    "VampPrior pseudo_inputs on another device": (lambda: _vamp(torch.zeros(4, 3, device="meta")), ValueError, "pseudo_inputs is on meta but the encoder's parameters are on cpu"),
    "VampPrior sample dim": (lambda: _vamp().sample(2, dim=3), ValueError, "dim = 3 asked of a prior over 2 dimensions"),
    "VampPrior sample n": (lambda: _vamp().sample(-2), ValueError, "n must be an int >= 0"),
    "VampPrior log_prob integer z": (lambda: _vamp().log_prob(torch.zeros(3, 2, dtype=torch.long)), TypeError, "z must be a floating-point"),
    "VampPrior log_prob z on another device": (lambda: _vamp().log_prob(torch.zeros(3, 2, device="meta")), ValueError, "z is on meta"),
    "VampPrior log_prob z of another D": (lambda: _vamp().log_prob(torch.zeros(3, 5)), ValueError, "z must be (..., D) with D = 2"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(NN_CASES))
def test_bad_module_input_raises_a_clear_error(case):
    call, error, message = NN_CASES[case]
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value)


# What the user's networks return, through VAE and IWAE alike: the modules' options with
# (encoder, decoder) replaced where given; x is X.
NETWORK_CASES = {
    "encoder gives an odd width": ({"encoder": Lambda(lambda x: torch.zeros(len(x), 3))}, ValueError, "encoder(x) returned one tensor of shape (5, 3); to split it in two its last dim must be even"),
    "encoder gives halves of two shapes": ({"encoder": Lambda(lambda x: (x[:, :2], x[:, :1]))}, ValueError, "encoder(x) must give mu and logvar of shape (B, D) = (5, D); got (5, 2) and (5, 1)"),
    "encoder gives another batch size": ({"encoder": Lambda(lambda x: (torch.zeros(9, 2),) * 2)}, ValueError, "encoder(x) must give mu and logvar of shape (B, D) = (5, D); got (9, 2) and (9, 2)"),
    "encoder gives 3-d halves": ({"encoder": Lambda(lambda x: (torch.zeros(len(x), 1, 2),) * 2)}, ValueError, "got (5, 1, 2) and (5, 1, 2)"),
    "encoder gives a str": ({"encoder": Lambda(lambda x: "mu")}, TypeError, "encoder(x) must return a pair of tensors or one tensor to split in two; got str"),
    "encoder gives three tensors": ({"encoder": Lambda(lambda x: (x, x, x))}, TypeError, "encoder(x) must return a pair of tensors or one tensor to split in two; got tuple"),
    "encoder's D is not the prior's": ({"prior": LearnedGaussian(3)}, ValueError, "encoder(x) gave D = 2; the prior has 3"),
    "decoder gives another event shape": ({"decoder": nn.Linear(2, 4)}, ValueError, "decoder(z) must give parameters of x's event shape (3,); got (2,)"),
    "decoder gives an odd width": ({"decoder": nn.Linear(2, 3)}, ValueError, "decoder(z) returned one tensor of shape"),
    "decoder gives another row count": ({"decoder": Lambda(lambda z: torch.zeros(1, 6))}, ValueError, "decoder(z) for z (N, D) = "),
    "bernoulli decoder gives a pair's width": ({"decoder": nn.Linear(2, 6), "likelihood": "bernoulli"}, ValueError, "decoder(z) must give parameters of x's event shape (3,); got (6,)"),
    "bernoulli decoder gives a pair": ({"decoder": Lambda(lambda z: (z, z)), "likelihood": "bernoulli"}, ValueError, "decoder(z) for z (N, D) = "),
    "discretized decoder gives one half": ({"decoder": nn.Linear(2, 3), "likelihood": "discretized_logistic"}, ValueError, "decoder(z) returned one tensor of shape"),
    "discretized decoder gives another event shape": ({"decoder": nn.Linear(2, 4), "likelihood": "discretized_logistic"}, ValueError, "decoder(z) must give parameters of x's event shape (3,); got (2,)"),
}  # fmt: skip


@pytest.mark.parametrize("model", [VAE, IWAE])
@pytest.mark.parametrize("case", list(NETWORK_CASES))
def test_bad_network_output_raises_a_clear_error(case, model):
    options, error, message = NETWORK_CASES[case]
    options = {"encoder": _enc(), "decoder": _dec()} | options
    with pytest.raises(error) as info:
        model(options.pop("encoder"), options.pop("decoder"), **options)(X)
    assert message in str(info.value)


def test_module_checks_accept_good_input():
    """The new checks pass what they should: callables of any kind, data where the model is."""
    encoder = lambda x: (x[:, :2], x[:, 1:])  # noqa: E731  a plain function is a network too
    model = VAE(encoder, _dec(), prior=StandardNormal(2))
    out = model(X)
    assert out.z.shape == (5, 2)
    assert model.decode(torch.zeros(4, 7, 2))[0].shape == (4, 7, 3)
    for prior in (StandardNormal(2), LearnedGaussian(2), MixturePrior(2, 3), _vamp()):
        assert prior.log_prob(torch.zeros(4, 2)).shape == (4,)
    assert StandardNormal().log_prob(torch.zeros(4, 5)).shape == (4,)  # no dim: any D
    assert _gan().discriminator_loss(X).isfinite()
