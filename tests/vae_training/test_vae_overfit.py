"""The whole objective can be optimised: overfitting one clip with the real tiny VAE drives the loss down."""

from __future__ import annotations

import pytest
from vae_training_helpers import loader, make_module, make_trainer, read_metrics

STEPS = 25


@pytest.mark.slow
def test_loss_falls_when_overfitting_one_clip(tmp_path):
    # GAN off here (its schedule is tested elsewhere): this is about L1 + LPIPS + KL through the real model
    module = make_module(disc_start=STEPS, max_steps=STEPS, loss={"lpips_weight": 0.1},
                         optim={"lr": 3e-3, "warmup_steps": 3, "schedule": "constant", "weight_decay": 0.0})
    trainer = make_trainer(tmp_path, STEPS)
    trainer.fit(module, loader(num_clips=1))
    rows = [r for r in read_metrics(tmp_path) if "train/l1" in r]
    assert len(rows) == STEPS
    mean = lambda key, part: sum(r[key] for r in part) / len(part)  # noqa: E731
    assert mean("train/l1", rows[-3:]) < 0.55 * mean("train/l1", rows[:3])
    assert mean("train/total", rows[-3:]) < 0.6 * mean("train/total", rows[:3])
    assert all(r["train/gan_active"] == 0.0 for r in rows)
