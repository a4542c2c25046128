"""Reading frames for the frame pack: true-fps frame indices, decoding only those frames, cover resize + centre crop.

Three steps turn a manifest row into a training clip (CogVideoX §5):

1. ``sample_frame_indices`` picks source frames at a *true* target frame rate: output frame ``i`` shows the
   source at time ``t_i = start + i / target_fps``, i.e. source index ``floor(t_i * source_fps + 1e-6)``. This is
   not an integer stride: 30 fps sampled at 8 fps gives offsets 0, 3, 7, 11, 15, 18, ... (``floor(i * 3.75)``).
   A clip too short for ``num_frames`` is padded by repeating its last sampled (real) frame and ``num_real``
   says how many frames are real; a longer clip is truncated to ``num_frames``.
2. ``read_frames`` decodes only those indices with decord (``get_batch`` seeks to the nearest key frame), and can
   let FFmpeg scale while converting to RGB so a 1080p source never exists as full-size RGB in memory.
3. ``resize_cover_center_crop`` scales so the frame covers the target size (aspect kept), centre-crops, and maps
   pixels to ``(x - 127.5) / 127.5``.

decord and PIL are imported inside the functions that need them, so importing this module is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
START_MODES = ("random", "start", "center")

# decord 0.6 returns garbage shapes (and get_batch raises "The size must exactly match") for RGB frames exactly
# this many pixels wide (found by scanning widths 2..2048); every wider frame is fine.
_DECORD_BAD_WIDTHS = frozenset({2, 3, 4, 6, 8, 12, 16, 24, 48, 72})

# Guards floor() against t * fps landing a hair below an integer (e.g. 2.9999999 for frame 3).
_FLOOR_EPS = 1e-6


def media_kind(path: str | Path) -> str | None:
    """'video' or 'image' from the file extension, None for anything else."""
    suffix = Path(path).suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    return None


@dataclass(frozen=True)
class FrameSelection:
    """Source frame index of every output frame; the first ``num_real`` are real, the rest repeat the last real."""

    indices: np.ndarray  # int64 [num_frames]
    num_real: int
    start_index: int


def _check_sampling_args(num_source_frames: int, source_fps: float, target_fps: float | None, num_frames: int):
    if num_source_frames < 1:
        raise ValueError(f"num_source_frames must be >= 1, got {num_source_frames}.")
    if not source_fps > 0:
        raise ValueError(f"source_fps must be > 0, got {source_fps}.")
    if target_fps is not None and not target_fps > 0:
        raise ValueError(f"target_fps must be > 0 (or None for the source rate), got {target_fps}.")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}.")


def _frame_offsets(source_fps: float, target_fps: float | None, num_frames: int) -> np.ndarray:
    """Source-frame offsets from the start frame: floor(i * source_fps / target_fps + eps)."""
    steps = np.arange(num_frames, dtype=np.float64)
    if target_fps is None:
        return steps.astype(np.int64)
    return np.floor(steps * (float(source_fps) / float(target_fps)) + _FLOOR_EPS).astype(np.int64)


def max_start_index(num_source_frames: int, source_fps: float, target_fps: float | None, num_frames: int) -> int:
    """Latest start frame from which all ``num_frames`` samples stay inside the clip (0 if the clip is too short)."""
    _check_sampling_args(num_source_frames, source_fps, target_fps, num_frames)
    span = int(_frame_offsets(source_fps, target_fps, num_frames)[-1])
    return max(0, num_source_frames - 1 - span)


def choose_start_index(
    num_source_frames: int,
    source_fps: float,
    target_fps: float | None,
    num_frames: int,
    mode: str,
    rng: np.random.Generator | None = None,
) -> int:
    """Start frame for a clip: 'random' (uniform over all valid starts, training), 'start' (frame 0) or 'center'
    (the window sits in the middle of the clip: validation uses it because openings are often static titles)."""
    last = max_start_index(num_source_frames, source_fps, target_fps, num_frames)
    if mode == "start":
        return 0
    if mode == "center":
        return last // 2
    if mode == "random":
        if rng is None:
            raise ValueError("start mode 'random' needs an rng (np.random.Generator) so the draw is reproducible.")
        return int(rng.integers(0, last + 1))
    raise ValueError(f"start mode must be one of {START_MODES}, got {mode!r}.")


def sample_frame_indices(
    num_source_frames: int,
    source_fps: float,
    target_fps: float | None,
    num_frames: int,
    start_time: float | None = None,
    start_index: int | None = None,
) -> FrameSelection:
    """Source frames for ``num_frames`` output frames at a true ``target_fps`` (None: the source rate).

    Give the start as ``start_index`` (a source frame) or ``start_time`` (seconds); neither means frame 0.
    Output frame i shows source frame ``floor((start + i / target_fps) * source_fps + 1e-6)``. Frames past the
    end of the clip are replaced by the last real one; ``num_real`` counts the real frames.
    """
    _check_sampling_args(num_source_frames, source_fps, target_fps, num_frames)
    if start_time is not None and start_index is not None:
        raise ValueError("give start_time or start_index, not both.")
    if start_time is not None:
        if start_time < 0:
            raise ValueError(f"start_time must be >= 0 seconds, got {start_time}.")
        step = 1.0 / (target_fps if target_fps is not None else source_fps)
        times = start_time + np.arange(num_frames, dtype=np.float64) * step
        indices = np.floor(times * float(source_fps) + _FLOOR_EPS).astype(np.int64)
        first = int(indices[0])
    else:
        first = 0 if start_index is None else int(start_index)
        if first < 0:
            raise ValueError(f"start_index must be >= 0, got {first}.")
        indices = first + _frame_offsets(source_fps, target_fps, num_frames)
    if first >= num_source_frames:
        raise ValueError(f"the start (frame {first}) is past the end of a {num_source_frames}-frame clip.")
    num_real = int(np.searchsorted(indices, num_source_frames, side="left"))  # indices never decrease
    indices[num_real:] = indices[num_real - 1]
    return FrameSelection(indices=indices, num_real=num_real, start_index=first)


def cover_size(src_hw: Sequence[int], target_hw: Sequence[int]) -> tuple[int, int]:
    """Smallest (h, w) with the source aspect ratio that covers ``target_hw`` (never below the target)."""
    src_h, src_w = int(src_hw[0]), int(src_hw[1])
    th, tw = int(target_hw[0]), int(target_hw[1])
    scale = max(th / src_h, tw / src_w)
    return max(th, round(src_h * scale)), max(tw, round(src_w * scale))


def decode_size(src_hw: Sequence[int] | None, target_hw: Sequence[int] | None) -> tuple[int, int] | None:
    """Size to ask the decoder for: the cover size when that shrinks the source, else None (native size).

    Scaling inside FFmpeg (while converting YUV to RGB) is cheaper than converting at full size and resizing
    afterwards; upscaling is left to ``resize_cover_center_crop``.
    """
    if src_hw is None or target_hw is None:
        return None
    h, w = cover_size(src_hw, target_hw)
    if h >= int(src_hw[0]) or w >= int(src_hw[1]):
        return None
    return h, w


def read_image(path: str | Path, draft_hw: Sequence[int] | None = None) -> np.ndarray:
    """An image as a 1-frame video: uint8 [1, H, W, 3], EXIF orientation applied.

    With ``draft_hw`` a JPEG may be decoded at a reduced scale (never below ``draft_hw``) via PIL's draft mode.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        if draft_hw is not None and img.format == "JPEG":
            img.draft("RGB", (int(draft_hw[1]), int(draft_hw[0])))
        img = ImageOps.exif_transpose(img)
        rgb = np.array(img.convert("RGB"))  # a writable copy (torch refuses read-only buffers)
    return rgb[None]


