"""DDIM sampling for a v-prediction model with "trailing" timestep spacing and classifier-free guidance.

One step from t to the next timestep t' (t' = -1 after the last step, where abar = 1, i.e. the clean sample):

    x0  = sqrt(abar_t) x_t - sqrt(1 - abar_t) v           eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t
    x_t' = sqrt(abar_t') x0 + sqrt(1 - abar_t' - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - abar_t') / (1 - abar_t)) sqrt(1 - abar_t / abar_t')      (eta = 0: deterministic DDIM)

Guidance on v, with one batched forward over [uncond; cond] (the order CogVideoX uses):
    v = v_uncond + w_i (v_cond - v_uncond)

"trailing" spacing (Lin et al. 2023) starts at t = N-1, where zero terminal SNR makes x_t pure noise, and ends
near N / num_steps - 1. With num_steps dividing N (50, 10, 5 ...) this matches diffusers' CogVideoXDDIMScheduler
step for step. For other step counts diffusers steps to t - N // num_steps, which is not the next timestep of its
own schedule, and ends on abar[0] instead of 1; here every step goes to the next scheduled timestep and the last
one to abar = 1.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from cogvx_train.diffusion.zero_snr_schedule import NoiseSchedule

GUIDANCE_SCHEDULES = ("constant", "dynamic_cosine")

DenoiseFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""denoise_fn(x_t [B, C, T, H, W], t [B] long, text_embeds [B, L, D]) -> v prediction [B, C, T, H, W]."""


def trailing_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """round(arange(N, 0, -N / num_steps)) - 1, descending: [999, 979, ..., 19] for 50 steps of 1000.
    numpy's arange is used on purpose: its float accumulation decides ties such as 62.5, and matching it keeps the
    schedule identical to diffusers' "trailing" spacing."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}.")
    positions = np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)[:num_steps]
    return [int(t) - 1 for t in np.round(positions).astype(np.int64)]


def guidance_scale_at(
    guidance_scale: float, guidance_schedule: str, timestep: int, num_steps: int
) -> float:
    """The CFG weight for the step that evaluates the model at training timestep `timestep`.

    "dynamic_cosine" is CogVideoX's released rule, 1 + w (1 - cos(pi ((num_steps - t) / num_steps)^5)) / 2, with t
    the *training timestep* (as in both the SAT sampler and diffusers' `use_dynamic_cfg`), not the step counter.
    ((50 - 999) / 50)^5 is about -2.5e6, so the weight oscillates between 1 and 1 + w from step to step rather than
    annealing smoothly; the authors have said this "wave-like" schedule is what they use (THUDM/CogVideo#267).
    """
    _check_guidance_schedule(guidance_schedule)
    if guidance_schedule == "constant":
        return float(guidance_scale)
    return 1 + guidance_scale * ((1 - math.cos(math.pi * ((num_steps - timestep) / num_steps) ** 5.0)) / 2)


def ddim_step(
    schedule: NoiseSchedule,
    x_t: Tensor,
    v: Tensor,
    t: int,
    t_prev: int,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One DDIM update x_t -> x_{t_prev} from a v prediction; t_prev = -1 means "to the clean sample" (abar = 1).
    Computed in fp32 (fp64 for fp64 inputs)."""
    if not -1 <= t_prev < t < schedule.num_train_timesteps:
        raise ValueError(f"Need -1 <= t_prev < t < {schedule.num_train_timesteps}, got t={t}, t_prev={t_prev}.")
    x0, eps = schedule.predict_x0_eps_from_v(x_t, v, t)
    abar_t = float(schedule.alphas_cumprod[t])
    abar_prev = 1.0 if t_prev < 0 else float(schedule.alphas_cumprod[t_prev])
    sigma = 0.0
    if eta > 0.0:
        sigma = eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev))
    x_prev = math.sqrt(abar_prev) * x0 + math.sqrt(max(1.0 - abar_prev - sigma**2, 0.0)) * eps
    if sigma > 0.0:
        if generator is None:
            raise ValueError("eta > 0 adds fresh noise every step; pass a torch.Generator so samples are reproducible.")
        z = torch.randn(x_prev.shape, generator=generator, device=generator.device, dtype=x_prev.dtype)
        x_prev = x_prev + sigma * z.to(x_prev.device)
    return x_prev


