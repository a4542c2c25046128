"""The optimizer settings shared by both training modules (the ``optim`` config group)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


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
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown optim setting(s) {unknown}; known: {', '.join(sorted(known))}.")
        cfg = cls(**value)
        cfg.betas = tuple(cfg.betas)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"betas": list(self.betas)}
