"""Turn a WebVid-style CSV into the captions file that `cogvx-data manifest --captions` reads.

WebVid's metadata CSVs have the columns ``videoid, contentUrl, duration, page_dir, name`` (``name`` is the
caption). Download tools usually save each clip as ``<page_dir>/<videoid>.mp4`` (``--layout nested``, the
default) or ``<videoid>.mp4`` in one folder (``--layout flat``). This writes ``path,caption`` rows with paths
relative to the download folder, which is the folder you then give to ``cogvx-data manifest``:

    python data_recipes/webvid_csv_to_captions.py results_2M_train.csv --out captions.csv
    cogvx-data manifest /data/webvid/videos --captions captions.csv --out /data/webvid/manifest.jsonl

Only the standard library is used, so the script runs anywhere.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def convert(src: Path, out: Path, layout: str = "nested", extension: str = ".mp4",
            id_column: str = "videoid", caption_column: str = "name", dir_column: str = "page_dir") -> int:
    """Write ``out`` (CSV: path, caption); returns the number of rows written. Rows without a caption are skipped."""
    with src.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {id_column, caption_column} - set(reader.fieldnames or [])
        if layout == "nested":
            missing |= {dir_column} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{src} lacks the column(s) {sorted(missing)}; its columns are {reader.fieldnames}.")
        written = 0
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8", newline="") as g:
            writer = csv.writer(g)
            writer.writerow(["path", "caption"])
            for row in reader:
                caption = " ".join((row.get(caption_column) or "").split())
                video_id = (row.get(id_column) or "").strip()
                if not caption or not video_id:
                    continue
                name = video_id + extension
                path = f"{row[dir_column].strip()}/{name}" if layout == "nested" else name
                writer.writerow([path, caption])
                written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path, help="WebVid-style metadata CSV")
    parser.add_argument("--out", type=Path, required=True, help="captions CSV to write (path,caption)")
    parser.add_argument("--layout", choices=("nested", "flat"), default="nested",
                        help="nested: <page_dir>/<videoid>.mp4; flat: <videoid>.mp4")
    parser.add_argument("--extension", default=".mp4")
    parser.add_argument("--id-column", default="videoid")
    parser.add_argument("--caption-column", default="name")
    parser.add_argument("--dir-column", default="page_dir")
    args = parser.parse_args(argv)
    try:
        count = convert(args.csv, args.out, args.layout, args.extension, args.id_column, args.caption_column,
                        args.dir_column)
    except (OSError, ValueError) as exc:
        print(f"webvid_csv_to_captions: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {count} captions to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
