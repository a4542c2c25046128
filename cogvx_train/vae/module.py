"""VAETrainingModule: the 3D causal VAE trained as a GAN generator against a PatchGAN discriminator.

One training step = one generator update, and from ``disc_start`` on also one discriminator update:

    x_hat, q(z|x) = VAE(x)                       (posterior sample, the trainer's autocast)
    G: L_G (losses.py) -> backward -> clip -> AdamW step -> lr step -> EMA update
    D: L_D on (x, x_hat.detach()) -> backward -> clip -> AdamW step -> lr step     (only once step >= disc_start)

Step counting. Lightning adds every ``LightningOptimizer.step()`` to ``trainer.global_step`` under manual
optimisation (Lightning issue #17958), so with two optimizers ``max_steps``, logging and checkpoint intervals would
count D updates too. Here the discriminator's step is kept out of that count, so ``trainer.global_step`` is the
number of generator steps, and the module also keeps its own ``generator_step`` (saved in checkpoints) that drives
``disc_start`` and both lr schedules; a mismatch between the two is reported.

Temporal context parallelism (``context_parallel_size`` = c > 1, stage A2). Consecutive ranks [g*c, (g+1)*c) form
a group that receives the same clips (the datamodule shards data over world/c data-parallel ranks); each rank
encodes and decodes its slice of the frames (context_parallel.py) and computes its share of every loss term with
the whole clip's denominators (losses.py), so the group's shares sum to the one-process loss; logs are those sums.
* Posterior noise is drawn for the whole clip's latent by the group's first rank and broadcast.
* G's gradient: each rank backpropagates c x its share (see training_step), so DDP's average over all ranks is the
  data-parallel average of whole-clip gradients.
* D sees whole clips: the real clip (every rank has it) and the group's reconstructions gathered; every rank of a
  group computes the same D loss, so D needs no scaling. The adaptive GAN weight uses whole-clip gradients.
* Validation: every rank reconstructs its slice, the group gathers the whole reconstruction, and the metrics are
  computed on whole clips on every rank of the group (identical values, so the mean over ranks is unchanged).
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from cogvx_train.train.ema import EMA
from cogvx_train.train.lr_schedule import build_lr_lambda
from cogvx_train.train.optimizer import OptimConfig, adamw, clip_grad_norm, fused_allowed
from cogvx_train.train.video_writer import side_by_side, write_video
from cogvx_train.vae.context_parallel import ClipShare, new_context_parallel_group, temporal_context_parallel
from cogvx_train.vae.discriminator import build_discriminator
from cogvx_train.vae.latent_scale import LatentMoments
from cogvx_train.vae.losses import SHARED_TERMS, VAELoss, VAELossConfig
from cogvx_train.vae.metrics import reconstruction_metrics

log = logging.getLogger(__name__)


def grad_norm(params) -> torch.Tensor:
    """Global L2 norm of the gradients, in fp32 (before clipping)."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(norms))


def _step_without_counting(optimizer) -> None:
    """``optimizer.step()`` through Lightning (precision plugin, strategy, callbacks) but without adding it to
    ``trainer.global_step``: Lightning's manual loop counts steps in the optimizer's before/after hooks, which are
    silenced for this one call."""
    before, after = getattr(optimizer, "_on_before_step", None), getattr(optimizer, "_on_after_step", None)
    if before is None or after is None:  # a plain torch optimizer (module used outside a Trainer)
        optimizer.step()
        return
    optimizer._on_before_step = optimizer._on_after_step = lambda: None
    try:
        optimizer.step()
    finally:
        optimizer._on_before_step, optimizer._on_after_step = before, after