def read_frames(
    path: str | Path,
    indices: Sequence[int] | np.ndarray,
    *,
    num_threads: int = 1,
    size: Sequence[int] | None = None,
) -> np.ndarray:
    """Decode only the frames at ``indices`` (repeats allowed, any order): uint8 [T, H, W, 3].

    ``size`` = (h, w) asks FFmpeg to scale while converting (see ``decode_size``). Images are 1-frame videos:
    every index must be 0. Raises on a missing, empty or undecodable file and on an index past the frames
    that decode, so the caller can replace the sample.
    """
    path = str(path)
    index_list = [int(i) for i in np.asarray(indices).reshape(-1)]
    if not index_list:
        raise ValueError("read_frames needs at least one frame index.")
    if min(index_list) < 0:
        raise ValueError(f"frame indices must be >= 0, got {min(index_list)}.")
    kind = media_kind(path)
    if kind == "image":
        if max(index_list) != 0:
            raise ValueError(f"{path} is an image (1 frame) but frame {max(index_list)} was asked for.")
        frame = read_image(path, draft_hw=size)
        return np.repeat(frame, len(index_list), axis=0) if len(index_list) > 1 else frame
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    if Path(path).stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes).")
    import decord

    height, width = (int(size[0]), int(size[1])) if size is not None else (-1, -1)
    if width in _DECORD_BAD_WIDTHS:
        width += 2  # still covers the target; the crop that follows removes the extra columns
    reader = decord.VideoReader(path, ctx=decord.cpu(0), width=width, height=height, num_threads=num_threads)
    available = len(reader)
    if max(index_list) >= available:
        raise ValueError(f"{path} has {available} frames but frame {max(index_list)} was asked for.")
    try:
        frames = reader.get_batch(index_list).asnumpy()
    except decord.DECORDError as exc:
        if width != -1 or "must exactly match" not in str(exc):
            raise
        native_h, native_w = reader[0].shape[:2]  # a tiny source of a bad width: let FFmpeg widen it by 2 px
        reader = decord.VideoReader(path, ctx=decord.cpu(0), width=native_w + 2, height=native_h,
                                    num_threads=num_threads)
        frames = reader.get_batch(index_list).asnumpy()
    if frames.shape[0] != len(index_list):
        raise ValueError(f"{path}: decoded {frames.shape[0]} frames, expected {len(index_list)}.")
    return frames


