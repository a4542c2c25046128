"""The one text-to-video sampling function, used by validation during training AND by `cogvx-sample`:

    prompts -> T5 -> cond;  uncond = zeros (what 10% caption dropout trained)
    noise_i ~ N(0, I) from a generator keyed on (seed, i)            [C, T', H/8, W/8] per prompt
    x0 = DDIM(v-prediction, trailing spacing, CFG constant or dynamic cosine)(noise, cond, uncond)
    video = VAE.decode(x0 / scaling_factor)                           [3, T, H, W] in [-1, 1] -> mp4

Prompt i's video depends only on (weights, seed, i, settings): not on how many prompts are sampled together, the
batch size, or the device the noise would otherwise be drawn on (noise is drawn on the CPU). The denoising loop
is cogvx_train.diffusion.ddim_sampler.sample, which matches diffusers' CogVideoXDDIMScheduler step for step.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from cogvx_train.diffusion import GUIDANCE_SCHEDULES, NoiseSchedule
from cogvx_train.diffusion import sample as ddim_sample
from cogvx_train.dit.frozen_encoders import keyed_generator, latent_shape

if TYPE_CHECKING:
    from cogvx_train.dit.module import DiTTrainingModule


@dataclass
class SampleResult:
    latents: Tensor  # [N, C, T', h, w] fp32 on the CPU, diffusion (scaled) latent space
    videos: Tensor | None  # [N, 3, T, H, W] fp32 on the CPU in [-1, 1]; None when not decoded
    paths: list[Path] = field(default_factory=list)  # the mp4s written, one per prompt


def initial_noise(seed: int, index: int, shape: tuple[int, ...]) -> Tensor:
    """The starting noise of prompt `index`: [C, T', h, w] fp32 on the CPU, a function of (seed, index) only."""
    return torch.randn(shape, generator=keyed_generator(seed, "sample", index), dtype=torch.float32)


def slug(text: str, max_len: int = 40) -> str:
    """A file-name-safe short form of a prompt: 'A red circle, moving!' -> 'a_red_circle_moving'."""
    words = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return words[:max_len].rstrip("_") or "prompt"


def _check(num_steps: int, guidance_scale: float, guidance_schedule: str, batch_size: int) -> None:
    if guidance_schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"guidance_schedule={guidance_schedule!r} is not one of {', '.join(GUIDANCE_SCHEDULES)}.")
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be at least 1 (50 is the released setting).")
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale={guidance_scale} must be >= 0 (1 = no guidance, 6 is the released value).")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")


