"""Manifest building: every file accounted for, frames counted by decoding, captions, filters, schema, summary."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cogvx_train.data.manifest import (
    build_manifest,
    format_summary,
    load_captions_file,
    read_manifest,
    summarize,
    summary_paths,
)
from cogvx_train.data.synthetic import write_mp4


def _clip(path: Path, frames: int = 24, size=(64, 48), fps: float = 12.0, faststart: bool = False) -> None:
    rng = np.random.default_rng(len(path.name))
    width, height = size
    video = np.repeat(rng.integers(0, 256, (1, height, width, 3), dtype=np.uint8), frames, axis=0)
    video[:, :, : width // 4] = np.arange(frames, dtype=np.uint8)[:, None, None, None] * 5
    write_mp4(path, video, fps)
    if faststart:  # rewrite with the index (moov) first, as web-ready files are
        import av

        with av.open(str(path)) as src, av.open(str(path) + ".fs.mp4", "w", options={"movflags": "+faststart"}) as dst:
            stream = dst.add_stream_from_template(src.streams.video[0])
            for packet in src.demux(src.streams.video[0]):
                if packet.dts is not None:
                    packet.stream = stream
                    dst.mux(packet)
        Path(str(path) + ".fs.mp4").replace(path)


@pytest.fixture()
def mixed_folder(tmp_path) -> tuple[Path, Path]:
    """Good and broken files of every kind, captions from sidecars and a CSV."""
    root = tmp_path / "data"
    (root / "videos").mkdir(parents=True)
    (root / "images").mkdir()
    _clip(root / "videos" / "good.mp4", frames=24, fps=12.0)
    (root / "videos" / "good.txt").write_text("a good clip\n")
    _clip(root / "videos" / "good2.mkv", frames=30, fps=15.0)
    _clip(root / "videos" / "clip3.mov", frames=20, fps=10.0, size=(80, 48))
    (root / "videos" / "zero.mp4").write_bytes(b"")
    (root / "videos" / "zero.txt").write_text("an empty file\n")
    _clip(root / "videos" / "cut.mp4", frames=40)
    data = (root / "videos" / "cut.mp4").read_bytes()
    (root / "videos" / "cut.mp4").write_bytes(data[: len(data) // 2])  # index (moov) at the end: lost
    (root / "videos" / "cut.txt").write_text("a truncated clip\n")
    _clip(root / "videos" / "cut_faststart.mp4", frames=40, faststart=True)
    data = (root / "videos" / "cut_faststart.mp4").read_bytes()
    (root / "videos" / "cut_faststart.mp4").write_bytes(data[: int(len(data) * 0.9)])  # frames lost, index kept
    (root / "videos" / "cut_faststart.txt").write_text("a truncated web clip\n")
    (root / "videos" / "renamed.mp4").write_text("this is a text file with a video name\n" * 10)
    (root / "videos" / "renamed.txt").write_text("not a video\n")
    _clip(root / "videos" / "nocap.mp4", frames=16)
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(root / "images" / "still.png")
    (root / "images" / "still.txt").write_text("a grey still\n")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (root / "images" / "corrupt.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "images" / "corrupt.txt").write_text("a broken jpeg\n")
    (root / "notes.md").write_text("# notes\n")
    (root / "orphan.txt").write_text("a caption without a file\n")
    captions = tmp_path / "captions.csv"
    with captions.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption"])
        writer.writerow(["videos/good2.mkv", "a   clip from the csv"])
        writer.writerow(["clip3.mov", "matched by file name"])
        writer.writerow(["videos/not_there.mp4", "a row without a file"])
    return root, captions


def _by_name(manifest):
    return {Path(e.path).name: e for e in manifest.entries}


def test_every_file_is_accounted_for(mixed_folder, tmp_path):
    root, captions = mixed_folder
    out = root / "manifest.jsonl"
    manifest = build_manifest(root, out, captions=captions, workers=2, progress=False)
    rows = _by_name(manifest)
    sidecars = {"good.txt", "zero.txt", "cut.txt", "cut_faststart.txt", "renamed.txt", "still.txt", "corrupt.txt"}
    all_files = {p.name for p in root.rglob("*") if p.is_file()} - {out.name, *(p.name for p in summary_paths(out))}
    assert set(rows) | sidecars == all_files and not set(rows) & sidecars
    assert manifest.header["sidecar_captions"] == len(sidecars)

    good = rows["good.mp4"]
    assert (good.status, good.kind, good.caption, good.caption_source) == ("ok", "video", "a good clip", "sidecar")
    assert (good.num_frames, good.fps, good.width, good.height, good.duration) == (24, 12.0, 64, 48, 2.0)
    assert rows["good2.mkv"].caption == "a clip from the csv" and rows["good2.mkv"].num_frames == 30
    assert rows["clip3.mov"].caption_source == "captions_file" and rows["clip3.mov"].width == 80
    assert rows["still.png"].status == "ok" and rows["still.png"].num_frames == 1
    assert (rows["still.png"].width, rows["still.png"].height) == (60, 40)

    expected_reasons = {
        "zero.mp4": "empty file",
        "cut.mp4": "cannot open",
        "cut_faststart.mp4": "cannot open",
        "renamed.mp4": "cannot open",
        "corrupt.jpg": "cannot open",
        "nocap.mp4": "no caption",
    }
    for name, category in expected_reasons.items():
        assert rows[name].status == "rejected", name
        assert rows[name].reason.split(":")[0] == category, (name, rows[name].reason)
    for name in ("notes.md", "orphan.txt"):
        assert rows[name].status == "ignored" and rows[name].reason.startswith("not media")
    assert manifest.header["captions_file_unmatched"] == 1

    # the file on disk is what was returned; paths are relative to the manifest's folder
    again = read_manifest(out)
    assert [e.to_json() for e in again.entries] == [e.to_json() for e in manifest.entries]
    assert again.resolve(again.entries[0]).is_file()
    assert rows["good.mp4"].path == "videos/good.mp4"


def test_decoded_frames_are_counted_not_metadata(tmp_path):
    """An mkv cut in the middle keeps no index: only the frames that decode are recorded."""
    root = tmp_path / "d"
    root.mkdir()
    _clip(root / "whole.mp4", frames=48, size=(64, 48))
    _clip(root / "cut.mkv", frames=48, size=(64, 48))
    data = (root / "cut.mkv").read_bytes()
    (root / "cut.mkv").write_bytes(data[: int(len(data) * 0.85)])
    for check in ("full", "fast"):
        manifest = build_manifest(root, tmp_path / f"m_{check}.jsonl", workers=0, check=check,
                                  allow_missing_captions=True, progress=False)
        rows = _by_name(manifest)
        assert rows["whole.mp4"].num_frames == 48
        cut = rows["cut.mkv"]
        assert cut.status == "ok" and 0 < cut.num_frames < 48
        import decord

        reader = decord.VideoReader(str(root / "cut.mkv"))
        assert reader.get_batch([cut.num_frames - 1]).shape[0] == 1  # the recorded last frame decodes


def test_filters(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    _clip(root / "ok.mp4", frames=36, size=(96, 64), fps=12.0)
    _clip(root / "short.mp4", frames=12, size=(96, 64), fps=12.0)
    _clip(root / "tiny.mp4", frames=36, size=(32, 16), fps=12.0)
    _clip(root / "wide.mp4", frames=36, size=(192, 48), fps=12.0)
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(root / "still.png")
    manifest = build_manifest(root, tmp_path / "m.jsonl", workers=0, min_duration=2.0, min_resolution=32,
                              max_aspect_ratio=2.5, allow_missing_captions=True, progress=False)
    rows = _by_name(manifest)
    assert rows["ok.mp4"].status == "ok" and rows["still.png"].status == "ok"  # stills skip min_duration
    assert rows["short.mp4"].reason.startswith("too short: 1.00 s < --min-duration 2")
    assert rows["tiny.mp4"].reason.startswith("too small: short side 16 px")
    assert rows["wide.mp4"].reason.startswith("too elongated: aspect ratio 4.00")
    summary = summarize(manifest)
    assert summary["reject_reasons"] == {"too short": 1, "too small": 1, "too elongated": 1}
    with pytest.raises(ValueError, match="max-aspect-ratio"):
        build_manifest(root, tmp_path / "m2.jsonl", workers=0, max_aspect_ratio=0.5, progress=False)


def test_captions_files(tmp_path):
    jsonl = tmp_path / "caps.jsonl"
    jsonl.write_text(json.dumps({"file": "a.mp4", "text": "from jsonl"}) + "\n" + json.dumps({"file": "b.mp4"}) + "\n")
    assert load_captions_file(jsonl) == {"a.mp4": "from jsonl"}
    bad = tmp_path / "caps.csv"
    bad.write_text("video_id,description\nx,y\n")
    with pytest.raises(ValueError, match="no file column"):
        load_captions_file(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_captions_file(tmp_path / "missing.csv")


def test_paths_outside_the_manifest_folder_are_absolute(tmp_path):
    root = tmp_path / "videos"
    root.mkdir()
    _clip(root / "a.mp4")
    (root / "a.txt").write_text("caption\n")
    manifest = build_manifest(root, tmp_path / "elsewhere" / "m.jsonl", workers=0, progress=False)
    assert manifest.entries[0].path == str(root / "a.mp4")
    again = read_manifest(tmp_path / "elsewhere" / "m.jsonl")
    assert again.resolve(again.entries[0]) == root / "a.mp4"


def test_summary_files(mixed_folder):
    root, captions = mixed_folder
    out = root / "m.jsonl"
    manifest = build_manifest(root, out, captions=captions, workers=0, progress=False)
    json_path, txt_path = summary_paths(out)
    assert json_path.name == "m.summary.json" and txt_path.name == "m.summary.txt"
    saved = json.loads(json_path.read_text())
    assert saved == json.loads(json.dumps(summarize(read_manifest(out))))
    assert saved["counts"]["ok"] == {"image": 1, "video": 3}
    assert saved["reject_reasons"]["cannot open"] == 4
    assert saved["duration_histogram"]["1-2 s"] == 0 and saved["duration_histogram"]["2-5 s"] == 3
    text = txt_path.read_text()
    assert "cannot open" in text and "rejected: 6" in text and text == format_summary(saved)
    assert manifest.header["counts"] == {"ok": 4, "rejected": 6, "ignored": 2}


def test_read_manifest_rejects_what_it_cannot_read(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_manifest(tmp_path / "none.jsonl")
    (tmp_path / "plain.jsonl").write_text('{"path": "a.mp4"}\n')
    with pytest.raises(ValueError, match="not a cogvx manifest"):
        read_manifest(tmp_path / "plain.jsonl")
    (tmp_path / "future.jsonl").write_text('{"schema": "cogvx-manifest", "version": 2}\n')
    with pytest.raises(ValueError, match="version 2"):
        read_manifest(tmp_path / "future.jsonl")
    (tmp_path / "badrow.jsonl").write_text('{"schema": "cogvx-manifest", "version": 1}\n{"path": "a.mp4"}\n')
    with pytest.raises(ValueError, match="lacks the field"):
        read_manifest(tmp_path / "badrow.jsonl")


def test_a_second_read_of_an_unchanged_manifest_is_not_parsed_again(tmp_path, monkeypatch):
    """The config checks and the datamodule both read the manifest: one parse, while the file stays the same."""
    import cogvx_train.data.manifest as manifest_module

    path = tmp_path / "m.jsonl"
    row = {"path": "a.mp4", "kind": "video", "status": "ok", "caption": "a red circle"}
    path.write_text(json.dumps({"schema": "cogvx-manifest", "version": 1, "counts": {"ok": 1}}) + "\n"
                    + json.dumps(row) + "\n")
    parses = []
    real = manifest_module._parse_manifest
    monkeypatch.setattr(manifest_module, "_parse_manifest", lambda p: parses.append(p) or real(p))
    first = read_manifest(path)
    first.header["counts"]["ok"] = 99  # a caller's edit (cogvx-data synthetic adds to the header) stays its own
    first.entries.append(first.entries[0])
    second = read_manifest(path)
    assert len(parses) == 1
    assert second.header["counts"] == {"ok": 1} and [e.path for e in second.entries] == ["a.mp4"]
    # a rewritten file is read again
    path.write_text(path.read_text() + json.dumps({**row, "path": "b.mp4"}) + "\n")
    assert [e.path for e in read_manifest(path).entries] == ["a.mp4", "b.mp4"] and len(parses) == 2


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        build_manifest(tmp_path / "nope", tmp_path / "m.jsonl")
    with pytest.raises(ValueError, match=r"\.jsonl"):
        build_manifest(tmp_path, tmp_path / "m.json")
