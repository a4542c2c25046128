"""Input embeddings of the expert transformer: latent patches, text tokens and the diffusion timestep."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_sinusoid(timesteps: torch.Tensor, dim: int, max_period: float = 1e4) -> torch.Tensor:
    """[B] timesteps (int or float) -> [B, dim] float32 = [cos(t * f_i) | sin(t * f_i)], f_i = max_period^(-i/(dim/2)).

    Cosine first: the released CogVideoX transformers were trained with diffusers' flip_sin_to_cos=True and
    freq_shift=0.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * freqs[None, :]  # [B, dim/2]
    emb = torch.cat([angles.cos(), angles.sin()], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """sinusoid(t, hidden) -> Linear(hidden, E) -> SiLU -> Linear(E, E)."""

    def __init__(self, hidden_size: int, time_embed_dim: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.linear_1 = nn.Linear(hidden_size, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t_freq = timestep_sinusoid(timesteps, self.hidden_size).to(dtype)  # [B, hidden]
        return self.linear_2(F.silu(self.linear_1(t_freq)))  # [B, E]


class PatchEmbed(nn.Module):
    """Per-frame 2x2 patches of the latent -> hidden tokens, and the text projection.

    `proj` is stored as the Conv2d(C -> hidden, kernel p, stride p) of the released checkpoints, but run as one
    matmul on unfolded patches: the patches come out directly in (t, h, w) token order, with no conv layout to
    permute back.
    """

    def __init__(self, in_channels: int, hidden_size: int, text_embed_dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.text_proj = nn.Linear(text_embed_dim, hidden_size)

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] -> [B, T*h*w, C*p*p] with patch channels in the Conv2d weight's (C, kh, kw) order."""
        b, c, t, height, width = latents.shape
        p = self.patch_size
        x = latents.reshape(b, c, t, height // p, p, width // p, p)  # [B, C, T, h, p, w, p]
        x = x.permute(0, 2, 3, 5, 1, 4, 6)  # [B, T, h, w, C, p, p]
        return x.reshape(b, t * (height // p) * (width // p), c * p * p)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] -> vision tokens [B, T*h*w, hidden]."""
        weight = self.proj.weight.flatten(1)  # [hidden, C*p*p]
        return F.linear(self.patchify(latents).to(weight.dtype), weight, self.proj.bias)


def unpatchify(tokens: torch.Tensor, channels: int, grid: tuple[int, int, int], patch_size: int) -> torch.Tensor:
    """[B, T*h*w, C*p*p] (channel-major patches, as the released proj_out) -> [B, C, T, h*p, w*p]."""
    t, h, w = grid
    p = patch_size
    x = tokens.reshape(tokens.shape[0], t, h, w, channels, p, p)  # [B, T, h, w, C, p, p]
    x = x.permute(0, 4, 1, 2, 5, 3, 6)  # [B, C, T, h, p, w, p]
    return x.reshape(tokens.shape[0], channels, t, h * p, w * p)
