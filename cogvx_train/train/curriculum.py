"""One command for a progression of stages: `cogvx-train stage=curriculum_dit` (b1 -> b2 -> b3 -> b4) or
`stage=curriculum_vae` (a1 -> a2), or your own list with `curriculum.stages=[dit_b1,dit_b2]`.

Each stage runs in `<curriculum dir>/<i>_<stage>/` and starts (init_from) from the previous stage's last
checkpoint, whose EMA weights the next stage loads. Running the same command again skips stages that finished
(DONE.json) and resumes the one that was interrupted (resume=), so a curriculum survives any number of kills.
"""

from __future__ import annotations

import logging
from omegaconf import DictConfig

from cogvx_train.train.run_dir import RunDirectory

log = logging.getLogger("cogvx_train")

# Overrides of the curriculum command that must not be forwarded to its stages.
OWN_KEYS = ("stage", "curriculum", "resume", "hydra")


def stage_overrides(task_overrides: list[str]) -> list[str]:
    return [o for o in task_overrides if o.split("=", 1)[0].lstrip("+~").split(".")[0] not in OWN_KEYS]


def run_curriculum(cfg: DictConfig, run: RunDirectory, task_overrides: list[str]) -> dict:
    from hydra import compose

    from cogvx_train.cli.train import train

    forwarded = stage_overrides(task_overrides)
    previous: RunDirectory | None = None
    metrics: dict = {}
    for i, stage in enumerate(cfg.curriculum.stages):
        stage_run = RunDirectory(run.path / f"{i}_{stage}")
        if stage_run.finished():
            log.info("curriculum: %s already finished in %s; skipping", stage, stage_run.path)
            previous, metrics = stage_run, stage_run.final_metrics()
            continue
        overrides = [f"stage={stage}", *forwarded]
        if previous is not None:
            overrides.append(f"init_from={previous.checkpoints / 'last.ckpt'}")
        if (stage_run.checkpoints / "last.ckpt").exists():
            overrides.append(f"resume={stage_run.path}")
            log.info("curriculum: resuming %s from %s", stage, stage_run.path)
        else:
            log.info("curriculum: starting %s in %s", stage, stage_run.path)
        metrics = train(compose(config_name="train", overrides=overrides), run=stage_run)
        previous = stage_run
    return metrics