class VAETrainingModule(pl.LightningModule):
    """Train a CausalVAE with L1 + LPIPS + KL and, from ``loss.disc_start``, a PatchGAN (see module docstring)."""

    def __init__(self, vae_size: str = "tiny", vae_overrides: dict[str, Any] | None = None,
                 loss: VAELossConfig | dict[str, Any] | None = None, optim: OptimConfig | dict[str, Any] | None = None,
                 max_steps: int | None = None, ema_decay: float | None = None, ema_start_step: int = 0,
                 samples_dir: str | None = None, num_val_videos: int = 2, val_fps: float = 8.0,
                 gradient_checkpointing: bool = False, context_parallel_size: int = 1,
                 measure_scaling_factor: bool = False):
        super().__init__()
        from cogvx_train.vae import build_vae  # the model package; imported here so losses stay importable alone

        self.loss_cfg = VAELossConfig.from_any(loss)
        self.optim_cfg = OptimConfig.from_any(optim)
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay={ema_decay!r} must lie strictly between 0 and 1 (or be None for no EMA).")
        if isinstance(context_parallel_size, bool) or not isinstance(context_parallel_size, int) \
                or context_parallel_size < 1:
            raise ValueError(f"context_parallel_size={context_parallel_size!r} must be a positive integer.")
        # plain values only: never a built module in the hyper-parameters
        self.save_hyperparameters({
            "vae_size": vae_size, "vae_overrides": dict(vae_overrides or {}), "loss": self.loss_cfg.to_dict(),
            "optim": self.optim_cfg.to_dict(), "max_steps": max_steps, "ema_decay": ema_decay,
            "ema_start_step": ema_start_step, "samples_dir": samples_dir, "num_val_videos": num_val_videos,
            "val_fps": val_fps, "gradient_checkpointing": gradient_checkpointing,
            "context_parallel_size": context_parallel_size, "measure_scaling_factor": measure_scaling_factor,
        })
        self.automatic_optimization = False
        self.vae = build_vae(vae_size, **(vae_overrides or {}))
        # non-reentrant checkpointing: the adaptive weight's torch.autograd.grad works through it
        self.vae.enable_gradient_checkpointing(gradient_checkpointing)
        self.loss = VAELoss.from_config(self.loss_cfg)
        self.discriminator = build_discriminator(self.loss_cfg.disc_kind, self.loss_cfg.disc_size)
        self.ema = EMA(self.vae, ema_decay, ema_start_step) if ema_decay is not None else None
        self.generator_step = 0
        self._warned_step_mismatch = False
        self.context_parallel_size = context_parallel_size
        self._cp_group = None  # made on first use, when the process group exists
        self._default_samples_dir: Path | None = None  # samples_dir: under the trainer's log_dir
        self.latent_moments = LatentMoments()

    # ---- context parallelism -------------------------------------------------------------------------------------

    def clip_share(self, clip_frames: int) -> ClipShare:
        """The frames of each ``clip_frames``-frame clip this rank works on: all of them, or its context-parallel
        slice (split on the GroupNorm windows of the VAE's config)."""
        c = self.context_parallel_size
        if c == 1:
            return ClipShare.whole(clip_frames)
        if self._cp_group is None:
            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError(f"context_parallel_size={c} splits every clip over {c} processes, but this is a "
                                 f"single-process run; launch a multiple of {c} ranks (e.g. trainer.devices={c}) or "
                                 "set context_parallel_size=1.")
            self._cp_group = new_context_parallel_group(c)  # collective: every rank gets here at the same step
        cfg = self.vae.config
        return ClipShare.for_rank(clip_frames, self._cp_group, cfg.temporal_compression_ratio,
                                  cfg.encoder_norm_window, cfg.decoder_norm_window)

    def _context_parallel(self, share: ClipShare):
        return nullcontext() if share.group is None else temporal_context_parallel(self.vae, share.group)

    def _sample_reconstruction(self, x_local: torch.Tensor, share: ClipShare):
        """(x_hat, q(z|x)) for this rank's frames, z = mean + std * eps. eps is drawn for the whole clip's latent and
        the group's first rank's draw is used by all (one process draws the same), then each rank takes its part."""
        posterior = self.vae.encode(x_local)
        latent = share.latent(self.vae.config.temporal_compression_ratio)
        mean = posterior.mean
        eps = torch.randn(*mean.shape[:2], latent.clip_frames, *mean.shape[3:], device=mean.device, dtype=mean.dtype)
        z = mean + posterior.std * latent.local(latent.broadcast_(eps))
        return self.vae.decode(z), posterior

    @staticmethod
    def _whole_clip_values(g: dict[str, torch.Tensor], share: ClipShare) -> dict[str, torch.Tensor]:
        """Detached loss values of whole clips: the group's shares summed (one all-reduce), the rest as they are."""
        out = {k: v.detach() for k, v in g.items()}
        shared = [k for k in SHARED_TERMS if k in out]
        if share.group is not None:
            summed = share.sum(torch.stack([out[k] for k in shared]))
            out.update(zip(shared, summed.unbind()))
        return out

    # ---- optimisation --------------------------------------------------------------------------------------------

    def total_steps(self) -> int | None:
        if self.hparams.max_steps is not None and self.hparams.max_steps > 0:
            return int(self.hparams.max_steps)
        if self._trainer is not None:
            est = self.trainer.estimated_stepping_batches
            return int(est) if math.isfinite(est) else None
        return None

    def configure_optimizers(self):
        o, lc = self.optim_cfg, self.loss_cfg
        total = self.total_steps()
        fused = fused_allowed(self)
        opt_g = adamw(self.vae.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                      allow_fused=fused)
        opt_d = adamw(self.discriminator.parameters(), lr=lc.disc_lr if lc.disc_lr else o.lr,
                      betas=lc.disc_betas or o.betas, eps=o.eps, weight_decay=o.weight_decay, allow_fused=fused)
        g_lambda = build_lr_lambda(o.warmup_steps, total, o.schedule, o.min_lr_ratio)
        # D counts its own steps (it starts at disc_start): it gets its own warmup and ends with G
        d_total = None if total is None else total - lc.disc_start
        if d_total is None or d_total <= 0:
            d_lambda = build_lr_lambda(o.warmup_steps, None, "constant", 1.0)
        else:
            d_lambda = build_lr_lambda(min(o.warmup_steps, d_total), d_total, o.schedule, o.min_lr_ratio)
        return ([opt_g, opt_d], [{"scheduler": LambdaLR(opt_g, g_lambda), "interval": "step"},
                                 {"scheduler": LambdaLR(opt_d, d_lambda), "interval": "step"}])

    def _clip(self, optimizer) -> None:
        if self.optim_cfg.grad_clip > 0:
            clip_grad_norm(self, optimizer, self.optim_cfg.grad_clip)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        x = batch["video"]  # whole clips (every rank of a context-parallel group has the same ones)
        num_real = batch.get("num_real_frames")
        step = self.generator_step
        self._check_step_counter(step)
        opt_g, opt_d = self.optimizers()
        sched_g, sched_d = self.lr_schedulers()
        gan_on = self.loss.gan_active(step)
        share = self.clip_share(x.shape[2])

        # generator update (D is only a critic here: its weights get no gradient)
        self.discriminator.requires_grad_(False)
        x_local = share.local(x)
        opt_g.zero_grad(set_to_none=True)
        with self._context_parallel(share):
            x_hat, posterior = self._sample_reconstruction(x_local, share)
            g = self.loss.generator_loss(
                x_local, x_hat, posterior, step,
                discriminator=self.discriminator if gan_on else None,
                last_layer=self.vae.last_decoder_layer_weight() if gan_on else None,
                num_real_frames=num_real, share=share,
            )
            # g["total"] is this rank's share of the whole-clip loss, so its gradient is this rank's share of the
            # whole-clip gradient. DDP averages over all c * dp ranks, i.e. sums a group's shares and divides by c
            # too many; backpropagating c x the share makes the average (1/dp) sum over clips of whole-clip
            # gradients: plain data parallelism over whole clips, with DDP's one all-reduce (an extra all-reduce in
            # the group before DDP's would give the same update at twice the traffic).
            self.manual_backward(g["total"] * share.size)
        values = self._whole_clip_values(g, share)
        logs = {f"train/{k}": v for k, v in values.items() if k != "logits_fake"}
        logs["train/grad_norm_g"] = grad_norm(self.vae.parameters())
        self._clip(opt_g)
        logs["train/lr_g"] = torch.tensor(opt_g.param_groups[0]["lr"])  # the lr this step used
        opt_g.step()
        sched_g.step()
        self.discriminator.requires_grad_(True)
        if self.ema is not None:
            self.ema.update(self.vae, step)

        # discriminator update, only once the GAN is on. D judges whole clips: every rank of a group computes the
        # same D loss and gradient, so DDP's average over all ranks is the data-parallel one without scaling.
        if gan_on:
            d = self.loss.discriminator_loss(x, share.gather(x_hat.detach()), self.discriminator)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d["d_loss"])
            logs["train/d_loss"] = d["d_loss"].detach()
            logs["train/d_logits_real"] = d["logits_real"]
            logs["train/d_logits_fake"] = d["logits_fake"]
            logs["train/grad_norm_d"] = grad_norm(self.discriminator.parameters())
            self._clip(opt_d)
            logs["train/lr_d"] = torch.tensor(opt_d.param_groups[0]["lr"])
            _step_without_counting(opt_d)
            sched_d.step()

        self.generator_step += 1
        self.log_dict({k: v.float() for k, v in logs.items()}, on_step=True, on_epoch=False,
                      batch_size=x.shape[0])
        self.log("train/loss", values["total"], on_step=True, on_epoch=False, prog_bar=True, batch_size=x.shape[0])
        return values

    def _check_step_counter(self, step: int) -> None:
        if self._trainer is None or self._warned_step_mismatch:
            return
        if self.trainer.global_step != step:
            self._warned_step_mismatch = True
            log.warning("trainer.global_step=%d differs from the VAE's generator step %d; disc_start and the lr "
                        "schedules follow the generator step. (Did the Lightning version change how manual "
                        "optimisation counts steps?)", self.trainer.global_step, step)

    # ---- validation ----------------------------------------------------------------------------------------------

    def eval_weights(self):
        """The weights validation and export use: the EMA when enabled, else the live ones."""
        if self.ema is not None:
            return self.ema.swapped_into(self.vae)
        from contextlib import nullcontext

        return nullcontext(self.vae)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, posterior_out: list | None = None) -> torch.Tensor:
        """Deterministic reconstruction (posterior mode) of whole clips with the eval weights. Under context
        parallelism every rank of a group passes the same clips, runs its slice, and gets the whole x_hat back.
        ``posterior_out`` (a list) receives q(z|x) of this rank's latent frames."""
        share = self.clip_share(x.shape[2])
        with self.eval_weights(), self._context_parallel(share):
            x_hat, posterior = self.vae(share.local(x), sample_posterior=False)
        if posterior_out is not None:
            posterior_out.append(posterior)
        return share.gather(x_hat)

    def on_validation_epoch_start(self) -> None:
        self.latent_moments.reset()

    def on_validation_epoch_end(self) -> None:
        """Latent statistics of the held-out clips (the distribution the DiT will be trained on) and, with
        ``measure_scaling_factor``, the VAE's scaling factor set to 1 / their std (see LatentMoments)."""
        mean, std = self.latent_moments.reduce(self.trainer.strategy)
        if std is None:
            return
        self.log("val/latent_mean", mean, on_step=False, on_epoch=True)
        self.log("val/latent_std", std, on_step=False, on_epoch=True)
        if self.hparams.measure_scaling_factor and std > 0:
            self.set_scaling_factor(1.0 / std)
            self.log("val/scaling_factor", self.vae.scaling_factor, on_step=False, on_epoch=True)

    def set_scaling_factor(self, value: float) -> None:
        from dataclasses import replace

        self.vae.config = replace(self.vae.config, scaling_factor=float(value))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = batch["video"]
        num_real = batch.get("num_real_frames")
        posteriors: list = []
        x_hat = self.reconstruct(x, posteriors)
        self.latent_moments.add(posteriors[0])
        metrics = reconstruction_metrics(x, x_hat, num_real, perceptual=self.loss.perceptual)
        for name, per_clip in metrics.items():
            per_clip = per_clip[torch.isfinite(per_clip)]  # flicker is undefined for clips with < 2 real frames
            if per_clip.numel():
                self.log(f"val/{name}", per_clip.mean(), on_step=False, on_epoch=True, sync_dist=True,
                         batch_size=per_clip.numel())
        if batch_idx == 0 and self.trainer.is_global_zero and self.hparams.num_val_videos > 0:
            self._write_reconstructions(x, x_hat)

    def setup(self, stage: str) -> None:
        # trainer.log_dir is a collective under DDP (rank 0 broadcasts it): resolve it now, on every rank, not later
        # on the one rank that writes videos while the others wait in the next collective
        self.samples_dir()

    def samples_dir(self) -> Path:
        if self.hparams.samples_dir:
            return Path(self.hparams.samples_dir)
        if self._default_samples_dir is None:
            self._default_samples_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "samples"
        return self._default_samples_dir

    def _write_reconstructions(self, x: torch.Tensor, x_hat: torch.Tensor) -> Path:
        """``original | reconstruction`` for the first clips of the first val batch, stacked vertically."""
        k = min(self.hparams.num_val_videos, x.shape[0])
        rows = [side_by_side(x[i].float().cpu(), x_hat[i].float().cpu()) for i in range(k)]
        grid = torch.cat(rows, dim=2)  # k x [3, T, H, 2W+gap] -> [3, T, k*H, 2W+gap]
        path = write_video(self.samples_dir() / f"recon_step{self.global_step:07d}.mp4", grid,
                           fps=self.hparams.val_fps)
        for logger in self.loggers:
            if hasattr(logger, "log_video"):  # wandb; csv has no video
                logger.log_video("val/reconstruction", videos=[str(path)], step=self.global_step,
                                 fps=[self.hparams.val_fps], format=["mp4"])
        return path

    # ---- checkpoints, init and export ----------------------------------------------------------------------------

    def _perceptual_keys(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith("loss.perceptual.")}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["vae_generator_step"] = self.generator_step
        checkpoint["vae_scaling_factor"] = self.vae.scaling_factor  # measured ones change during training
        if self.ema is not None:
            checkpoint["vae_ema"] = self.ema.state_dict()
        # LPIPS is a fixed instrument loaded from its own files: keep it out of the checkpoint
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("loss.perceptual.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved_step = int(checkpoint.get("vae_generator_step", checkpoint.get("global_step", 0)))
        if self._trainer is None or self.trainer.global_step == 0:
            self.generator_step = saved_step  # resume / load: Lightning restores global_step to the same value
        # else: a mid-run roll-back of the weights (the non-finite guard); the step count goes on, as the
        # trainer's global_step and the lr schedulers do
        if self.hparams.measure_scaling_factor and "vae_scaling_factor" in checkpoint:
            self.set_scaling_factor(checkpoint["vae_scaling_factor"])
        if self.ema is not None:
            if "vae_ema" in checkpoint:
                self.ema.load_state_dict(checkpoint["vae_ema"])
            else:  # on_train_start restarts it from the loaded weights
                log.warning("the checkpoint has no EMA; the EMA restarts from the loaded weights.")
        if "state_dict" in checkpoint:  # strict loading expects the LPIPS entries removed at save time
            checkpoint["state_dict"].update(self._perceptual_keys())

    def on_train_start(self) -> None:
        # a checkpoint without EMA (or init weights loaded after construction): start the EMA from the live weights
        if self.ema is not None and self.ema.num_updates == 0:
            self.ema = EMA(self.vae, self.ema.decay, self.ema.start_step)

    def load_init_weights(self, path: str) -> None:
        """``init_from``: VAE (its EMA when the checkpoint has one) and discriminator weights from a vae-stage
        checkpoint or run directory, or VAE weights from a diffusers-format directory. Steps, optimizers and the
        data position start fresh."""
        from cogvx_train.vae import load_diffusers_vae

        p = Path(path).expanduser()
        if p.is_dir() and (p / "checkpoints" / "last.ckpt").is_file():
            p = p / "checkpoints" / "last.ckpt"
        if p.is_dir():
            loaded = load_diffusers_vae(str(p)).state_dict()
            own = self.vae.state_dict()
            wrong = [k for k in own if k not in loaded or loaded[k].shape != own[k].shape]
            if wrong:
                raise ValueError(f"init_from={path} holds a VAE of another size than model.vae.size="
                                 f"{self.hparams.vae_size} (first difference: {wrong[0]}); choose the matching size.")
            self.vae.load_state_dict(loaded, strict=True)
        elif p.is_file():
            ckpt = torch.load(p, map_location="cpu", weights_only=False)
            state = ckpt.get("state_dict")
            if not isinstance(state, dict) or not any(k.startswith("vae.") for k in state):
                raise ValueError(f"init_from={path} is not a VAE-stage checkpoint (no 'vae.' weights); give a vae "
                                 "run directory, its checkpoints/*.ckpt or a diffusers-format VAE directory.")
            vae_state = {k[len("vae."):]: v for k, v in state.items() if k.startswith("vae.")}
            if "vae_ema" in ckpt:  # the averaged weights are the better start
                vae_state.update(ckpt["vae_ema"]["shadow"])
            self.vae.load_state_dict(vae_state, strict=True)
            disc_state = {k[len("discriminator."):]: v for k, v in state.items() if k.startswith("discriminator.")}
            own = self.discriminator.state_dict()
            if disc_state.keys() == own.keys() and all(disc_state[k].shape == own[k].shape for k in own):
                self.discriminator.load_state_dict(disc_state)
            else:
                log.warning("init_from %s: its discriminator does not match this one (kind/size); D starts fresh.",
                            path)
        else:
            raise ValueError(f"init_from={path} does not exist; give a vae run directory, a checkpoint file or a "
                             "diffusers-format VAE directory.")
        if self.ema is not None:
            self.ema = EMA(self.vae, self.ema.decay, self.ema.start_step)

    def export(self, out_dir: str) -> Path:
        """The (EMA) VAE in diffusers' AutoencoderKLCogVideoX format."""
        from cogvx_train.vae import export_diffusers_vae

        with self.eval_weights():
            export_diffusers_vae(self.vae, out_dir)
        return Path(out_dir)
