"""Shared pieces of the VAE-training tests: a tiny in-memory dataset in the batch layout, module and trainer."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from cogvx_train.vae.module import VAETrainingModule


class ClipDataset(Dataset):
    """Deterministic clips in the architecture's batch layout: a bright square moving over a colour gradient."""

    def __init__(self, num_clips: int = 4, frames: int = 5, size: int = 32, num_real_frames: int | None = None):
        self.num_clips, self.frames, self.size = num_clips, frames, size
        self.num_real = num_real_frames or frames

    def __len__(self) -> int:
        return self.num_clips

    def __getitem__(self, i: int) -> dict[str, Any]:
        s, t = self.size, self.frames
        ys = torch.linspace(-0.6, 0.6, s)[:, None].expand(s, s)
        xs = torch.linspace(-0.6, 0.6, s)[None, :].expand(s, s)
        background = torch.stack([ys, xs, -ys * (i % 2 * 2 - 1)])  # [3, H, W]
        video = background[:, None].repeat(1, t, 1, 1)  # [3, T, H, W]
        side = s // 4
        for k in range(t):
            step = min(k, self.num_real - 1)  # frames past the real ones repeat the last real frame
            top, left = (2 * step + 3 * i) % (s - side), (3 * step + i) % (s - side)
            video[:, k, top:top + side, left:left + side] = 0.9
        return {
            "video": video,
            "num_real_frames": torch.tensor(self.num_real),
            "is_image": torch.tensor(t == 1),
            "caption": f"clip {i}",
            "index": torch.tensor(i),
            "requested_index": torch.tensor(i),
            "frame_indices": torch.arange(t).clamp(max=self.num_real - 1),
        }


def loader(**kwargs) -> DataLoader:
    batch_size = kwargs.pop("batch_size", 1)
    return DataLoader(ClipDataset(**kwargs), batch_size=batch_size, shuffle=False)


def make_module(disc_start: int = 3, max_steps: int = 6, ema_decay: float | None = None, loss: dict | None = None,
                optim: dict | None = None, **kwargs) -> VAETrainingModule:
    pl.seed_everything(0, verbose=False)
    loss_cfg = {"lpips_net": "alex", "lpips_random_backbone": True, "lpips_weight": 0.5, "disc_start": disc_start,
                "disc_size": "tiny", **(loss or {})}
    optim_cfg = {"lr": 2e-4, "warmup_steps": 2, "schedule": "cosine", "min_lr_ratio": 0.1, **(optim or {})}
    return VAETrainingModule(vae_size="tiny", loss=loss_cfg, optim=optim_cfg, max_steps=max_steps,
                             ema_decay=ema_decay, **kwargs)


def make_trainer(root: Path, max_steps: int, callbacks: list | None = None, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_steps=max_steps, log_every_n_steps=1, num_sanity_val_steps=0,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    limit_val_batches=0, default_root_dir=str(root))
    defaults.update(kwargs)
    return pl.Trainer(logger=pl.loggers.CSVLogger(str(root), name="", version=""), callbacks=callbacks or [],
                      **defaults)


def read_metrics(root: Path) -> list[dict[str, float]]:
    """metrics.csv rows as {column: float}, empty cells dropped."""
    with open(Path(root) / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
