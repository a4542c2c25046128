"""Write clips to mp4 with PyAV, and put an original next to its reconstruction for eyeballing a VAE.

Accepts ``[3, T, H, W]`` (the project's channel-first layout) or ``[T, H, W, 3]``; float tensors are read in the
range ``value_range`` (default [-1, 1], the batch convention), uint8 tensors as they are.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import torch


def to_uint8_frames(video: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """``[3, T, H, W]`` or ``[T, H, W, 3]`` -> uint8 array ``[T, H, W, 3]``. A shape with 3 in both places is read
    channel-first, the project's layout."""
    if video.ndim != 4 or 3 not in (video.shape[0], video.shape[-1]):
        raise ValueError(f"a video to write must be [3, T, H, W] or [T, H, W, 3], got shape {tuple(video.shape)}.")
    frames = video.detach().cpu()
    if frames.shape[0] == 3:
        frames = frames.permute(1, 2, 3, 0)  # [3, T, H, W] -> [T, H, W, 3]
    if frames.dtype != torch.uint8:
        lo, hi = value_range
        frames = ((frames.float() - lo) / (hi - lo)).clamp(0.0, 1.0)
        frames = (frames * 255.0).round().to(torch.uint8)
    return frames.contiguous().numpy()


def side_by_side(original: torch.Tensor, reconstruction: torch.Tensor, gap: int = 2,
                 fill: float = 1.0) -> torch.Tensor:
    """``[3, T, H, W]`` pair -> ``[3, T, H, 2W + gap]`` with ``original | reconstruction``; the gap has value
    ``fill`` (white in [-1, 1]; uint8 clips always get 255)."""
    if original.shape != reconstruction.shape or original.ndim != 4 or original.shape[0] != 3:
        raise ValueError(f"side_by_side needs two [3, T, H, W] clips of one shape, got {tuple(original.shape)} and "
                         f"{tuple(reconstruction.shape)}.")
    c, t, h, _ = original.shape
    fill = 255 if original.dtype == torch.uint8 else fill
    divider = torch.full((c, t, h, gap), fill, dtype=original.dtype, device=original.device)
    return torch.cat([original, divider, reconstruction.to(original.dtype)], dim=-1)


def write_video(path: str | Path, video: torch.Tensor, fps: float = 8.0,
                value_range: tuple[float, float] = (-1.0, 1.0)) -> Path:
    """Encode ``video`` to an H.264 mp4 at ``path`` (parent folders created). Odd sizes are padded by one pixel
    because yuv420p needs even width and height."""
    frames = to_uint8_frames(video, value_range)
    t, h, w, _ = frames.shape
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=max(1, round(fps)))
        stream.width, stream.height = w + pad_w, h + pad_h
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}  # near-lossless: the video is for judging reconstructions
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush
            container.mux(packet)
    return path


def write_side_by_side(path: str | Path, original: torch.Tensor, reconstruction: torch.Tensor,
                       fps: float = 8.0, value_range: tuple[float, float] = (-1.0, 1.0)) -> Path:
    """One mp4 with ``original | reconstruction`` per ``[3, T, H, W]`` pair."""
    clip = side_by_side(original, reconstruction, fill=value_range[1])
    return write_video(path, clip, fps=fps, value_range=value_range)