@torch.no_grad()
def sample_videos(
    dit: torch.nn.Module,
    vae,
    schedule: NoiseSchedule,
    prompts: list[str] | None = None,
    *,
    text_encoder=None,
    text_embeds: Tensor | None = None,
    scaling_factor: float | None = None,
    num_frames: int = 49,
    height: int = 480,
    width: int = 720,
    num_steps: int = 50,
    guidance_scale: float = 6.0,
    guidance_schedule: str = "constant",
    seed: int = 1234,
    noise: Tensor | None = None,
    batch_size: int = 1,
    autocast_dtype: torch.dtype | None = None,
    decode: bool = True,
    out_dir: str | Path | None = None,
    name_format: str = "sample_{i:02d}_{slug}.mp4",
    fps: float = 8.0,
    progress: bool = False,
) -> SampleResult:
    """Sample one video per prompt (see the module docstring).

    Text: `prompts` with `text_encoder`, or `text_embeds` [N, L, D] (then `prompts` only names the files).
    noise: optional [N, C, T', h, w] starting noise; default initial_noise(seed, i, ...) for prompt i.
    scaling_factor: latents are divided by it before decoding (default: the VAE's own).
    autocast_dtype: e.g. torch.bfloat16 to run the transformer under autocast (as bf16-mixed training does);
        the DDIM arithmetic stays fp32 and the VAE decodes in fp32.
    out_dir: when given (and decode), write `name_format.format(i=i, slug=slug(prompt))` mp4s at `fps`.
    """
    _check(num_steps, guidance_scale, guidance_schedule, batch_size)
    if text_embeds is None:
        if text_encoder is None or not prompts:
            raise ValueError("give prompts together with a text_encoder, or precomputed text_embeds [N, L, D].")
        text_embeds = torch.cat([text_encoder(list(prompts[i : i + 8])) for i in range(0, len(prompts), 8)])
    if text_embeds.ndim != 3:
        raise ValueError(f"text_embeds must be [N, L, D], got shape {tuple(text_embeds.shape)}.")
    count = text_embeds.shape[0]
    prompts = list(prompts) if prompts is not None else [f"prompt {i}" for i in range(count)]
    if len(prompts) != count:
        raise ValueError(f"{len(prompts)} prompts but {count} text embeddings; give one embedding per prompt.")
    if decode and vae is None:
        raise ValueError("decoding needs the VAE; pass vae= or decode=False for latents only.")
    if vae is not None:
        shape = latent_shape(vae, num_frames, height, width)
        scaling_factor = vae.scaling_factor if scaling_factor is None else scaling_factor
    else:  # latents only: the CogVideoX compression (4x time, 8x space)
        if (num_frames - 1) % 4 or height % 8 or width % 8:
            raise ValueError(f"a {num_frames}x{height}x{width} clip needs 4k+1 frames and sizes that are multiples "
                             "of 8.")
        shape = (dit.config.in_channels, (num_frames - 1) // 4 + 1, height // 8, width // 8)
    patch = getattr(dit.config, "patch_size", 1)
    if shape[2] % patch or shape[3] % patch:
        raise ValueError(f"height/width {height}x{width} give a {shape[2]}x{shape[3]} latent that the {patch}x{patch} "
                         f"patches do not divide; use multiples of {8 * patch}.")
    if noise is None:
        noise = torch.stack([initial_noise(seed, i, shape) for i in range(count)])
    elif tuple(noise.shape) != (count, *shape):
        raise ValueError(f"noise must be [{count}, {', '.join(map(str, shape))}], got {tuple(noise.shape)}.")

    device = next(dit.parameters()).device
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else nullcontext())

    def denoise(x: Tensor, t: Tensor, text: Tensor) -> Tensor:
        with autocast:
            return dit(x, t, text)

    was_training = dit.training
    dit.eval()
    latents, videos = [], []
    try:
        for start in range(0, count, batch_size):
            cond = text_embeds[start : start + batch_size].to(device)
            x0 = ddim_sample(denoise, noise[start : start + batch_size].to(device), cond, torch.zeros_like(cond),
                             schedule, num_steps, guidance_scale, guidance_schedule, progress=progress)
            latents.append(x0.float().cpu())
            if decode:
                videos.append(decode_latents(vae, x0, scaling_factor).cpu())
    finally:
        dit.train(was_training)
    result = SampleResult(torch.cat(latents), torch.cat(videos) if decode else None)
    if decode and out_dir is not None:
        from cogvx_train.train.video_writer import write_video

        for i, (prompt, video) in enumerate(zip(prompts, result.videos)):
            path = Path(out_dir) / name_format.format(i=i, slug=slug(prompt))
            result.paths.append(write_video(path, video, fps=fps))
    return result


@torch.no_grad()
def decode_latents(vae, latents: Tensor, scaling_factor: float) -> Tensor:
    """Video [B, 3, T, H, W] in [-1, 1] (fp32) from diffusion latents; decoded in fp32, in chunks of the decoder's
    GroupNorm window when it has one (same result as one pass, bounded memory)."""
    window = getattr(vae.config, "decoder_norm_window", None)
    dtype = next(vae.parameters()).dtype
    with torch.autocast(latents.device.type, enabled=False):
        z = (latents.float() / scaling_factor).to(next(vae.parameters()).device, dtype)
        video = vae.decode(z, chunk_latent_frames=window)
    return video.float().clamp(-1.0, 1.0)


def load_for_sampling(path: str | Path, use_ema: bool = True,
                      device: str | torch.device = "cpu") -> tuple["DiTTrainingModule", str]:
    """A DiTTrainingModule rebuilt from a dit checkpoint's hyper-parameters with its (EMA) weights, in eval mode on
    `device`; the frozen VAE and T5 are rebuilt from their specs on first use."""
    from cogvx_train.dit.init_from import resolve_dit_checkpoint, weights_from_checkpoint
    from cogvx_train.dit.module import DiTTrainingModule

    kind, where = resolve_dit_checkpoint(path)
    if kind != "ckpt":
        raise ValueError(f"{path} is a bare transformer ({kind}); sampling needs a dit run directory or .ckpt, which "
                         "also records the VAE, text encoder and noise schedule.")
    ckpt = torch.load(where, map_location="cpu", weights_only=False)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    if "dit_size" not in hparams:
        raise ValueError(f"{where} is not a DiTTrainingModule checkpoint (no dit_size in its hyper-parameters).")
    hparams["use_latent_cache"] = False
    module = DiTTrainingModule(**hparams)
    module.on_load_checkpoint(ckpt)
    weights, source = weights_from_checkpoint(ckpt, where, use_ema)
    module.dit.load_state_dict(weights, strict=True)
    module.ema = None  # the chosen weights are loaded into the model itself
    module.sampling_cfg.use_ema = False
    return module.to(device).eval(), source
