"""Sweeps (`cogvx-train -m ...`): one directory per trial, a summary table of final metrics at the end.

Trial directories are named by their overrides under `<output_dir>/sweeps/<sweep_name>/`, so running the same
sweep command again finds finished trials (DONE.json) and skips them; only missing or interrupted ones run.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("cogvx_train")

PREFERRED = ("train/loss", "val/loss", "val/psnr", "val/ssim", "val/lpips", "val/flicker", "global_step")


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for trial in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        done = trial / "DONE.json"
        row: dict[str, Any] = {"trial": trial.name, "status": "finished" if done.exists() else "unfinished"}
        if done.exists():
            row.update(json.loads(done.read_text()))
        rows.append(row)
    return rows


def write_summary(sweep_dir: Path) -> tuple[Path, Path] | None:
    rows = collect(sweep_dir)
    if not rows:
        return None
    keys = sorted({k for r in rows for k in r} - {"trial", "status"},
                  key=lambda k: (PREFERRED.index(k) if k in PREFERRED else len(PREFERRED), k))
    columns = ["trial", "status", *keys]
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


class SweepSummary(Callback):
    """Hydra callback: writes summary.csv and summary.md into the sweep directory when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        paths = write_summary(Path(config.hydra.sweep.dir))
        if paths:
            log.info("sweep summary: %s", paths[1])
            print(paths[1].read_text())
