"""OmegaConf resolvers used by conf/train.yaml. Registered by the CLI (and tests), never at import time."""

from __future__ import annotations

import hashlib
import os
import re
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf


def run_dir(output_dir: str, stage_name: str, resume: str | None) -> str:
    """Where a single run writes: the resumed run's own directory, else a new timestamped one."""
    if resume:
        path = Path(str(resume)).expanduser()
        # resume may name a checkpoint file inside <run>/checkpoints/
        if path.is_file():
            path = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return str(path)
    if stage_name.startswith("curriculum"):
        # deterministic, so re-running the same curriculum command finds its finished and interrupted stages
        return str(Path(output_dir) / "curricula" / stage_name)
    # Every rank must agree on the directory: a launcher-wide id when there is one, else the start time.
    stamp = os.environ.get("COGVX_RUN_ID") or os.environ.get("SLURM_JOB_ID") or ""
    if not stamp and os.environ.get("TORCHELASTIC_RUN_ID", "none") != "none":
        stamp = os.environ["TORCHELASTIC_RUN_ID"]
    stamp = stamp or datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return str(Path(output_dir) / "runs" / stage_name / stamp)


def trial_name(override_dirname: str) -> str:
    """A sweep trial's directory name from its overrides, safe for every filesystem."""
    if not override_dirname:
        return "default"
    name = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", override_dirname)
    if len(name) <= 200:
        return name
    # cut to fit file-name limits, keeping trials apart: two trials that differ only past the cut get their own
    # directories (the hash covers the whole override string)
    return f"{name[:183]}-{hashlib.sha1(override_dirname.encode()).hexdigest()[:16]}"


def register() -> None:
    """Idempotent: safe to call from the CLI and from every test."""
    OmegaConf.register_new_resolver("cogvx_run_dir", run_dir, replace=True)
    OmegaConf.register_new_resolver("cogvx_trial_name", trial_name, replace=True)
