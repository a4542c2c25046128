"""True-fps frame indices, decoding only the needed frames, cover resize + centre crop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cogvx_train.data.synthetic import decode_frame_index, write_index_clip
from cogvx_train.data.video_io import (
    center_crop_box,
    choose_start_index,
    cover_size,
    decode_size,
    max_start_index,
    read_frames,
    resize_cover_center_crop,
    sample_frame_indices,
)


def test_true_fps_is_not_an_integer_stride():
    sel = sample_frame_indices(300, 30.0, 8.0, 49, start_index=0)
    assert sel.indices.tolist() == [math.floor(i * 30 / 8) for i in range(49)]
    assert sel.indices[:6].tolist() == [0, 3, 7, 11, 15, 18]
    assert sel.num_real == 49 and sel.indices.dtype == np.int64


def test_start_time_and_start_index_agree():
    by_index = sample_frame_indices(300, 30.0, 8.0, 17, start_index=45)
    by_time = sample_frame_indices(300, 30.0, 8.0, 17, start_time=45 / 30)
    assert by_index.indices.tolist() == by_time.indices.tolist()
    assert by_index.indices.tolist() == [45 + math.floor(i * 3.75) for i in range(17)]
    # a start time between frames: t_i = 0.51 + i/8 -> floor(t_i * 24)
    sel = sample_frame_indices(200, 24.0, 8.0, 9, start_time=0.51)
    assert sel.indices.tolist() == [math.floor((0.51 + i / 8) * 24 + 1e-6) for i in range(9)]


def test_short_clip_is_padded_with_its_last_real_frame():
    sel = sample_frame_indices(20, 30.0, 8.0, 17, start_index=0)
    # 30 -> 8 fps offsets 0, 3, 7, 11, 15, 18 are inside a 20-frame clip, 22 is not
    assert sel.num_real == 6
    assert sel.indices.tolist() == [0, 3, 7, 11, 15, 18] + [18] * 11


def test_long_clip_is_truncated_and_native_rate_is_stride_one():
    sel = sample_frame_indices(1000, 30.0, 8.0, 9)
    assert len(sel.indices) == 9 and sel.indices[-1] == 30 and sel.num_real == 9
    assert sample_frame_indices(10, 25.0, None, 5, start_index=3).indices.tolist() == [3, 4, 5, 6, 7]
    # a target rate above the source rate repeats source frames
    assert sample_frame_indices(10, 8.0, 16.0, 5).indices.tolist() == [0, 0, 1, 1, 2]


def test_start_modes():
    n, sf, tf, t = 100, 30.0, 8.0, 17
    last = max_start_index(n, sf, tf, t)
    assert last == 100 - 1 - math.floor(16 * 3.75)
    assert choose_start_index(n, sf, tf, t, "start") == 0
    assert choose_start_index(n, sf, tf, t, "center") == last // 2
    draws = [choose_start_index(n, sf, tf, t, "random", np.random.default_rng(s)) for s in range(400)]
    assert min(draws) == 0 and max(draws) == last
    assert draws == [choose_start_index(n, sf, tf, t, "random", np.random.default_rng(s)) for s in range(400)]
    for start in (0, last):
        assert sample_frame_indices(n, sf, tf, t, start_index=start).num_real == t
    assert max_start_index(10, sf, tf, t) == 0  # too short: start at 0 and pad
    with pytest.raises(ValueError, match="needs an rng"):
        choose_start_index(n, sf, tf, t, "random")


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_source_frames=0), "num_source_frames"),
    (dict(source_fps=0), "source_fps"),
    (dict(target_fps=-1), "target_fps"),
    (dict(start_index=100), "past the end"),
    (dict(start_index=1, start_time=0.1), "not both"),
])
def test_sampling_errors(kwargs, match):
    args = dict(num_source_frames=100, source_fps=30.0, target_fps=8.0, num_frames=9) | kwargs
    with pytest.raises(ValueError, match=match):
        sample_frame_indices(**args)


def test_read_frames_decodes_exactly_the_requested_frames(tmp_path):
    path = tmp_path / "index.mp4"
    write_index_clip(path, 120, 30.0, (64, 48), gop=8)
    rng = np.random.default_rng(0)
    indices = rng.integers(0, 120, 20).tolist() + [119, 119, 0]
    frames = read_frames(path, indices)
    assert frames.shape == (23, 48, 64, 3) and frames.dtype == np.uint8
    assert [decode_frame_index(f) for f in frames] == indices
    small = read_frames(path, [5, 77, 118], size=(24, 32))
    assert small.shape == (3, 24, 32, 3)
    assert [decode_frame_index(f) for f in small] == [5, 77, 118]
    with pytest.raises(ValueError, match="120 frames but frame 120"):
        read_frames(path, [3, 120])


def test_read_frames_errors_and_images(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_frames(tmp_path / "missing.mp4", [0])
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        read_frames(tmp_path / "empty.mp4", [0])
    (tmp_path / "text.mp4").write_text("not a video\n" * 20)
    with pytest.raises(Exception):
        read_frames(tmp_path / "text.mp4", [0])
    image = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "still.png")
    frames = read_frames(tmp_path / "still.png", [0])
    assert frames.shape == (1, 30, 40, 3) and np.array_equal(frames[0], image)
    with pytest.raises(ValueError, match="image"):
        read_frames(tmp_path / "still.png", [1])


def test_cover_and_decode_sizes():
    assert cover_size((480, 720), (256, 256)) == (256, 384)
    assert cover_size((480, 720), (480, 720)) == (480, 720)
    assert decode_size((480, 720), (256, 256)) == (256, 384)
    assert decode_size((96, 160), (128, 128)) is None  # upscaling is left to the resize
    assert center_crop_box((100, 200), (64, 64)) == (0, 50, 100, 100)
    assert center_crop_box((200, 100), (64, 128)) == (75, 0, 50, 100)


def test_resize_cover_center_crop_values_and_layout():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 32, 48, 3), dtype=np.uint8)
    out = resize_cover_center_crop(frames, (32, 48))  # same size: only the pixel mapping
    assert out.shape == (3, 3, 32, 48) and out.dtype == torch.float32
    expected = (torch.from_numpy(frames).permute(3, 0, 1, 2).float() - 127.5) / 127.5
    assert torch.equal(out, expected)
    cropped = resize_cover_center_crop(frames, (32, 32))  # same height: a pure centre crop of columns 8..40
    assert torch.equal(cropped, expected[..., 8:40])


def test_resize_matches_resize_then_crop_reference():
    # a smooth image: the crop-first shortcut must match "resize to cover, then centre crop" closely
    h, w = 90, 200
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([xx * 255 / (w - 1), yy * 255 / (h - 1), (xx + yy) * 255 / (w + h - 2)], -1)
    frames = image.round().astype(np.uint8)[None]
    target = (48, 64)
    ours = resize_cover_center_crop(frames, target)
    ch, cw = cover_size((h, w), target)  # (48, 107)
    ref = F.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size=(ch, cw), mode="bilinear",
                        antialias=True, align_corners=False)
    top, left = (ch - target[0]) // 2, (cw - target[1]) // 2
    ref = ((ref[..., top : top + target[0], left : left + target[1]] - 127.5) / 127.5).permute(1, 0, 2, 3)
    assert ours.shape == (3, 1, 48, 64)
    assert (ours - ref).abs().max() < 6 / 127.5  # under a pixel of horizontal shift on a 1.3/px ramp
    assert -1.0 <= ours.min() and ours.max() <= 1.0
    # the left edge of the output shows the source around column (200 - 90*64/48) / 2 = 40, not column 0
    assert abs(float(ours[0, 0, :, 0].mean()) * 127.5 + 127.5 - 40 * 255 / 199) < 4


def test_resize_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        resize_cover_center_crop(np.zeros((2, 8, 8, 3), np.float32), (8, 8))


def test_widths_decord_cannot_return_are_worked_around(tmp_path):
    """decord 0.6 fails on RGB frames exactly 16, 24, 48 or 72 px wide; read_frames widens them by 2 px."""
    write_index_clip(tmp_path / "w48.mp4", 12, 24.0, (48, 40))
    frames = read_frames(tmp_path / "w48.mp4", [0, 7, 11])
    assert frames.shape == (3, 40, 50, 3)
    assert [decode_frame_index(f) for f in frames] == [0, 7, 11]
    write_index_clip(tmp_path / "w96.mp4", 12, 24.0, (96, 40))
    small = read_frames(tmp_path / "w96.mp4", [3, 9], size=(20, 48))  # asks for a bad width
    assert small.shape == (2, 20, 50, 3)
    assert [decode_frame_index(f) for f in small] == [3, 9]
    clip = resize_cover_center_crop(small, (16, 48))
    assert clip.shape == (3, 2, 16, 48)
