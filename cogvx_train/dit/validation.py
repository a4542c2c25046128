"""What a DiT validation measures and writes, both held fixed so that validations compare across steps and runs:

* the loss of paper Table 9: the v-prediction loss at fixed timesteps (VAL_TIMESTEPS), with the posterior sample and
  the noise of each clip keyed on its manifest row (a loss at random timesteps and noise mostly measures the draw);
* samples: every sampling prompt with its fixed seed through cogvx_train.sampling, written as step{step:07d}_{i}.mp4
  and logged as videos where the logger takes them (wandb);
* prompt following, where the prompts speak the synthetic set's vocabulary ("a red circle moves from left to
  right"): the share of samples whose pixels show the colour / direction their prompt names
  (cogvx_train/eval/prompt_following.py), logged as val/prompt_colour_acc and val/prompt_direction_acc.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from cogvx_train.diffusion import NoiseSchedule
from cogvx_train.dit.frozen_encoders import keyed_generator, randn_like_on_cpu
from cogvx_train.dit.training_config import SamplingConfig
from cogvx_train.eval.prompt_following import prompt_following

VAL_TIMESTEPS = (100, 300, 500, 700, 900)  # paper Table 9 reports the validation loss at these timesteps


@torch.no_grad()
def fixed_timestep_losses(dit: nn.Module, schedule: NoiseSchedule, mean: Tensor, logvar: Tensor, text: Tensor,
                          rows: list[int], seed: int, scaling_factor: float,
                          timesteps: tuple[int, ...] = VAL_TIMESTEPS) -> dict[int, Tensor]:
    """Per-sample v-loss [B] at each of `timesteps`, for the VAE posterior (mean, logvar) [B, 16, T', h, w] and text
    embeddings [B, L, D] of the clips with manifest rows `rows`."""
    eps = torch.stack([randn_like_on_cpu(mean[0], keyed_generator(seed, "val_posterior", r)) for r in rows])
    x0 = (mean.float() + torch.exp(0.5 * logvar.float()) * eps) * scaling_factor
    b = x0.shape[0]
    out = {}
    for t in timesteps:
        noise = torch.stack([randn_like_on_cpu(x0[0], keyed_generator(seed, "val_noise", r, t)) for r in rows])
        steps = torch.full((b,), t, dtype=torch.long, device=x0.device)
        x_t = schedule.add_noise(x0, noise, steps)
        out[t] = schedule.v_prediction_loss(dit(x_t, steps, text), x0, noise, steps)
    return out


def sample_shape(sampling: SamplingConfig, data_shape: tuple[int, int, int] | None) -> tuple[int, int, int]:
    """Pixel (frames, height, width) of validation samples: the sampling config, else the data's shape (else the
    paper's 49 x 480 x 720)."""
    data = data_shape or (49, 480, 720)
    return (sampling.num_frames or data[0], sampling.height or data[1], sampling.width or data[2])


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype the trainer's precision ("bf16-mixed", "16-mixed", "32-true" ...) runs the transformer in: samples
    are drawn the way training runs it. None: fp32."""
    return torch.bfloat16 if "bf16" in precision else torch.float16 if "16" in precision else None


@torch.no_grad()
def write_validation_samples(dit: nn.Module, vae: nn.Module, schedule: NoiseSchedule, sampling: SamplingConfig,
                             text_embeds: Tensor, scaling_factor: float, shape: tuple[int, int, int], step: int,
                             autocast: torch.dtype | None, out_dir: Path | None) -> tuple[list[Path], Tensor]:
    """Sample every prompt of `sampling` (text_embeds: their embeddings) with its fixed seed; write
    out_dir/step{step:07d}_{i}.mp4 unless out_dir is None (every rank samples, one writes). Returns the paths and
    the videos [N, 3, T, H, W] in [-1, 1]."""
    from cogvx_train.sampling import sample_videos

    s = sampling
    frames, height, width = shape
    result = sample_videos(dit, vae, schedule, s.prompts, text_embeds=text_embeds, scaling_factor=scaling_factor,
                           num_frames=frames, height=height, width=width, num_steps=s.num_steps,
                           guidance_scale=s.guidance_scale, guidance_schedule=s.guidance_schedule, seed=s.seed,
                           batch_size=s.batch_size, autocast_dtype=autocast, out_dir=out_dir,
                           name_format=f"step{step:07d}_{{i}}.mp4", fps=s.fps)
    return result.paths, result.videos


def prompt_following_metrics(videos: Tensor, prompts: list[str]) -> dict[str, float]:
    """{"val/prompt_colour_acc", "val/prompt_direction_acc"} over the prompts that name a palette colour / a
    direction; a key is left out when no prompt names one (free-form prompts log nothing)."""
    score = prompt_following(list(videos), list(prompts))
    out = {"val/prompt_colour_acc": score.color_accuracy, "val/prompt_direction_acc": score.direction_accuracy}
    return {k: float(v) for k, v in out.items() if v is not None}


def log_sample_videos(loggers, paths: list[Path], sampling: SamplingConfig, step: int) -> None:
    """The written samples as val/samples videos, captioned with their prompts, on every logger that takes videos."""
    for logger in loggers:
        if hasattr(logger, "log_video"):  # wandb; csv has no video
            logger.log_video("val/samples", videos=[str(p) for p in paths], step=step, caption=list(sampling.prompts),
                             fps=[sampling.fps] * len(paths), format=["mp4"] * len(paths))
