"""mp4 writing with PyAV: both layouts, value ranges, odd sizes, side-by-side comparison clips."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from cogvx_train.train.video_writer import side_by_side, to_uint8_frames, write_side_by_side, write_video


def smooth_clip(t: int = 5, h: int = 32, w: int = 48) -> torch.Tensor:
    """[3, T, H, W] in [-1, 1]: gentle gradients (compress well, so decoded values are close)."""
    ys = torch.linspace(-0.8, 0.8, h)[:, None].expand(h, w)
    xs = torch.linspace(-0.8, 0.8, w)[None, :].expand(h, w)
    frames = [torch.stack([ys, xs, (ys + xs) / 2 + 0.1 * k]) for k in range(t)]
    return torch.stack(frames, dim=1).clamp(-1, 1)


def read_frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_channel_first_float_round_trip(tmp_path):
    clip = smooth_clip()
    path = write_video(tmp_path / "a" / "clip.mp4", clip, fps=8)
    frames = read_frames(path)
    assert frames.shape == (5, 32, 48, 3)
    expected = to_uint8_frames(clip).astype(np.float32)
    assert np.abs(frames.astype(np.float32) - expected).mean() < 4.0  # lossy codec, near-lossless setting


def test_channel_last_uint8_and_odd_sizes(tmp_path):
    clip = to_uint8_frames(smooth_clip(t=4, h=31, w=45))  # [T, H, W, 3] uint8
    path = write_video(tmp_path / "odd.mp4", torch.from_numpy(clip))
    frames = read_frames(path)
    assert frames.shape == (4, 32, 46, 3)  # padded to even sizes for yuv420p


def test_ambiguous_shape_is_read_channel_first():
    clip = smooth_clip(t=4, h=8, w=3)  # [3, 4, 8, 3]: 3 in both places
    assert to_uint8_frames(clip).shape == (4, 8, 3, 3)


def test_to_uint8_maps_range_and_layouts_agree():
    clip = torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 3).expand(3, 2, 1, 3)  # [3, T, H, W]
    frames = to_uint8_frames(clip)
    assert frames.shape == (2, 1, 3, 3)
    assert frames[0, 0, :, 0].tolist() == [0, 128, 255]
    assert np.array_equal(to_uint8_frames(clip.permute(1, 2, 3, 0)), frames)
    with pytest.raises(ValueError, match=r"\[3, T, H, W\]"):
        to_uint8_frames(torch.zeros(2, 4, 4, 4))


def test_side_by_side(tmp_path):
    a, b = smooth_clip(), -smooth_clip()
    both = side_by_side(a, b, gap=2)
    assert both.shape == (3, 5, 32, 48 * 2 + 2)
    assert torch.equal(both[..., :48], a) and torch.equal(both[..., 50:], b)
    assert torch.all(both[..., 48:50] == 1.0)
    frames = read_frames(write_side_by_side(tmp_path / "sbs.mp4", a, b))
    assert frames.shape == (5, 32, 98, 3)
    with pytest.raises(ValueError, match="one shape"):
        side_by_side(a, b[:, :3])
