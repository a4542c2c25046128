"""A resumed run catches up on the metrics of the step its checkpoint was written at.

Lightning writes the checkpoint of step N in the callbacks' ``on_train_batch_end``, and only afterwards logs that
step's metrics row (end of the batch loop) and runs the validation due after it. A kill in between leaves a
checkpoint whose own step has no training row, or no validation rows, in ``metrics.csv`` and the logger; the
resumed run goes on with step N + 1, so without this callback the gap would stay for good. For the training row
that window is milliseconds; for validation it is as long as validation takes (minutes, when it samples videos).

So every checkpoint written at the end of a training step carries (``CHECKPOINT_KEY``):

* the row Lightning is about to log for that step (every metric logged so far in the step, the same values);
* whether validation is due right after the step.

On resume, before the first training step, rank 0 looks in ``metrics.csv`` for that step: a missing training row
is written from the checkpoint; missing validation rows are produced by running the validation loop, labelled with
that step as in an uninterrupted run. A checkpoint of the run's final step leaves the resumed ``fit`` nothing to
train, so Lightning returns before ``on_train_start``: the CLI then calls :meth:`CatchUpOnResume.after_fit`, which
does the same through ``trainer.validate`` and hands back the metrics DONE.json records. The RNG callback isolates
the training stream from validation (callbacks.RNGStateCallback), so the catch-up changes nothing that the
following steps draw.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars
from lightning.pytorch import Callback

log = logging.getLogger("cogvx_train")

CHECKPOINT_KEY = "cogvx_step_rows"


def _in_batch_end(trainer) -> bool:
    """Between a training batch's processing and its completion: the callbacks' ``on_train_batch_end``, where
    ModelCheckpoint saves. Saves elsewhere (end of fit, a roll-back, by hand) follow a step whose rows are out."""
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return trainer.training and not trainer.sanity_checking and progress.processed > progress.completed


class CatchUpOnResume(Callback):
    """Puts the checkpoint step's pending row and validation into the checkpoint; writes what a kill lost on resume.
    Needs the run's metrics.csv logger (RunCSVLogger) to tell what was lost; without it nothing is replayed."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if not _in_batch_end(trainer):
            return
        loop = trainer.fit_loop.epoch_loop
        connector = trainer._logger_connector
        logs_row = not (loop._should_accumulate() and pl_module.automatic_optimization) and connector.should_update_logs
        row = convert_tensors_to_scalars(dict(connector.metrics["log"])) if logs_row else {}
        if row:
            row.setdefault("epoch", trainer.current_epoch)
        validation_due = trainer.enable_validation and loop._should_check_val_fx(trainer.fit_loop._data_fetcher)
        checkpoint[CHECKPOINT_KEY] = {
            "step": int(loop._batches_that_stepped),  # the label Lightning gives this step's rows
            "train_row": row,
            "validation_due": bool(validation_due),
            # what DONE.json records if this is the final step and a resume finds nothing left to train
            "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()
                                 if isinstance(v, torch.Tensor) and v.numel() == 1},
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get(CHECKPOINT_KEY)

    def on_train_start(self, trainer, pl_module) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self._catch_up(trainer, pending, lambda step: self._validate_as_step(trainer, step))

    def after_fit(self, trainer, module, datamodule) -> dict[str, float]:
        """The catch-up for a checkpoint of the run's final step. ``fit`` then returns at once (nothing left to
        train), so ``on_train_start`` never runs: the CLI calls this after ``fit`` on every rank. The validation
        due after the final step runs through ``trainer.validate``, labelled like the in-fit one. Returns the
        final step's metrics as they stood when its checkpoint was saved (for DONE.json: the skipped fit produced
        none); {} when this launch trained or resumed from no checkpoint."""
        pending, self._pending = self._pending, None
        if pending is None:
            return {}

        def validate(step: int) -> None:
            loop = trainer.fit_loop.epoch_loop
            resumed_at, loop._batches_that_stepped = loop._batches_that_stepped, step
            try:
                trainer.validate(module, datamodule=datamodule, verbose=False)
            finally:
                loop._batches_that_stepped = resumed_at

        self._catch_up(trainer, pending, validate)
        return dict(pending.get("callback_metrics", {}))

    def _catch_up(self, trainer, pending: dict[str, Any], validate) -> None:
        """Write the checkpoint step's training row and run its validation (``validate(step)``), where metrics.csv
        lacks them."""
        from cogvx_train.train.resume import RunCSVLogger

        csv_logger = next((lg for lg in trainer.loggers if isinstance(lg, RunCSVLogger)), None)
        if not trainer.is_global_zero:
            csv_logger = None  # the file is rank 0's
        missing = {"train": False, "val": False}
        if trainer.is_global_zero and csv_logger is not None:
            keys = csv_logger.experiment.logged_keys_at(pending["step"])
            missing["train"] = bool(pending["train_row"]) and not set(pending["train_row"]) - {"epoch"} <= keys
            missing["val"] = pending["validation_due"] and not any(k.startswith("val/") for k in keys)
        missing = trainer.strategy.broadcast(missing, src=0)  # every rank must join a validation run
        if not (missing["train"] or missing["val"]):
            return
        step = pending["step"]
        if csv_logger is not None:
            csv_logger.experiment.continue_after(step)  # keep what step `step` has; drop the killed launch's later rows
        if missing["train"]:
            log.info("resume: the killed launch never logged step %d's metrics; writing them from the checkpoint", step)
            for logger in trainer.loggers:
                logger.log_metrics(dict(pending["train_row"]), step=step)
                logger.save()
        if missing["val"]:
            log.info("resume: the killed launch did not finish the validation after step %d; running it now", step)
            validate(step)

    @staticmethod
    def _validate_as_step(trainer, step: int) -> None:
        """The validation loop, its rows labelled ``step`` (the loop's counter is one past it after a restart), as
        Lightning's training loop runs it mid-epoch (see validate_at_start.py)."""
        loop = trainer.fit_loop.epoch_loop
        first_loop_iter = trainer._logger_connector._first_loop_iter
        resumed_at = loop._batches_that_stepped
        loop._batches_that_stepped = step
        try:
            trainer.validating = True
            loop.val_loop.run()
        finally:
            trainer.training = True
            trainer._logger_connector._first_loop_iter = first_loop_iter
            loop._batches_that_stepped = resumed_at
