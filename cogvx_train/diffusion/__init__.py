"""The diffusion objective (zero-SNR v-prediction), training timestep sampling, and the DDIM sampler."""

from cogvx_train.diffusion.ddim_sampler import (
    GUIDANCE_SCHEDULES,
    DenoiseFn,
    ddim_step,
    guidance_scale_at,
    sample,
    trailing_timesteps,
)
from cogvx_train.diffusion.timestep_sampling import (
    TIMESTEP_SAMPLERS,
    IIDSampler,
    TimestepSampler,
    UniformPerRankSampler,
    build_timestep_sampler,
    rank_generator,
)
from cogvx_train.diffusion.zero_snr_schedule import NoiseSchedule

__all__ = [
    "GUIDANCE_SCHEDULES",
    "TIMESTEP_SAMPLERS",
    "DenoiseFn",
    "IIDSampler",
    "NoiseSchedule",
    "TimestepSampler",
    "UniformPerRankSampler",
    "build_timestep_sampler",
    "ddim_step",
    "guidance_scale_at",
    "rank_generator",
    "sample",
    "trailing_timesteps",
]
