"""The joints where config becomes objects: datamodule, module, callbacks, loggers, trainer.

`cogvx_train.cli.train.train()` calls these in a fixed order. Below them everything takes plain typed
arguments; nothing past this file reads the Hydra config.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from cogvx_train.config import ConfigError
from cogvx_train.config.validate import derive, validate
from cogvx_train.train.run_dir import RunDirectory

log = logging.getLogger("cogvx_train")


def world_size_from_env(cfg: DictConfig | None = None) -> int:
    """Ranks in this job: from the launcher's environment (torchrun, deepspeed, SLURM), else the trainer config."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if var in os.environ:
            return int(os.environ[var])
    if cfg is not None:
        devices, nodes = cfg.trainer.devices, cfg.trainer.num_nodes
        if isinstance(devices, int) and isinstance(nodes, int):
            return devices * nodes
    return 1


def check_config(cfg: DictConfig, world_size: int) -> dict[str, Any]:
    validate(cfg, world_size)
    derived = derive(cfg, world_size)
    log.info("derived: %s", json.dumps(derived))
    return derived


def seed_everything(seed: int) -> None:
    from lightning.pytorch import seed_everything as _seed

    _seed(seed, workers=True, verbose=False)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def training_manifest(cfg: DictConfig) -> str:
    """The user's manifest, or the built-in synthetic dataset generated on first use."""
    if cfg.data.manifest:
        return str(Path(cfg.data.manifest).expanduser())
    from cogvx_train.data.synthetic import ensure_default_dataset

    return str(ensure_default_dataset(Path(cfg.paths.cache_dir).expanduser()))


def context_parallel_size(cfg: DictConfig) -> int:
    """Ranks that share one clip (VAE stage A2); 1 everywhere else."""
    return int(OmegaConf.select(cfg, "context_parallel_size", default=1) or 1) if cfg.task == "vae" else 1


def build_datamodule(cfg: DictConfig):
    d = cfg.data
    if d.latent_cache:
        from cogvx_train.data.latent_cache import LatentCacheDataModule

        return LatentCacheDataModule(cache_dir=d.latent_cache, batch_size=d.batch_size, num_workers=d.num_workers,
                                     seed=cfg.seed, val_count=d.num_val_clips)
    from cogvx_train.data.frame_pack import FramePackDataModule

    return FramePackDataModule(
        manifest=training_manifest(cfg),
        val_manifest=d.val_manifest,
        num_val_clips=d.num_val_clips,
        num_frames=d.num_frames,
        target_fps=_plain(d.fps),
        resolutions=[tuple(hw) for hw in _plain(d.resolutions)],
        use_images=d.use_images,
        image_batch_size=d.image_batch_size,
        batch_size=d.batch_size,
        num_workers=d.num_workers,
        seed=cfg.seed,
        max_failure_rate=d.max_failure_rate,
        context_parallel_size=context_parallel_size(cfg),
    )


def build_module(cfg: DictConfig, run: RunDirectory):
    if cfg.task == "vae":
        from cogvx_train.vae.module import VAETrainingModule

        module = VAETrainingModule(
            vae_size=cfg.model.vae.size,
            # scaling_factor null: measured on the validation clips (vae/latent_scale.py)
            vae_overrides={"factorized": cfg.model.vae.factorized, **_plain(cfg.model.vae.overrides),
                           **({} if cfg.model.vae.scaling_factor is None
                              else {"scaling_factor": cfg.model.vae.scaling_factor})},
            measure_scaling_factor=cfg.model.vae.scaling_factor is None,
            loss=_plain(cfg.vae_loss),
            optim=_plain(cfg.optim),
            max_steps=cfg.trainer.max_steps,
            ema_decay=cfg.ema.decay if cfg.ema.enabled else None,
            ema_start_step=cfg.ema.start_step,
            samples_dir=str(run.samples),
            gradient_checkpointing=cfg.model.gradient_checkpointing,
            context_parallel_size=context_parallel_size(cfg),
        )
    else:
        from cogvx_train.dit.module import DiTTrainingModule

        module = DiTTrainingModule(
            dit_size=cfg.model.size,
            dit_overrides={"attention": cfg.model.attention, "positions": cfg.model.positions,
                           "text_fusion": cfg.model.text_fusion,
                           "gradient_checkpointing": cfg.model.gradient_checkpointing, **_plain(cfg.model.overrides)},
            vae=_plain(cfg.model.vae) | {"weights": resolve_vae_weights(cfg)},
            text_encoder=_plain(cfg.model.text_encoder),
            diffusion=_plain(cfg.diffusion),
            optim=_plain(cfg.optim),
            max_steps=cfg.trainer.max_steps,
            ema=_plain(cfg.ema),
            sampling=_plain(cfg.sampling),
            seed=cfg.seed,
            samples_dir=str(run.samples),
            use_latent_cache=bool(cfg.data.latent_cache),
        )
    if cfg.init_from and not cfg.resume:
        load_init_weights(module, cfg)
    return module


def resolve_vae_weights(cfg: DictConfig) -> str | None:
    """`demo` names the VAE the demo trains; anything else is a path (checked by validate)."""
    weights = cfg.model.vae.weights
    if weights != "demo":
        return weights
    from cogvx_train.train.demo import demo_vae_dir

    return str(demo_vae_dir(cfg))


