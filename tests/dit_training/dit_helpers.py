"""Tiny DiT-stage pieces for the tests: a tiny DiT (2 layers), the tiny VAE and the tiny T5, batches of a few
16x16 frames, in-memory batch sources, and a Trainer that writes nothing it is not asked to."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

torch.set_num_threads(1)  # 2 threads on a loaded 2-core machine are ~100x slower for tiny ops
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("cogvx_train.dit.frozen_encoders").setLevel(logging.ERROR)

TEXT_LEN = 8


def module_kwargs(**changes) -> dict:
    """Plain constructor arguments of a tiny DiTTrainingModule (random tiny VAE, tiny T5)."""
    kwargs = dict(
        dit_size="tiny",
        dit_overrides={},
        vae={"size": "tiny", "weights": None, "scaling_factor": 1.0},
        text_encoder={"kind": "tiny", "path": None, "max_length": TEXT_LEN},
        diffusion={"snr_shift": 1.0, "caption_dropout": 0.1},
        optim={"lr": 2e-3, "warmup_steps": 2, "schedule": "constant"},
        max_steps=10,
        ema={"enabled": True, "decay": 0.9},
        sampling={"num_steps": 2, "guidance_scale": 3.0, "prompts": ["a red circle", "a blue square"], "seed": 7},
        seed=5,
    )
    kwargs.update(changes)
    return kwargs


def video_batch(b: int = 2, frames: int = 5, h: int = 16, w: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"video": torch.rand(b, 3, frames, h, w, generator=g) * 2 - 1,
            "caption": [f"caption number {i}" for i in range(b)],
            "num_real_frames": torch.full((b,), frames), "is_image": torch.zeros(b, dtype=torch.bool),
            "index": torch.arange(b) + 100 * seed}


def latent_batch(b: int = 2, t: int = 2, h: int = 2, w: int = 2, seed: int = 0, logvar: float = -20.0) -> dict:
    """A latent-cache style batch (mean, logvar, text embeddings) that needs neither VAE nor T5."""
    g = torch.Generator().manual_seed(seed)
    return {"latents_mean": torch.randn(b, 16, t, h, w, generator=g),
            "latents_logvar": torch.full((b, 16, t, h, w), logvar),
            "text_embeds": torch.randn(b, TEXT_LEN, 32, generator=g),
            "caption": [f"caption number {i}" for i in range(b)], "index": torch.arange(b) + 100 * seed,
            "is_image": torch.zeros(b, dtype=torch.bool), "num_real_frames": torch.full((b,), 4 * t - 3)}


class Repeat(Dataset):
    """The same batches, cycled: an in-memory batch source for Lightning."""

    def __init__(self, batches: list[dict], length: int):
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return self.batches[i % len(self.batches)]


def loader(batches: list[dict] | dict, length: int = 1000) -> DataLoader:
    batches = batches if isinstance(batches, list) else [batches]
    return DataLoader(Repeat(batches, length), batch_size=None, shuffle=False)


def trainer(max_steps: int, **kwargs):
    import lightning.pytorch as pl

    defaults = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                    num_sanity_val_steps=0)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


@pytest.fixture()
def tiny_module():
    from cogvx_train.dit.module import DiTTrainingModule

    def build(**changes) -> DiTTrainingModule:
        torch.manual_seed(0)
        return DiTTrainingModule(**module_kwargs(**changes))

    return build
