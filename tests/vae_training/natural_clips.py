"""Clips with natural-image statistics for generalisation checks (test_vae_generalises.py), without any download.

Each clip is a camera pan (with a slow zoom) over its own "dead leaves" scene: opaque discs of random colour whose
radii follow a power law, painted over each other until the canvas is covered. This classic model of natural
images (Matheron; Lee, Mumford and Huang 2001) has their 1/f^2 power spectrum, their scale invariance, and
their large flat regions bounded by sharp occluding edges. A separate disc crosses the view as a moving object.
Every clip draws its own scene, path and speed from its seed, so clips generated from one seed share no content
with those from another.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cogvx_train.data.synthetic import write_mp4


def dead_leaves(rng: np.random.Generator, size: int, r_min: float = 2.0, r_max: float | None = None) -> np.ndarray:
    """float32 [size, size, 3] in [0, 1]: discs with radius density ~ r^-3 painted front to back until covered."""
    r_max = r_max or size / 3
    image = np.zeros((size, size, 3), np.float32)
    covered = np.zeros((size, size), bool)
    yy, xx = np.mgrid[0:size, 0:size]
    base = rng.uniform(0.1, 0.9, size=3)  # scenes differ in overall colour, leaves vary around it
    image[:] = base
    while covered.mean() < 0.998:  # the last specks keep the base colour
        # inverse-CDF draw from p(r) ~ r^-3 on [r_min, r_max]
        u = rng.uniform()
        r = 1.0 / np.sqrt(1.0 / r_min**2 - u * (1.0 / r_min**2 - 1.0 / r_max**2))
        cy, cx = rng.uniform(0, size, size=2)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & ~covered  # front-to-back: only uncovered pixels
        image[disc] = np.clip(base + rng.normal(0, 0.25, size=3), 0, 1)
        covered |= disc
    return image


def pan_clip(rng: np.random.Generator, frames: int, out: int) -> np.ndarray:
    """uint8 [frames, out, out, 3]: a window panning and zooming over a scene while a disc crosses it."""
    speed = 1.5
    margin = int(np.ceil(speed * frames)) + 2
    field_size = out + 2 * margin
    field = dead_leaves(rng, field_size)
    start = np.full(2, float(margin))
    velocity = rng.uniform(-speed, speed, size=2)
    zoom = rng.uniform(-0.004, 0.004)
    object_colour = rng.uniform(0, 1, size=3).astype(np.float32)
    object_start, object_velocity = rng.uniform(0, out, size=2), rng.uniform(-2, 2, size=2)
    object_radius = rng.uniform(out / 10, out / 5)
    grid = np.arange(out, dtype=np.float32)
    clip = np.empty((frames, out, out, 3), np.uint8)
    for t in range(frames):
        scale = 1.0 + zoom * t
        ys = np.clip(start[0] + velocity[0] * t + grid * scale, 0, field_size - 1.001)
        xs = np.clip(start[1] + velocity[1] * t + grid * scale, 0, field_size - 1.001)
        y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
        wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]  # bilinear sampling between pixels
        frame = ((1 - wy) * (1 - wx) * field[y0][:, x0] + (1 - wy) * wx * field[y0][:, x0 + 1]
                 + wy * (1 - wx) * field[y0 + 1][:, x0] + wy * wx * field[y0 + 1][:, x0 + 1])
        oy, ox = object_start + object_velocity * t
        inside = np.clip(object_radius + 0.5 - np.hypot(grid[:, None] - oy, grid[None, :] - ox), 0, 1)[..., None]
        frame = frame * (1 - inside) + object_colour * inside  # anti-aliased edge
        clip[t] = np.clip(frame * 255 + 0.5, 0, 255).astype(np.uint8)
    return clip


def write_natural_clips(out_dir: str | Path, count: int, seed: int, frames: int = 25, size: int = 48,
                        fps: float = 8.0) -> Path:
    """``count`` clips (mp4 + sidecar caption) into ``out_dir``; returns the folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        write_mp4(out_dir / f"pan_{seed}_{i:03d}.mp4", pan_clip(rng, frames, size), fps)
        (out_dir / f"pan_{seed}_{i:03d}.txt").write_text("a camera pan over a cluttered scene\n", encoding="utf-8")
    return out_dir
