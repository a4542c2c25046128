"""Weights & Biases logging that never needs an account and continues the same run on resume."""

from __future__ import annotations

import netrc
import os
import secrets
import string

from omegaconf import DictConfig

from cogvx_train.train.run_dir import RunDirectory


def has_wandb_account() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """auto: online with an account, offline without; WANDB_MODE in the environment wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if mode == "auto":
        return "online" if has_wandb_account() else "offline"
    return mode


def run_id(run: RunDirectory) -> str:
    """The run's wandb id, created once and kept in the run directory so a resume logs to the same run."""
    path = run.path / "wandb_id.txt"
    if path.exists():
        return path.read_text().strip()
    # wandb's own generator moved between releases (wandb.util -> wandb.sdk.lib.runid): make the same kind of id
    rid = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    if int(os.environ.get("RANK", "0")) == 0:
        run.path.mkdir(parents=True, exist_ok=True)
        path.write_text(rid)
    return rid


def build_wandb_logger(wcfg: DictConfig, run: RunDirectory, stage: str):
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(
        project=wcfg.project,
        entity=wcfg.entity,
        name=f"{stage}/{run.path.name}",
        id=run_id(run),
        resume="allow",
        save_dir=str(run.path),
        mode=resolve_mode(wcfg.mode),
        tags=list(wcfg.tags),
    )
