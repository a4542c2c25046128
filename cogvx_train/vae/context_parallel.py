"""Temporal context parallelism for the causal VAE (the paper's A2 stage: 161-frame clips over several ranks).

The frames of one clip are split over the ranks of a process group in rank order. The model then runs on each
rank's slice and computes exactly what one process would compute on the whole clip:

* every causal conv receives the previous rank's last k-1 input frames (rank 0 pads with copies of frame 0) and
  sends its own to the next rank; the backward pass sends the halo's gradient back (:func:`exchange_front_halo`);
* only rank 0 holds frame 0, so only rank 0 keeps it apart in temporal down/up-sampling;
* GroupNorm statistics that span the whole clip (``encoder_norm_window`` / ``decoder_norm_window`` = None) are
  all-reduced over the group with an autograd-aware all-reduce; per-window statistics need no communication,
  because the split puts rank boundaries on window boundaries.

Frame split rule. With temporal compression 4 a clip has T = 1 + 4K frames, i.e. frame 0 and K groups of 4.
Rank 0 gets frame 0 plus m_0 groups (1 + 4 m_0 frames), rank r > 0 gets m_r groups (4 m_r frames), m_r >= 1;
the K groups are shared out as evenly as possible, earlier ranks taking the remainder. Each rank's latent slice
is then 1 + m_0 (rank 0) or m_r latent frames, and every temporal downsample pairs frames of one rank only.
A rank passes 2 frames of every layer on, so ranks between the first and the last need m_r >= 2 (2 frames at
the deepest layer).
With per-window GroupNorm each m_r (but the last rank's) must be a multiple of window/4.

Parameter gradients computed on each rank are that rank's share; summing them over the group
(:func:`all_reduce_grads`) gives the single-process gradient of the summed loss. A loss that averages over
frames must divide by the global frame count, not the local one: :class:`ClipShare` says which frames of the
clip a rank holds, and the VAE losses take it to compute each rank's share of every term.

Groups. :func:`new_context_parallel_group` splits the job into groups of consecutive ranks
([g * size, (g + 1) * size)), so the data-parallel rank of rank r is r // size.

Usage::

    with temporal_context_parallel(vae, group):
        x_local = split_frames_for_rank(x, rank, world)
        recon_local, posterior_local = vae(x_local)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn


class _FrontHalo(torch.autograd.Function):
    """Front padding for a causal conv under context parallelism.

    Forward: rank r sends its last ``num`` frames to rank r+1 and returns what rank r-1 sent (rank 0 returns
    ``num`` copies of its frame 0). Backward: the halo's gradient goes back to the rank that sent it and is added
    to the gradient of that rank's last frames.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, num: int, group) -> torch.Tensor:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        ctx.num, ctx.group, ctx.shape = num, group, x.shape
        requests = []
        if rank < world - 1:
            tail = x[:, :, -num:].contiguous()
            requests.append(dist.isend(tail, dist.get_global_rank(group, rank + 1), group=group))
        if rank > 0:
            halo = x.new_empty(x.shape[0], x.shape[1], num, x.shape[3], x.shape[4])
            requests.append(dist.irecv(halo, dist.get_global_rank(group, rank - 1), group=group))
        else:
            halo = x[:, :, :1].expand(-1, -1, num, -1, -1).contiguous()
        for request in requests:
            request.wait()
        return halo

    @staticmethod
    def backward(ctx, grad_halo: torch.Tensor):
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        num = ctx.num
        grad_x = grad_halo.new_zeros(ctx.shape)
        requests = []
        if rank > 0:
            previous = dist.get_global_rank(ctx.group, rank - 1)
            requests.append(dist.isend(grad_halo.contiguous(), previous, group=ctx.group))
        else:
            grad_x[:, :, :1] += grad_halo.sum(dim=2, keepdim=True)  # the replicated frame 0
        grad_tail = None
        if rank < world - 1:
            grad_tail = grad_halo.new_empty(grad_x[:, :, -num:].shape)
            requests.append(dist.irecv(grad_tail, dist.get_global_rank(ctx.group, rank + 1), group=ctx.group))
        for request in requests:
            request.wait()
        if grad_tail is not None:
            grad_x[:, :, -num:] += grad_tail
        return grad_x, None, None


