"""VAETrainingModule: validation (metrics + side-by-side mp4 on the EMA weights), image batches, bf16, export and
init_from."""

from __future__ import annotations

import av
import lightning.pytorch as pl
import pytest
import torch
from vae_training_helpers import loader, make_module, make_trainer, read_metrics

from cogvx_train.vae import load_diffusers_vae


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three generator steps (GAN from step 1), EMA on, then one validation pass on two fixed clips."""
    root = tmp_path_factory.mktemp("vae_val")
    module = make_module(disc_start=1, max_steps=3, ema_decay=0.5, samples_dir=str(root / "samples"),
                         num_val_videos=2)
    trainer = make_trainer(root, 3, limit_val_batches=1.0)
    trainer.fit(module, loader(num_clips=2))
    metrics = trainer.validate(module, loader(num_clips=2, batch_size=2, num_real_frames=4), verbose=False)[0]
    return root, module, trainer, metrics


def test_validation_logs_every_metric(trained):
    *_, metrics = trained
    assert set(metrics) == {"val/psnr", "val/ssim", "val/lpips", "val/flicker", "val/temporal_error",
                            "val/latent_mean", "val/latent_std"}  # no val/scaling_factor: not measured here
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert 0 < metrics["val/psnr"] < 100 and -1 <= metrics["val/ssim"] <= 1 and metrics["val/lpips"] > 0


def test_validation_writes_side_by_side_mp4(trained):
    root, module, trainer, _ = trained
    path = root / "samples" / f"recon_step{trainer.global_step:07d}.mp4"
    assert path.is_file()
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5
    assert frames[0].shape == (2 * 32, 2 * 32 + 2, 3)  # two clips stacked, original | reconstruction


def test_validation_uses_ema_weights_and_restores_live_ones(trained):
    _, module, _, _ = trained
    x = loader(num_clips=1).dataset[0]["video"][None]
    live = {k: v.clone() for k, v in module.vae.state_dict().items()}
    assert any(not torch.equal(module.ema.shadow[n], p) for n, p in module.vae.named_parameters())
    with torch.no_grad():
        via_module = module.reconstruct(x)
        with module.ema.swapped_into(module.vae):
            by_hand, _ = module.vae(x, sample_posterior=False)
        live_recon, _ = module.vae(x, sample_posterior=False)
    assert torch.equal(via_module, by_hand) and not torch.equal(via_module, live_recon)
    for k, v in module.vae.state_dict().items():
        assert torch.equal(v, live[k])


def test_export_writes_ema_weights_in_diffusers_format_and_init_from_reads_them(trained, tmp_path):
    _, module, trainer, _ = trained
    out = module.export(str(tmp_path / "export"))
    exported = load_diffusers_vae(out)
    for name, p in exported.named_parameters():
        assert torch.equal(p, module.ema.shadow[name]), name

    fresh = make_module(disc_start=1, max_steps=3, ema_decay=0.5)
    fresh.load_init_weights(str(out))
    for name, p in fresh.vae.named_parameters():
        assert torch.equal(p, module.ema.shadow[name]), name
    assert fresh.generator_step == 0

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    trainer.save_checkpoint(ckpt)
    from_run = make_module(disc_start=1, max_steps=3, ema_decay=0.5)
    from_run.load_init_weights(str(tmp_path / "run"))  # a run directory: its last.ckpt, EMA preferred
    for name, p in from_run.vae.named_parameters():
        assert torch.equal(p, module.ema.shadow[name]), name
    for a, b in zip(from_run.discriminator.parameters(), module.discriminator.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="does not exist"):
        from_run.load_init_weights(str(tmp_path / "missing"))


def test_image_batches_train_and_validate_without_flicker(tmp_path):
    module = make_module(disc_start=0, max_steps=2, samples_dir=str(tmp_path / "samples"))
    trainer = make_trainer(tmp_path, 2, limit_val_batches=1.0)
    trainer.fit(module, loader(num_clips=2, frames=1, batch_size=2))
    assert trainer.global_step == 2 and module.generator_step == 2
    assert trainer.callback_metrics["train/gan_active"] == 1.0
    assert torch.isfinite(trainer.callback_metrics["train/d_loss"])
    metrics = trainer.validate(module, loader(num_clips=2, frames=1, batch_size=2), verbose=False)[0]
    assert set(metrics) == {"val/psnr", "val/ssim", "val/lpips", "val/latent_mean", "val/latent_std"}
    assert (tmp_path / "samples" / "recon_step0000002.mp4").is_file()


def test_bf16_mixed_precision_keeps_losses_fp32(tmp_path):
    module = make_module(disc_start=0, max_steps=1, optim={"warmup_steps": 1})
    outputs = []

    class Keep(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, out, batch, batch_idx):
            outputs.append(out)

    trainer = make_trainer(tmp_path, 1, precision="bf16-mixed", callbacks=[Keep()])
    trainer.fit(module, loader(num_clips=1, frames=1))  # one frame: CPU bf16 convolutions are slow
    assert outputs and all(v.dtype == torch.float32 and torch.isfinite(v) for v in outputs[0].values())
    assert all(p.dtype == torch.float32 for p in module.vae.parameters())


def test_reconstruction_video_goes_to_wandb_when_that_logger_is_on(trained, tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    _, module, _, _ = trained
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="cogvx-test")
    trainer = pl.Trainer(accelerator="cpu", logger=logger, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, loader(num_clips=1), verbose=False)
    logger.experiment.finish()
    assert list(tmp_path.glob("wandb/*/files/media/videos/val/reconstruction_*.mp4"))


def test_fresh_run_validates_at_step_zero_with_untrained_weights(tmp_path):
    from cogvx_train.train.validate_at_start import ValidateAtStart

    module = make_module(disc_start=10, max_steps=2, samples_dir=str(tmp_path / "samples"), num_val_videos=1)
    untrained = {k: v.clone() for k, v in module.vae.state_dict().items()}
    seen = []
    module.validation_step = lambda batch, i, _orig=module.validation_step: (  # noqa: E731
        seen.append((module.global_step, all(torch.equal(v, untrained[k]) for k, v in module.vae.state_dict().items()))),
        _orig(batch, i))[1]
    trainer = make_trainer(tmp_path, 2, callbacks=[ValidateAtStart()], limit_val_batches=1.0, val_check_interval=2)
    trainer.fit(module, loader(num_clips=2), loader(num_clips=2))
    assert [s for s in seen if s[0] == 0] == [(0, True)] * 2  # the baseline pass: before any step, initial weights
    assert [step for step, _ in seen] == [0, 0, 2, 2]  # 2 val batches at step 0 and after the last step
    psnr_rows = [r for r in read_metrics(tmp_path) if "val/psnr" in r]
    assert [int(r["step"]) for r in psnr_rows] == [0, 1]  # logged at step 0, and after the last step
    assert (tmp_path / "samples" / "recon_step0000000.mp4").is_file()


def test_measured_scaling_factor_is_one_over_the_latent_std_and_goes_with_checkpoints_and_export(tmp_path):
    """model.vae.scaling_factor: null -> the VAE's factor is 1 / std of the posterior over the val clips (EMA
    weights), and the checkpoint, a resume, the DiT's frozen VAE and the diffusers export all carry it."""
    from cogvx_train.dit.frozen_encoders import load_frozen_vae

    module = make_module(disc_start=1, max_steps=2, ema_decay=0.5, measure_scaling_factor=True)
    default = module.vae.scaling_factor
    trainer = make_trainer(tmp_path, 2, limit_val_batches=1.0)
    trainer.fit(module, loader(num_clips=2))
    val = loader(num_clips=3, batch_size=2)
    metrics = trainer.validate(module, val, verbose=False)[0]

    with torch.no_grad(), module.ema.swapped_into(module.vae):  # by hand: every val clip's posterior
        posteriors = [module.vae.encode(val.dataset[i]["video"][None]) for i in range(3)]
    mean = torch.cat([p.mean.flatten() for p in posteriors]).double()
    second = torch.cat([(p.mean.square() + p.var).flatten() for p in posteriors]).double()
    std = (second.mean() - mean.mean().square()).sqrt().item()
    assert metrics["val/latent_std"] == pytest.approx(std, rel=1e-5)
    assert metrics["val/latent_mean"] == pytest.approx(mean.mean().item(), rel=1e-5, abs=1e-7)
    assert module.vae.scaling_factor == pytest.approx(1 / std, rel=1e-9) != pytest.approx(default)
    assert metrics["val/scaling_factor"] == pytest.approx(module.vae.scaling_factor, rel=1e-6)

    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = make_module(disc_start=1, max_steps=2, ema_decay=0.5, measure_scaling_factor=True)
    resumed.on_load_checkpoint(torch.load(ckpt, map_location="cpu", weights_only=False))
    assert resumed.vae.scaling_factor == module.vae.scaling_factor
    frozen = load_frozen_vae({"size": "tiny", "weights": str(ckpt), "scaling_factor": None})
    assert frozen.scaling_factor == module.vae.scaling_factor
    assert load_diffusers_vae(module.export(str(tmp_path / "export"))).scaling_factor == module.vae.scaling_factor

    fixed = make_module(disc_start=1, max_steps=2, vae_overrides={"scaling_factor": 0.5})  # a number stays put
    make_trainer(tmp_path / "fixed", 1, limit_val_batches=1.0).validate(fixed, val, verbose=False)
    assert fixed.vae.scaling_factor == 0.5
