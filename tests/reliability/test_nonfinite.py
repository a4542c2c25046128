"""Non-finite guard on real runs (`debug_inject_nan_steps` fills chosen batches with NaN): a NaN step is skipped
(weights and EMA unchanged), counted (train/skipped_nonfinite_steps), and `max_consecutive` of them in a row roll
weights, EMA and optimizer back to the last checkpoint. DiT = automatic optimisation; VAE = manual, with G and D
updates."""

from __future__ import annotations

import logging

import pytest
import torch
from lightning.pytorch import Callback
from reliability_helpers import SMALL, SMALL_VAE, metrics_by_step

from cogvx_train.train.callbacks import NonFiniteGuard

# step 1: one NaN batch (skipped); steps 4, 5: two in a row -> roll back to the step-3 checkpoint after step 5
INJECT = [1, 4, 5]
OVERRIDES = ["trainer.max_steps=7", "checkpoint.every_n_steps=3", "callbacks.nonfinite_guard.max_consecutive=2",
             f"debug_inject_nan_steps=[{','.join(map(str, INJECT))}]"]


class WeightRecorder(Callback):
    """The trainable weights, EMA shadow and EMA update count after every step, per sub-model (after the guard has
    acted on the step)."""

    def __init__(self, parts: tuple[str, ...]):
        self.parts = parts
        self.after: list[dict[str, torch.Tensor]] = []
        self.ema: list[torch.Tensor] = []
        self.ema_updates: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append({part: torch.cat([p.detach().flatten() for p in getattr(pl_module, part).parameters()
                                            if p.requires_grad]).clone() for part in self.parts})
        self.ema.append(torch.cat([t.flatten() for t in pl_module.ema.shadow.values()]).clone())
        self.ema_updates.append(pl_module.ema.num_updates)


