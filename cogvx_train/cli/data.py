"""`cogvx-data`: build and inspect manifests, generate the synthetic dataset.

    cogvx-data manifest /data/clips --out /data/clips/manifest.jsonl --captions captions.csv --workers 16
    cogvx-data summary /data/clips/manifest.jsonl
    cogvx-data synthetic --out /tmp/shapes --num-videos 24 --seed 0

Subcommands live in the SUBCOMMANDS registry: name -> Subcommand(help, add_arguments, run). Adding one is a
pair of functions and one registry line; ``run`` returns the exit code, and a ValueError it raises is printed as
one line (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, NamedTuple


class Subcommand(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 160x96, got {text!r}") from None
    return width, height


# ------------------------------------------------------------------------------------------------- manifest


def _add_manifest_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, help="folder to scan recursively for videos and images")
    parser.add_argument("--out", type=Path, required=True, help="manifest to write (.jsonl)")
    parser.add_argument("--captions", type=Path, help="CSV/JSONL with a path|file column and a caption|text column "
                                                      "(default: a sidecar <stem>.txt next to each file)")
    parser.add_argument("--workers", type=int, default=None, help="decode-check processes (default: all cores; "
                                                                  "0: in this process)")
    parser.add_argument("--check", choices=("full", "fast"), default="full",
                        help="full: decode every frame; fast: open and decode the first and last frame")
    parser.add_argument("--min-duration", type=float, help="reject videos shorter than this (seconds)")
    parser.add_argument("--min-resolution", type=int, help="reject files whose short side is below this (pixels)")
    parser.add_argument("--max-aspect-ratio", type=float, help="reject files with long/short side above this")
    parser.add_argument("--allow-missing-captions", action="store_true",
                        help="keep files without a caption (e.g. for VAE training)")
    parser.add_argument("--keep-partial", action="store_true",
                        help="keep videos where fewer frames decode than the container lists, with the decodable "
                             "count")
    parser.add_argument("--absolute-paths", action="store_true", help="store absolute paths in the manifest")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_manifest(args: argparse.Namespace) -> int:
    from cogvx_train.data.manifest import build_manifest, format_summary, summarize, summary_paths

    manifest = build_manifest(
        args.folder, args.out, captions=args.captions, workers=args.workers, check=args.check,
        min_duration=args.min_duration, min_resolution=args.min_resolution, max_aspect_ratio=args.max_aspect_ratio,
        allow_missing_captions=args.allow_missing_captions, keep_partial=args.keep_partial,
        absolute_paths=args.absolute_paths, progress=not args.no_progress)
    print(format_summary(summarize(manifest)), end="")
    json_path, txt_path = summary_paths(args.out)
    print(f"wrote {Path(args.out).resolve()}, {json_path.name} and {txt_path.name}")
    if manifest.header["counts"]["ok"] == 0:
        print("warning: no usable file in this manifest", file=sys.stderr)
    return 0


# -------------------------------------------------------------------------------------------------- summary


def _add_summary_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", type=Path, help="manifest (.jsonl) to summarise")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def _run_summary(args: argparse.Namespace) -> int:
    from cogvx_train.data.manifest import format_summary, read_manifest, summarize

    summary = summarize(read_manifest(args.manifest))
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary), end="\n" if args.json else "")
    return 0


# ------------------------------------------------------------------------------------------------ synthetic


def _add_synthetic_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="new or empty folder to write into")
    parser.add_argument("--num-videos", type=int, default=24)
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=_size, help="WIDTHxHEIGHT for every file (default: 160x96, 128x128, 96x160)")
    parser.add_argument("--frames", type=int, help="frames per clip (default: 33, 41 or 49)")
    parser.add_argument("--fps", type=float, help="frame rate of every clip (default: 8, 12 or 16)")


def _run_synthetic(args: argparse.Namespace) -> int:
    from cogvx_train.data.manifest import format_summary, read_manifest, summarize
    from cogvx_train.data.synthetic import generate_synthetic_dataset

    path = generate_synthetic_dataset(args.out, num_videos=args.num_videos, num_images=args.num_images,
                                      seed=args.seed, size=args.size, frames=args.frames, fps=args.fps)
    print(format_summary(summarize(read_manifest(path))), end="")
    print(f"wrote {path}")
    return 0


def add_precompute_args(parser: argparse.ArgumentParser) -> None:
    from cogvx_train.data.latent_cache import add_precompute_args as add

    add(parser)


def run_precompute(args: argparse.Namespace) -> int:
    from cogvx_train.data.latent_cache import run_precompute as run

    return run(args)


SUBCOMMANDS: dict[str, Subcommand] = {
    "manifest": Subcommand("decode-check a folder of videos/images and write a manifest",
                           _add_manifest_args, _run_manifest),
    "summary": Subcommand("print the summary of a manifest", _add_summary_args, _run_summary),
    "synthetic": Subcommand("write the seeded coloured-shapes dataset and its manifest",
                            _add_synthetic_args, _run_synthetic),
    "precompute": Subcommand("encode a manifest with the frozen VAE and T5 into a latent cache",
                             add_precompute_args, run_precompute),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cogvx-data", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return SUBCOMMANDS[args.command].run(args)
    except ValueError as exc:
        print(f"cogvx-data {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
