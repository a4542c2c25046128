"""Data loading throughput: our FramePackDataset against raw decord on the same clips and the same frame indices.

    python scripts/bench_data.py                       # 480x720 sources, 49 frames at 8 fps, 2 targets
    python scripts/bench_data.py --clips 4 --reps 5 --workers 2

Sources are synthetic H.264 clips (moving texture, 24 and 30 fps, a key frame every second) written to a temp
folder. For every clip and rep the dataset picks a random start; the raw baselines decode exactly the indices the
dataset used:
  raw_decode         decord VideoReader(num_threads=T).get_batch(indices) -> uint8 (decode only)
  raw_decode+resize  the same, then resize_cover_center_crop at full size (what a plain loader would do)
  ours               FramePackDataset.__getitem__ (decode at reduced size when that helps, crop, float [-1, 1])
All three run in one process, num_workers=0, interleaved clip by clip in rotating order; the numbers are medians
of the per-clip times. The last
line prints the ratios ours/raw (throughput; the goal is >= 0.8 against raw decode).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_clip(path: Path, frames: int, fps: float, height: int, width: int, gop: int, seed: int) -> None:
    from cogvx_train.data.synthetic import write_mp4

    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (height // 8 + 1, width // 8 + frames + 1, 3), dtype=np.uint8)
    texture = texture.repeat(8, axis=0).repeat(8, axis=1)
    video = np.stack([texture[:height, 8 * 0 + 3 * t : 3 * t + width] for t in range(frames)])
    write_mp4(path, video, fps, crf=23, gop=gop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--source-frames", type=int, default=150)
    parser.add_argument("--num-frames", type=int, default=49)
    parser.add_argument("--target-fps", type=float, default=8.0)
    parser.add_argument("--targets", default="480x720,256x384", help="HxW output sizes, comma separated")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="decord threads per reader (both sides)")
    parser.add_argument("--gop", type=int, default=30)
    parser.add_argument("--workers", type=int, default=0, help="also time a DataLoader with this many workers")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import decord

    from cogvx_train.data.frame_pack import FramePackDataModule, FramePackDataset
    from cogvx_train.data.manifest import build_manifest, read_manifest
    from cogvx_train.data.video_io import resize_cover_center_crop

    targets = [tuple(int(v) for v in t.split("x")) for t in args.targets.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "clips"
        root.mkdir()
        t0 = time.perf_counter()
        for i in range(args.clips):
            make_clip(root / f"clip{i}.mp4", args.source_frames, (24.0, 30.0)[i % 2], args.height, args.width,
                      args.gop, i)
        manifest_path = build_manifest(root, Path(tmp) / "m.jsonl", workers=0, allow_missing_captions=True,
                                       progress=False).path
        print(f"wrote {args.clips} clips of {args.source_frames} frames at {args.height}x{args.width} "
              f"in {time.perf_counter() - t0:.1f} s")
        manifest = read_manifest(manifest_path)
        rows = manifest.indices("ok")
        ratios = []
        for target in targets:
            ds = FramePackDataset(manifest, rows, args.num_frames, [list(target)], target_fps=args.target_fps,
                                  decode_threads=args.threads)
            for k in range(3):  # warm-up
                ds[(1000 + k, k % len(ds))]
            times: dict[str, list[float]] = {"ours": [], "raw_decode": [], "raw_decode+resize": []}
            for rep in range(args.reps):
                for i in range(len(ds)):  # interleaved per clip; the order rotates so no side always goes first
                    order = ["ours", "raw_decode", "raw_decode+resize"]
                    order = order[(rep + i) % 3 :] + order[: (rep + i) % 3]
                    picked = ds.load(rep, i)  # what the dataset picks for (rep, i): path and frame indices
                    path, indices, shape = picked["path"], picked["frame_indices"].tolist(), picked["video"].shape
                    del picked
                    for name in order:
                        start = time.perf_counter()
                        if name == "ours":
                            out = ds[(rep, i)]["video"]
                        else:
                            reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=args.threads)
                            out = reader.get_batch(indices).asnumpy()
                            if name == "raw_decode+resize":
                                out = resize_cover_center_crop(out, target)
                                assert out.shape == shape
                        times[name].append(time.perf_counter() - start)
                        del out
            median = {k: statistics.median(v) for k, v in times.items()}  # seconds per clip
            print(f"target {target[0]}x{target[1]} ({args.num_frames} frames at {args.target_fps:g} fps):")
            for name, seconds in median.items():
                print(f"  {name:>18}: {1 / seconds:7.2f} clips/s  {args.num_frames / seconds:8.1f} frames/s")
            ratios.append((target, median["raw_decode"] / median["ours"], median["raw_decode+resize"] / median["ours"]))

        if args.workers > 0:
            target = targets[-1]
            dm = FramePackDataModule(manifest_path, args.num_frames, [list(target)], 1, target_fps=args.target_fps,
                                     num_workers=args.workers, decode_threads=args.threads, persistent_workers=False)
            for epoch in range(2):  # the first epoch pays the worker start-up
                dm.set_epoch(epoch)
                start = time.perf_counter()
                count = sum(1 for _ in dm.train_dataloader())
                seconds = time.perf_counter() - start
            print(f"DataLoader with {args.workers} workers at {target[0]}x{target[1]}: {count / seconds:.2f} clips/s "
                  f"{count * args.num_frames / seconds:.1f} frames/s")

    print("ratios (throughput ours/raw): " + "  ".join(
        f"{t[0]}x{t[1]}: ours/raw_decode={a:.2f} ours/raw_decode+resize={b:.2f}" for t, a, b in ratios))


if __name__ == "__main__":
    main()