def _train(overrides: list[str], run_path, recorder: WeightRecorder, inject=tuple(INJECT)):
    from hydra import compose, initialize_config_module

    from cogvx_train.config import resolvers
    from cogvx_train.train import factory
    from cogvx_train.train.run_dir import RunDirectory

    resolvers.register()
    with initialize_config_module(config_module="cogvx_train.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    run = RunDirectory(run_path)
    factory.check_config(cfg, 1)
    factory.seed_everything(cfg.seed)
    datamodule, module = factory.build_datamodule(cfg), factory.build_module(cfg, run)
    callbacks = [*factory.build_callbacks(cfg, run), recorder]
    assert any(isinstance(cb, NonFiniteGuard) and cb.inject_nan_steps == set(inject) for cb in callbacks)
    trainer = factory.build_trainer(cfg, callbacks, factory.build_loggers(cfg, run))
    trainer.fit(module, datamodule=datamodule)
    return run, trainer


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["dit", "vae"])
def test_nan_steps_are_skipped_counted_and_rolled_back(kind, tmp_path, cache_dir, dataset, tiny_vae_dir, caplog):
    torch.set_num_threads(1)
    if kind == "dit":
        overrides, parts = ["stage=dit_b1", *SMALL, f"model.vae.weights={tiny_vae_dir}"], ("dit",)
    else:  # the GAN from step 0, so every step has a generator and a discriminator update
        overrides, parts = [*SMALL_VAE, "vae_loss.disc_start=0"], ("vae", "discriminator")
    recorder = WeightRecorder(parts)
    with caplog.at_level(logging.WARNING, logger="cogvx_train"):
        run, trainer = _train([*overrides, *OVERRIDES, f"paths.output_dir={tmp_path}"], tmp_path / "run", recorder)
    w = recorder.after
    assert trainer.global_step == 7 and len(w) == 7
    assert all(torch.isfinite(v).all() for step in w for v in step.values())

    # a normal step changes every sub-model; a NaN step changes none (G and D alike)
    for part in parts:
        assert not torch.equal(w[0][part], w[2][part]) and not torch.equal(w[2][part], w[3][part]), part
    assert _same(w[1], w[0]), "the NaN step 1 changed the weights"
    assert _same(w[4], w[3]), "the NaN step 4 changed the weights"
    # ... nor the EMA, which a normal step moves (the EMA of G only: a skipped step has no update to average)
    shadows = recorder.ema
    assert torch.equal(shadows[1], shadows[0]), "the NaN step 1 moved the EMA"
    assert torch.equal(shadows[4], shadows[3]), "the NaN step 4 moved the EMA"
    assert not torch.equal(shadows[2], shadows[1]) and not torch.equal(shadows[3], shadows[2])
    # folds per step: steps 1 and 4 add none; the roll-back after step 5 restores the count saved at step 3
    assert recorder.ema_updates == [1, 1, 2, 3, 3, 2, 3]
    assert torch.equal(shadows[5], shadows[2])
    # the second NaN step in a row rolls back to the step-3 checkpoint: the weights after step 2, not after step 3
    assert _same(w[5], w[2]) and not _same(w[5], w[3])
    ckpt = torch.load(run.checkpoints / "step-00000006.ckpt", map_location="cpu", weights_only=False)
    ema = ckpt["dit_ema" if kind == "dit" else "vae_ema"]
    saved_at_3 = torch.load(run.checkpoints / "step-00000003.ckpt", map_location="cpu", weights_only=False)
    ema_at_3 = saved_at_3["dit_ema" if kind == "dit" else "vae_ema"]
    assert all(torch.equal(ema["shadow"][k], ema_at_3["shadow"][k]) for k in ema["shadow"]), "EMA not rolled back"
    assert not _same(w[6], w[5])  # and training goes on

    # counted and logged, with a clear line for each skip and for the roll-back
    steps = metrics_by_step(run.path)
    counts = {s: float(steps[s]["train/skipped_nonfinite_steps"]) for s in range(7)}
    assert counts == {0: 0, 1: 1, 2: 1, 3: 1, 4: 2, 5: 3, 6: 3}
    assert steps[1]["train/loss"] == "nan" and steps[2]["train/loss"] != "nan"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("non-finite loss or gradients at step" in m for m in messages) == 3
    rollback = [m for m in messages if "rolled model, EMA and optimizer back to" in m]
    assert len(rollback) == 1 and "last.ckpt (saved at step 3)" in rollback[0], rollback
    assert trainer.checkpoint_callback is not None
    guard = next(cb for cb in trainer.callbacks if isinstance(cb, NonFiniteGuard))
    assert (guard.total_skipped, guard.rollbacks) == (3, 1)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_with_gradient_accumulation_a_nan_skips_and_counts_one_optimizer_step(tmp_path, cache_dir, dataset,
                                                                               tiny_vae_dir):
    """trainer.accumulate_grad_batches=2: step 1's two micro-batches are NaN. The guard decides once per optimizer
    step (after both micro-batches' gradients are summed): one skip counted, not two; weights and EMA move only at
    the ends of steps 0 and 2; the data position counts micro-batches."""
    torch.set_num_threads(1)
    recorder = WeightRecorder(("dit",))
    overrides = ["stage=dit_b1", *SMALL, f"model.vae.weights={tiny_vae_dir}", "trainer.accumulate_grad_batches=2",
                 "trainer.max_steps=3", "checkpoint.every_n_steps=1", "debug_inject_nan_steps=[1]",
                 f"paths.output_dir={tmp_path}"]
    run, trainer = _train(overrides, tmp_path / "run", recorder, inject=(1,))
    w = [step["dit"] for step in recorder.after]  # one entry per micro-batch
    assert trainer.global_step == 3 and len(w) == 6
    assert not torch.equal(w[1], w[0])  # end of step 0: an update
    assert torch.equal(w[2], w[1]) and torch.equal(w[3], w[2])  # step 1: accumulating, then skipped
    assert torch.equal(w[4], w[3]) and not torch.equal(w[5], w[4])  # step 2: accumulating, then an update
    assert recorder.ema_updates == [0, 1, 1, 1, 1, 2]
    assert torch.equal(recorder.ema[3], recorder.ema[1])
    assert float(metrics_by_step(run.path)[2]["train/skipped_nonfinite_steps"]) == 1.0
    assert trainer.datamodule.position.samples_seen == 6 * trainer.datamodule.batch_size
