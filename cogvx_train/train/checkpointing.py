"""Checkpoints that survive a kill at any moment, describe themselves and load without the training engine.

* Atomic: every file is written to ``<name>.tmp-<pid>`` in the same directory, fsynced, then renamed over the
  target, so a SIGKILL during a save leaves the previous checkpoint loadable.
* Keep-last-k: ModelCheckpoint ranks checkpoints by step and deletes the oldest beyond k; ``last.ckpt`` always
  holds the newest state. A resume removes the temporary files of a save that was killed.
* Self-describing: each checkpoint carries ``cogvx`` metadata (resolved config, stage, step, format version).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cogvx_train.config import ConfigError
from cogvx_train.train.consolidate import unreadable

FORMAT_VERSION = 1


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through a temporary file and a rename: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer with :func:`atomic_torch_save` underneath."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote stores: their own semantics
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))


# Lightning warns at every save under manual optimisation (the VAE) that the file holds the weights after the
# optimizer step; that is what a checkpoint of step N must hold here.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also saves the step the run ends with.

    Lightning saves only every `every_n_train_steps`; a run whose max_steps is not a multiple of it would leave
    last.ckpt behind its final weights, and `init_from=<run>` (the next curriculum stage) or a resume with a larger
    max_steps would start from an older state than the one the run finished with (and exported). The final save
    happens at the end of the last batch, like every other one: after Lightning's end-of-epoch hooks (on_train_end,
    or a save after fit returns) the data position has already moved on to the next epoch, and a resume from such
    a file would skip the rest of the current one.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        last_step = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        if last_step and not self._should_skip_saving_checkpoint(trainer):  # skips a step saved already
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)


def build_checkpoint_callback(dirpath: Path, every_n_steps: int, keep_last_k: int) -> ModelCheckpoint:
    return StepCheckpoint(
        dirpath=str(dirpath),
        filename="step-{step:08d}",
        auto_insert_metric_name=False,
        monitor="step",
        mode="max",
        save_top_k=keep_last_k,
        every_n_train_steps=every_n_steps,
        save_last=True,
        save_on_train_epoch_end=False,
        # a resumed run re-saves the steps after its checkpoint under the same names: replace them, never add
        # step-XXXXXXXX-v1.ckpt copies that keep-last-k would not know about
        enable_version_counter=False,
    )


def remove_partial_files(dirpath: str | os.PathLike) -> list[Path]:
    """Delete the ``*.tmp-<pid>`` files a killed save left behind (the checkpoints themselves are intact)."""
    dirpath = Path(dirpath)
    removed = sorted(dirpath.glob("*.tmp-*")) if dirpath.is_dir() else []
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint on the CPU with one clear sentence if it is missing or unreadable."""
    path = Path(path).expanduser()
    if path.is_dir():
        candidates = [path / "checkpoints" / "last.ckpt", path / "last.ckpt"]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise ConfigError(f"{path} holds no checkpoints/last.ckpt; give a run directory that has trained at "
                              "least one checkpoint interval, or a .ckpt file.")
        path = found
    if not path.exists():
        raise ConfigError(f"checkpoint {path} does not exist; give an existing .ckpt file or run directory.")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - not a torch archive, or one cut short: see consolidate.unreadable
        raise ConfigError(f"checkpoint {unreadable(path, err)}") from err
