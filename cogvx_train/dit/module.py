"""DiTTrainingModule: the CogVideoX expert transformer trained with v-prediction on a frozen VAE and frozen T5.

One training step on rank r of W at optimizer step s (every random draw is keyed on (seed, s, r), so a resumed run
draws exactly what the uninterrupted run would have):

    (mean, logvar) = VAE.encode(video)            or from a latent-cache batch
    x0   = (mean + exp(logvar / 2) eps_post) * scaling_factor     re-sampled every step, fp32
    c    = T5(caption), zeroed with p = caption_dropout            (the unconditional branch at sampling)
    t    ~ Explicit Uniform Sampling: rank r draws inside its interval of [0, 1000)
    x_t  = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps ;  v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0     fp32
    loss = mean_b  mean_{C,T,H,W} (DiT(x_t, t, c) - v)^2          model under the trainer's autocast

Padding frames. A clip shorter than num_frames repeats its last frame (batch["num_real_frames"] says how many are
real). Like the paper's pipeline, the loss covers the repeated frames as they are: the causal VAE mixes real and
repeated frames inside the last latent frames, so a latent-frame mask would be approximate anyway, and the model
simply learns that such clips hold their last frame.

Optimizer. AdamW (0.9, 0.95), eps 1e-8, weight decay 1e-4 on matrices and convolution kernels only: biases and
LayerNorm / q-k-norm gains (every tensor with fewer than 2 dims) are not decayed, since shrinking a gain towards 0
changes what the layer computes rather than regularising it. Linear warmup then cosine (build_lr_lambda),
stepped per optimizer step. Gradients are clipped to `optim.grad_clip` (global L2 norm) in
`configure_gradient_clipping`, unless the Trainer was given its own `gradient_clip_val`.

Frozen VAE and T5 live in a FrozenEncoders object that is not a child module: not trainable, not in the optimizer,
not in state_dict or checkpoints, never wrapped by DDP/FSDP/DeepSpeed, never cast by bf16-true, always in eval
mode. They are rebuilt from their specs (plain values in the hyper-parameters) on start, resume and sampling.

Logged: train/loss, train/lr, train/caption_dropped, train/grad_norm (before clipping), train/loss_tAAA-BBB and
train/t_count_tAAA-BBB per timestep bucket over the last log_every_n_steps steps of all ranks (NaN = no sample;
timestep_buckets.py), a wandb.Histogram of those timesteps under a WandbLogger, train/tokens_per_s and train/mfu
(analytic FLOPs of dit.flops_per_step over the wall time between batch ends; peak from `peak_flops` or the device
name, none on a CPU; throughput.py); validation (validation.py): val/loss_t100 ... val/loss_t900 (paper Table 9,
live weights, fixed noise) and mp4 samples.

In files of their own: the config groups (training_config.py; `optim` is train/optimizer.py), `init_from`
(init_from.py: start from another run's weights) and the export after training (pipeline_export.py).

Trainer: use_distributed_sampler=False (the datamodules shard by rank themselves). Clipping needs no Trainer
argument, except under DeepSpeed, whose engine clips only with gradient_clip_val=optim.grad_clip.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR

from cogvx_train.diffusion import NoiseSchedule, build_timestep_sampler
from cogvx_train.dit import ExpertTransformer, build_dit, validation
from cogvx_train.dit.frozen_encoders import (
    FrozenEncoders,
    TextEncoderSpec,
    VAESpec,
    keyed_generator,
    randn_like_on_cpu,
    sample_latents,
)
from cogvx_train.dit.init_from import load_init_weights
from cogvx_train.dit.pipeline_export import export_pipeline
from cogvx_train.dit.throughput import StepThroughput
from cogvx_train.dit.timestep_buckets import TimestepBuckets
from cogvx_train.dit.training_config import DiffusionConfig, EMAConfig, SamplingConfig
from cogvx_train.train.ema import EMA
from cogvx_train.train.lr_schedule import build_lr_lambda
from cogvx_train.train.optimizer import OptimConfig, adamw, clip_grad_norm, fused_allowed

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "cogvx_dit"


def _absolute(path: str | None) -> str | None:
    """Paths in the hyper-parameters are made absolute so `cogvx-sample` works from any directory."""
    if path is None or path == "demo":
        return path
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else str(path)


class DiTTrainingModule(pl.LightningModule):
    """Train the expert transformer (see the module docstring). Arguments are plain values only."""

    def __init__(
        self,
        dit_size: str = "tiny",
        dit_overrides: dict[str, Any] | None = None,
        vae: VAESpec | dict[str, Any] | None = None,
        text_encoder: TextEncoderSpec | dict[str, Any] | None = None,
        diffusion: DiffusionConfig | dict[str, Any] | None = None,
        optim: OptimConfig | dict[str, Any] | None = None,
        max_steps: int | None = None,
        ema: EMAConfig | dict[str, Any] | None = None,
        sampling: SamplingConfig | dict[str, Any] | None = None,
        seed: int = 0,
        samples_dir: str | None = None,
        use_latent_cache: bool = False,
        peak_flops: float | None = None,
        val_timesteps: tuple[int, ...] | list[int] = validation.VAL_TIMESTEPS,
    ):
        super().__init__()
        vae_spec = VAESpec.from_any(vae)
        vae_spec = dataclasses.replace(vae_spec, weights=_absolute(vae_spec.weights))
        text_spec = TextEncoderSpec.from_any(text_encoder)
        text_spec = dataclasses.replace(text_spec, path=_absolute(text_spec.path))
        self.diffusion_cfg = DiffusionConfig.from_any(diffusion)
        self.optim_cfg = OptimConfig.from_any(optim)
        self.ema_cfg = EMAConfig.from_any(ema)
        self.sampling_cfg = SamplingConfig.from_any(sampling)
        self.vae_spec, self.text_spec = vae_spec, text_spec
        val_timesteps = tuple(int(t) for t in val_timesteps)
        n = self.diffusion_cfg.num_train_timesteps
        if any(not 0 <= t < n for t in val_timesteps):
            raise ValueError(f"val_timesteps {val_timesteps} must lie in [0, {n}).")
        self.timestep_buckets = TimestepBuckets(n, self.diffusion_cfg.loss_buckets)  # train/loss_t*, see there
        # plain values only: never a built module in the hyper-parameters
        self.save_hyperparameters({
            "dit_size": dit_size, "dit_overrides": dict(dit_overrides or {}), "vae": vae_spec.to_dict(),
            "text_encoder": text_spec.to_dict(), "diffusion": asdict(self.diffusion_cfg),
            "optim": self.optim_cfg.to_dict(), "max_steps": max_steps, "ema": asdict(self.ema_cfg),
            "sampling": asdict(self.sampling_cfg), "seed": int(seed), "samples_dir": samples_dir,
            "use_latent_cache": bool(use_latent_cache), "peak_flops": peak_flops, "val_timesteps": list(val_timesteps),
        })
        self.seed = int(seed)
        self.val_timesteps = val_timesteps
        self.dit = build_dit(dit_size, **(dit_overrides or {}))
        d = self.diffusion_cfg
        self.schedule = NoiseSchedule(d.num_train_timesteps, d.beta_start, d.beta_end, d.snr_shift)
        self.timestep_sampler = build_timestep_sampler(d.timestep_sampling, d.num_train_timesteps, self.seed)
        self.ema = EMA(self.dit, self.ema_cfg.decay, self.ema_cfg.start_step) if self.ema_cfg.enabled else None
        self.frozen = FrozenEncoders()  # filled on demand by encoders(); not a child module
        self._prompt_embeds: Tensor | None = None  # sampling prompts, embedded once
        self.throughput = StepThroughput(self.dit.config, peak_flops)  # train/tokens_per_s, train/mfu
        self._sample_shape: tuple[int, int, int] | None = None  # pixel (T, H, W) of the data
        self._gathered_for_export: dict[str, Tensor] | None = None  # ZeRO-3 only, see on_train_end

    # ------------------------------------------------------------------------------------ frozen encoders
    def encoders(self, vae: bool, text: bool) -> FrozenEncoders:
        """Load whichever frozen encoder is needed and not loaded yet, on this module's device."""
        f = self.frozen
        if vae and f.vae is None:
            loaded = FrozenEncoders.build(self.vae_spec, None, load_vae=True, load_text=False)
            f.vae, f.scaling_factor = loaded.vae, loaded.scaling_factor
        if text and f.text_encoder is None:
            f.text_encoder = FrozenEncoders.build(None, self.text_spec, load_vae=False, load_text=True).text_encoder
            self._check_text_dim(f.text_encoder.embed_dim, f.text_encoder.max_length)
        return f.to(self.device)

    def _check_text_dim(self, dim: int, length: int) -> None:
        cfg = self.dit.config
        if dim != cfg.text_embed_dim:
            raise ValueError(f"the text encoder gives {dim}-dim embeddings but the DiT expects text_embed_dim="
                             f"{cfg.text_embed_dim}; use a matching model.text_encoder or set text_embed_dim.")
        if length > cfg.max_text_tokens:
            raise ValueError(f"text max_length={length} exceeds the DiT's max_text_tokens={cfg.max_text_tokens}.")

    @property
    def scaling_factor(self) -> float:
        if self.vae_spec.scaling_factor is not None:
            return float(self.vae_spec.scaling_factor)
        return float(self.encoders(vae=True, text=False).scaling_factor)

    def setup(self, stage: str) -> None:
        if stage == "fit" and not self.hparams.use_latent_cache:
            self.encoders(vae=True, text=True)

    # ------------------------------------------------------------------------------------------- training
    def _draw_step(self, batch_idx: int) -> int:
        """The key of this micro-batch's random draws: the optimizer step (times the accumulation factor plus the
        micro-batch, when gradients are accumulated)."""
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        return self.global_step * accumulate + batch_idx % accumulate

    def _rank_world(self) -> tuple[int, int]:
        if self._trainer is None:
            return 0, 1
        return int(self.global_rank), int(self.trainer.world_size)

    def clean_latents_and_text(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """x0 [B, 16, T', h, w] (fp32, scaled, posterior re-sampled with `generator`) and text embeddings [B, L, D]
        of a batch (see _posterior_and_text)."""
        mean, logvar, text = self._posterior_and_text(batch)
        x0 = sample_latents(mean, logvar, generator, self.scaling_factor)
        if "video" in batch:
            self._remember_shape(batch["video"].shape[2:])
        if self._sample_shape is None:
            t, h, w = x0.shape[2:]
            self._remember_shape(((t - 1) * 4 + 1, h * 8, w * 8))
        return x0, text

    def _remember_shape(self, thw) -> None:
        """The pixel (frames, height, width) of the video data, the default shape of samples (stills skipped)."""
        if int(thw[0]) > 1:
            self._sample_shape = tuple(int(v) for v in thw)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        from cogvx_train.text import drop_captions

        step = self._draw_step(batch_idx)
        rank, world = self._rank_world()
        x0, text = self.clean_latents_and_text(batch, keyed_generator(self.seed, "posterior", step, rank))
        b = x0.shape[0]
        text, dropped = drop_captions(text, self.diffusion_cfg.caption_dropout,
                                      keyed_generator(self.seed, "captions", step, rank))
        t = self.timestep_sampler.sample(step, rank, world, b).to(self.device)
        noise = randn_like_on_cpu(x0, keyed_generator(self.seed, "noise", step, rank))
        x_t = self.schedule.add_noise(x0, noise, t)  # fp32
        v_pred = self.dit(x_t, t, text)
        per_sample = self.schedule.v_prediction_loss(v_pred, x0, noise, t)  # [B] fp32
        loss = per_sample.mean()

        self.throughput.step_shape = (b, *x0.shape[2:], text.shape[1])
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=b)
        self.log("train/caption_dropped", dropped.float().mean(), on_step=True, on_epoch=False, batch_size=b)
        if self._trainer is not None:  # the lr this step used
            self.log("train/lr", float(self.optimizers().param_groups[0]["lr"]), on_step=True, on_epoch=False,
                     batch_size=b)
        self._log_timestep_buckets(t, per_sample.detach(), world)
        return loss

    def _log_timestep_buckets(self, t: Tensor, per_sample: Tensor, world: int) -> None:
        """Loss per timestep bucket and the timestep histogram over the last log_every_n_steps steps of ALL ranks
        (each rank only sees its own interval under Explicit Uniform Sampling). No host sync: empty buckets log
        NaN."""
        if world > 1 and self._trainer is not None:
            t, per_sample = self.all_gather(t).reshape(-1), self.all_gather(per_sample).reshape(-1)
        every = max(1, int(self.trainer.log_every_n_steps)) if self._trainer is not None else 1
        metrics, ts = self.timestep_buckets.add(t, per_sample, steps=every)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        if self._trainer is not None and self.trainer.is_global_zero and (self.global_step + 1) % every == 0:
            for logger in self.loggers:
                if type(logger).__name__ == "WandbLogger":
                    import wandb

                    logger.experiment.log({"train/timesteps": wandb.Histogram(ts.cpu().numpy())},
                                          step=self.global_step)

    def on_before_optimizer_step(self, optimizer) -> None:
        from cogvx_train.train.strategies import gradient_norm

        # over all ranks' shards under FSDP (every rank takes part); None under DeepSpeed, whose engine keeps its own
        # partitioned gradients
        norm = gradient_norm(self.dit.parameters(), self.trainer.strategy if self._trainer is not None else None)
        if norm is not None:
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False, batch_size=1)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip = gradient_clip_val if gradient_clip_val is not None else self.optim_cfg.grad_clip
        algorithm = str(getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm) or "norm")
        if clip and clip > 0 and algorithm == "norm":
            clip_grad_norm(self, optimizer, clip)
        elif clip and clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm=algorithm)

    def on_train_start(self) -> None:
        # A fresh EMA (new run, init_from, or a checkpoint without one) starts from the weights training starts from.
        if self.ema is not None and self.ema.num_updates == 0:
            self.ema = EMA(self.dit, self.ema.decay, self.ema.start_step)
        self.throughput.last_batch_end = None

    def on_train_end(self) -> None:
        # ZeRO-3 leaves each rank one slice of every weight and of the EMA, and the export after fit runs on rank 0
        # alone: gather what it exports (the EMA, else the live weights) now, while every rank is still here
        from cogvx_train.train.zero import gathered_parameters, is_partitioned

        if any(is_partitioned(p) for p in self.dit.parameters()):
            weights = self.ema.full_shadow() if self.ema is not None else {}
            weights.update(gathered_parameters(self.dit, skip=weights.keys()))
            self._gathered_for_export = weights if self._is_rank_zero() else None

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        # The EMA is folded in right after the weights change, before any callback (checkpointing included) sees
        # the step: a checkpoint written at this step holds the matching EMA.
        step = self.global_step
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.ema is not None:
            self.ema.update(self.dit, step)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        for name, value in self.throughput.batch_end(world=self._rank_world()[1]).items():
            self.log(name, value, on_step=True, on_epoch=False, batch_size=1)

    def tokens_in_batch(self, batch: dict[str, Any] | None = None) -> int:
        """Text + vision tokens of the last step on this rank (ThroughputMonitor's perf/tokens_per_s)."""
        return self.throughput.tokens()

    def flops_in_batch(self, batch: dict[str, Any] | None = None) -> tuple[int, int]:
        """(model, hardware) FLOPs of the last step on this rank (MFU / HFU numerators)."""
        return self.throughput.flops()

    # ------------------------------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        o = self.optim_cfg
        decay = [p for p in self.dit.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.dit.parameters() if p.requires_grad and p.ndim < 2]
        optimizer = adamw([{"params": decay, "weight_decay": o.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, betas=o.betas, eps=o.eps,
                          allow_fused=fused_allowed(self))
        total = self.hparams.max_steps
        if (total is None or total <= 0) and self._trainer is not None:
            estimate = self.trainer.estimated_stepping_batches
            total = int(estimate) if math.isfinite(estimate) else None
        scheduler = LambdaLR(optimizer, build_lr_lambda(o.warmup_steps, total, o.schedule, o.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------ validation
    def eval_weights(self, use_ema: bool | None = None):
        """Context in which self.dit carries the weights used for sampling/export: the EMA when enabled."""
        use_ema = self.sampling_cfg.use_ema if use_ema is None else use_ema
        return self.ema.swapped_into(self.dit) if use_ema and self.ema is not None else nullcontext(self.dit)

    @torch.no_grad()
    def validation_loss(self, batch: dict[str, Any]) -> dict[int, Tensor]:
        """Per-sample v-loss [B] at each fixed timestep, with posterior sample and noise fixed per sample (keyed on
        its manifest row), so the numbers are comparable across validations and runs (paper Table 9)."""
        b = len(batch["caption"]) if "caption" in batch else batch["text_embeds"].shape[0]
        rows = batch["index"].tolist() if "index" in batch else list(range(b))
        mean, logvar, text = self._posterior_and_text(batch)
        return validation.fixed_timestep_losses(self.dit, self.schedule, mean, logvar, text, rows, self.seed,
                                                self.scaling_factor, self.val_timesteps)

    def _posterior_and_text(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """VAE posterior (mean, logvar) [B, 16, T', h, w] and text embeddings [B, L, D] of a latent-cache batch
        (latents_mean, latents_logvar, text_embeds) or of a frame-pack batch (video, caption) encoded here by the
        frozen VAE and T5."""
        if "latents_mean" in batch:
            mean, logvar, text = batch["latents_mean"], batch["latents_logvar"], batch["text_embeds"]
            self._check_text_dim(text.shape[2], text.shape[1])
        elif "video" in batch:
            encoders = self.encoders(vae=True, text=True)
            mean, logvar = encoders.encode_video(batch["video"])
            text = encoders.encode_text(batch["caption"])
        else:
            raise ValueError(f"a DiT batch needs 'video' + 'caption' (frame pack) or 'latents_mean', "
                             f"'latents_logvar', 'text_embeds' (latent cache); got keys {sorted(batch)}.")
        return mean, logvar, text.to(self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # Lightning validates under inference_mode; anything the DiT caches here (position tables per token grid)
        # would be an inference tensor that a later training step cannot save for backward: use no_grad instead.
        with torch.inference_mode(False), torch.no_grad():
            losses = self.validation_loss(batch)
        b = next(iter(losses.values())).shape[0]
        for t, per_sample in losses.items():
            self.log(f"val/loss_t{t}", per_sample.mean(), on_step=False, on_epoch=True, sync_dist=True, batch_size=b)
        self.log("val/loss", torch.stack([v.mean() for v in losses.values()]).mean(), on_step=False, on_epoch=True,
                 sync_dist=True, batch_size=b, prog_bar=True)
        if "video" in batch:
            self._remember_shape(batch["video"].shape[2:])
        else:
            t, h, w = batch["latents_mean"].shape[2:]
            self._remember_shape(((t - 1) * 4 + 1, h * 8, w * 8))

    def on_validation_epoch_end(self) -> None:
        if self._trainer is not None and self.trainer.sanity_checking:
            return
        if self.sampling_cfg.prompts:
            self.write_samples()

    def samples_dir(self) -> Path:
        if self.hparams.samples_dir:
            return Path(self.hparams.samples_dir)
        root = (self.trainer.log_dir or self.trainer.default_root_dir) if self._trainer is not None else "."
        return Path(root) / "samples"

    def sample_shape(self) -> tuple[int, int, int]:
        """Pixel (frames, height, width) of validation samples: the sampling config, else the data's shape."""
        return validation.sample_shape(self.sampling_cfg, self._sample_shape)

    def prompt_embeddings(self) -> Tensor:
        """The sampling prompts through T5, computed once. A latent-cache run loads T5 for this and frees it."""
        if self._prompt_embeds is None:
            loaded = self.frozen.text_encoder is not None
            encoders = self.encoders(vae=False, text=True)
            self._prompt_embeds = encoders.encode_text(self.sampling_cfg.prompts).detach()
            if self.hparams.use_latent_cache and not loaded:
                self.frozen.text_encoder = None  # a cache run trains without T5 in memory
        return self._prompt_embeds.to(self.device)

    @torch.no_grad()
    def write_samples(self, step: int | None = None) -> list[Path]:
        """Sample every prompt with its fixed seed through cogvx_train.sampling (EMA weights when use_ema) and write
        samples_dir/step{step:07d}_{i}.mp4 on rank 0. Every rank runs the sampler (sharded strategies need all
        ranks in each forward); only rank 0 writes and logs."""
        step = self.global_step if step is None else step
        text, vae = self.prompt_embeddings(), self.encoders(vae=True, text=False).vae
        precision = str(self.trainer.precision) if self._trainer is not None else "32"
        out_dir = self.samples_dir() if self._is_rank_zero() else None
        with torch.inference_mode(False), torch.no_grad(), self.eval_weights():  # see validation_step
            paths, videos = validation.write_validation_samples(self.dit, vae, self.schedule, self.sampling_cfg,
                                                                text, self.scaling_factor, self.sample_shape(), step,
                                                                validation.autocast_dtype(precision), out_dir)
        if self._trainer is not None:
            for name, value in validation.prompt_following_metrics(videos, self.sampling_cfg.prompts).items():
                # every rank sampled the same videos: the same value everywhere, no reduction needed
                self.log(name, value, on_step=False, on_epoch=True, rank_zero_only=True, batch_size=1)
            if self._is_rank_zero():
                validation.log_sample_videos(self.loggers, paths, self.sampling_cfg, step)
        return paths

    def _is_rank_zero(self) -> bool:
        return self._trainer is None or self.trainer.is_global_zero

    # ---------------------------------------------------------------------------- checkpoints, init, export
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None:
            checkpoint["dit_ema"] = self.ema.state_dict()
        checkpoint[CHECKPOINT_KEY] = {"format": 1, "dit_config": asdict(self.dit.config),
                                      "sample_shape": list(self.sample_shape())}
        # the (t, loss) of the last steps behind train/loss_t*: a resumed run logs what the uninterrupted one does
        checkpoint["dit_loss_window"] = self.timestep_buckets.state()
        frozen = [k for k in checkpoint.get("state_dict", {}) if not k.startswith("dit.")]
        if frozen:  # nothing but the transformer is trainable state; never ship frozen weights
            raise RuntimeError(f"unexpected non-DiT weights in the DiT checkpoint: {frozen[:3]}")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get(CHECKPOINT_KEY, {})
        if meta.get("sample_shape"):
            self._sample_shape = tuple(meta["sample_shape"])
        if "dit_loss_window" in checkpoint and (self._trainer is None or self.trainer.global_step == 0):
            # a resume (not a mid-run roll-back, whose steps were logged already)
            self.timestep_buckets.load_state(checkpoint["dit_loss_window"], self.device)
        if self.ema is not None:
            if "dit_ema" in checkpoint:
                self.ema.load_state_dict(checkpoint["dit_ema"])
            else:
                log.warning("the checkpoint has no DiT EMA; the EMA restarts from the loaded weights.")

    def load_init_weights(self, path: str) -> None:
        """`init_from`: see cogvx_train.dit.init_from.load_init_weights."""
        load_init_weights(self, path)

    def export(self, out_dir: str) -> Path:
        """The (EMA) transformer for diffusers (transformer/, CogVideoXTransformer3DModel) or, for ablation
        variants diffusers cannot represent, in our own format (transformer/dit_config.json); the frozen VAE
        (vae/) when it has real weights; scheduler/ with the matching CogVideoXDDIMScheduler config."""
        vae = self.encoders(vae=True, text=False).vae if self.vae_spec.weights is not None else None
        with self._dit_to_export() as dit:
            return export_pipeline(dit, vae, self.diffusion_cfg, out_dir)

    def _dit_to_export(self):
        """The (EMA) transformer as a context: this module's, or after a ZeRO-3 fit a whole fp32 copy built from the
        weights on_train_end gathered (the module's own parameters hold only this rank's slices)."""
        if self._gathered_for_export is None:
            return self.eval_weights(use_ema=True)
        dit = ExpertTransformer(self.dit.config)
        dit.load_state_dict(self._gathered_for_export, strict=True)
        return nullcontext(dit)

