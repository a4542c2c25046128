"""Shared helpers for the VAE model tests: tiny diffusers reference models and seeded non-trivial weights."""

from __future__ import annotations

import torch
from torch import nn

TINY_DIFFUSERS = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8, latent_channels=16)


def randomize_(model: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """Perturb every parameter (GroupNorm affine included, which starts at 1/0) with seeded noise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=gen))
    return model


def tiny_diffusers_vae(seed: int = 0):
    """A tiny diffusers AutoencoderKLCogVideoX with seeded weights (the numerical reference)."""
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(seed)
    return randomize_(AutoencoderKLCogVideoX(**TINY_DIFFUSERS), seed).eval()


def set_diffusers_batching(ref, one_pass: bool) -> None:
    """one_pass: the whole clip in one encoder/decoder call; else diffusers' default 8-frame / 2-latent batches."""
    ref.num_sample_frames_batch_size = 10**6 if one_pass else 8
    ref.num_latent_frames_batch_size = 10**6 if one_pass else 2
    ref.use_tiling = False


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()
