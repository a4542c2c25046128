"""One directory per run (or sweep trial) holding everything needed to understand and continue it.

    <run>/config.yaml        the fully resolved config (+ `derived:` values)
    <run>/command.txt        the command line, one entry per launch (resumes append)
    <run>/train.log          Hydra's log file
    <run>/metrics.csv        csv logger
    <run>/checkpoints/       step-*.ckpt, last.ckpt (atomic writes, keep-last-k)
    <run>/samples/           reconstruction / sample videos
    <run>/export/            diffusers-format weights of the final model
    <run>/DONE.json          final metrics; its presence means the run finished
"""

from __future__ import annotations

import json
import os
import shlex
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


class RunDirectory:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser().resolve()

    @classmethod
    def from_hydra(cls, cfg: DictConfig) -> "RunDirectory":
        """The directory Hydra chose (it never changes the working directory); a plain path outside Hydra."""
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return cls(HydraConfig.get().runtime.output_dir)
        from cogvx_train.config.resolvers import run_dir

        return cls(run_dir(cfg.paths.output_dir, cfg.stage_name, cfg.resume))

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def export(self) -> Path:
        return self.path / "export"

    @property
    def done_marker(self) -> Path:
        return self.path / "DONE.json"

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    def finished(self) -> bool:
        return self.done_marker.exists()

    def final_metrics(self) -> dict[str, Any]:
        return json.loads(self.done_marker.read_text()) if self.finished() else {}

    def saved_config(self) -> DictConfig | None:
        return OmegaConf.load(self.config_file) if self.config_file.exists() else None

    def write_config(self, cfg: DictConfig, derived: dict[str, Any], argv: list[str]) -> None:
        """Resolved config + derived values + the command line. Only rank 0 writes."""
        if int(os.environ.get("RANK", "0")) != 0:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        resolved["derived"] = derived
        tmp = self.config_file.with_suffix(".yaml.tmp")
        tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
        os.replace(tmp, self.config_file)
        with open(self.path / "command.txt", "a") as f:
            f.write(f"# {datetime.now().isoformat(timespec='seconds')}\n{shlex.join(argv)}\n")

    def mark_finished(self, metrics: dict[str, Any]) -> None:
        tmp = self.done_marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True))
        os.replace(tmp, self.done_marker)
