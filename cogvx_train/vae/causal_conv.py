"""Causal 3D convolution: frame t never sees frames after t.

A kernel of k frames needs k-1 frames in front of the input. Where they come from depends on where the input
sits in the whole clip, which a :class:`FrameContext` describes:

* the input starts at the clip's frame 0 -> k-1 copies of frame 0 (the released CogVideoX "first" padding);
* the input continues an earlier chunk of the same clip (streaming) -> the last k-1 frames the same conv saw in
  the previous chunk, kept in ``ctx.cache``;
* the input is one rank's slice of a context-parallel clip -> the previous rank's last k-1 frames, exchanged
  with a differentiable send/receive (see :mod:`cogvx_train.vae.context_parallel`).

Spatial padding is zero padding of (k-1)/2 done by the convolution itself. The front frames cost one
``torch.cat``, or no copy at all when the caller writes the input straight into a padded buffer
(:meth:`CausalConv3d.new_padded_input`, used without gradients).

``CausalConv3d.conv`` is the full ``Conv3d`` (state-dict key ``<name>.conv.weight``, as in diffusers'
AutoencoderKLCogVideoX). The factorized variant (``factorized=True``) replaces it by a per-frame 2D conv (kernel
(1, k, k), key ``<name>.conv``) followed by a causal 1D temporal conv (kernel (k, 1, 1), key
``<name>.temporal_conv``): about half the parameters and FLOPs, for ablations; it has no diffusers counterpart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cogvx_train.vae.context_parallel import exchange_front_halo

_MKLDNN = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride=(1, 1, 1), padding=(0, 0, 0)):
    """F.conv3d; float32 CPU convs go straight to oneDNN, on channels-last (NTHWC) activations.

    PyTorch's CPU heuristic runs batch-1 convs whose C*T*H <= 20480 with its native im2col kernel, whose column
    buffer is k^3 = 27 times the input: in a chunked run the largest allocation, and whether a chunk gets it depends
    on where the threshold falls. oneDNN's direct conv needs none, and on channels-last data it needs no layout
    reorder of input or output either, so its only allocation is the output. The whole network then stays
    channels-last on CPU; other devices keep NCTHW. The aten op is differentiable.
    """
    if _MKLDNN and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32:
        x = x.contiguous(memory_format=torch.channels_last_3d)
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, list(padding), list(stride), [1, 1, 1], 1)
    return F.conv3d(x, weight, bias, stride=stride, padding=padding)


def empty_like_layout(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """An empty tensor of ``shape`` with the dtype, device and memory layout (NCTHW or NTHWC) of ``like``."""
    channels_last = like.is_contiguous(memory_format=torch.channels_last_3d) and not like.is_contiguous()
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


@dataclass
class FrameContext:
    """Where the frames of one forward call sit in the whole clip.

    has_first_frame: the input's first frame is the clip's frame 0 (it gets frame-0 padding and is kept apart
        by temporal down/up-sampling). False for every streaming chunk but the first, and for context-parallel
        ranks other than 0.
    cache: when streaming a clip chunk by chunk, each causal conv stores its last k-1 input frames here (keyed
        by the module) for the next chunk; None for a single pass.
    group: context-parallel process group whose ranks hold consecutive slices of the clip in rank order; None
        when one process holds the whole clip.
    """

    has_first_frame: bool = True
    cache: dict[nn.Module, torch.Tensor] | None = None
    group: object | None = None


def front_frames(module: nn.Module, x: torch.Tensor, num: int, ctx: FrameContext) -> torch.Tensor:
    """The ``num`` frames that precede ``x`` in the clip, as seen by ``module`` ([B, C, num, H, W])."""
    if ctx.group is not None:  # every rank takes part: rank 0 sends its tail even though it pads with frame 0
        return exchange_front_halo(x, num, ctx.group)
    if ctx.has_first_frame:
        return x[:, :, :1].expand(-1, -1, num, -1, -1)  # frame-0 replicate padding (no copy until the cat)
    if ctx.cache is None or module not in ctx.cache:
        raise ValueError(
            "A chunk that does not start at frame 0 needs the causal-conv cache of the previous chunk; "
            "stream chunks in order with one FrameContext(cache={})."
        )
    return ctx.cache[module]


class CausalConv3d(nn.Module):
    """Conv3d with stride 1, zero spatial padding and causal (front-only) temporal padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, factorized: bool = False):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"CausalConv3d needs an odd kernel size, got {kernel_size}.")
        self.time_kernel_size = kernel_size
        self.factorized = factorized and kernel_size > 1
        pad = kernel_size // 2
        if self.factorized:
            self.conv = nn.Conv3d(in_channels, out_channels, (1, kernel_size, kernel_size), padding=(0, pad, pad))
            self.temporal_conv = nn.Conv3d(out_channels, out_channels, (kernel_size, 1, 1))
        else:
            self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, padding=(0, pad, pad))

    @property
    def can_prepad(self) -> bool:
        """Whether a caller may write this conv's input straight into a padded buffer (see new_padded_input)."""
        return self.time_kernel_size > 1 and not self.factorized

    def new_padded_input(self, like: torch.Tensor) -> torch.Tensor:
        """An empty [B, C, k-1+T, H, W] buffer for an input shaped like ``like``: the caller writes the input into
        frames k-1.. and calls ``forward(buffer, ctx, prepadded=True)``, which fills the front frames. This saves
        the copy (and the second full-size tensor) of ``torch.cat``."""
        b, c, t, h, w = like.shape
        return empty_like_layout(like, b, c, self.time_kernel_size - 1 + t, h, w)

    def _causal(self, conv: nn.Conv3d, x: torch.Tensor, ctx: FrameContext, prepadded: bool = False) -> torch.Tensor:
        k = self.time_kernel_size
        if k == 1:
            return conv3d(x, conv.weight, conv.bias, padding=conv.padding)
        if prepadded:
            padded = x
            padded[:, :, : k - 1] = front_frames(self, padded[:, :, k - 1 :], k - 1, ctx)
        else:
            padded = torch.cat([front_frames(self, x, k - 1, ctx), x], dim=2)  # [B, C, k-1+T, H, W]
        if ctx.cache is not None:
            # clone: a slice would keep the whole padded chunk alive until the next chunk
            ctx.cache[self] = padded[:, :, -(k - 1):].clone()
        return conv3d(padded, conv.weight, conv.bias, padding=conv.padding)

    def forward(self, x: torch.Tensor, ctx: FrameContext, prepadded: bool = False) -> torch.Tensor:
        if self.factorized:
            spatial = conv3d(x, self.conv.weight, self.conv.bias, padding=self.conv.padding)
            return self._causal(self.temporal_conv, spatial, ctx)
        return self._causal(self.conv, x, ctx, prepadded)

    @property
    def last_weight(self) -> torch.Tensor:
        """Weight of the last convolution applied (the full conv, or the temporal conv when factorized)."""
        return self.temporal_conv.weight if self.factorized else self.conv.weight
