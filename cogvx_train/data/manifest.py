"""The manifest: one decode-checked row per input file, the only thing training reads about a dataset.

File format (schema ``cogvx-manifest``, version 1): JSON Lines. The first line is a header object, every further
line one row::

    {"schema": "cogvx-manifest", "version": 1, "created_at": "...", "root": "/abs/folder", "check": "full",
     "path_base": "manifest_dir", "captions_file": null, "filters": {...}, "counts": {"ok": 30, ...}}
    {"path": "videos/a.mp4", "kind": "video", "status": "ok", "reason": null, "caption": "a red circle ...",
     "caption_source": "sidecar", "num_frames": 49, "fps": 16.0, "width": 160, "height": 96,
     "duration": 3.0625, "size_bytes": 41234}

Row fields:
- ``path``: relative to the directory that holds the manifest when the file lies under it, absolute otherwise
  (``--absolute-paths`` forces absolute). Readers resolve it with ``Manifest.resolve``.
- ``kind``: ``video`` | ``image`` | ``other`` (by extension: videos mp4 mov mkv webm avi, images jpg jpeg png webp).
- ``status``: ``ok`` (usable), ``rejected`` (media that failed a check or a filter) or ``ignored`` (not media).
  ``reason`` says why, as ``"category: detail"`` (the summary groups by category); null when ok.
- ``num_frames``: frames that actually DECODE (not container metadata); 1 for images.
- ``fps``, ``duration`` (= num_frames / fps): null for images. ``width``/``height``: decoded size in pixels.
- ``caption`` and ``caption_source`` (``captions_file`` | ``sidecar`` | null).

Captions come from ``--captions`` (CSV with a header, or JSONL; the file column is one of path/file/filename/
video/image, the text column one of caption/text) and else from a sidecar ``<stem>.txt`` next to the media file.
Captions-file paths may be relative to the scanned folder, absolute, or bare file names. A sidecar that supplies a
caption is not a row of its own (it is named by ``caption_source``); every other file gets a row, so each input
file is accounted for.

Decode check: videos are opened with decord (which reads every packet, so a file cut short inside its data fails
here) and then, with ``check="full"``, every frame is decoded; when fewer frames decode than the container lists,
the row is rejected as ``partial decode`` (or kept with the decodable count, ``keep_partial=True``). Images are
fully decoded with PIL. Files are checked in a process pool (spawned, so no decoder state is forked).

Next to ``NAME.jsonl`` the builder writes ``NAME.summary.json`` and ``NAME.summary.txt`` (counts, reasons,
duration / resolution / fps histograms); ``cogvx-data summary NAME.jsonl`` recomputes and prints them.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import datetime
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from cogvx_train.config.errors import ConfigError
from cogvx_train.data.video_io import media_kind

MANIFEST_SCHEMA = "cogvx-manifest"
MANIFEST_VERSION = 1
STATUSES = ("ok", "rejected", "ignored")
CHECK_MODES = ("full", "fast")

_PATH_COLUMNS = ("path", "file", "filename", "video", "image")
_CAPTION_COLUMNS = ("caption", "text")
_DURATION_BINS = ((0.0, "<1 s"), (1.0, "1-2 s"), (2.0, "2-5 s"), (5.0, "5-10 s"), (10.0, "10-30 s"),
                  (30.0, "30-60 s"), (60.0, ">=60 s"))
_SHORT_SIDE_BINS = ((0, "<256 px"), (256, "256-479 px"), (480, "480-719 px"), (720, "720-1079 px"),
                    (1080, ">=1080 px"))


@dataclass
class ManifestEntry:
    """One manifest row (see the module docstring for the meaning of each field)."""

    path: str
    kind: str
    status: str
    reason: str | None = None
    caption: str = ""
    caption_source: str | None = None
    num_frames: int | None = None
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    duration: float | None = None
    size_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> "ManifestEntry":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {"path", "kind", "status"} - obj.keys()
        if missing:
            raise ValueError(f"{where}: row lacks the field(s) {sorted(missing)}.")
        if obj["status"] not in STATUSES:
            raise ValueError(f"{where}: status must be one of {STATUSES}, got {obj['status']!r}.")
        return cls(**{k: v for k, v in obj.items() if k in names})


@dataclass
class Manifest:
    """A read manifest: header, rows and the file it came from (paths resolve against its directory)."""

    header: dict[str, Any]
    entries: list[ManifestEntry]
    path: Path | None = None

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path is not None else Path.cwd()

    def resolve(self, entry: ManifestEntry | str) -> Path:
        rel = entry.path if isinstance(entry, ManifestEntry) else entry
        return self.base_dir / rel  # an absolute rel wins the join

    def indices(self, status: str = "ok", kinds: Iterable[str] = ("video", "image")) -> list[int]:
        kinds = set(kinds)
        return [i for i, e in enumerate(self.entries) if e.status == status and e.kind in kinds]


@dataclass(frozen=True)
class ProbeResult:
    """What decoding one file told us; ``error`` set means the file is not usable."""

    kind: str
    num_frames: int | None = None
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    listed_frames: int | None = None
    error: str | None = None


# ----------------------------------------------------------------------------------------------------- probing


def _short_error(exc: BaseException) -> str:
    """First line of an error, without decord's "[12:00:00] /src/video_reader.cc:486: " prefix."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    text = re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", lines[0].strip()) if lines else type(exc).__name__
    return text[:200]


