"""LatentMoments: the exact posterior moments behind the measured scaling factor, kept per process."""

from __future__ import annotations

import math
import pickle

import torch
import torch.multiprocessing  # noqa: F401  (registers torch's shared-memory reductions on ForkingPickler)
from multiprocessing.reduction import ForkingPickler

from cogvx_train.vae.latent_scale import LatentMoments
from cogvx_train.vae.posterior import DiagonalGaussian


def _posterior(seed: int, frames: int) -> DiagonalGaussian:
    g = torch.Generator().manual_seed(seed)
    return DiagonalGaussian(torch.randn(2, 8, frames, 3, 5, generator=g))  # mean: 4 channels, logvar: 4


def test_moments_are_those_of_posterior_samples_over_every_batch():
    posteriors = [_posterior(0, 3), _posterior(1, 2)]
    moments = LatentMoments()
    assert moments.reduce() == (None, None)
    for p in posteriors:
        moments.add(p)
    mean, std = moments.reduce()
    means = torch.cat([p.mean.flatten() for p in posteriors]).double()
    variances = torch.cat([p.var.flatten() for p in posteriors]).double()
    # z ~ N(mean, var) per element: E[z] = mean, Var[z] = E[var] + Var[mean] over the elements
    assert math.isclose(mean, means.mean().item(), rel_tol=1e-12)
    assert math.isclose(std, math.sqrt(variances.mean().item() + means.var(unbiased=False).item()), rel_tol=1e-12)
    moments.reset()
    assert moments.reduce() == (None, None)


def test_a_copy_sent_to_a_spawned_rank_keeps_its_own_sums():
    """torch.multiprocessing moves every tensor it pickles into shared memory: a module's tensor-valued sums would be
    one set of numbers that every rank of a spawn launch adds into (this made a 2-rank validation log a wrong mean)."""
    here = LatentMoments()
    there = pickle.loads(ForkingPickler.dumps(here))  # what Lightning's spawn launcher does with the module
    there.add(_posterior(0, 3))
    assert here.reduce() == (None, None)
    assert there.reduce()[0] is not None
