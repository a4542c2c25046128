"""The `cogvx-data` console script, run as users run it: in a subprocess, outside the repository."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cogvx_train.cli.data import SUBCOMMANDS, build_parser


def _cogvx_data() -> list[str]:
    script = shutil.which("cogvx-data", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "cogvx_train.cli.data"]


def _run(args, cwd, env=None):
    return subprocess.run(_cogvx_data() + [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_synthetic_manifest_summary_round_trip(tmp_path):
    out = tmp_path / "shapes"
    done = _run(["synthetic", "--out", out, "--num-videos", 4, "--num-images", 2, "--size", "64x48", "--frames", 9,
                 "--fps", 8, "--seed", 1], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "ok: 6 (2 image, 4 video)" in done.stdout
    assert (out / "manifest.jsonl").is_file() and (out / "manifest.summary.json").is_file()

    (out / "videos" / "broken.mp4").write_bytes(b"")
    manifest = tmp_path / "elsewhere" / "m.jsonl"
    again = _run(["manifest", out, "--out", manifest, "--workers", 2, "--min-duration", 0.5], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "rejected: 1" in again.stdout and "empty file" in again.stdout
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    # header + 6 media + the broken file + the first manifest and its two summaries (ignored: not media)
    assert rows[0]["schema"] == "cogvx-manifest" and len(rows) == 1 + 7 + 3
    assert sum(r["status"] == "ignored" for r in rows[1:]) == 3
    assert all(Path(r["path"]).is_absolute() for r in rows[1:])  # the manifest lies outside the folder

    summary = _run(["summary", manifest], cwd=tmp_path)
    assert summary.returncode == 0 and summary.stdout == manifest.with_name("m.summary.txt").read_text()
    as_json = _run(["summary", manifest, "--json"], cwd=tmp_path)
    assert json.loads(as_json.stdout)["counts"]["rejected"] == {"video": 1}


def test_mistakes_get_one_line_and_exit_code_2(tmp_path):
    missing = _run(["manifest", tmp_path / "nope", "--out", tmp_path / "m.jsonl"], cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"cogvx-data manifest: error: {tmp_path / 'nope'} is not a folder; give the folder that holds the videos "
        "and images."]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("a")
    busy = _run(["synthetic", "--out", tmp_path / "full"], cwd=tmp_path)
    assert busy.returncode == 2 and "not empty" in busy.stderr and "Traceback" not in busy.stderr
    bad_size = _run(["synthetic", "--out", tmp_path / "x", "--size", "64by48"], cwd=tmp_path)
    assert bad_size.returncode == 2 and "WIDTHxHEIGHT" in bad_size.stderr
    not_manifest = tmp_path / "plain.jsonl"
    not_manifest.write_text("{}\n")
    assert _run(["summary", not_manifest], cwd=tmp_path).returncode == 2


def test_subcommands_are_a_registry():
    assert set(SUBCOMMANDS) >= {"manifest", "summary", "synthetic"}
    parser = build_parser()
    args = parser.parse_args(["synthetic", "--out", "x", "--size", "32x16"])
    assert args.size == (32, 16) and args.command == "synthetic"
    with pytest.raises(SystemExit):
        parser.parse_args([])