def probe_video(path: str, check: str = "full") -> ProbeResult:
    """Open with decord and count the frames that decode (``check='full'``) or decode the last one (``'fast'``)."""
    import decord

    decord.logging.set_level(decord.logging.QUIET)  # the reason goes into the row; keep the progress bar clean
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        listed = len(reader)
        fps = float(reader.get_avg_fps())
        height, width = reader[0].shape[:2]
    except Exception as exc:  # decord raises RuntimeError, DECORDError, AssertionError (0 frames)
        return ProbeResult("video", error=f"cannot open: {_short_error(exc)}")
    if not fps > 0:
        return ProbeResult("video", listed_frames=listed, error=f"no frame rate: container reports {fps}")
    try:
        if check == "fast":
            reader.get_batch([0, listed - 1]).asnumpy()
            decoded = listed
        else:
            decoded = _count_decodable_frames(path, listed)
    except Exception:
        decoded = _count_decodable_frames(path, listed, sequential=True)
    return ProbeResult("video", num_frames=decoded, fps=fps, width=int(width), height=int(height),
                       listed_frames=listed)


def _count_decodable_frames(path: str, listed: int, sequential: bool = False) -> int:
    """Frames that decode, in order. The fast path decodes all but the last without RGB conversion
    (``skip_frames``) and converts the last; only if that fails are frames counted one by one."""
    import decord

    if not sequential:
        try:
            reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
            if listed > 1:
                reader.skip_frames(listed - 1)
            reader.next()
            return listed
        except Exception:
            pass
    count = 0
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        for _ in range(listed):
            reader.next()
            count += 1
    except Exception:
        pass
    return count


def probe_image(path: str) -> ProbeResult:
    """Fully decode with PIL (``verify`` alone misses truncated data); EXIF orientation applied to the size."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            width, height = img.size
    except Exception as exc:
        return ProbeResult("image", error=f"cannot open: {_short_error(exc)}")
    return ProbeResult("image", num_frames=1, width=int(width), height=int(height))


def probe_file(path: str, check: str = "full") -> ProbeResult:
    """Decode-check one media file (a process-pool worker)."""
    kind = media_kind(path)
    if kind is None:
        return ProbeResult("other", error=f"not media: extension {Path(path).suffix or '(none)'!r}")
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        return ProbeResult(kind, error=f"cannot open: {_short_error(exc)}")
    if size == 0:
        return ProbeResult(kind, error="empty file: 0 bytes")
    return probe_video(path, check) if kind == "video" else probe_image(path)


def _quiet_worker() -> None:
    """decord's C++ logger writes to stderr whatever FFmpeg's level; the reason is already in the row, so the
    pool workers' stderr is dropped to keep the progress bar readable."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def _probe_task(task: tuple[int, str, str]) -> tuple[int, ProbeResult]:
    index, path, check = task
    return index, probe_file(path, check)


def probe_files(paths: Sequence[str], *, workers: int | None = None, check: str = "full",
                progress: bool = True) -> list[ProbeResult]:
    """Decode-check ``paths`` in a spawned process pool (``workers=0``: in this process), with a tqdm bar."""
    from tqdm import tqdm

    if check not in CHECK_MODES:
        raise ValueError(f"check must be one of {CHECK_MODES}, got {check!r}.")
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}.")
    tasks = [(i, str(p), check) for i, p in enumerate(paths)]
    results: list[ProbeResult | None] = [None] * len(tasks)
    bar = tqdm(total=len(tasks), desc="decode-check", unit="file", disable=not progress, dynamic_ncols=True)
    if workers == 0 or len(tasks) <= 1:
        for task in tasks:
            index, result = _probe_task(task)
            results[index] = result
            bar.update(1)
    else:
        import multiprocessing

        # spawn, not fork: a forked decoder (or a parent's torch thread pool) can deadlock in the child.
        with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks)), initializer=_quiet_worker) as pool:
            for index, result in pool.imap_unordered(_probe_task, tasks, chunksize=4):
                results[index] = result
                bar.update(1)
    bar.close()
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------- captions


