"""The optimizer settings shared by both training modules (the ``optim`` config group)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

import torch

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


FUSED_DEVICES = ("cpu", "cuda")


def adamw(param_groups: Iterable, lr: float, betas: tuple[float, float], eps: float,
          weight_decay: float = 0.0) -> torch.optim.AdamW:
    """torch's AdamW, with its fused kernel wherever every parameter allows it (floating point, on a CPU or CUDA
    device; otherwise the default multi-tensor path). The update rule is the same; the fused kernel does a
    parameter's whole update in one pass instead of foreach's chain of ops: 3-5x faster on this project's CPU
    (0.65 M and 4 M parameters: 1.1 vs 5.4 ms, 4.2 vs 12.9 ms per step)."""
    groups = list(param_groups)
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             fused=True if fused else None)