def center_crop_box(src_hw: Sequence[int], target_hw: Sequence[int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the centred source region with the target's aspect ratio.

    Cropping this region and resizing it to the target equals resizing to cover and then centre-cropping, up to
    rounding the region to whole pixels; cropping first means the resize touches fewer pixels.
    """
    src_h, src_w = int(src_hw[0]), int(src_hw[1])
    th, tw = int(target_hw[0]), int(target_hw[1])
    if src_h * tw > src_w * th:  # source is taller than the target: crop rows
        crop_h, crop_w = min(src_h, max(1, round(src_w * th / tw))), src_w
    else:  # source is wider (or equal): crop columns
        crop_h, crop_w = src_h, min(src_w, max(1, round(src_h * tw / th)))
    return (src_h - crop_h) // 2, (src_w - crop_w) // 2, crop_h, crop_w


def to_unit_range(frames):
    """uint8 [T, C, H, W] (numpy or torch, any strides) -> contiguous float32 [C, T, H, W], (x - 127.5) / 127.5.

    Frame by frame, so the float data is still in cache for the subtract and divide, into a numpy-allocated buffer
    (numpy asks the kernel for huge pages, which makes first-touch page faults on ~200 MB per 49x480x720 clip
    several times cheaper than torch's allocator). Measured ~1.7x faster than one whole-clip permuted copy.
    """
    import torch

    x = torch.as_tensor(frames)
    num_t, channels, height, width = x.shape
    out = torch.from_numpy(np.empty((channels, num_t, height, width), dtype=np.float32))
    for t in range(num_t):
        plane = out[:, t]  # [C, H, W]
        plane.copy_(x[t])
        plane.sub_(127.5).div_(127.5)
    return out


def resize_cover_center_crop(frames, size: Sequence[int]):
    """uint8 frames [T, H, W, C] (numpy or torch) -> float32 [C, T, h, w] in [-1, 1].

    Resize keeping the aspect ratio so the frame covers (h, w), centre-crop, then (x - 127.5) / 127.5. The resize
    runs on uint8 (bilinear with antialias, channels-last, which is several times faster than on float) and the
    float conversion happens once, on the small result, fused with the layout change.
    """
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(frames)
    if x.ndim != 4 or x.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, C], got {x.dtype} {tuple(x.shape)}.")
    th, tw = int(size[0]), int(size[1])
    if th < 1 or tw < 1:
        raise ValueError(f"target size must be positive (h, w), got {tuple(size)}.")
    top, left, crop_h, crop_w = center_crop_box(x.shape[1:3], (th, tw))
    x = x[:, top : top + crop_h, left : left + crop_w]  # [T, crop_h, crop_w, C]
    x = x.permute(0, 3, 1, 2)  # [T, C, crop_h, crop_w], channels-last in memory
    if (crop_h, crop_w) != (th, tw):
        x = F.interpolate(x, size=(th, tw), mode="bilinear", antialias=True, align_corners=False)
    return to_unit_range(x)


def load_clip(
    path: str | Path,
    indices: Sequence[int] | np.ndarray,
    target_hw: Sequence[int],
    *,
    src_hw: Sequence[int] | None = None,
    num_threads: int = 1,
    reduced_decode: bool = True,
):
    """Decode ``indices`` of ``path`` and return float32 [3, T, h, w] in [-1, 1] at ``target_hw``.

    ``src_hw`` (from the manifest) lets the decoder scale down before RGB conversion; without it the file is
    decoded at its native size.
    """
    size = decode_size(src_hw, target_hw) if reduced_decode else None
    frames = read_frames(path, indices, num_threads=num_threads, size=size)
    return resize_cover_center_crop(frames, target_hw)

