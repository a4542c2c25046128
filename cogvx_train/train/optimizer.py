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


def fused_allowed(module: Any) -> bool:
    """Whether ``module``'s run may use a fused optimizer: not under fp16 loss scaling ("16-mixed"), whose
    GradScaler must unscale the gradients before they are clipped, which a fused step would do only inside
    itself. Modules not attached to a Trainer (direct use, tests) may."""
    trainer = getattr(module, "_trainer", None)
    return trainer is None or not str(trainer.precision).startswith("16-mixed")


def adamw(param_groups: Iterable, lr: float, betas: tuple[float, float], eps: float,
          weight_decay: float = 0.0, allow_fused: bool = True) -> torch.optim.AdamW:
    """torch's AdamW, with its fused kernel wherever every parameter allows it (floating point, on a CPU or CUDA
    device) and ``allow_fused`` (see :func:`fused_allowed`); otherwise the default multi-tensor path. The update
    rule is the same; the fused kernel does a parameter's whole update in one pass instead of foreach's chain of
    ops: ~3x faster on this project's CPU (`python scripts/bench_dit.py --configs tiny --profile`, BENCHMARKS.md)."""
    groups = list(param_groups)
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = allow_fused and bool(params) and all(
        p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             fused=True if fused else None)


def clip_grad_norm(module: Any, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Clip ``optimizer``'s gradients to a global norm through the run's precision plugin (which knows how the
    strategy holds them: whole, or FSDP shards).

    Lightning's bf16/fp16 ``MixedPrecision`` plugin refuses norm clipping for any optimizer that unscales
    gradients inside its step (torch's fused AdamW). That matters under fp16 loss scaling, where the gradients
    would still be scaled when clipped, and :func:`fused_allowed` keeps the fused kernel out of those runs. Under
    bf16 autocast the plugin has no scaler and nothing to unscale, so its plain norm clipping is called directly.
    """
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = module.trainer.precision_plugin
    if isinstance(plugin, MixedPrecision) and plugin.scaler is None:
        plugin.clip_grad_by_norm(optimizer, max_norm)
    else:
        module.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
