"""Training machinery shared by the VAE and DiT stages: EMA, lr schedules, video writing, checkpoints, resume,
callbacks, throughput/MFU and distributed checks.

Importing this package imports nothing heavy (a config error is reported before torch's distributed stack and
Lightning are loaded); the submodules are imported where they are used, ``EMA`` and ``build_lr_lambda`` on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EMA", "build_lr_lambda"]


def __getattr__(name: str) -> Any:
    if name == "EMA":
        from cogvx_train.train.ema import EMA

        return EMA
    if name == "build_lr_lambda":
        from cogvx_train.train.lr_schedule import build_lr_lambda

        return build_lr_lambda
    raise AttributeError(f"module 'cogvx_train.train' has no attribute {name!r}")
