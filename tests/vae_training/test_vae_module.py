"""VAETrainingModule under a real Lightning Trainer on the real tiny VAE: the G/D schedule, step counting,
logging of every term, and checkpoint round trips."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from vae_training_helpers import loader, make_module, make_trainer, read_metrics

from cogvx_train.vae.module import VAETrainingModule

DISC_START, MAX_STEPS = 3, 6


class Recorder(pl.Callback):
    """Per training step: counters at its start, discriminator weights at its end."""

    def __init__(self):
        self.start_steps, self.disc_params = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.start_steps.append((trainer.global_step, module.generator_step))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.disc_params.append(torch.cat([p.detach().flatten() for p in module.discriminator.parameters()]))


def adam_steps(optimizer: torch.optim.Optimizer) -> int:
    steps = {int(s["step"]) for s in optimizer.state.values()}
    assert len(steps) == 1
    return steps.pop()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae_run")
    module = make_module(disc_start=DISC_START, max_steps=MAX_STEPS, ema_decay=0.9)
    disc_init = torch.cat([p.detach().flatten().clone() for p in module.discriminator.parameters()])
    recorder = Recorder()
    trainer = make_trainer(root, MAX_STEPS, callbacks=[recorder])
    trainer.fit(module, loader(num_clips=4))
    return root, module, trainer, recorder, disc_init


def test_global_step_counts_generator_steps_only(run):
    _, module, trainer, recorder, _ = run
    assert trainer.global_step == MAX_STEPS  # max_steps means generator steps, D updates are not counted
    assert module.generator_step == MAX_STEPS
    assert recorder.start_steps == [(k, k) for k in range(MAX_STEPS)]
    opt_g, opt_d = trainer.optimizers
    assert adam_steps(opt_g) == MAX_STEPS
    assert adam_steps(opt_d) == MAX_STEPS - DISC_START


def test_discriminator_updates_exactly_from_disc_start(run):
    _, _, _, recorder, disc_init = run
    snapshots = [disc_init] + recorder.disc_params
    changed = [not torch.equal(a, b) for a, b in zip(snapshots, snapshots[1:])]
    assert changed == [k >= DISC_START for k in range(MAX_STEPS)]


def test_gan_term_logged_from_disc_start_and_every_term_non_zero(run):
    root, *_ = run
    rows = {int(r["step"]): r for r in read_metrics(root) if "train/total" in r}
    assert sorted(rows) == list(range(MAX_STEPS))
    base = ["l1", "lpips", "kl", "kl_per_clip", "rec", "total", "grad_norm_g", "lr_g"]
    gan = ["g_loss", "adaptive_weight", "gan_weight", "d_loss", "d_logits_real", "d_logits_fake", "grad_norm_d",
           "lr_d"]
    for step, row in rows.items():
        on = step >= DISC_START
        assert row["train/gan_active"] == float(on)
        for name in base + (gan if on else []):
            value = row[f"train/{name}"]
            assert math.isfinite(value) and value != 0.0, (step, name)
        if not on:
            assert not any(f"train/{name}" in row for name in gan), step
        else:
            assert 0.0 < row["train/adaptive_weight"] <= 1e4
            assert row["train/gan_weight"] == pytest.approx(0.5 * row["train/adaptive_weight"], rel=1e-5)
            # total = rec + w_kl * kl + gan_weight * g_loss: the adaptive weight is applied
            expected = row["train/rec"] + 1e-6 * row["train/kl"] + row["train/gan_weight"] * row["train/g_loss"]
            assert row["train/total"] == pytest.approx(expected, rel=1e-5)


def test_logged_learning_rates_follow_the_schedules(run):
    root, *_ = run
    rows = {int(r["step"]): r for r in read_metrics(root) if "train/total" in r}
    assert rows[0]["train/lr_g"] == pytest.approx(2e-4 * 0.5)  # warmup 2: first step at half the lr
    assert rows[1]["train/lr_g"] == pytest.approx(2e-4)
    # D warms up over its own first steps, starting at disc_start
    assert rows[DISC_START]["train/lr_d"] == pytest.approx(2e-4 * 0.5)
    assert rows[DISC_START + 1]["train/lr_d"] == pytest.approx(2e-4)


def test_hyperparameters_are_plain_values(run):
    _, module, *_ = run
    def plain(v):
        if isinstance(v, dict):
            return all(plain(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return all(plain(x) for x in v)
        return v is None or isinstance(v, (str, int, float, bool))
    assert plain(dict(module.hparams))
    assert module.hparams.loss["disc_start"] == DISC_START


def test_checkpoint_round_trip_keeps_step_counter_ema_and_resumes(run, tmp_path):
    _, module, trainer, _, _ = run
    path = tmp_path / "step6.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert ckpt["vae_generator_step"] == MAX_STEPS and ckpt["global_step"] == MAX_STEPS
    assert not any(k.startswith("loss.perceptual.") for k in ckpt["state_dict"])  # LPIPS is not trained state
    assert set(ckpt["vae_ema"]["shadow"]) == {n for n, _ in module.vae.named_parameters()}

    restored = VAETrainingModule.load_from_checkpoint(path, map_location="cpu")
    assert restored.generator_step == MAX_STEPS
    for (name, a), b in zip(module.vae.state_dict().items(), restored.vae.state_dict().values()):
        assert torch.equal(a, b), name
    for name, t in module.ema.shadow.items():
        assert torch.equal(restored.ema.shadow[name], t)

    # continue the run for two more generator steps (GAN on): counters continue, D steps twice more
    resumed = make_module(disc_start=DISC_START, max_steps=MAX_STEPS + 2, ema_decay=0.9)
    recorder = Recorder()
    trainer2 = make_trainer(tmp_path / "resumed", MAX_STEPS + 2, callbacks=[recorder])
    trainer2.fit(resumed, loader(num_clips=4), ckpt_path=str(path))
    assert recorder.start_steps == [(MAX_STEPS, MAX_STEPS), (MAX_STEPS + 1, MAX_STEPS + 1)]
    assert resumed.generator_step == trainer2.global_step == MAX_STEPS + 2
    opt_g, opt_d = trainer2.optimizers
    assert adam_steps(opt_g) == MAX_STEPS + 2 and adam_steps(opt_d) == MAX_STEPS + 2 - DISC_START
    assert resumed.ema.num_updates == module.ema.num_updates + 2


def test_mid_run_weight_rollback_does_not_rewind_the_step_counter(run):
    """The non-finite guard reloads weights mid-run through on_load_checkpoint; the trainer's step count (and the
    lr schedulers) go on, so the generator step must too."""
    _, module, trainer, _, _ = run
    module.on_load_checkpoint({"vae_generator_step": 2, "state_dict": {}, "vae_ema": module.ema.state_dict()})
    assert module.generator_step == trainer.global_step == MAX_STEPS
