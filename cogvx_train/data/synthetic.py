"""A seeded, captioned toy dataset of real H.264 clips: coloured shapes moving in stated directions.

Each clip shows one shape (circle, square, triangle) of one colour crossing a plain or gradient background from
one side to the other, captioned e.g. "a red circle moves from left to right"; each still is a PNG captioned
e.g. "a blue square". Clips use a few aspect ratios, frame counts and frame rates so that buckets, padding and
fps resampling all get exercised. Everything is a function of the seed: the same seed gives byte-identical files
(x264 runs single-threaded). The manifest is built by the same code as for real data (``manifest.build_manifest``).

The default set (``ensure_default_dataset``, what runs with ``data.manifest=null`` train on) is DEFAULT_DATASET:
48 short clips, every (colour, direction, shape) of the four DEFAULT_COLORS exactly once, so a model that
learns from it can be asked for any colour moving in any direction (cogvx_train/eval/prompt_following.py checks
that it does).

Also here: index clips for tests (``write_index_clip``: frame i shows i in binary as horizontal black/white
bands, which survive H.264 and resizing; ``decode_frame_index`` reads it back) and ``ensure_default_dataset``,
which generates the default set once into a cache directory, safely when several ranks ask at once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (225, 35, 35),
    "green": (40, 190, 60),
    "blue": (45, 95, 235),
    "yellow": (240, 215, 40),
    "white": (245, 245, 245),
    "purple": (160, 60, 210),
    "orange": (250, 140, 25),
    "cyan": (40, 205, 215),
}
# direction -> unit step of the shape's centre across the frame (dx, dy), image y pointing down
DIRECTIONS = {
    "left to right": (1, 0),
    "right to left": (-1, 0),
    "top to bottom": (0, 1),
    "bottom to top": (0, -1),
}
# dark backgrounds so every shape colour stands out; a gradient runs between two of them
BACKGROUND_COLORS = ((12, 12, 12), (45, 45, 50), (18, 28, 70), (20, 60, 32), (70, 40, 20), (90, 90, 95))
DEFAULT_SIZES = ((160, 96), (128, 128), (96, 160))  # (width, height): landscape, square, portrait
DEFAULT_FRAME_COUNTS = (33, 41, 49)
DEFAULT_FPS = (8.0, 12.0, 16.0)
# Four colours far apart in RGB: a tiny VAE keeps them apart and a tiny DiT can be asked for each by name.
DEFAULT_COLORS = ("red", "green", "blue", "yellow")
DEFAULT_DATASET_NAME = "synthetic-v2"
# The default set: every (colour, direction, shape) once (4 x 4 x 3 = 48 clips); clips of 9-17 frames at 8-16
# fps last 0.5-2 s, so the demo's 9 frames at 8 fps show most of a crossing, sometimes padded by the last frame.
DEFAULT_DATASET = dict(num_videos=48, num_images=8, colors=DEFAULT_COLORS, frame_counts=(9, 13, 17))
INDEX_BITS = 10  # write_index_clip encodes frame indices 0..1023


@dataclass(frozen=True)
class ShapeSpec:
    """Everything that decides one clip's (or still's) pixels and caption."""

    shape: str
    color: str
    background: tuple[tuple[int, int, int], tuple[int, int, int], str]  # (colour a, colour b, plain|horizontal|vertical)
    width: int
    height: int
    direction: str | None = None  # None for stills
    num_frames: int = 1
    fps: float | None = None
    cross: float = 0.5  # position across the motion (0..1), or the still's x position
    along: float = 0.5  # the still's y position

    @property
    def caption(self) -> str:
        if self.direction is None:
            return f"a {self.color} {self.shape}"
        return f"a {self.color} {self.shape} moves from {self.direction}"


def _background(spec: ShapeSpec) -> np.ndarray:
    """float32 [H, W, 3] plain colour or linear gradient between two colours."""
    color_a, color_b, style = spec.background
    a, b = np.asarray(color_a, np.float32), np.asarray(color_b, np.float32)
    if style == "plain":
        return np.broadcast_to(a, (spec.height, spec.width, 3)).copy()
    n = spec.width if style == "horizontal" else spec.height
    ramp = np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None]
    line = a[None] * (1 - ramp) + b[None] * ramp  # [n, 3]
    if style == "horizontal":
        return np.broadcast_to(line[None], (spec.height, spec.width, 3)).copy()
    return np.broadcast_to(line[:, None], (spec.height, spec.width, 3)).copy()


def _shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "triangle":  # pointing up: apex (0, -r), base corners (+-r, 0.8 r)
        return (dy <= 0.8 * r) & (dy >= -r + 1.8 * np.abs(dx))
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}.")


def render(spec: ShapeSpec) -> np.ndarray:
    """uint8 [T, H, W, 3]: the shape moving from one edge to the other (or standing still)."""
    background = _background(spec)
    yy, xx = np.mgrid[0 : spec.height, 0 : spec.width].astype(np.float32) + 0.5
    r = 0.2 * min(spec.width, spec.height)
    color = np.asarray(COLORS[spec.color], np.float32)
    frames = np.empty((spec.num_frames, spec.height, spec.width, 3), np.uint8)
    for t in range(spec.num_frames):
        if spec.direction is None:
            cx = r + spec.cross * (spec.width - 2 * r)
            cy = r + spec.along * (spec.height - 2 * r)
        else:
            progress = t / max(1, spec.num_frames - 1)
            dx, dy = DIRECTIONS[spec.direction]
            if dx:
                cx = r + (progress if dx > 0 else 1 - progress) * (spec.width - 2 * r)
                cy = r + spec.cross * (spec.height - 2 * r)
            else:
                cy = r + (progress if dy > 0 else 1 - progress) * (spec.height - 2 * r)
                cx = r + spec.cross * (spec.width - 2 * r)
        image = background.copy()
        image[_shape_mask(spec.shape, xx, yy, cx, cy, r)] = color
        frames[t] = image.round().astype(np.uint8)
    return frames


def write_mp4(path: str | Path, frames: np.ndarray, fps: float, *, crf: int = 18, gop: int | None = None,
              preset: str = "veryfast") -> None:
    """uint8 [T, H, W, 3] -> H.264 yuv420p mp4 (even H and W). Single-threaded x264 so the bytes are repeatable."""
    import av
    from fractions import Fraction

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}.")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"H.264 with yuv420p needs even width and height, got {width}x{height}.")
    options = {"crf": str(crf), "preset": preset, "threads": "1"}
    if gop is not None:
        options["g"] = str(gop)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = options
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _pick_background(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int], str]:
    style = ("plain", "horizontal", "vertical")[int(rng.integers(3))]
    i, j = rng.choice(len(BACKGROUND_COLORS), size=2, replace=False)
    return BACKGROUND_COLORS[int(i)], BACKGROUND_COLORS[int(j)], style


def _check_colors(colors: Sequence[str] | None) -> tuple[str, ...]:
    colors = tuple(COLORS) if colors is None else tuple(colors)
    unknown = [c for c in colors if c not in COLORS]
    if not colors or unknown:
        raise ValueError(f"colors must be a non-empty list of {', '.join(COLORS)}; got {list(colors)}.")
    return colors


def clip_specs(num_videos: int, seed: int, size: Sequence[int] | None = None, frames: int | None = None,
               fps: float | None = None, colors: Sequence[str] | None = None,
               frame_counts: Sequence[int] = DEFAULT_FRAME_COUNTS) -> list[ShapeSpec]:
    """The seeded list of clip descriptions. Shape and direction cycle (every 12 clips cover all their pairs) and
    the colour shifts by one for each such block, so every 12 x len(colors) clips hold each (colour, direction,
    shape) exactly once and even 12 clips show every colour (of up to 12)."""
    colors = _check_colors(colors)
    pairs = len(SHAPES) * len(DIRECTIONS)
    specs = []
    for i in range(num_videos):
        rng = np.random.default_rng([seed, 0, i])
        width, height = size if size is not None else DEFAULT_SIZES[i % len(DEFAULT_SIZES)]
        specs.append(ShapeSpec(
            shape=SHAPES[i % len(SHAPES)],
            direction=list(DIRECTIONS)[(i // len(SHAPES)) % len(DIRECTIONS)],
            color=colors[(i % pairs + i // pairs) % len(colors)],
            background=_pick_background(rng),
            width=int(width), height=int(height),
            num_frames=int(frames) if frames is not None else int(rng.choice(frame_counts)),
            fps=float(fps) if fps is not None else float(rng.choice(DEFAULT_FPS)),
            cross=float(rng.uniform(0.2, 0.8)),
        ))
    return specs


def image_specs(num_images: int, seed: int, size: Sequence[int] | None = None,
                colors: Sequence[str] | None = None) -> list[ShapeSpec]:
    colors = _check_colors(colors)
    specs = []
    for i in range(num_images):
        rng = np.random.default_rng([seed, 1, i])
        width, height = size if size is not None else DEFAULT_SIZES[i % len(DEFAULT_SIZES)]
        specs.append(ShapeSpec(
            shape=SHAPES[i % len(SHAPES)],
            color=colors[int(rng.integers(len(colors)))],
            background=_pick_background(rng),
            width=int(width), height=int(height),
            cross=float(rng.uniform(0.0, 1.0)), along=float(rng.uniform(0.0, 1.0)),
        ))
    return specs


def _check_generation_args(num_videos, num_images, size, frames, fps) -> None:
    if num_videos < 0 or num_images < 0 or num_videos + num_images == 0:
        raise ValueError(f"ask for at least one clip or image (got {num_videos} videos, {num_images} images).")
    if size is not None:
        width, height = size
        if width < 16 or height < 16 or width % 2 or height % 2:
            raise ValueError(f"--size must be even and at least 16x16 (H.264 yuv420p), got {width}x{height}.")
    if frames is not None and frames < 2:
        raise ValueError(f"--frames must be >= 2 so the shape can move, got {frames}.")
    if fps is not None and not fps > 0:
        raise ValueError(f"--fps must be > 0, got {fps}.")


def generate_synthetic_dataset(
    out_dir: str | Path,
    *,
    num_videos: int = 24,
    num_images: int = 8,
    seed: int = 0,
    size: Sequence[int] | None = None,
    frames: int | None = None,
    fps: float | None = None,
    colors: Sequence[str] | None = None,
    frame_counts: Sequence[int] = DEFAULT_FRAME_COUNTS,
    workers: int = 0,
    progress: bool = False,
) -> Path:
    """Write clips (videos/clip_NNN.mp4), stills (images/image_NNN.png), sidecar captions and the manifest.

    ``size`` is (width, height) for every file (default: a mix of 160x96, 128x128 and 96x160); ``frames`` and
    ``fps`` fix the clip length and rate (default: drawn from ``frame_counts`` and 8/12/16 fps); ``colors``
    names the shape colours used (default: all of COLORS). Returns the manifest path ``out_dir/manifest.jsonl``.
    ``out_dir`` must be new or empty.
    """
    from PIL import Image

    from cogvx_train.data.manifest import build_manifest, read_manifest, write_manifest

    _check_generation_args(num_videos, num_images, size, frames, fps)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty; give a new or empty folder for the synthetic dataset.")
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    if not frame_counts or min(frame_counts) < 2:
        raise ValueError(f"frame_counts must be clip lengths of at least 2 frames, got {list(frame_counts)}.")
    for i, spec in enumerate(clip_specs(num_videos, seed, size, frames, fps, colors, frame_counts)):
        write_mp4(out_dir / "videos" / f"clip_{i:03d}.mp4", render(spec), spec.fps)
        (out_dir / "videos" / f"clip_{i:03d}.txt").write_text(spec.caption + "\n", encoding="utf-8")
    for i, spec in enumerate(image_specs(num_images, seed, size, colors)):
        Image.fromarray(render(spec)[0]).save(out_dir / "images" / f"image_{i:03d}.png")
        (out_dir / "images" / f"image_{i:03d}.txt").write_text(spec.caption + "\n", encoding="utf-8")
    manifest_path = out_dir / "manifest.jsonl"
    build_manifest(out_dir, manifest_path, workers=workers, progress=progress)
    manifest = read_manifest(manifest_path)
    manifest.header["synthetic"] = {"seed": seed, "num_videos": num_videos, "num_images": num_images,
                                    "size": list(size) if size is not None else None, "frames": frames, "fps": fps,
                                    "colors": list(_check_colors(colors)), "frame_counts": list(frame_counts)}
    write_manifest(manifest_path, manifest)
    return manifest_path


def default_cache_dir() -> Path:
    """$COGVX_CACHE, else ~/.cache/cogvx-train."""
    env = os.environ.get("COGVX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cogvx-train"


def ensure_default_dataset(cache_dir: str | Path | None = None) -> Path:
    """Manifest of the default synthetic set (DEFAULT_DATASET) in ``cache_dir/synthetic-v2`` (default cache:
    ``default_cache_dir()``), generated on first use.

    Several processes (ranks) may call this at once: a file lock makes one of them generate, and the set is built
    in a temporary folder and renamed into place, so nobody ever sees a half-written dataset (the rename alone
    keeps this safe where file locks do not work, e.g. some network file systems).
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / DEFAULT_DATASET_NAME
    manifest = final / "manifest.jsonl"
    if manifest.is_file():
        return manifest
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{DEFAULT_DATASET_NAME}.lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # no flock on this platform: the atomic rename below still prevents mixing
            pass
        if manifest.is_file():
            return manifest
        tmp = Path(tempfile.mkdtemp(prefix=f"{DEFAULT_DATASET_NAME}.tmp-", dir=root))
        try:
            generate_synthetic_dataset(tmp, **DEFAULT_DATASET)
            os.rename(tmp, final)
        except OSError:
            if not manifest.is_file():  # the rename failed and nobody else finished either
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


