"""Building blocks of the causal VAE: GroupNorm with frame windows, SpatialNorm, ResNet block, down/up-sampling.

GroupNorm statistics and chunking. GroupNorm normalises over (C/G, T, H, W), so its statistics depend on which
frames share a forward pass. ``window`` fixes that set by design, independently of how a clip is chunked:

* ``window=None``: one set of statistics for the whole clip (the paper's A2 training and SAT's one-pass encode).
  A context-parallel run all-reduces them over the group, so it equals one process. Chunked streaming cannot
  reproduce them in bounded memory (every layer's statistics need the whole clip before any chunk can go on),
  so the VAE refuses to stream such a model.
* ``window=n`` (frames at this layer): statistics per window of frames, the first window being frame 0 plus n
  frames, then n frames each (the last may be shorter). This is exactly what diffusers' AutoencoderKLCogVideoX
  does by default with released weights (8 input frames per encoder batch, 2 latent frames per decoder batch,
  first batch one frame longer), written as a property of the model: a single pass and any chunking whose
  chunks hold whole windows compute the same numbers, and memory stays bounded.

Every norm here is followed by SiLU; both norms return ``x * scale + shift`` with per-frame coefficients so the
windowed, context-parallel and spatially-conditioned cases share one code path (:func:`group_norm_affine`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cogvx_train.vae.causal_conv import CausalConv3d, FrameContext, conv3d, empty_like_layout
from cogvx_train.vae.context_parallel import all_reduce_sum


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU, in place when no gradient flows (the norm output it overwrites is not needed again)."""
    return F.silu(x, inplace=not (torch.is_grad_enabled() and x.requires_grad))


def window_bounds(num_frames: int, window: int | None, has_first_frame: bool) -> list[tuple[int, int]]:
    """[start, end) of each GroupNorm window in a call of ``num_frames`` frames."""
    if window is None:
        return [(0, num_frames)]
    bounds, start = [], 0
    if has_first_frame:
        start = min(1 + window, num_frames)
        bounds.append((0, start))
    while start < num_frames:
        bounds.append((start, min(start + window, num_frames)))
        start = bounds[-1][1]
    return bounds


