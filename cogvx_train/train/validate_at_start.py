"""Validation at step 0: the baseline every later validation is compared with.

Lightning validates only after training steps (``val_check_interval``); its sanity check runs the loop but
throws the metrics away. A fresh run of this framework therefore starts with one real validation pass, logged
at step 0 under the usual ``val/*`` keys (so ``metrics.csv`` and wandb show "held-out PSNR at step 0 -> step N"
directly), and writes the step-0 reconstructions / samples like any other validation. A resumed run skips it:
its baseline was logged when it first started.
"""

from __future__ import annotations

from lightning.pytorch import Callback


class ValidateAtStart(Callback):
    """Run the trainer's validation loop once before the first training step of a fresh run."""

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step != 0 or trainer.ckpt_path is not None or trainer.limit_val_batches == 0:
            return
        # the same sequence Lightning's training loop uses when it validates mid-epoch
        first_loop_iter = trainer._logger_connector._first_loop_iter
        trainer.validating = True
        trainer.fit_loop.epoch_loop.val_loop.run()  # sets up the val loader; skips if there is none
        trainer.training = True
        trainer._logger_connector._first_loop_iter = first_loop_iter
