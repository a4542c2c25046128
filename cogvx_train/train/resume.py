"""`resume=<run dir>`: continue a run exactly, refusing config changes that would make it another run.

What is restored comes from the Lightning checkpoint (model, EMA, every optimizer and scheduler, step, data
position, per-rank RNG, callback counters) and the run directory (the wandb run id, metrics.csv). What may change is
a documented whitelist (`resume_whitelist` in conf/train.yaml: lr, max_steps, logging, checkpoint cadence, ...).
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf

from cogvx_train.config import ConfigError
from cogvx_train.train.run_dir import RunDirectory


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if node else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


# Settings added after some run directories were written: {key: (setting, value, behaviour)}. A saved config without
# `key` whose `setting` is `value` ran as `key`=behaviour: before trainer.wrap_blocks (one FSDP unit per block)
# existed, FSDP wrapped the whole DiT as one unit; before trainer.cpu_offload, FSDP never offloaded.
_BEFORE_ADDED = {"trainer.wrap_blocks": ("trainer.strategy", "fsdp", False),
                 "trainer.cpu_offload": ("trainer.strategy", "fsdp", False)}


def config_changes(saved: dict, current: dict, whitelist: list[str]) -> tuple[list[str], list[str]]:
    """(allowed, refused) differences as 'key: old -> new' lines. A setting the saved run predates counts as the
    behaviour that run had (`_BEFORE_ADDED`), so naming that behaviour on resume changes nothing."""
    a, b = _flatten(saved), _flatten(current)
    for key, (setting, value, then) in _BEFORE_ADDED.items():
        if key not in a and a.get(setting) == value:
            a[key] = then
    allowed, refused = [], []
    for key in sorted(set(a) | set(b)):
        if key.startswith(("derived.", "resume_whitelist")) or a.get(key, "<unset>") == b.get(key, "<unset>"):
            continue
        line = f"{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}"
        ok = any(key == w or key.startswith(w + ".") for w in whitelist)
        (allowed if ok else refused).append(line)
    return allowed, refused


def resume_checkpoint_path(cfg: DictConfig, run: RunDirectory) -> str:
    """The checkpoint to continue from, after checking that the config only changed where allowed."""
    target = Path(str(cfg.resume)).expanduser()
    ckpt = target if target.is_file() else run.checkpoints / "last.ckpt"
    if not ckpt.exists():
        raise ConfigError(f"resume={cfg.resume} has no checkpoints/last.ckpt yet; resume a run that wrote at least "
                          "one checkpoint, or start it again without resume=.")
    saved = run.saved_config()
    if saved is None:
        raise ConfigError(f"resume={cfg.resume} has no config.yaml; it is not a cogvx-train run directory.")
    saved_plain = OmegaConf.to_container(saved, resolve=True)
    saved_plain.pop("derived", None)
    current = OmegaConf.to_container(cfg, resolve=True)
    whitelist = list(current.get("resume_whitelist") or [])
    if saved_plain.get("stage_name") != current.get("stage_name"):
        # another stage changes nearly every setting: name the stage rather than list them all
        raise ConfigError(f"resume={cfg.resume} is a {saved_plain.get('stage_name')} run, but this launch is "
                          f"stage={current.get('stage_name')}; resume it with stage={saved_plain.get('stage_name')}, "
                          f"or start a {current.get('stage_name')} run from its weights with init_from=.")
    allowed, refused = config_changes(saved_plain, current, whitelist)
    if refused:
        raise ConfigError(["resume would change settings that make it a different run:"] + [f"  {r}" for r in refused]
                          + ["undo these overrides, or start a new run with init_from= to keep only the weights "
                             f"(changeable on resume: {', '.join(whitelist)})."])
    for line in allowed:
        logging.getLogger("cogvx_train").info("resume: allowed change %s", line)
    if int(os.environ.get("RANK", "0")) == 0:
        from cogvx_train.train.checkpointing import remove_partial_files

        for p in remove_partial_files(run.checkpoints):
            logging.getLogger("cogvx_train").info("resume: removed %s, left by a save that was interrupted", p)
    return str(ckpt)


# ----------------------------------------------------------------------------------------------------------------
# metrics.csv across kills and resumes
# ----------------------------------------------------------------------------------------------------------------
class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes the metrics.csv it finds. This one keeps it until the first row of the new
    launch arrives, then keeps the rows of earlier steps and drops those at or after it: the rows a killed launch
    wrote past its last checkpoint are replaced by the resumed launch's, and the file reads like one run."""

    def _check_log_dir_exists(self) -> None:
        self._continuing = self._fs.isfile(self.metrics_file_path)

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        if getattr(self, "_continuing", False) and step is not None:
            self._continuing = False
            self._keep_rows_before(int(step))
        super().log_metrics(metrics_dict, step)

    def logged_keys_at(self, step: int) -> set[str]:
        """The columns that rows of ``step`` already have in metrics.csv (a torn last line counts as absent)."""
        if not self._fs.isfile(self.metrics_file_path):
            return set()
        keys: set[str] = set()
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            for row in csv.DictReader(f):
                try:
                    if row.get("step") and int(float(row["step"])) == step and None not in row:
                        keys.update(k for k, v in row.items() if k != "step" and v not in ("", None))
                except ValueError:
                    continue
        return keys

    def continue_after(self, step: int) -> None:
        """Keep the rows up to ``step`` and drop later ones now, before rows of ``step`` itself are added (the
        catch-up of a resume, see catch_up.py); the first row logged afterwards trims nothing more."""
        if getattr(self, "_continuing", False):
            self._continuing = False
            self._keep_rows_before(step + 1)

    def _keep_rows_before(self, step: int) -> None:
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step") not in (None, "") and int(float(r["step"])) < step]
        if not rows:
            self._fs.rm_file(self.metrics_file_path)
            return
        self._replace_file(header, rows)
        self.metrics_keys = header

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        # Lightning rewrites the file in place whenever a new column appears (the first validation, say): a kill
        # in the middle would truncate every row logged so far
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            rows = list(csv.DictReader(f))
        self._replace_file(fieldnames, rows)

    def _replace_file(self, header: list[str], rows: list[dict[str, str]]) -> None:
        """metrics.csv replaced atomically: written next to it, flushed to disk, renamed over it."""
        tmp = f"{self.metrics_file_path}.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.metrics_file_path)


class RunCSVLogger(CSVLogger):
    """`<run>/metrics.csv` that survives kills and resumes: every logged row is on disk at once (a SIGKILL loses
    nothing that was logged), and a resumed launch continues the file (see _ContinuingWriter) instead of
    starting it afresh."""

    def __init__(self, run_dir: str | os.PathLike):
        super().__init__(save_dir=str(run_dir), name="", version="", flush_logs_every_n_steps=1)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment
