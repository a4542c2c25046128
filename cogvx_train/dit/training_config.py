"""The DiT stage's typed config groups (`diffusion`, `ema`, `sampling`): what DiTTrainingModule takes instead of
OmegaConf. Each is built from None (defaults), an instance, or a dict of plain values (cogvx_train.config.plain);
the `optim` group is the shared OptimConfig (cogvx_train.train.optimizer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cogvx_train.config.plain import plain_config


@dataclass
class DiffusionConfig:
    """The noise schedule, timestep sampling, caption dropout and the timestep buckets of train/loss_t*."""

    num_train_timesteps: int = 1000
    snr_shift: float = 3.0  # 2B: 3.0, 5B: 1.0
    timestep_sampling: str = "uniform_per_rank"  # uniform_per_rank (Explicit Uniform Sampling) | iid
    caption_dropout: float = 0.1
    loss_buckets: int = 10  # train/loss_t000-099 ... over the last log_every_n_steps steps
    beta_start: float = 8.5e-4
    beta_end: float = 1.2e-2

    @classmethod
    def from_any(cls, value: "DiffusionConfig | dict[str, Any] | None") -> "DiffusionConfig":
        return plain_config(cls, value, "diffusion")


@dataclass
class EMAConfig:
    """The EMA of the transformer's weights (cogvx_train.train.ema), the weights samples and exports use."""

    enabled: bool = True
    decay: float = 0.9999
    start_step: int = 0

    @classmethod
    def from_any(cls, value: "EMAConfig | dict[str, Any] | None") -> "EMAConfig":
        return plain_config(cls, value, "ema")


@dataclass
class SamplingConfig:
    """The validation samples: prompts, each sampled with the fixed seed, and the DDIM / guidance settings."""

    num_steps: int = 50
    guidance_scale: float = 6.0
    guidance_schedule: str = "constant"  # constant | dynamic_cosine
    seed: int = 1234
    prompts: list[str] = field(default_factory=lambda: ["a red circle moves from left to right"])
    use_ema: bool = True
    num_frames: int | None = None  # None: the shape of the validation batches
    height: int | None = None
    width: int | None = None
    fps: float = 8.0
    batch_size: int = 1

    @classmethod
    def from_any(cls, value: "SamplingConfig | dict[str, Any] | None") -> "SamplingConfig":
        cfg = plain_config(cls, value, "sampling")
        cfg.prompts = [str(p) for p in cfg.prompts]
        return cfg