def _pick_column(columns: Iterable[str], wanted: Sequence[str], what: str, source: Path) -> str:
    lowered = {c.strip().lower(): c for c in columns if c is not None}
    for name in wanted:
        if name in lowered:
            return lowered[name]
    raise ValueError(f"{source} has no {what} column: found {sorted(lowered)}, expected one of {list(wanted)}.")


def load_captions_file(path: str | Path) -> dict[str, str]:
    """{file key: caption} from a CSV (with a header row) or a JSONL file (one object per line)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"captions file {path} does not exist.")
    rows: list[dict[str, Any]]
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{line_no} is not valid JSON ({exc.msg}).") from None
    elif path.suffix.lower() in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    else:
        raise ValueError(f"captions file {path} must end in .csv, .tsv or .jsonl.")
    if not rows:
        return {}
    key_col = _pick_column(rows[0].keys(), _PATH_COLUMNS, "file", path)
    text_col = _pick_column(rows[0].keys(), _CAPTION_COLUMNS, "caption", path)
    captions: dict[str, str] = {}
    for row in rows:
        key, text = row.get(key_col), row.get(text_col)
        if key and text is not None:
            captions.setdefault(str(key).strip(), " ".join(str(text).split()))
    return captions


def _caption_lookup(captions: dict[str, str], rel: str, absolute: Path) -> str | None:
    for key in (rel, "./" + rel, str(absolute), absolute.name):
        if key in captions:
            return captions[key]
    return None


def _read_sidecar(path: Path) -> str:
    return " ".join(path.read_text(encoding="utf-8", errors="replace").split())


# ----------------------------------------------------------------------------------------------------- filters


def filter_reason(entry: ManifestEntry, min_duration: float | None = None, min_resolution: int | None = None,
                  max_aspect_ratio: float | None = None) -> str | None:
    """Why an ok row fails a filter, or None. Images are exempt from ``min_duration``."""
    if min_duration is not None and entry.kind == "video" and (entry.duration or 0.0) < min_duration:
        return f"too short: {entry.duration:.2f} s < --min-duration {min_duration:g} s"
    short, long = sorted((entry.width or 0, entry.height or 0))
    if min_resolution is not None and short < min_resolution:
        return f"too small: short side {short} px < --min-resolution {min_resolution} px"
    if max_aspect_ratio is not None and short > 0 and long / short > max_aspect_ratio:
        return f"too elongated: aspect ratio {long / short:.2f} > --max-aspect-ratio {max_aspect_ratio:g}"
    return None


def _check_filters(min_duration, min_resolution, max_aspect_ratio) -> None:
    if min_duration is not None and min_duration < 0:
        raise ValueError(f"--min-duration must be >= 0 seconds, got {min_duration}.")
    if min_resolution is not None and min_resolution < 1:
        raise ValueError(f"--min-resolution must be a positive number of pixels, got {min_resolution}.")
    if max_aspect_ratio is not None and max_aspect_ratio < 1:
        raise ValueError(f"--max-aspect-ratio is long side / short side, so it must be >= 1, got {max_aspect_ratio}.")


# ------------------------------------------------------------------------------------------------------ build


def summary_paths(manifest_path: str | Path) -> tuple[Path, Path]:
    """NAME.jsonl -> (NAME.summary.json, NAME.summary.txt), next to the manifest."""
    manifest_path = Path(manifest_path)
    stem = manifest_path.name[: -len(manifest_path.suffix)] if manifest_path.suffix else manifest_path.name
    return manifest_path.with_name(stem + ".summary.json"), manifest_path.with_name(stem + ".summary.txt")


def _stored_path(file: Path, manifest_dir: Path, absolute: bool) -> str:
    if not absolute:
        try:
            return file.relative_to(manifest_dir).as_posix()
        except ValueError:
            pass
    return str(file)


def scan_folder(folder: Path, exclude: Iterable[Path] = ()) -> list[Path]:
    """Every regular file under ``folder`` (symlinks to files included), sorted; ``exclude`` left out."""
    excluded = {p.resolve() for p in exclude}
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            file = Path(dirpath) / name
            if file.resolve() not in excluded:
                found.append(file)
    return found


def build_manifest(
    folder: str | Path,
    out: str | Path,
    *,
    captions: str | Path | None = None,
    workers: int | None = None,
    check: str = "full",
    min_duration: float | None = None,
    min_resolution: int | None = None,
    max_aspect_ratio: float | None = None,
    allow_missing_captions: bool = False,
    keep_partial: bool = False,
    absolute_paths: bool = False,
    progress: bool = True,
) -> Manifest:
    """Scan ``folder``, decode-check every media file, apply filters, write the manifest and its summary."""
    folder = Path(folder).resolve()
    out = Path(out).resolve()
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; give the folder that holds the videos and images.")
    if out.suffix != ".jsonl":
        raise ValueError(f"the manifest is JSON Lines, so --out must end in .jsonl, got {out.name}.")
    _check_filters(min_duration, min_resolution, max_aspect_ratio)
    caption_map = load_captions_file(captions) if captions is not None else {}
    captions_path = Path(captions).resolve() if captions is not None else None

    files = scan_folder(folder, exclude=[out, *summary_paths(out), *([captions_path] if captions_path else [])])
    media_stems = {(f.parent, f.stem) for f in files if media_kind(f) is not None}
    sidecars_used: set[Path] = set()
    media_files = [f for f in files if media_kind(f) is not None]
    probes = dict(zip(media_files, probe_files([str(f) for f in media_files], workers=workers, check=check,
                                               progress=progress)))
    entries: list[ManifestEntry] = []
    matched_caption_keys = 0
    for file in files:
        rel_to_folder = file.relative_to(folder).as_posix()
        stored = _stored_path(file, out.parent, absolute_paths)
        size_bytes = file.stat().st_size if file.exists() else 0
        kind = media_kind(file)
        if kind is None:
            if file.suffix.lower() == ".txt" and (file.parent, file.stem) in media_stems:
                sidecars_used.add(file)
                continue
            entries.append(ManifestEntry(stored, "other", "ignored", f"not media: extension {file.suffix or '(none)'}",
                                         size_bytes=size_bytes))
            continue
        probe = probes[file]
        entry = ManifestEntry(stored, kind, "ok", size_bytes=size_bytes, num_frames=probe.num_frames,
                              width=probe.width, height=probe.height)
        if kind == "video" and probe.fps:
            entry.fps = round(probe.fps, 6)
            if probe.num_frames is not None:
                entry.duration = round(probe.num_frames / probe.fps, 6)
        text = _caption_lookup(caption_map, rel_to_folder, file)
        if text is not None:
            entry.caption, entry.caption_source = text, "captions_file"
            matched_caption_keys += 1
        elif file.with_suffix(".txt").is_file():
            entry.caption, entry.caption_source = _read_sidecar(file.with_suffix(".txt")), "sidecar"
        entry.reason = _entry_reason(entry, probe, min_duration, min_resolution, max_aspect_ratio,
                                     allow_missing_captions, keep_partial)
        if entry.reason is not None:
            entry.status = "rejected"
        entries.append(entry)

    counts = Counter(e.status for e in entries)
    header = {
        "schema": MANIFEST_SCHEMA,
        "version": MANIFEST_VERSION,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "root": str(folder),
        "path_base": "manifest_dir",
        "check": check,
        "captions_file": str(captions_path) if captions_path else None,
        "filters": {"min_duration": min_duration, "min_resolution": min_resolution,
                    "max_aspect_ratio": max_aspect_ratio, "allow_missing_captions": allow_missing_captions,
                    "keep_partial": keep_partial},
        "counts": {s: counts.get(s, 0) for s in STATUSES},
        "files_seen": len(files),
        "sidecar_captions": len(sidecars_used),
        "captions_file_unmatched": max(0, len(caption_map) - matched_caption_keys),
    }
    manifest = Manifest(header, entries, out)
    write_manifest(out, manifest)
    write_summary(out, summarize(manifest))
    return manifest


def _entry_reason(entry: ManifestEntry, probe: ProbeResult, min_duration, min_resolution, max_aspect_ratio,
                  allow_missing_captions: bool, keep_partial: bool) -> str | None:
    if probe.error is not None:
        return probe.error
    if entry.kind == "video":
        if not probe.num_frames:
            return f"partial decode: no frame of {probe.listed_frames} decodes"
        if probe.listed_frames is not None and probe.num_frames < probe.listed_frames and not keep_partial:
            return f"partial decode: only {probe.num_frames} of {probe.listed_frames} listed frames decode"
    reason = filter_reason(entry, min_duration, min_resolution, max_aspect_ratio)
    if reason is not None:
        return reason
    if not entry.caption and not allow_missing_captions:
        return "no caption: no sidecar .txt and not in the captions file"
    return None


# ------------------------------------------------------------------------------------------------------ files


def write_manifest(path: str | Path, manifest: Manifest) -> None:
    """Write header + rows atomically (temporary file, then rename), so readers never see half a manifest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(json.dumps(manifest.header, ensure_ascii=False) + "\n")
        for entry in manifest.entries:
            f.write(json.dumps(entry.to_json(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


_last_read: tuple[tuple, Manifest] | None = None  # (file identity, what read_manifest returned for it)


def read_manifest(path: str | Path) -> Manifest:
    """Read and check a manifest; a newer version or a file that is not a manifest is a ConfigError (a
    ValueError): one sentence saying what would work.

    A launch reads the same manifest twice in each process (the config checks before the model is built, then the
    datamodule): the second read of an unchanged file (same path, size and modification time) returns the
    first read's rows (shared: rows are read-only once read) in a new list, with a copy of the header, instead of
    parsing again (about 1.7 s per 100k rows).
    """
    global _last_read
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        identity = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if _last_read is None or _last_read[0] != identity:
            _last_read = (identity, _parse_manifest(path))
        cached = _last_read[1]
        return Manifest(copy.deepcopy(cached.header), list(cached.entries), cached.path)  # rows: read-only
    return _parse_manifest(path)


def _parse_manifest(path: Path) -> Manifest:
    if path.is_dir():
        inside = sorted(path.glob("*.jsonl"))
        raise ConfigError(f"manifest {path} is a folder; give the manifest file itself"
                         + (f", e.g. {inside[0]}" if inside else "")
                         + f" (build one with `cogvx-data manifest {path} --out {path}/manifest.jsonl`).")
    if not path.is_file():
        raise ConfigError(f"manifest {path} does not exist; build one with `cogvx-data manifest FOLDER --out {path}`.")
    entries: list[ManifestEntry] = []
    with path.open(encoding="utf-8") as f:
        first = f.readline()
        try:
            header = json.loads(first) if first.strip() else None
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or header.get("schema") != MANIFEST_SCHEMA:
            raise ConfigError(f"{path} is not a cogvx manifest: its first line must be a header with "
                             f"\"schema\": \"{MANIFEST_SCHEMA}\"; build one from the media folder with "
                             f"`cogvx-data manifest FOLDER --out {path.with_suffix('.jsonl').name}`.")
        version = header.get("version")
        if not isinstance(version, int) or version > MANIFEST_VERSION or version < 1:
            raise ConfigError(f"{path} has manifest version {version!r}; this cogvx-train reads versions "
                             f"1..{MANIFEST_VERSION} (upgrade cogvx-train or rebuild the manifest).")
        for line_no, line in enumerate(f, 2):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{line_no} is not valid JSON ({exc.msg}); repair or delete that line, or "
                                 "rebuild the manifest with `cogvx-data manifest`.") from None
            if not isinstance(obj, dict):
                raise ConfigError(f"{path}:{line_no} is not a row object ({{\"path\": ..., \"kind\": ..., "
                                 f"\"status\": ...}}); repair or delete that line, or rebuild the manifest with "
                                 "`cogvx-data manifest`.")
            entries.append(ManifestEntry.from_json(obj, f"{path}:{line_no}"))
    return Manifest(header, entries, path.resolve())


def check_files_present(manifest: Manifest, rows: Sequence[int], probe: int = 8) -> None:
    """One sentence (ConfigError) when none of the first `probe` of `rows` is on disk: the manifest was moved away
    from the files its relative paths name, or the data disk is not mounted. A few missing files among present ones
    are not an error here: training replaces a file that fails (``max_failure_rate``)."""
    first = [manifest.resolve(manifest.entries[r]) for r in rows[:probe]]
    if first and not any(path.exists() for path in first):
        some = f"the first {len(first)}" if len(rows) > len(first) else f"all {len(first)}"
        raise ConfigError(f"manifest {manifest.path}: {some} of its usable files are missing (e.g. {first[0]}); "
                         f"its relative paths start at the manifest's folder, so keep the manifest next to its data "
                         f"(or rebuild it with `cogvx-data manifest FOLDER --out M.jsonl --absolute-paths`) and "
                         f"check that the data disk is mounted.")


# ---------------------------------------------------------------------------------------------------- summary


def _bin_label(value: float, bins: Sequence[tuple[float, str]]) -> str:
    label = bins[0][1]
    for edge, name in bins:
        if value >= edge:
            label = name
    return label


def summarize(manifest: Manifest) -> dict[str, Any]:
    """Counts, reasons and histograms of a manifest (what ``cogvx-data summary`` prints)."""
    by_status: dict[str, Counter] = {s: Counter() for s in STATUSES}
    reasons: dict[str, Counter] = {"rejected": Counter(), "ignored": Counter()}
    duration_hist = Counter({label: 0 for _, label in _DURATION_BINS})
    short_side_hist = {k: Counter({label: 0 for _, label in _SHORT_SIDE_BINS}) for k in ("video", "image")}
    fps_hist: Counter = Counter()
    total_seconds, total_frames = 0.0, 0
    for e in manifest.entries:
        by_status[e.status][e.kind] += 1
        if e.status in reasons:
            reasons[e.status][(e.reason or "unknown").split(":")[0]] += 1
        if e.status != "ok":
            continue
        short_side_hist[e.kind][_bin_label(min(e.width or 0, e.height or 0), _SHORT_SIDE_BINS)] += 1
        if e.kind == "video":
            total_seconds += e.duration or 0.0
            total_frames += e.num_frames or 0
            duration_hist[_bin_label(e.duration or 0.0, _DURATION_BINS)] += 1
            fps_hist[f"{e.fps:g}"] += 1
    header = manifest.header
    return {
        "manifest": str(manifest.path) if manifest.path else None,
        "schema": header.get("schema"),
        "version": header.get("version"),
        "root": header.get("root"),
        "files_seen": header.get("files_seen"),
        "rows": len(manifest.entries),
        "sidecar_captions": header.get("sidecar_captions"),
        "captions_file_unmatched": header.get("captions_file_unmatched"),
        "counts": {s: dict(sorted(c.items())) for s, c in by_status.items()},
        "reject_reasons": dict(reasons["rejected"].most_common()),
        "ignore_reasons": dict(reasons["ignored"].most_common()),
        "ok_video_hours": round(total_seconds / 3600.0, 4),
        "ok_video_frames": total_frames,
        "duration_histogram": dict(duration_hist),
        "short_side_histogram": {k: dict(v) for k, v in short_side_hist.items()},
        "fps_histogram": dict(sorted(fps_hist.items(), key=lambda kv: float(kv[0]))),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable summary (the .summary.txt file and the CLI output)."""
    lines = [f"manifest: {summary['manifest']}", f"source folder: {summary['root']}",
             f"files seen: {summary['files_seen']} ({summary['rows']} rows, "
             f"{summary['sidecar_captions']} caption sidecars used)"]
    for status in STATUSES:
        kinds = summary["counts"][status]
        detail = ", ".join(f"{n} {k}" for k, n in kinds.items()) or "none"
        lines.append(f"{status:>9}: {sum(kinds.values())} ({detail})")
    for title, key in (("reject reasons", "reject_reasons"), ("ignore reasons", "ignore_reasons")):
        if summary[key]:
            lines.append(f"{title}:")
            lines += [f"  {n:>7}  {reason}" for reason, n in summary[key].items()]
    if summary.get("captions_file_unmatched"):
        lines.append(f"captions-file rows with no file in the folder: {summary['captions_file_unmatched']}")
    lines.append(f"ok video: {summary['ok_video_hours'] * 60:.2f} min, {summary['ok_video_frames']} frames")
    lines.append("duration (ok videos):")
    lines += [f"  {label:>9}  {n}" for label, n in summary["duration_histogram"].items()]
    for kind in ("video", "image"):
        lines.append(f"short side (ok {kind}s):")
        lines += [f"  {label:>11}  {n}" for label, n in summary["short_side_histogram"][kind].items()]
    if summary["fps_histogram"]:
        lines.append("fps (ok videos): " + ", ".join(f"{k}: {n}" for k, n in summary["fps_histogram"].items()))
    return "\n".join(lines) + "\n"


def write_summary(manifest_path: str | Path, summary: dict[str, Any]) -> tuple[Path, Path]:
    json_path, txt_path = summary_paths(manifest_path)
    json_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    txt_path.write_text(format_summary(summary), encoding="utf-8")
    return json_path, txt_path
