"""3D sin-cos absolute position embedding (CogVideoX-2B).

Each vision token (t, h, w) gets a fixed vector added after the patch embedding:
  channels [0, D/4)         encode t / temporal_scale,
  channels [D/4, D/4+3D/8)  encode w / spatial_scale,
  channels [D/4+3D/8, D)    encode h / spatial_scale,
every block being [sin(pos * omega_i) | cos(pos * omega_i)] with omega_i = 1e4^(-i / (block/2)).
The spatial positions are divided by 1.875 because the 2B model was first trained at 256x384 and then at 480x720
(interpolation, unlike RoPE's extrapolation). The w-before-h order matches the released 2B weights.
Text tokens get no position embedding.
"""

from __future__ import annotations

import torch


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """[M] positions -> [M, dim] = [sin(p * omega) | cos(p * omega)], computed in float64."""
    if dim % 2 != 0:
        raise ValueError(f"a sin-cos block needs an even number of channels, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    omega = 1.0 / (10000.0**omega)  # [dim/2]
    angles = torch.outer(positions.to(torch.float64), omega)  # [M, dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos3d_embedding(
    num_frames: int,
    height_tokens: int,
    width_tokens: int,
    dim: int,
    spatial_scale: float = 1.875,
    temporal_scale: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Absolute 3D position table for a (num_frames, height_tokens, width_tokens) token grid.

    Returns [num_frames * height_tokens * width_tokens, dim], rows in (t, h, w) order, the order of the
    transformer's vision tokens.
    """
    if dim % 16 != 0:
        raise ValueError(f"the 3D sin-cos embedding splits {dim} channels into D/4 + 3D/8 + 3D/8 even blocks, "
                         "so the hidden size must be a multiple of 16")
    if min(num_frames, height_tokens, width_tokens) < 1:
        raise ValueError(f"token grid must be at least 1x1x1, got {(num_frames, height_tokens, width_tokens)}")
    dim_t, dim_s = dim // 4, 3 * dim // 8
    t = torch.arange(num_frames, dtype=torch.float64, device=device) / temporal_scale
    h = torch.arange(height_tokens, dtype=torch.float64, device=device) / spatial_scale
    w = torch.arange(width_tokens, dtype=torch.float64, device=device) / spatial_scale
    emb_t = sincos_1d(t, dim_t)[:, None, None, :].expand(-1, height_tokens, width_tokens, -1)
    emb_w = sincos_1d(w, dim_s)[None, None, :, :].expand(num_frames, height_tokens, -1, -1)
    emb_h = sincos_1d(h, dim_s)[None, :, None, :].expand(num_frames, -1, width_tokens, -1)
    table = torch.cat([emb_t, emb_w, emb_h], dim=-1)  # [T, h, w, D]
    return table.reshape(-1, dim).to(dtype)
