"""3D rotary position embedding (CogVideoX-5B).

The head dimension is split into a temporal block (head_dim / 4 channels) and two spatial blocks
(3 * head_dim / 8 channels each, height then width): 16 | 24 | 24 for head_dim 64. Inside a block of d channels,
channel pair (2i, 2i+1) is rotated by the angle pos * theta^(-2i / d) ("interleaved pairs"). Positions are the
integer token coordinates, so a larger video extrapolates to new positions instead of squeezing the trained range.
Only vision queries and keys are rotated; text tokens carry no position.
"""

from __future__ import annotations

import torch


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels per axis (t, h, w) for a head dimension: (hd/4, 3hd/8, 3hd/8)."""
    if head_dim % 16 != 0:
        raise ValueError(f"3D RoPE needs head_dim divisible by 16 (t:h:w = 2:3:3 blocks of even size), "
                         f"got {head_dim}")
    return head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3


def _axis_angles(num_positions: int, dim: int, theta: float, device) -> torch.Tensor:
    """[num_positions, dim/2] angles pos * theta^(-2i/dim), in float64."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
    positions = torch.arange(num_positions, dtype=torch.float64, device=device)
    return torch.outer(positions, inv_freq)


def rope3d_frequencies(
    num_frames: int,
    height_tokens: int,
    width_tokens: int,
    head_dim: int = 64,
    theta: float = 1e4,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [num_frames * height_tokens * width_tokens, head_dim], rows in (t, h, w) token order.

    Every angle appears twice in a row (channels 2i and 2i+1), the layout diffusers' CogVideoX transformer takes
    as `image_rotary_emb`.
    """
    if min(num_frames, height_tokens, width_tokens) < 1:
        raise ValueError(f"token grid must be at least 1x1x1, got {(num_frames, height_tokens, width_tokens)}")
    dim_t, dim_h, dim_w = rope_axis_dims(head_dim)
    grid = (num_frames, height_tokens, width_tokens)
    a_t = _axis_angles(num_frames, dim_t, theta, device)[:, None, None, :].expand(*grid, -1)
    a_h = _axis_angles(height_tokens, dim_h, theta, device)[None, :, None, :].expand(*grid, -1)
    a_w = _axis_angles(width_tokens, dim_w, theta, device)[None, None, :, :].expand(*grid, -1)
    angles = torch.cat([a_t, a_h, a_w], dim=-1).reshape(-1, head_dim // 2)  # [N, hd/2]
    angles = angles.repeat_interleave(2, dim=-1)  # [N, hd], pairs share an angle
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """[N, hd] interleaved (cos, sin) tables -> float32 [N, 1, hd/2, 2] (cos, sin) per channel pair, broadcast over
    heads. Stored real (a free view as unit complex numbers in eager) so that compiled code never sees a complex
    tensor."""
    return torch.stack([cos[:, None, 0::2], sin[:, None, 0::2]], dim=-1).float()


def rotate_(x: torch.Tensor, rot: torch.Tensor, inverse: bool = False) -> None:
    """Rotate channel pairs of x [B, N, H, hd] in place: (x1 + i x2) * rot, or * conj(rot) for the backward pass
    (the rotation is orthogonal). Eager: one complex multiply instead of several strided real ones. Compiled:
    the same rotation in real arithmetic, which inductor fuses (it generates no complex kernels)."""
    if torch.compiler.is_compiling():
        pairs = x.unflatten(-1, (-1, 2))  # [B, N, H, hd/2, 2] view of x
        x1, x2 = pairs.unbind(-1)
        cos, sin = rot.to(x.dtype).unbind(-1)
        sin = -sin if inverse else sin
        pairs.copy_(torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1))
        return
    rot = torch.view_as_complex(rot)
    rot = rot.conj() if inverse else rot
    if x.dtype in (torch.float32, torch.float64):
        torch.view_as_complex(x.unflatten(-1, (-1, 2))).mul_(rot.to(torch.complex128 if x.dtype == torch.float64
                                                                       else torch.complex64))
    else:  # no complex bfloat16: rotate in float32
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous()) * rot
        x.copy_(torch.view_as_real(pairs).flatten(-2))
