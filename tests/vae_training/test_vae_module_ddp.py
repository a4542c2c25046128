"""Two-process DDP (gloo, CPU): the G/D loop runs with find_unused_parameters=True, which the VAE stage needs
(D takes no part in the generator's loss before disc_start, and the VAE none in D's loss), and the step count
stays the generator's. Without it Lightning stops at the first step with its unused-parameters message."""

from __future__ import annotations

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from vae_training_helpers import loader, make_module, read_metrics

DISC_START, STEPS = 2, 4


@pytest.mark.distributed
@pytest.mark.slow
def test_gan_training_under_ddp(tmp_path):
    module = make_module(disc_start=DISC_START, max_steps=STEPS, ema_decay=0.9, optim={"warmup_steps": 1})
    trainer = Trainer(
        accelerator="cpu", devices=2, max_steps=STEPS, log_every_n_steps=1, limit_val_batches=0,
        strategy=DDPStrategy(find_unused_parameters=True, process_group_backend="gloo", start_method="spawn"),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        logger=CSVLogger(str(tmp_path), name="", version=""))
    trainer.fit(module, loader(num_clips=8))
    rows = [r for r in read_metrics(tmp_path) if "train/total" in r]
    # max_steps=4 generator steps although D stepped twice too: D steps are not counted
    assert [int(r["step"]) for r in rows] == list(range(STEPS))
    assert [r["train/gan_active"] for r in rows] == [float(k >= DISC_START) for k in range(STEPS)]
    assert all(r["train/d_loss"] > 0 and r["train/adaptive_weight"] > 0 for r in rows[DISC_START:])