def load_init_weights(module, cfg: DictConfig) -> None:
    """`init_from=`: weights only (EMA when the checkpoint has them); optimizer, step and data start fresh."""
    path = Path(cfg.init_from).expanduser()
    log.info("init_from %s (weights only; a fresh run)", path)
    module.load_init_weights(str(path))


def build_callbacks(cfg: DictConfig, run: RunDirectory) -> list:
    from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar

    from cogvx_train.data.frame_pack import DataPositionCallback
    from cogvx_train.train.callbacks import NonFiniteGuard, RNGStateCallback, ThroughputMonitor
    from cogvx_train.train.checkpointing import build_checkpoint_callback

    c = cfg.callbacks
    from cogvx_train.train.distributed import ConfigAgreementCheck, config_hash

    callbacks: list = [ConfigAgreementCheck(config_hash(cfg)), RNGStateCallback()]
    callbacks.append(DataPositionCallback(max_failure_rate=cfg.data.max_failure_rate))
    if c.get("checkpoint"):
        from cogvx_train.train.catch_up import CatchUpOnResume

        callbacks.append(build_checkpoint_callback(run.checkpoints, cfg.checkpoint.every_n_steps,
                                                   cfg.checkpoint.keep_last_k))
        callbacks.append(CatchUpOnResume())  # a resume writes the rows a kill right after a save lost
    if c.get("lr_monitor") and cfg.logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if c.get("progress_bar"):
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, cfg.trainer.log_every_n_steps)))
    if c.get("throughput"):
        callbacks.append(ThroughputMonitor())
    if c.get("nonfinite_guard"):
        callbacks.append(NonFiniteGuard(max_consecutive=c.nonfinite_guard.max_consecutive,
                                        checkpoint_dir=str(run.checkpoints),
                                        inject_nan_steps=list(cfg.get("debug_inject_nan_steps") or [])))
    if c.get("weight_sync_check"):  # every N steps all data-parallel ranks compare weight checksums
        from cogvx_train.train.sync_check import WeightSyncCheck

        callbacks.append(WeightSyncCheck(every_n_steps=int(c.weight_sync_check)))
    if c.get("validate_at_start"):  # last: the step-0 baseline runs after every other start-up hook
        from cogvx_train.train.validate_at_start import ValidateAtStart

        callbacks.append(ValidateAtStart())
    return callbacks


def build_loggers(cfg: DictConfig, run: RunDirectory) -> list:
    from cogvx_train.train.resume import RunCSVLogger

    loggers: list = []
    if "csv" in cfg.logger:
        loggers.append(RunCSVLogger(run.path))  # continues metrics.csv on resume, flushes every row
    if "wandb" in cfg.logger:
        from cogvx_train.train.wandb_run import build_wandb_logger

        loggers.append(build_wandb_logger(cfg.logger.wandb, run, stage=cfg.stage_name))
    return loggers


def resolve_precision(precision: str, accelerator: str) -> str:
    """`auto`: bf16 mixed precision where the hardware has it (CUDA with bf16), fp32 elsewhere."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list):
    """Lightning Trainer; VAE stages need find_unused_parameters (D has no gradients before disc_start)."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from cogvx_train.train.checkpointing import AtomicCheckpointIO
    from cogvx_train.train.strategies import build_strategy

    t = cfg.trainer
    extra = {k: t[k] for k in ("fast_dev_run", "overfit_batches") if k in t}
    if cfg.task == "vae" and str(t.strategy) == "auto" and world_size_from_env(cfg) > 1:
        # Lightning's "auto" would pick DDP without the unused-parameter search the G/D loop needs
        t = OmegaConf.merge(t, {"strategy": "ddp"})
    return Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(t, find_unused_parameters=cfg.task == "vae", gradient_clip_val=cfg.optim.grad_clip),
        precision=resolve_precision(str(t.precision), t.accelerator),
        max_steps=t.max_steps,
        accumulate_grad_batches=t.get("accumulate_grad_batches", 1),
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=t.num_sanity_val_steps,
        deterministic=t.deterministic,
        use_distributed_sampler=False,  # the frame-pack sampler shards by rank itself (and resumes exactly)
        plugins=[AtomicCheckpointIO()],
        callbacks=callbacks,
        logger=loggers or False,
        enable_progress_bar=bool(cfg.callbacks.get("progress_bar")),
        enable_checkpointing=any(isinstance(cb, ModelCheckpoint) for cb in callbacks),
        default_root_dir=None,
        **extra,
    )


def resume_checkpoint(cfg: DictConfig, run: RunDirectory) -> str | None:
    if not cfg.resume:
        return None
    from cogvx_train.train.resume import resume_checkpoint_path

    return resume_checkpoint_path(cfg, run)


def final_metrics(trainer) -> dict[str, float]:
    out = {}
    for key, value in trainer.callback_metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[key] = float(value)
    out["global_step"] = int(trainer.global_step)
    return out


def export_final(module, run: RunDirectory) -> None:
    """Diffusers-format weights of the final (EMA) model, ready for diffusers or the next stage."""
    if hasattr(module, "export"):
        module.export(str(run.export))
        log.info("exported diffusers-format weights to %s", run.export)