def exchange_front_halo(x: torch.Tensor, num: int, group) -> torch.Tensor:
    """The ``num`` frames before this rank's ``x`` ([B, C, num, H, W]); differentiable. Called by every rank."""
    if x.shape[2] < num and dist.get_rank(group) < dist.get_world_size(group) - 1:
        raise ValueError(
            f"A context-parallel slice has {x.shape[2]} frames at a layer whose causal conv must pass {num} on to "
            "the next rank; give every rank but the last at least 2 latent frames (split with frame_split_sizes)."
        )
    return _FrontHalo.apply(x, num, group)


def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    """Differentiable sum over the group (the backward sums the gradients too)."""
    return dist_fn.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


def frame_split_sizes(
    num_frames: int, world: int, time_compression: int = 4, window: int | None = None
) -> list[int]:
    """Frames per rank for a clip of ``num_frames`` = 1 + time_compression * K (see the module docstring)."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}.")
    groups, rest = divmod(num_frames - 1, time_compression)
    if num_frames < 1 or rest != 0:
        raise ValueError(
            f"A context-parallel clip needs 1 + {time_compression}k frames, got {num_frames} "
            f"(e.g. {num_frames - rest} or {num_frames - rest + time_compression})."
        )
    unit = 1 if window is None else window // time_compression
    if window is not None and (window % time_compression != 0 or unit == 0):
        raise ValueError(f"GroupNorm window {window} must be a multiple of the time compression {time_compression}.")
    units, tail = divmod(groups, unit)  # whole windows, plus a partial window that goes to the last rank
    per_rank = [units // world + (r < units % world) for r in range(world)]
    sizes = [n * unit * time_compression for n in per_rank]
    sizes[-1] += tail * time_compression
    # every rank but the last passes k-1 = 2 frames of its deepest layer on, so it needs 2 of them there
    if any(size == 0 for size in sizes) or any(size < 2 * time_compression for size in sizes[1:-1]):
        raise ValueError(
            f"{num_frames} frames cannot be split over {world} ranks so that each rank gets at least "
            f"{unit * time_compression} frames (ranks between the first and the last: {2 * time_compression}); "
            "use fewer ranks or a longer clip."
        )
    sizes[0] += 1
    return sizes


def latent_split_sizes(frame_sizes: list[int], time_compression: int = 4) -> list[int]:
    """Latent frames per rank for a clip split by :func:`frame_split_sizes` (rank 0: 1 + m_0, rank r: m_r)."""
    return [1 + (frame_sizes[0] - 1) // time_compression] + [n // time_compression for n in frame_sizes[1:]]


def check_clip_split(num_frames: int, world: int, time_compression: int = 4, encoder_window: int | None = None,
                     decoder_window: int | None = None) -> list[int]:
    """Frames per rank for a clip the encoder AND the decoder can run context-parallel; one-sentence ValueError
    otherwise. The split follows the encoder's GroupNorm window; the latent slices it gives must end on the
    decoder's window too (rank boundaries may not cut a window)."""
    sizes = frame_split_sizes(num_frames, world, time_compression, encoder_window)
    if decoder_window is not None:
        latent = latent_split_sizes(sizes, time_compression)
        if any((n - (r == 0)) % decoder_window for r, n in enumerate(latent[:-1])):
            raise ValueError(
                f"Split over {world} ranks, {num_frames} frames give latent slices of {latent} frames, which do not "
                f"end on the decoder's GroupNorm window of {decoder_window} latent frames; use "
                f"decoder_norm_window = encoder_norm_window / {time_compression} (the released 8 and 2).")
    return sizes


def split_frames_for_rank(
    x: torch.Tensor, rank: int, world: int, time_compression: int = 4, window: int | None = None
) -> torch.Tensor:
    """This rank's consecutive slice of ``x`` [B, C, T, H, W] along T, following :func:`frame_split_sizes`.

    For latents pass ``time_compression=1`` (and the decoder's window).
    """
    sizes = frame_split_sizes(x.shape[2], world, time_compression, window)
    start = sum(sizes[:rank])
    return x[:, :, start : start + sizes[rank]]


def gather_frames(x_local: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's slice along T in rank order (not differentiable; for inspection and tests)."""
    world = dist.get_world_size(group)
    length = torch.tensor([x_local.shape[2]], dtype=torch.long, device=x_local.device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length, group=group)
    longest = int(max(lengths).item())
    padded = x_local.new_zeros(*x_local.shape[:2], longest, *x_local.shape[3:])
    padded[:, :, : x_local.shape[2]] = x_local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:, :, : int(n.item())] for part, n in zip(parts, lengths)], dim=2)