# -------------------------------------------------------------------------------------- index clips for tests


def index_frame(index: int, width: int, height: int) -> np.ndarray:
    """uint8 [H, W, 3] showing ``index`` in binary: band b (of INDEX_BITS horizontal bands, top first) is white
    when bit b is set. Horizontal bands survive a centre crop of columns and any resize."""
    if not 0 <= index < 2**INDEX_BITS:
        raise ValueError(f"index clips encode frames 0..{2**INDEX_BITS - 1}, got {index}.")
    frame = np.zeros((height, width, 3), np.uint8)
    for bit in range(INDEX_BITS):
        if (index >> bit) & 1:
            frame[bit * height // INDEX_BITS : (bit + 1) * height // INDEX_BITS] = 255
    return frame


def write_index_clip(path: str | Path, num_frames: int, fps: float, size: Sequence[int] = (64, 64),
                     gop: int = 8) -> None:
    """An mp4 whose frame i encodes i (see ``index_frame``); ``size`` is (width, height), height >= 2*INDEX_BITS.
    A short GOP (key frame every ``gop`` frames, plus B-frames) makes decoders seek for real."""
    width, height = int(size[0]), int(size[1])
    if height < 2 * INDEX_BITS:
        raise ValueError(f"index clips need a height of at least {2 * INDEX_BITS} px, got {height}.")
    frames = np.stack([index_frame(i, width, height) for i in range(num_frames)])
    write_mp4(path, frames, fps, crf=12, gop=gop)


def decode_frame_index(frame) -> int:
    """Read back the index of an index-clip frame: uint8 [H, W, C] as decoded, or float [C, H, W] in [-1, 1] as
    in a batch (numpy or torch). Each band is judged on its middle half, away from blurred edges."""
    array = frame.detach().cpu().numpy() if hasattr(frame, "detach") else np.asarray(frame)
    if array.dtype == np.uint8:
        gray = array.astype(np.float32).mean(axis=-1) / 127.5 - 1.0  # [H, W] in [-1, 1]
    elif array.ndim == 3:
        gray = array.astype(np.float32).mean(axis=0)
    else:
        raise ValueError(f"frame must be uint8 [H, W, C] or float [C, H, W], got {array.dtype} {array.shape}.")
    height = gray.shape[0]
    value = 0
    for bit in range(INDEX_BITS):
        top, bottom = bit * height / INDEX_BITS, (bit + 1) * height / INDEX_BITS
        quarter = (bottom - top) / 4
        band = gray[int(np.floor(top + quarter)) : int(np.ceil(bottom - quarter))]
        if band.mean() > 0.0:
            value |= 1 << bit
    return value

