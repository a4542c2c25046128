"""The recipe scripts in data_recipes/: WebVid CSV -> captions file -> manifest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from cogvx_train.data.manifest import build_manifest
from cogvx_train.data.synthetic import write_mp4

RECIPES = Path(__file__).resolve().parents[2] / "data_recipes"


def test_webvid_csv_becomes_captions_the_manifest_reads(tmp_path):
    webvid = tmp_path / "results_train.csv"
    webvid.write_text("videoid,contentUrl,duration,page_dir,name\n"
                      "1001,https://example.com/1.mp4,PT00H00M02S,000001_000050,\"A dog,  running\"\n"
                      "1002,https://example.com/2.mp4,PT00H00M02S,000001_000050,\n")
    captions = tmp_path / "captions.csv"
    done = subprocess.run([sys.executable, str(RECIPES / "webvid_csv_to_captions.py"), str(webvid), "--out",
                           str(captions)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert captions.read_text().splitlines() == ["path,caption", '000001_000050/1001.mp4,"A dog, running"']

    videos = tmp_path / "videos" / "000001_000050"
    videos.mkdir(parents=True)
    write_mp4(videos / "1001.mp4", np.zeros((8, 32, 64, 3), np.uint8), 8.0)
    write_mp4(videos / "1002.mp4", np.zeros((8, 32, 64, 3), np.uint8), 8.0)
    manifest = build_manifest(tmp_path / "videos", tmp_path / "m.jsonl", captions=captions, workers=0,
                              progress=False)
    by_name = {Path(e.path).name: e for e in manifest.entries}
    assert by_name["1001.mp4"].status == "ok" and by_name["1001.mp4"].caption == "A dog, running"
    assert by_name["1002.mp4"].reason.startswith("no caption")

    bad = subprocess.run([sys.executable, str(RECIPES / "webvid_csv_to_captions.py"), str(captions), "--out",
                          str(tmp_path / "x.csv")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "lacks the column" in bad.stderr