@dataclass(frozen=True)
class ClipShare:
    """The frames of every clip in a batch that this rank holds, and the group holding the rest.

    ``sizes`` are the frames per rank of the group in rank order (one entry: this rank holds whole clips, no
    group). A loss term averaged with the whole clip's denominators over this rank's frames is this rank's share:
    the shares sum over the group (:meth:`sum`) to the whole-clip value one process would compute.
    """

    sizes: tuple[int, ...]
    rank: int = 0
    group: Any = None

    @classmethod
    def whole(cls, clip_frames: int) -> "ClipShare":
        return cls((clip_frames,))

    @classmethod
    def for_rank(cls, clip_frames: int, group, time_compression: int = 4, encoder_window: int | None = None,
                 decoder_window: int | None = None) -> "ClipShare":
        """This rank's share of ``clip_frames``-frame clips under the context-parallel ``group``."""
        world = dist.get_world_size(group)
        sizes = check_clip_split(clip_frames, world, time_compression, encoder_window, decoder_window)
        return cls(tuple(sizes), dist.get_rank(group), group)

    @property
    def size(self) -> int:
        """Ranks sharing each clip."""
        return len(self.sizes)

    @property
    def start(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def frames(self) -> int:
        return self.sizes[self.rank]

    @property
    def clip_frames(self) -> int:
        return sum(self.sizes)

    def latent(self, time_compression: int = 4) -> "ClipShare":
        """The same share counted in latent frames."""
        return ClipShare(tuple(latent_split_sizes(list(self.sizes), time_compression)), self.rank, self.group)

    def local(self, t: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """This rank's frames of whole clips ``t`` (time on ``dim``)."""
        return t.narrow(dim, self.start, self.frames)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of the group's shares ``t`` (differentiable); ``t`` itself without a group."""
        return t if self.group is None else all_reduce_sum(t, self.group)

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        """The group's first rank's ``t``, in place on every rank (for random draws all ranks must share)."""
        if self.group is not None:
            dist.broadcast(t, dist.get_global_rank(self.group, 0), group=self.group)
        return t

    def gather(self, x_local: torch.Tensor) -> torch.Tensor:
        """Whole clips [B, C, T, H, W] from every rank's slice (differentiable: each rank's slice receives the sum
        of the gradients all ranks' copies of it get); ``x_local`` itself without a group."""
        if self.group is None:
            return x_local
        return _GatherFrames.apply(x_local, self.sizes, self.group)


class _GatherFrames(torch.autograd.Function):
    """Forward: every rank's slice, concatenated along T in rank order. Backward: the whole clip's gradient summed
    over the group (every rank may have used the clip), then this rank's frames of it. Written out because
    torch's differentiable all_gather emulates reduce-scatter with scatters whose source is a group rank, which
    is wrong on gloo for groups that do not start at rank 0."""

    @staticmethod
    def forward(ctx, x_local: torch.Tensor, sizes: tuple[int, ...], group) -> torch.Tensor:
        rank = dist.get_rank(group)
        ctx.sizes, ctx.group, ctx.rank = sizes, group, rank
        longest = max(sizes)
        padded = F.pad(x_local, (0, 0, 0, 0, 0, longest - x_local.shape[2])).contiguous()  # T padded to longest
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([part[:, :, :n] for part, n in zip(parts, sizes)], dim=2)

    @staticmethod
    def backward(ctx, grad_clip: torch.Tensor):
        grad_clip = grad_clip.clone(memory_format=torch.contiguous_format)  # the all-reduce works in place
        dist.all_reduce(grad_clip, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad_clip[:, :, start : start + ctx.sizes[ctx.rank]], None, None


def new_context_parallel_group(size: int):
    """Split the job's ranks into groups of ``size`` consecutive ranks and return this rank's group.

    Every rank must call this (each group is created collectively). The data-parallel rank is then rank // size
    and the data-parallel world world_size // size, which is how the frame-pack datamodule shards the data.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if size < 1 or world % size:
        raise ValueError(f"context_parallel_size={size} does not divide the world size {world}; launch a multiple "
                         f"of {size} ranks.")
    mine = None
    for first in range(0, world, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = group
    return mine


def all_reduce_grads(module: nn.Module, group) -> None:
    """Sum every parameter gradient over the context-parallel group (each rank holds its frames' share)."""
    for param in module.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=group)


@contextlib.contextmanager
def temporal_context_parallel(vae, group) -> Iterator[None]:
    """Run ``vae`` on this rank's slice of each clip inside the block (see the module docstring)."""
    vae.enable_context_parallel(group)
    try:
        yield
    finally:
        vae.disable_context_parallel()
