"""Prompt following on the synthetic shapes: does a sampled clip show the COLOUR and the DIRECTION its prompt names?

A generated clip is read in pixels, the way a person would check it:

    background  bg_t(x, y) = c + a x + b y per channel, fitted per frame by least squares, refitted on the pixels
                that fit (the shape is the outlier); the synthetic backgrounds are plain or linear gradients
    shape       weight w_t(x, y) = max(0, d - d_max / 2) with d = |frame - bg| (RGB distance): the pixels that
                stand out most from the background in that frame
    colour      the palette entry whose direction from the background is closest (cosine) to the shape's mean
                colour minus the background under it: a blurred shape (shape mixed with background) keeps its hue
    direction   centroid (x_t, y_t) of w_t per frame; least-squares slope of each over time (frames with a
                visible shape only); the larger axis and its sign give one of the four DIRECTIONS

Chance is 1 / (number of palette colours) for colour and 1/4 for direction. The readers take float clips
[3, T, H, W] in [-1, 1] (what `cogvx_train.sampling.sample_videos` returns) or uint8 [T, H, W, 3].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from cogvx_train.data.synthetic import COLORS, DIRECTIONS

MIN_CONTRAST = 0.15  # a frame whose strongest pixel is closer than this to the background (RGB distance in [0, 1]
# units, max sqrt(3)) shows no shape
NOTHING = "none"  # colour and direction of a clip in which no shape stands out


@dataclass(frozen=True)
class ClipReading:
    """What one clip shows: its shape's colour (a palette name) and direction (a DIRECTIONS key); NOTHING for both
    when no frame shows a shape."""

    color: str
    direction: str
    shape_rgb: tuple[float, float, float]  # mean colour of the shape, [0, 1]
    velocity: tuple[float, float]  # centroid motion in frame widths / heights per clip length (x right, y down)
    visible_frames: int


@dataclass
class PromptFollowing:
    """Accuracies over a set of (prompt, clip) pairs; None where no prompt names a colour / direction."""

    color_accuracy: float | None
    direction_accuracy: float | None
    readings: list[ClipReading] = field(default_factory=list)
    wanted: list[tuple[str | None, str | None]] = field(default_factory=list)

    def summary(self) -> str:
        def pct(v):
            return "n/a" if v is None else f"{100 * v:.0f}%"

        return f"colour {pct(self.color_accuracy)}, direction {pct(self.direction_accuracy)} of {len(self.readings)}"


def parse_prompt(prompt: str, palette: Sequence[str] = tuple(COLORS)) -> tuple[str | None, str | None]:
    """(colour, direction) named by a prompt such as "a red circle moves from left to right"; None when absent."""
    words = prompt.lower().replace(",", " ").split()
    color = next((w for w in words if w in palette), None)
    text = " ".join(words)
    direction = next((d for d in DIRECTIONS if f"from {d}" in text), None)
    return color, direction


def _as_frames(video) -> np.ndarray:
    """float64 [T, H, W, 3] in [0, 1] from a float [3, T, H, W] clip in [-1, 1] or a uint8 [T, H, W, 3] one."""
    array = video.detach().float().cpu().numpy() if hasattr(video, "detach") else np.asarray(video)
    if array.dtype == np.uint8 and array.ndim == 4 and array.shape[-1] == 3:
        return array.astype(np.float64) / 255.0
    if array.ndim == 4 and array.shape[0] == 3:
        return np.clip((np.moveaxis(array.astype(np.float64), 0, -1) + 1.0) / 2.0, 0.0, 1.0)
    raise ValueError(f"a clip must be float [3, T, H, W] in [-1, 1] or uint8 [T, H, W, 3], got {array.dtype} "
                     f"{array.shape}.")


def fit_background(frame: np.ndarray, iterations: int = 2) -> np.ndarray:
    """[H, W, 3] plane c + a x + b y per channel fitted to `frame` [H, W, 3], ignoring outliers (the shape)."""
    height, width = frame.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    design = np.stack([np.ones(height * width), xx.ravel() / width, yy.ravel() / height], 1)  # [HW, 3]
    pixels = frame.reshape(-1, 3)
    keep = np.ones(len(pixels), dtype=bool)
    for _ in range(iterations + 1):
        coef, *_ = np.linalg.lstsq(design[keep], pixels[keep], rcond=None)  # [3 terms, 3 channels]
        residual = np.linalg.norm(pixels - design @ coef, axis=1)
        keep = residual <= max(np.median(residual) * 3.0, 1e-3)
    return (design @ coef).reshape(height, width, 3)


def read_clip(video, palette: Mapping[str, Sequence[int]] | None = None) -> ClipReading:
    """Colour and direction of the moving shape in one clip (see the module docstring)."""
    palette = dict(COLORS if palette is None else palette)
    if not palette:
        raise ValueError("the palette is empty; give colour names with their RGB values, e.g. synthetic.COLORS.")
    frames = _as_frames(video)
    num_frames, height, width = frames.shape[:3]
    if num_frames < 2:
        raise ValueError(f"a direction needs at least 2 frames, got {num_frames}.")
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    shape_sum, bg_sum, mass = np.zeros(3), np.zeros(3), 0.0
    times, cx, cy = [], [], []
    for t, frame in enumerate(frames):
        background = fit_background(frame)
        distance = np.linalg.norm(frame - background, axis=-1)  # [H, W]
        peak = float(distance.max())
        if peak < MIN_CONTRAST:
            continue
        weight = np.maximum(distance - peak / 2, 0.0)
        total = float(weight.sum())
        shape_sum += (weight[..., None] * frame).sum((0, 1))
        bg_sum += (weight[..., None] * background).sum((0, 1))
        mass += total
        times.append(t)
        cx.append(float((weight * xx).sum() / total) / width)
        cy.append(float((weight * yy).sum() / total) / height)
    if mass == 0.0:  # nothing stands out: neither a colour nor a direction, a miss for any prompt
        return ClipReading(NOTHING, NOTHING, (0.0, 0.0, 0.0), (0.0, 0.0), 0)
    shape_rgb, bg_rgb = shape_sum / mass, bg_sum / mass
    contrast = shape_rgb - bg_rgb

    def cosine(rgb) -> float:
        target = np.asarray(rgb, np.float64) / 255.0 - bg_rgb
        return float(contrast @ target / (np.linalg.norm(contrast) * np.linalg.norm(target) + 1e-12))

    color = max(palette, key=lambda name: cosine(palette[name]))
    if len(times) >= 2:  # slope per frame, times the clip length: displacement over the whole clip
        vx = float(np.polyfit(times, cx, 1)[0]) * (num_frames - 1)
        vy = float(np.polyfit(times, cy, 1)[0]) * (num_frames - 1)
    else:
        vx = vy = 0.0
    if abs(vx) >= abs(vy):
        step = (1 if vx >= 0 else -1, 0)
    else:
        step = (0, 1 if vy >= 0 else -1)
    direction = next(d for d, unit in DIRECTIONS.items() if tuple(unit) == step)
    return ClipReading(color, direction, tuple(float(v) for v in shape_rgb), (vx, vy), len(times))


def prompt_following(videos, prompts: Sequence[str], palette: Mapping[str, Sequence[int]] | None = None
                     ) -> PromptFollowing:
    """Score clips against their prompts: videos [N, 3, T, H, W] in [-1, 1] (or a list of clips), one prompt each.

    Colour accuracy counts the prompts that name a palette colour, direction accuracy those that name a direction.
    """
    palette = dict(COLORS if palette is None else palette)
    clips = list(videos)
    if len(clips) != len(prompts):
        raise ValueError(f"{len(clips)} clips but {len(prompts)} prompts; give one prompt per clip.")
    readings = [read_clip(clip, palette) for clip in clips]
    wanted = [parse_prompt(p, tuple(palette)) for p in prompts]
    colors = [r.color == c for r, (c, _) in zip(readings, wanted) if c is not None]
    directions = [r.direction == d for r, (_, d) in zip(readings, wanted) if d is not None]
    return PromptFollowing(float(np.mean(colors)) if colors else None,
                           float(np.mean(directions)) if directions else None, readings, wanted)


def grid_prompts(colors: Sequence[str], shape: str = "circle") -> list[str]:
    """One prompt per (colour, direction): "a red circle moves from left to right", ... (len(colors) x 4)."""
    return [f"a {color} {shape} moves from {direction}" for color in colors for direction in DIRECTIONS]
