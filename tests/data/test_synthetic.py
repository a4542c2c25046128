"""The synthetic shapes dataset: seeded, decodable, captions that match the motion; index clips; the cache."""

from __future__ import annotations

import threading
from pathlib import Path

import decord
import numpy as np
import pytest

from cogvx_train.data.manifest import read_manifest
from cogvx_train.data.synthetic import (
    COLORS,
    DEFAULT_DATASET_NAME,
    decode_frame_index,
    ensure_default_dataset,
    generate_synthetic_dataset,
    write_index_clip,
)


def _media_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.glob("*/*"))
            if p.parent.name in ("videos", "images")}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    kwargs = dict(num_videos=4, num_images=2, size=(64, 48), frames=9)
    a = generate_synthetic_dataset(tmp_path / "a", seed=5, **kwargs)
    b = generate_synthetic_dataset(tmp_path / "b", seed=5, **kwargs)
    c = generate_synthetic_dataset(tmp_path / "c", seed=6, **kwargs)
    assert _media_bytes(a.parent) == _media_bytes(b.parent)
    rows = lambda m: [e.to_json() for e in read_manifest(m).entries]  # noqa: E731
    assert rows(a) == rows(b)
    assert _media_bytes(a.parent) != _media_bytes(c.parent)


def _shape_centre(frame: np.ndarray, rgb) -> tuple[float, float]:
    mask = np.abs(frame.astype(np.int32) - np.asarray(rgb)).sum(-1) < 60
    ys, xs = np.nonzero(mask)
    assert len(xs) > 20, "the shape is not visible"
    return float(xs.mean()), float(ys.mean())


def test_clips_decode_and_move_as_captioned(small_synthetic):
    manifest = read_manifest(small_synthetic)
    videos = [e for e in manifest.entries if e.kind == "video"]
    images = [e for e in manifest.entries if e.kind == "image"]
    assert len(videos) == 12 and len(images) == 6
    assert all(e.status == "ok" for e in manifest.entries)
    assert {(e.width, e.height) for e in videos} == {(160, 96), (128, 128), (96, 160)}
    assert {e.num_frames for e in videos} <= {33, 41, 49} and {e.fps for e in videos} <= {8.0, 12.0, 16.0}
    directions = set()
    for e in videos:
        words = e.caption.split()  # "a red circle moves from left to right"
        color, shape, direction = words[1], words[2], " ".join(words[5:])
        directions.add(direction)
        reader = decord.VideoReader(str(manifest.resolve(e)))
        assert len(reader) == e.num_frames
        first, last = reader.get_batch([0, len(reader) - 1]).asnumpy()
        (x0, y0), (x1, y1) = _shape_centre(first, COLORS[color]), _shape_centre(last, COLORS[color])
        dx, dy = x1 - x0, y1 - y0
        expected = {"left to right": dx > 20, "right to left": dx < -20, "top to bottom": dy > 20,
                    "bottom to top": dy < -20}[direction]
        assert expected, (e.path, e.caption, dx, dy)
        assert shape in ("circle", "square", "triangle")
    assert directions == {"left to right", "right to left", "top to bottom", "bottom to top"}
    assert all(len(e.caption.split()) == 3 for e in images)  # "a blue square"


def test_index_clip_round_trip(tmp_path):
    write_index_clip(tmp_path / "i.mp4", 70, 24.0, (64, 40))
    frames = decord.VideoReader(str(tmp_path / "i.mp4")).get_batch(list(range(70))).asnumpy()
    assert [decode_frame_index(f) for f in frames] == list(range(70))
    import torch

    as_batch = (torch.from_numpy(frames[37]).permute(2, 0, 1).float() - 127.5) / 127.5  # [C, H, W] in [-1, 1]
    assert decode_frame_index(as_batch) == 37
    with pytest.raises(ValueError, match="height"):
        write_index_clip(tmp_path / "j.mp4", 5, 24.0, (48, 10))


def test_generation_arguments(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        generate_synthetic_dataset(tmp_path / "full")
    with pytest.raises(ValueError, match="even"):
        generate_synthetic_dataset(tmp_path / "odd", size=(65, 48))
    with pytest.raises(ValueError, match="at least one"):
        generate_synthetic_dataset(tmp_path / "none", num_videos=0, num_images=0)


def test_default_dataset_is_generated_once_even_with_concurrent_callers(tmp_path, monkeypatch):
    calls = []
    import cogvx_train.data.synthetic as synthetic

    real = synthetic.generate_synthetic_dataset

    def small(out_dir, **kwargs):  # the default set is bigger; the locking is what is under test
        calls.append(out_dir)
        return real(out_dir, num_videos=3, num_images=1, size=(64, 48), frames=9)

    monkeypatch.setattr(synthetic, "generate_synthetic_dataset", small)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_default_dataset(tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [tmp_path / DEFAULT_DATASET_NAME / "manifest.jsonl"] * 3
    assert len(read_manifest(results[0]).indices("ok")) == 4
    # no temporary folder left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEFAULT_DATASET_NAME, f"{DEFAULT_DATASET_NAME}.lock"]
    monkeypatch.setenv("COGVX_CACHE", str(tmp_path))
    assert ensure_default_dataset() == results[0] and len(calls) == 1
