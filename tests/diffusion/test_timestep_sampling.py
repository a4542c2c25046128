"""Explicit Uniform Sampling (stratified over the global batch) and the iid ablation."""

import math

import pytest
import torch

from cogvx_train.diffusion import TimestepSampler, build_timestep_sampler, rank_generator

N = 1000
WORLD_SIZES = [1, 2, 3, 8]
BATCH_SIZES = [1, 2, 5]


def _global_draw(sampler, step, world_size, batch_size):
    return [sampler.sample(step, rank, world_size, batch_size) for rank in range(world_size)]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_each_rank_stays_in_its_interval(world_size, batch_size):
    sampler = build_timestep_sampler("uniform_per_rank", num_timesteps=N, seed=7)
    assert isinstance(sampler, TimestepSampler)
    for step in range(20):
        for rank, t in enumerate(_global_draw(sampler, step, world_size, batch_size)):
            assert t.dtype == torch.int64 and t.shape == (batch_size,)
            lo, hi = sampler.interval(rank, world_size)
            assert lo == pytest.approx(rank * N / world_size) and hi == pytest.approx((rank + 1) * N / world_size)
            assert bool((t >= math.floor(lo)).all()) and bool((t < hi).all()), (step, rank, t, lo, hi)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_union_covers_range_one_draw_per_stratum(world_size, batch_size):
    sampler = build_timestep_sampler("uniform_per_rank", num_timesteps=N, seed=3)
    strata = world_size * batch_size
    for step in range(20):
        t = torch.cat(_global_draw(sampler, step, world_size, batch_size)).sort().values
        # The k-th smallest timestep of the global batch lies in stratum k = [k N / S, (k + 1) N / S).
        for k in range(strata):
            assert math.floor(k * N / strata) <= t[k].item() < (k + 1) * N / strata, (step, k, t.tolist())


def test_marginal_is_uniform_over_many_steps():
    # W=3, B=5 does not divide 1000: the per-stratum rule still gives a flat histogram over [0, 1000).
    sampler = build_timestep_sampler("uniform_per_rank", seed=0)
    draws = torch.cat([torch.cat(_global_draw(sampler, step, 3, 5)) for step in range(2000)])
    counts = torch.bincount(draws // 100, minlength=10).double()  # 10 buckets of 100 timesteps, 3000 draws each
    assert draws.min() >= 0 and draws.max() <= 999
    assert (counts - 3000).abs().max().item() < 40  # measured 13 here; iid draws give ~150


def test_two_ranks_disjoint_intervals_cover_everything():
    sampler = build_timestep_sampler("uniform_per_rank", seed=11)
    (lo0, hi0), (lo1, hi1) = sampler.interval(0, 2), sampler.interval(1, 2)
    assert (lo0, hi0, lo1, hi1) == (0.0, 500.0, 500.0, 1000.0)
    seen = [set(), set()]
    for step in range(300):
        for rank in (0, 1):
            seen[rank].update(sampler.sample(step, rank, 2, 4).tolist())
    assert seen[0].isdisjoint(seen[1])
    assert max(seen[0]) < 500 <= min(seen[1])
    assert min(seen[0]) < 10 and max(seen[1]) > 990


def test_same_seed_step_rank_gives_same_draws_and_global_rng_untouched():
    a = build_timestep_sampler("uniform_per_rank", seed=5)
    b = build_timestep_sampler("uniform_per_rank", seed=5)
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    first = a.sample(123, 1, 4, 5)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(first, b.sample(123, 1, 4, 5))  # a resumed run redraws exactly the same timesteps
    assert torch.equal(first, a.sample(123, 1, 4, 5))
    assert not torch.equal(first, a.sample(124, 1, 4, 5))
    assert not torch.equal(first, build_timestep_sampler("uniform_per_rank", seed=6).sample(123, 1, 4, 5))


def test_different_steps_differ():
    sampler = build_timestep_sampler("uniform_per_rank", seed=0)
    draws = {tuple(sampler.sample(step, 0, 2, 5).tolist()) for step in range(50)}
    assert len(draws) == 50


def test_order_within_rank_is_shuffled():
    # Without the shuffle sample j would always get the j-th stratum (the smallest timestep at j = 0).
    sampler = build_timestep_sampler("uniform_per_rank", seed=0)
    argmins = {int(sampler.sample(step, 0, 1, 5).argmin()) for step in range(50)}
    assert len(argmins) >= 4


def test_iid_differs_and_is_reproducible():
    iid = build_timestep_sampler("iid", seed=5)
    uniform = build_timestep_sampler("uniform_per_rank", seed=5)
    assert torch.equal(iid.sample(9, 0, 2, 8), iid.sample(9, 0, 2, 8))
    assert not torch.equal(iid.sample(9, 0, 2, 8), uniform.sample(9, 0, 2, 8))
    assert iid.interval(1, 2) == (0.0, 1000.0)
    draws = torch.cat([iid.sample(step, 1, 2, 8) for step in range(200)])
    assert draws.min() < 100 and draws.max() > 900  # rank 1 of 2 is not confined to [500, 1000)
    # iid leaves strata empty: some global batch misses a stratum.
    misses = 0
    for step in range(50):
        t = torch.cat([iid.sample(step, r, 2, 4) for r in range(2)]).sort().values
        misses += any(not (k * 125 <= t[k].item() < (k + 1) * 125) for k in range(8))
    assert misses > 0


def test_rank_generator_streams_differ():
    a = torch.rand(4, generator=rank_generator(0, 1, 0))
    b = torch.rand(4, generator=rank_generator(0, 1, 1))
    c = torch.rand(4, generator=rank_generator(0, 1, 0))
    assert torch.equal(a, c) and not torch.equal(a, b)


def test_bad_arguments_raise():
    sampler = build_timestep_sampler("uniform_per_rank")
    with pytest.raises(ValueError, match="rank"):
        sampler.sample(0, 2, 2, 4)
    with pytest.raises(ValueError, match="batch_size"):
        sampler.sample(0, 0, 2, 0)
    with pytest.raises(ValueError, match="uniform_per_rank"):
        build_timestep_sampler("stratified")
