"""`resume=<run dir>`: continue a run exactly, refusing config changes that would make it another run.

What is restored comes from the Lightning checkpoint (model, EMA, every optimizer and scheduler, step, data
position, per-rank RNG, callback counters) and the run directory (the wandb run id). What may change is a
documented whitelist (`resume_whitelist` in conf/train.yaml: lr, max_steps, logging, checkpoint cadence, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def config_changes(saved: dict, current: dict, whitelist: list[str]) -> tuple[list[str], list[str]]:
    """(allowed, refused) differences as 'key: old -> new' lines."""
    a, b = _flatten(saved), _flatten(current)
    allowed, refused = [], []
    for key in sorted(set(a) | set(b)):
        if key.startswith("derived.") or a.get(key, "<unset>") == b.get(key, "<unset>"):
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
    allowed, refused = config_changes(saved_plain, current, whitelist)
    if refused:
        raise ConfigError(["resume would change settings that make it a different run:"] + [f"  {r}" for r in refused]
                          + ["undo these overrides, or start a new run with init_from= to keep only the weights "
                             f"(changeable on resume: {', '.join(whitelist)})."])
    import logging

    for line in allowed:
        logging.getLogger("cogvx_train").info("resume: allowed change %s", line)
    return str(ckpt)