@torch.no_grad()
def sample(
    denoise_fn: DenoiseFn,
    noise: Tensor,
    cond: Tensor,
    uncond: Tensor | None,
    schedule: NoiseSchedule,
    num_steps: int = 50,
    guidance_scale: float = 6.0,
    guidance_schedule: str = "constant",
    progress: bool = False,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Run the DDIM chain from `noise` ([B, C, T, H, W], unit Gaussian: init sigma is 1 for this schedule) to
    latents in the model's (VAE-scaled) latent space, fp32 [B, C, T, H, W]; divide by the VAE scaling factor before
    decoding.

    Guidance is on when guidance_scale > 1 (as in diffusers): `uncond` ([B or 1, L, D]; CogVideoX training replaces
    dropped captions by zeros, so zeros is the matching unconditional embedding) is then required. The latents stay
    fp32 between steps; `denoise_fn` casts to its own compute dtype.
    """
    _check_inputs(noise, cond, uncond, guidance_scale, guidance_schedule, eta, generator)
    timesteps = trailing_timesteps(num_steps, schedule.num_train_timesteps)
    use_cfg = guidance_scale > 1.0
    batch = noise.shape[0]
    if use_cfg:
        uncond = uncond.expand(batch, -1, -1) if uncond.shape[0] == 1 else uncond
        text = torch.cat([uncond.to(cond), cond])  # [2B, L, D], unconditional half first
    else:
        text = cond

    x = noise.float()
    steps = enumerate(timesteps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, total=len(timesteps), desc="ddim")
    for i, t in steps:
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x_in = torch.cat([x, x]) if use_cfg else x  # [2B or B, C, T, H, W]
        t_batch = torch.full((x_in.shape[0],), t, dtype=torch.long, device=x.device)
        v = denoise_fn(x_in, t_batch, text).float()
        if v.shape != x_in.shape:
            raise ValueError(f"denoise_fn must return the input's shape {tuple(x_in.shape)}, got {tuple(v.shape)}.")
        if use_cfg:
            v_uncond, v_cond = v.chunk(2)
            w = guidance_scale_at(guidance_scale, guidance_schedule, t, num_steps)
            v = v_uncond + w * (v_cond - v_uncond)
        x = ddim_step(schedule, x, v, t, t_prev, eta, generator)
    return x


def _check_inputs(
    noise: Tensor,
    cond: Tensor,
    uncond: Tensor | None,
    guidance_scale: float,
    guidance_schedule: str,
    eta: float,
    generator: torch.Generator | None,
) -> None:
    if noise.ndim != 5:
        raise ValueError(f"noise must be [B, C, T, H, W], got shape {tuple(noise.shape)}.")
    if cond.ndim != 3 or cond.shape[0] != noise.shape[0]:
        raise ValueError(f"cond must be [B, L, D] with B = {noise.shape[0]}, got shape {tuple(cond.shape)}.")
    _check_guidance_schedule(guidance_schedule)
    if guidance_scale > 1.0:
        if uncond is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs an unconditional embedding; pass uncond (zeros of cond's "
                "shape match how caption dropout trained it) or set guidance_scale to 1."
            )
        if uncond.ndim != 3 or uncond.shape[1:] != cond.shape[1:] or uncond.shape[0] not in (1, cond.shape[0]):
            raise ValueError(
                f"uncond must be [1 or {cond.shape[0]}, {cond.shape[1]}, {cond.shape[2]}], got {tuple(uncond.shape)}."
            )
    if eta < 0.0:
        raise ValueError(f"eta must be >= 0 (0 = deterministic DDIM), got {eta}.")
    if eta > 0.0 and generator is None:
        raise ValueError("eta > 0 adds fresh noise every step; pass a torch.Generator so samples are reproducible.")


def _check_guidance_schedule(guidance_schedule: str) -> None:
    if guidance_schedule not in GUIDANCE_SCHEDULES:
        choices = ", ".join(GUIDANCE_SCHEDULES)
        raise ValueError(f"Unknown guidance_schedule {guidance_schedule!r}; choose one of {choices}.")
