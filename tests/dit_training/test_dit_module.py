"""DiTTrainingModule under a real Lightning Trainer (CPU): learning, ablation variants, Explicit Uniform Sampling
across ranks and across a checkpoint resume, init_from at another resolution, frozen encoders, validation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint

from cogvx_train.dit.init_from import load_init_weights
from cogvx_train.dit.module import DiTTrainingModule

from dit_helpers import latent_batch, loader, module_kwargs, trainer, video_batch


class Record(Callback):
    """Timesteps drawn and loss per optimizer step."""

    def __init__(self, module: DiTTrainingModule):
        self.timesteps: dict[int, torch.Tensor] = {}
        self.losses: dict[int, float] = {}
        original = module.timestep_sampler.sample

        def sample(step, rank, world_size, batch_size):
            t = original(step, rank, world_size, batch_size)
            self.timesteps[step] = t.clone()
            return t

        module.timestep_sampler.sample = sample

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step - 1] = float(outputs["loss"])


class AsRankOf2(DiTTrainingModule):
    """The module as rank `rank` of a 2-rank job (one process: the draws are what that rank would draw)."""

    rank = 0

    def _rank_world(self):
        return self.rank, 2


def test_overfitting_one_batch_lowers_the_fixed_timestep_loss(tiny_module):
    module = tiny_module(diffusion={"snr_shift": 1.0, "caption_dropout": 0.0}, ema={"enabled": False},
                         optim={"lr": 5e-3, "warmup_steps": 2, "schedule": "constant"}, use_latent_cache=True)
    batch = latent_batch(b=2, t=2, h=2, w=2)
    before = torch.stack([v.mean() for v in module.validation_loss(batch).values()]).mean().item()
    record = Record(module)
    trainer(50, callbacks=[record]).fit(module, train_dataloaders=loader(batch))
    after = torch.stack([v.mean() for v in module.validation_loss(batch).values()]).mean().item()
    losses = list(record.losses.values())
    assert len(losses) == 50 and all(math.isfinite(v) for v in losses)
    assert after < 0.85 * before, (before, after)  # the fixed-noise, fixed-t loss of paper Table 9 goes down
    assert sum(losses[-10:]) < 0.9 * sum(losses[:10]), losses


@pytest.mark.parametrize("overrides,timesteps", [
    ({"attention": "full", "positions": "rope3d", "text_fusion": "expert_adaln"}, "uniform_per_rank"),
    ({"attention": "spatial_temporal", "positions": "sincos3d", "text_fusion": "expert_adaln"}, "iid"),
    ({"attention": "full", "positions": "sincos3d", "text_fusion": "shared_adaln"}, "uniform_per_rank"),
    ({"attention": "spatial_temporal", "positions": "rope3d", "text_fusion": "expert_ffn"}, "uniform_per_rank"),
    ({"attention": "full", "positions": "rope3d", "text_fusion": "mmdit", "gradient_checkpointing": True}, "iid"),
])
def test_every_ablation_variant_trains(tiny_module, overrides, timesteps):
    module = tiny_module(dit_overrides=overrides, diffusion={"snr_shift": 1.0, "timestep_sampling": timesteps},
                         use_latent_cache=True)
    start = {k: v.clone() for k, v in module.dit.state_dict().items()}
    record = Record(module)
    trainer(2, callbacks=[record]).fit(module, train_dataloaders=loader(latent_batch(t=2, h=2, w=4)))
    assert len(record.losses) == 2 and all(math.isfinite(v) for v in record.losses.values())
    moved = [k for k, v in module.dit.state_dict().items() if not torch.equal(v, start[k])]
    # adaLN-zero: the output layer and the modulations move first
    assert "proj_out.weight" in moved and "transformer_blocks.0.norm1.linear.weight" in moved
    if timesteps == "iid":
        assert all(((t >= 0) & (t < 1000)).all() for t in record.timesteps.values())


def test_ranks_draw_disjoint_intervals_that_tile_the_range(tiny_module):
    batch = latent_batch(b=4)
    drawn = {}
    for rank in (0, 1):
        module = AsRankOf2(**module_kwargs(use_latent_cache=True))
        module.rank = rank
        record = Record(module)
        module.training_step(batch, 0)
        drawn[rank] = record.timesteps[0]
    assert ((drawn[0] >= 0) & (drawn[0] < 500)).all() and ((drawn[1] >= 500) & (drawn[1] < 1000)).all()
    strata = torch.cat([drawn[0], drawn[1]]).sort().values // 125  # 2 ranks x 4 samples = 8 strata of 125
    assert strata.tolist() == list(range(8))


def test_draws_and_losses_are_identical_after_a_checkpoint_resume(tmp_path):
    batches = [latent_batch(seed=0), latent_batch(seed=1)]

    def run(max_steps, ckpt_path=None, dirpath=None):
        torch.manual_seed(0)
        module = AsRankOf2(**module_kwargs(use_latent_cache=True))
        module.rank = 1
        record = Record(module)
        callbacks = [record]
        if dirpath is not None:
            callbacks.append(ModelCheckpoint(dirpath=dirpath, every_n_train_steps=2, save_top_k=-1))
        trainer(max_steps, callbacks=callbacks, enable_checkpointing=dirpath is not None).fit(
            module, train_dataloaders=loader(batches), ckpt_path=ckpt_path)
        return module, record

    _, straight = run(4)
    run(2, dirpath=tmp_path)
    ckpt = next(tmp_path.glob("*.ckpt"))
    resumed_module, resumed = run(4, ckpt_path=str(ckpt))
    assert sorted(resumed.timesteps) == [2, 3]
    for step in (2, 3):
        assert torch.equal(resumed.timesteps[step], straight.timesteps[step])
        assert ((resumed.timesteps[step] >= 500) & (resumed.timesteps[step] < 1000)).all()  # rank 1 of 2
        assert resumed.losses[step] == pytest.approx(straight.losses[step], rel=1e-5, abs=1e-6)
    assert straight.timesteps[0].tolist() != straight.timesteps[1].tolist()  # a new draw every step
    assert resumed_module.ema.num_updates == 4  # the EMA came back with the checkpoint and went on


@pytest.mark.parametrize("positions", ["rope3d", "sincos3d"])
def test_init_from_a_64x64_run_into_a_64x96_run(tmp_path, tiny_module, positions):
    source = tiny_module(dit_overrides={"positions": positions}, use_latent_cache=True)
    trainer(2, callbacks=[ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)],
            enable_checkpointing=True).fit(source, train_dataloaders=loader(latent_batch(h=8, w=8)))  # 64x64
    ema = {k: v.clone() for k, v in source.ema.shadow.items()}
    live = {k: v.clone() for k, v in source.dit.state_dict().items()}

    target = tiny_module(dit_overrides={"positions": positions}, use_latent_cache=True)
    load_init_weights(target, str(tmp_path))  # run dir -> checkpoints/last.ckpt, EMA preferred
    loaded = target.dit.state_dict()
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)
    assert any(not torch.equal(loaded[k], live[k]) for k in ema)  # it really took the EMA, not the live weights
    assert target.global_step == 0
    record = Record(target)
    trainer(2, callbacks=[record]).fit(target, train_dataloaders=loader(latent_batch(h=8, w=12)))  # 64x96
    assert all(math.isfinite(v) for v in record.losses.values())


def test_init_from_diffusers_export_and_a_clear_error_for_another_architecture(tmp_path, tiny_module):
    from cogvx_train.dit import export_diffusers_transformer

    source = tiny_module(use_latent_cache=True)
    export_diffusers_transformer(source.dit, tmp_path / "transformer")
    target = tiny_module(use_latent_cache=True)
    load_init_weights(target, str(tmp_path))
    assert all(torch.equal(v, source.dit.state_dict()[k]) for k, v in target.dit.state_dict().items())
    other = tiny_module(dit_overrides={"text_fusion": "expert_ffn"}, use_latent_cache=True)
    with pytest.raises(ValueError, match="another architecture"):
        load_init_weights(other, str(tmp_path))
    with pytest.raises(ValueError, match="not a dit run directory"):
        load_init_weights(other, str(tmp_path / "nothing-here"))


def test_frozen_encoders_get_no_grads_stay_in_eval_and_stay_out_of_the_checkpoint(tmp_path, tiny_module):
    module = tiny_module()
    clip_calls = []
    original_clip = module.clip_gradients
    module.clip_gradients = lambda opt, **kw: (clip_calls.append(kw), original_clip(opt, **kw))[1]
    trainer(2, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)], enable_checkpointing=True).fit(
        module, train_dataloaders=loader(video_batch()))
    vae, text = module.frozen.vae, module.frozen.text_encoder
    for frozen in (vae, text):
        assert not frozen.training
        assert all(not p.requires_grad and p.grad is None for p in frozen.parameters())
    optimizer = module.trainer.optimizers[0]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in module.dit.parameters()}
    no_decay = optimizer.param_groups[1]
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim < 2 for p in no_decay["params"])
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-8
    assert optimizer.defaults["fused"] is True  # the fused kernel (CPU here), see test_fused_adamw_*
    assert clip_calls and clip_calls[0] == {"gradient_clip_val": 1.0, "gradient_clip_algorithm": "norm"}

    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"] and all(k.startswith("dit.") for k in ckpt["state_dict"])
    assert set(ckpt["dit_ema"]["shadow"]) == {k[len("dit."):] for k in ckpt["state_dict"]}
    json.dumps(ckpt["hyper_parameters"])  # plain values only, never a module or a tensor
    assert ckpt["hyper_parameters"]["vae"]["size"] == "tiny"


def test_logs_buckets_grad_norm_throughput_and_validation_writes_mp4s(tmp_path, tiny_module):
    module = tiny_module(samples_dir=str(tmp_path / "samples"), peak_flops=1e12)
    train = [video_batch(seed=0), video_batch(seed=1), video_batch(seed=2, w=32)]  # step 2: a new token grid
    fit = trainer(3, val_check_interval=2, limit_val_batches=1, check_val_every_n_epoch=None)
    fit.fit(module, train_dataloaders=loader(train), val_dataloaders=loader(video_batch(seed=3, w=32), length=1))
    written = sorted(p.name for p in (tmp_path / "samples").glob("*.mp4"))
    assert written == ["step0000002_0.mp4", "step0000002_1.mp4"]
    metrics = fit.callback_metrics
    # the prompts name colours ("a red circle") but no direction: only the colour score is logged
    assert 0.0 <= float(metrics["val/prompt_colour_acc"]) <= 1.0 and "val/prompt_direction_acc" not in metrics
    for t in (100, 300, 500, 700, 900):
        assert math.isfinite(float(metrics[f"val/loss_t{t}"]))
    for key in ("train/grad_norm", "train/lr", "train/tokens_per_s", "train/mfu", "train/t_count_t000-099"):
        assert key in metrics and math.isfinite(float(metrics[key]))
    counts = sum(float(metrics[f"train/t_count_{n}"]) for n in module.timestep_buckets.names)
    assert counts == 2  # log_every_n_steps=1: the window holds the last step's 2 samples
    assert float(module.sample_shape()[2]) == 32  # samples at the validation data's size


def test_training_after_a_standalone_validate_on_a_new_token_grid(tmp_path, tiny_module):
    # trainer.validate() runs under inference_mode; whatever the DiT caches for a grid there must stay usable by
    # a later training step on that grid (inference tensors cannot be saved for backward).
    module = tiny_module(samples_dir=str(tmp_path), use_latent_cache=True, sampling={"prompts": []})
    batch = latent_batch(h=2, w=6)
    trainer(1).validate(module, dataloaders=loader(batch, length=1))
    record = Record(module)
    trainer(1, callbacks=[record]).fit(module, train_dataloaders=loader(batch))
    assert math.isfinite(record.losses[0])


def test_bucket_statistics_follow_the_bucket_names(tiny_module):
    module = tiny_module(diffusion={"loss_buckets": 3}, use_latent_cache=True)
    logged = {}
    module.log_dict = lambda metrics, **kwargs: logged.update(metrics)
    t = torch.tensor([0, 332, 333, 665, 666, 999, 999])
    module._log_timestep_buckets(t, torch.tensor([1.0, 3.0, 5.0, 7.0, 2.0, 4.0, 6.0]), world=1)
    assert module.timestep_buckets.names == ["t000-332", "t333-665", "t666-999"]
    assert [float(logged[f"train/t_count_{n}"]) for n in module.timestep_buckets.names] == [2, 2, 3]
    assert [float(logged[f"train/loss_{n}"]) for n in module.timestep_buckets.names] == [2.0, 6.0, 4.0]


def test_fused_adamw_makes_the_same_update_and_falls_back_where_it_cannot_run():
    from cogvx_train.train.optimizer import adamw

    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(64, 32, generator=gen), torch.randn(32, generator=gen)]
    grads = [[torch.randn(t.shape, generator=gen) for t in start] for _ in range(5)]
    runs = {}
    for name, make in [("ours", adamw), ("torch", lambda *a, **k: torch.optim.AdamW(*a, **k, foreach=False))]:
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = make([{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}],
                   lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        runs[name] = (opt, params)
    assert runs["ours"][0].defaults["fused"] is True and not runs["torch"][0].defaults["fused"]
    for a, b in zip(runs["ours"][1], runs["torch"][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # same rule, another summation order
    meta = torch.nn.Parameter(torch.empty(4, device="meta"))
    assert not adamw([meta], lr=1e-3, betas=(0.9, 0.95), eps=1e-8).defaults["fused"]
    assert not adamw([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                     allow_fused=False).defaults["fused"]


def test_bf16_mixed_clips_with_the_fused_optimizer_and_fp16_loss_scaling_keeps_it_off(tiny_module, monkeypatch):
    """Lightning's MixedPrecision refuses clipping with a fused optimizer; under bf16 (no GradScaler) the norm is
    clipped anyway, over every parameter, at optim.grad_clip."""
    from cogvx_train.train.optimizer import fused_allowed

    clipped = []
    original = torch.nn.utils.clip_grad_norm_

    def record(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        clipped.append((len(parameters), max_norm))
        return original(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record)
    module = tiny_module(optim={"grad_clip": 0.5, "warmup_steps": 1}, use_latent_cache=True)
    trainer(2, precision="bf16-mixed").fit(module, train_dataloaders=loader(latent_batch(t=2, h=2, w=4)))
    assert module.trainer.optimizers[0].defaults["fused"] is True
    assert clipped == [(len(list(module.dit.parameters())), 0.5)] * 2

    class FakeTrainer:
        precision = "16-mixed"

    module._trainer = FakeTrainer()
    assert not fused_allowed(module)
    FakeTrainer.precision = "bf16-mixed"
    assert fused_allowed(module)
