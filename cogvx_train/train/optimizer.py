"""The optimizer settings shared by both training modules (the ``optim`` config group)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from cogvx_train.config.plain import plain_config


@dataclass
class OptimConfig:
    """The ``optim`` config group: AdamW and its lr schedule, the same keys for the VAE and DiT stages (the VAE
    discriminator's lr/betas live in ``vae_loss``)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    warmup_steps: int = 1000
    schedule: str = "cosine"     # cosine | constant | linear
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0       # max global grad norm, per optimizer; 0 = off

    @classmethod
    def from_any(cls, value: "OptimConfig | dict[str, Any] | None") -> "OptimConfig":
        cfg = plain_config(cls, value, "optim")
        cfg.betas = tuple(float(b) for b in cfg.betas)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"betas": list(self.betas)}
