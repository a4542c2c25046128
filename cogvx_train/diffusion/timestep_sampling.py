"""Training timestep samplers: the paper's Explicit Uniform Sampling, and plain iid sampling as its ablation.

Explicit Uniform Sampling (CogVideoX): split the timestep range into one interval per data-parallel rank and let
each rank sample inside its own interval, so every optimizer step sees the whole range evenly and the loss has less
variance. Here the split is a stratified draw over the *global* batch, which works for any world size W and local
batch B (the public code needs W to fit a fixed group count and silently switches off at <= 8 GPUs):

    sample j on rank r:  u ~ U[0, 1),  p = (r B + j + u) / (W B),  t = floor(p N)

Stratum k = r B + j is [k / (W B), (k + 1) / (W B)); rank r covers [r / W, (r + 1) / W); together the W B strata
tile [0, 1) so the union over ranks covers [0, N) evenly, and marginally every integer t has probability 1 / N.
The draws come from a private torch.Generator seeded from (seed, step, rank) only: the same step on the same rank
gives the same timesteps after a resume, and the global RNG is never touched. The B values are shuffled within
the rank so that the timestep is not correlated with the position of a sample in the batch.
"""

from __future__ import annotations

import hashlib
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

TIMESTEP_SAMPLERS = ("uniform_per_rank", "iid")


@runtime_checkable
class TimestepSampler(Protocol):
    """Draws the integer training timesteps for one rank's local batch at one optimizer step."""

    num_timesteps: int

    def sample(self, step: int, rank: int, world_size: int, batch_size: int) -> Tensor:
        """LongTensor [batch_size] on the CPU, values in [0, num_timesteps)."""
        ...

    def interval(self, rank: int, world_size: int) -> tuple[float, float]:
        """Half-open range [lo, hi) of continuous timestep positions this rank draws from (for logging);
        the integer timesteps t it returns satisfy floor(lo) <= t < hi."""
        ...


def rank_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """A CPU generator seeded with a 63-bit hash of (seed, step, rank): independent streams per step and rank
    without drawing from (or disturbing) the global RNG."""
    digest = hashlib.blake2b(f"{seed}:{step}:{rank}".encode(), digest_size=8).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return generator


class _SamplerBase:
    def __init__(self, num_timesteps: int = 1000, seed: int = 0) -> None:
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be positive, got {num_timesteps}.")
        self.num_timesteps = num_timesteps
        self.seed = seed

    def _check(self, step: int, rank: int, world_size: int, batch_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"Need 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}.")


class UniformPerRankSampler(_SamplerBase):
    """Explicit Uniform Sampling as a stratified draw over the global batch (see the module docstring)."""

    def sample(self, step: int, rank: int, world_size: int, batch_size: int) -> Tensor:
        self._check(step, rank, world_size, batch_size)
        generator = rank_generator(self.seed, step, rank)
        n, strata = self.num_timesteps, world_size * batch_size
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        k = rank * batch_size + torch.arange(batch_size, dtype=torch.int64)  # global stratum of each sample
        t = torch.floor((k.double() + u) * n / strata).long()
        # Integer bounds of stratum k, floor(k N / S) .. ceil((k + 1) N / S) - 1, computed exactly, so float
        # rounding of (k + u) N / S can never push a draw into the neighbouring stratum (or rank).
        lo = (k * n) // strata
        hi = ((k + 1) * n - 1) // strata
        t = torch.minimum(torch.maximum(t, lo), hi)
        return t[torch.randperm(batch_size, generator=generator)]

    def interval(self, rank: int, world_size: int) -> tuple[float, float]:
        self._check(0, rank, world_size, 1)
        return rank * self.num_timesteps / world_size, (rank + 1) * self.num_timesteps / world_size


class IIDSampler(_SamplerBase):
    """Ablation: independent uniform integers in [0, N) on every rank (the usual DDPM recipe)."""

    def sample(self, step: int, rank: int, world_size: int, batch_size: int) -> Tensor:
        self._check(step, rank, world_size, batch_size)
        generator = rank_generator(self.seed, step, rank)
        return torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, dtype=torch.int64)

    def interval(self, rank: int, world_size: int) -> tuple[float, float]:
        self._check(0, rank, world_size, 1)
        return 0.0, float(self.num_timesteps)


def build_timestep_sampler(kind: str, num_timesteps: int = 1000, seed: int = 0) -> TimestepSampler:
    """`kind`: "uniform_per_rank" (Explicit Uniform Sampling) or "iid"."""
    if kind == "uniform_per_rank":
        return UniformPerRankSampler(num_timesteps, seed)
    if kind == "iid":
        return IIDSampler(num_timesteps, seed)
    raise ValueError(f"Unknown timestep sampler {kind!r}; choose one of {', '.join(TIMESTEP_SAMPLERS)}.")