def _window_stats(x: torch.Tensor, groups: int, bounds, ctx: FrameContext, whole_clip: bool):
    """Per-window mean and biased variance, [B, G, num_windows] (fp32)."""
    batch, channels = x.shape[:2]
    means, variances, counts = [], [], []
    for start, end in bounds:
        part = x[:, :, start:end]
        if part.is_contiguous(memory_format=torch.channels_last_3d) and not part.is_contiguous():
            part = part.permute(0, 2, 3, 4, 1).reshape(batch, -1, groups, channels // groups)  # [B, L*H*W, G, C/G]
            dims = (1, 3)
        else:
            part = part.reshape(batch, groups, channels // groups, -1)  # [B, G, C/G, L*H*W]
            dims = (2, 3)
        var, mean = torch.var_mean(part.float(), dim=dims, correction=0)
        means.append(mean)
        variances.append(var)
        counts.append(part.shape[dims[0]] * part.shape[dims[1]])
    mean, var = torch.stack(means, -1), torch.stack(variances, -1)
    if whole_clip and ctx.group is not None:
        # Combine (count, mean, var) of every rank: global mean first, then the within + between variance.
        count = torch.tensor([float(counts[0])], dtype=torch.float64, device=x.device)  # NCCL needs it on the GPU
        dist.all_reduce(count, group=ctx.group)
        total = float(count.item())
        mean_all = all_reduce_sum(mean * (counts[0] / total), ctx.group)
        var = all_reduce_sum((var + (mean - mean_all) ** 2) * (counts[0] / total), ctx.group)
        mean = mean_all
    return mean, var


def group_norm_affine(
    x: torch.Tensor, norm: nn.GroupNorm, window: int | None, ctx: FrameContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients with ``norm(x) == x * scale + shift``; both [B, C, T or 1, 1, 1] in x's dtype."""
    batch, channels, frames = x.shape[:3]
    groups = norm.num_groups
    bounds = window_bounds(frames, window, ctx.has_first_frame)
    mean, var = _window_stats(x, groups, bounds, ctx, whole_clip=window is None)
    rstd = torch.rsqrt(var + norm.eps)  # [B, G, nw]
    if len(bounds) > 1:  # one coefficient per frame: repeat each window's over its frames
        lengths = torch.tensor([end - start for start, end in bounds], device=x.device)
        rstd, mean = rstd.repeat_interleave(lengths, dim=-1), mean.repeat_interleave(lengths, dim=-1)
    per_group = channels // groups
    rstd = rstd.repeat_interleave(per_group, dim=1)  # [B, C, T or 1]
    mean = mean.repeat_interleave(per_group, dim=1)
    scale = rstd * norm.weight.float()[None, :, None]
    shift = norm.bias.float()[None, :, None] - mean * scale
    scale, shift = scale[..., None, None].to(x.dtype), shift[..., None, None].to(x.dtype)
    if x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():  # C innermost, like x
        cl = torch.channels_last_3d
        scale, shift = scale.contiguous(memory_format=cl), shift.contiguous(memory_format=cl)
    return scale, shift


class GroupNorm3d(nn.GroupNorm):
    """GroupNorm over (C/G, T, H, W) with statistics per frame window or over the whole clip (module docstring).

    Subclasses nn.GroupNorm so the parameters keep the names ``weight`` and ``bias``.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float, window: int | None):
        super().__init__(num_groups, num_channels, eps=eps)
        self.window = window

    def forward(self, x: torch.Tensor, ctx: FrameContext, out: torch.Tensor | None = None) -> torch.Tensor:
        """GroupNorm(x); written into ``out`` when given (no gradient)."""
        single_window = self.window is None or x.shape[2] <= self.window + int(ctx.has_first_frame)
        if out is None and single_window and (ctx.group is None or self.window is not None):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        scale, shift = group_norm_affine(x, self, self.window, ctx)
        return torch.addcmul(shift, x, scale) if out is None else torch.addcmul(shift, x, scale, out=out)


def _fine_view(t: torch.Tensor, frames: int, size: int) -> torch.Tensor:
    """View a fine [B, C, t*frames, h*size, w*size] tensor as [B, C, t, frames, h, size, w, size]."""
    b, c, tt, hh, ww = t.shape
    return t.view(b, c, tt // frames, frames, hh // size, size, ww // size, size)


def _coarse_view(t: torch.Tensor) -> torch.Tensor:
    """[B, C, t, h, w] -> [B, C, t, 1, h, 1, w, 1]: nearest upsampling as a broadcast, without a copy."""
    return t[:, :, :, None, :, None, :, None]


def multiply_add_upsampled(
    f: torch.Tensor, a: torch.Tensor, c: torch.Tensor, has_first_frame: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``f * up(a) + up(c)``, up = nearest resize of [B, C, Tz, h, w] to f's size with frame 0 kept apart.

    The coarse tensors are broadcast over f's sub-grid, so no upsampled copy of them is ever made. Without
    gradients the result goes into ``out`` (or a new tensor) in one pass.
    """
    size = f.shape[-1] // a.shape[-1]
    parts = []  # (fine part, coarse a, coarse c, temporal factor)
    if has_first_frame:
        parts.append((f[:, :, :1], a[:, :, :1], c[:, :, :1], 1))
        if f.shape[2] > 1:
            parts.append((f[:, :, 1:], a[:, :, 1:], c[:, :, 1:], (f.shape[2] - 1) // (a.shape[2] - 1)))
    else:
        parts.append((f, a, c, f.shape[2] // a.shape[2]))
    if not (torch.is_grad_enabled() and (f.requires_grad or a.requires_grad)):
        out = torch.empty_like(f) if out is None else out
        start = 0
        for fine, ca, cc, frames in parts:
            target = _fine_view(out[:, :, start : start + fine.shape[2]], frames, size)
            torch.addcmul(_coarse_view(cc), _fine_view(fine, frames, size), _coarse_view(ca), out=target)
            start += fine.shape[2]
        return out
    pieces = [
        torch.addcmul(_coarse_view(cc), _fine_view(fine, frames, size), _coarse_view(ca)).reshape(fine.shape)
        for fine, ca, cc, frames in parts
    ]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)


class SpatialNorm3d(nn.Module):
    """Decoder norm conditioned on the latent z: GroupNorm(f) * conv_y(z) + conv_b(z), z resized nearest to f.

    conv_y and conv_b are 1x1x1, so they commute with the nearest resize: they run at latent resolution and the
    GroupNorm folds into the same per-position scale and shift, one fused multiply-add over f.
    """

    def __init__(self, f_channels: int, zq_channels: int, groups: int, eps: float, window: int | None):
        super().__init__()
        self.norm_layer = GroupNorm3d(groups, f_channels, eps, window)
        self.conv_y = CausalConv3d(zq_channels, f_channels, kernel_size=1)
        self.conv_b = CausalConv3d(zq_channels, f_channels, kernel_size=1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor, ctx: FrameContext, out: torch.Tensor | None = None):
        scale, shift = group_norm_affine(f, self.norm_layer, self.norm_layer.window, ctx)  # [B, C, Tf|1, 1, 1]
        if scale.shape[2] > 1:  # per-frame -> per-latent-frame (windows hold whole latent frames)
            frames = (f.shape[2] - 1) // max(zq.shape[2] - 1, 1) if ctx.has_first_frame else f.shape[2] // zq.shape[2]
            first = int(ctx.has_first_frame)
            index = torch.arange(zq.shape[2], device=f.device)
            index = torch.where(index < first, index, first + (index - first) * frames)
            scale, shift = scale[:, :, index], shift[:, :, index]
        y, b = self.conv_y(zq, ctx), self.conv_b(zq, ctx)  # [B, C, Tz, h, w]
        return multiply_add_upsampled(f, scale * y, torch.addcmul(b, shift, y), ctx.has_first_frame, out)


def norm_silu_conv(
    norm: Callable[[torch.Tensor | None], torch.Tensor], conv: CausalConv3d, x: torch.Tensor, ctx: FrameContext
) -> torch.Tensor:
    """conv(silu(norm(x))). ``norm(out)`` normalises x, into ``out`` when given: without gradients it writes
    straight into the conv's padded input, so the block holds x, that buffer and the conv output, nothing more."""
    if torch.is_grad_enabled() or not conv.can_prepad:
        return conv(silu(norm(None)), ctx)
    buffer = conv.new_padded_input(x)
    F.silu(norm(buffer[:, :, conv.time_kernel_size - 1 :]), inplace=True)
    return conv(buffer, ctx, prepadded=True)


class ResnetBlock3d(nn.Module):
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), a 1x1x1 conv on the shortcut when channels change.

    ``zq_channels`` set: the norms are SpatialNorm3d conditioned on the latent (decoder); else GroupNorm3d.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        groups: int,
        eps: float,
        window: int | None,
        zq_channels: int | None = None,
        factorized: bool = False,
    ):
        super().__init__()
        if zq_channels is None:
            self.norm1 = GroupNorm3d(groups, in_channels, eps, window)
            self.norm2 = GroupNorm3d(groups, out_channels, eps, window)
        else:
            self.norm1 = SpatialNorm3d(in_channels, zq_channels, groups, eps, window)
            self.norm2 = SpatialNorm3d(out_channels, zq_channels, groups, eps, window)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, factorized)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, factorized)
        self.conv_shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    @staticmethod
    def _norm(norm: nn.Module, x: torch.Tensor, zq: torch.Tensor | None, ctx: FrameContext):
        """norm(x) as a function of the optional output buffer, for norm_silu_conv."""
        return (lambda out: norm(x, ctx, out=out)) if zq is None else (lambda out: norm(x, zq, ctx, out=out))

    def forward(self, x: torch.Tensor, ctx: FrameContext, zq: torch.Tensor | None = None) -> torch.Tensor:
        h = norm_silu_conv(self._norm(self.norm1, x, zq, ctx), self.conv1, x, ctx)
        h = norm_silu_conv(self._norm(self.norm2, h, zq, ctx), self.conv2, h, ctx)
        shortcut = x if self.conv_shortcut is None else conv3d(x, self.conv_shortcut.weight, self.conv_shortcut.bias)
        return h.add_(shortcut)  # conv backward does not need its output, so in place is safe


def downsample_time(x: torch.Tensor, has_first_frame: bool) -> torch.Tensor:
    """Average pairs of frames, frame 0 (when present) kept as it is: 1 + 2m -> 1 + m, 2m -> m."""
    rest = x[:, :, 1:] if has_first_frame else x
    if rest.shape[2] % 2:
        raise ValueError(f"Temporal downsampling pairs frames, but {rest.shape[2]} frames follow frame 0 here.")
    pooled = (rest[:, :, 0::2] + rest[:, :, 1::2]) * 0.5
    return torch.cat([x[:, :, :1], pooled], dim=2) if has_first_frame else pooled


def pool_time_and_pad(x: torch.Tensor, compress_time: bool, has_first_frame: bool) -> torch.Tensor:
    """downsample_time (if compress_time) and a zero row/column at the bottom/right, written in one pass."""
    b, c, t, h, w = x.shape
    first = int(has_first_frame) if compress_time else t
    rest = x[:, :, first:]
    if rest.shape[2] % 2:
        raise ValueError(f"Temporal downsampling pairs frames, but {rest.shape[2]} frames follow frame 0 here.")
    out = empty_like_layout(x, b, c, first + rest.shape[2] // 2, h + 1, w + 1)
    out[..., h, :] = 0
    out[..., :h, w] = 0
    body = out[..., :h, :w]
    body[:, :, :first] = x[:, :, :first]
    if rest.shape[2]:
        torch.add(rest[:, :, 0::2], rest[:, :, 1::2], out=body[:, :, first:]).mul_(0.5)
    return out


class Downsample3d(nn.Module):
    """Optional temporal 2x (frame 0 apart), then a stride-2 3x3 conv per frame after zero-padding right/bottom."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)  # 2D weights, applied to every frame

    def forward(self, x: torch.Tensor, ctx: FrameContext) -> torch.Tensor:
        if torch.is_grad_enabled():
            x = downsample_time(x, ctx.has_first_frame) if self.compress_time else x
            x = F.pad(x, (0, 1, 0, 1))
        else:
            x = pool_time_and_pad(x, self.compress_time, ctx.has_first_frame)
        return conv3d(x, self.conv.weight.unsqueeze(2), self.conv.bias, stride=(1, 2, 2))


def upsample_space(x: torch.Tensor) -> torch.Tensor:
    """Nearest 2x in H and W: [B, C, T, H, W] -> [B, C, T, 2H, 2W], one write."""
    b, c, t, h, w = x.shape
    out = empty_like_layout(x, b, c, t, 2 * h, 2 * w)
    out.view(b, c, t, h, 2, w, 2).copy_(x[:, :, :, :, None, :, None])
    return out


def repeat_frames(y: torch.Tensor, has_first_frame: bool) -> torch.Tensor:
    """Each frame twice, frame 0 (when present) once: T -> 2T - 1 or 2T (nearest temporal upsampling)."""
    b, c, t, h, w = y.shape
    first = int(has_first_frame)
    out = empty_like_layout(y, b, c, first + 2 * (t - first), h, w)
    out[:, :, :first] = y[:, :, :first]
    out[:, :, first:].view(b, c, t - first, 2, h, w).copy_(y[:, :, first:, None])
    return out


class Upsample3d(nn.Module):
    """Nearest 2x upsampling (temporal too when ``compress_time``, frame 0 kept single), then a 3x3 conv per frame.

    The conv is per frame and a repeated frame is an exact copy, so the frames are convolved before they are
    repeated: the same numbers as upsample-then-conv (diffusers' order) for half the FLOPs. Without gradients the
    frames go through in slabs written into the output, so the full-size upsampled input never exists at once.
    """

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        return conv3d(upsample_space(x), self.conv.weight.unsqueeze(2), self.conv.bias, padding=(0, 1, 1))

    def forward(self, x: torch.Tensor, ctx: FrameContext) -> torch.Tensor:
        if torch.is_grad_enabled():
            y = self._conv(x)
            return repeat_frames(y, ctx.has_first_frame) if self.compress_time else y
        b, c, t, h, w = x.shape
        first = int(ctx.has_first_frame) if self.compress_time else t
        out, slab = None, -(-t // 4)  # ~4 slabs: small transient buffers, convs still large enough to be efficient
        for start in range(0, t, slab):
            y = self._conv(x[:, :, start : start + slab])  # [B, C, n, 2H, 2W]
            if out is None:
                out = empty_like_layout(y, b, y.shape[1], first + 2 * (t - first), 2 * h, 2 * w)
            n = y.shape[2]
            single = max(0, min(first - start, n))  # frames of this slab that are not repeated
            lo = start if start < first else first + 2 * (start - first)
            out[:, :, lo : lo + single] = y[:, :, :single]
            if n > single:
                rest = out[:, :, lo + single : lo + single + 2 * (n - single)]
                rest.view(b, -1, n - single, 2, 2 * h, 2 * w).copy_(y[:, :, single:, None])
        return out
