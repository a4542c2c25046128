"""A trained DiT run as a diffusers-style pipeline folder, the format `cogvx-sample` and diffusers both read:

    out/transformer/   CogVideoXTransformer3DModel, or our own format (dit_config.json) for ablation variants
    out/vae/           AutoencoderKLCogVideoX, when the run's frozen VAE has real weights
    out/scheduler/     the CogVideoXDDIMScheduler config matching the training noise schedule
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from cogvx_train.dit.diffusers_format import export_diffusers_transformer, save_dit
from cogvx_train.dit.training_config import DiffusionConfig


def ddim_scheduler_config(diffusion: DiffusionConfig) -> dict:
    """diffusers' CogVideoXDDIMScheduler settings equal to the training schedule (scaled-linear betas, zero terminal
    SNR, SNR shift, v-prediction) with the trailing spacing the sampler uses."""
    d = diffusion
    return {"_class_name": "CogVideoXDDIMScheduler", "num_train_timesteps": d.num_train_timesteps,
            "beta_start": d.beta_start, "beta_end": d.beta_end, "beta_schedule": "scaled_linear",
            "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0,
            "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
            "snr_shift_scale": d.snr_shift, "timestep_spacing": "trailing"}


def export_pipeline(dit: nn.Module, vae: nn.Module | None, diffusion: DiffusionConfig, out_dir: str | Path) -> Path:
    """Write `dit` (the weights to ship, e.g. the EMA), `vae` unless None, and the scheduler config under out_dir."""
    from cogvx_train.vae import export_diffusers_vae

    out = Path(out_dir)
    try:
        export_diffusers_transformer(dit, out / "transformer")
    except ValueError:  # ablation variant: no diffusers equivalent
        save_dit(dit, out / "transformer")
    if vae is not None:
        export_diffusers_vae(vae, out / "vae")
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    scheduler = ddim_scheduler_config(diffusion)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    return out
