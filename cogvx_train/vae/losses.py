"""The VAE objective: L1 + LPIPS + KL, plus a hinge GAN term with the adaptive weight from ``disc_start`` on.

    L_G = w_l1 * L1 + w_lpips * LPIPS + w_kl * KL  [+ lambda * w_disc * L_adv   once step >= disc_start]
    lambda = clamp(||grad_W L_rec|| / (||grad_W L_adv|| + 1e-4), 0, 1e4),  W = the decoder's last conv weight
    L_adv = -mean D(x_hat)                                   (hinge generator loss)
    L_D = 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))

The public reference code gets three things wrong, each pinned by a test here: its GAN gate is inverted, its
adaptive weight is computed but never applied, and it has no KL term.

Scale convention: L1 and LPIPS are means over pixels (and frames), and KL is the posterior's per-clip sum divided by
the clip's number of pixel values (3 * T * H * W). That is the LDM/SGM loss (per-clip sums of reconstruction error
and KL) divided by a constant, so ``kl_weight = 1e-6`` means what it means there; the GAN term is invariant to that
constant because lambda scales with the reconstruction gradient.

All loss arithmetic runs in fp32 with autocast off, whatever the trainer's precision.

Context parallelism (``share``: a :class:`ClipShare`). A rank that holds only some frames of each clip computes
its share of every term in ``SHARED_TERMS`` (sums over its frames divided by the WHOLE clip's counts), so the
shares sum over the group to what one process computes on the whole clip. The discriminator judges whole clips
(the group's reconstructions gathered), so ``g_loss``, ``adaptive_weight`` and ``logits_fake`` are whole-clip
values on every rank; ``total`` counts ``g_loss`` as 1/size per rank. The LPIPS frame choice is the group's
first rank's draw (global frame indices), and lambda uses the last layer's whole-clip gradients.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cogvx_train.config.plain import plain_config
from cogvx_train.vae.context_parallel import ClipShare
from cogvx_train.vae.lpips_loss import PerceptualLoss
from cogvx_train.vae.metrics import real_frame_mask

DISC_LOSSES = ("hinge", "vanilla")
# generator_loss entries that are per-rank shares under context parallelism (their group sum is the clip's value)
SHARED_TERMS = ("l1", "lpips", "kl", "kl_per_clip", "rec", "total")


@dataclass
class VAELossConfig:
    """The ``vae_loss`` config group, field for field (the LightningModule takes it as a dict or this)."""

    l1_weight: float = 1.0
    lpips_weight: float = 0.1
    kl_weight: float = 1e-6
    lpips_frames: str | int = "all"         # "all" real frames, or this many random real frames per clip
    lpips_net: str = "vgg"                  # vgg | alex
    lpips_backbone_path: str | None = None  # local torchvision backbone checkpoint (no download)
    lpips_linear_path: str | None = None    # None: the linear layers shipped inside the lpips package
    lpips_random_backbone: bool = False     # tests and demos only; warned
    disc_start: int = 5000                  # first generator step with the GAN term (and D updates)
    disc_weight: float = 0.5
    disc_loss: str = "hinge"                # hinge | vanilla (non-saturating softplus)
    disc_kind: str = "3d"                   # 3d | 2d (per frame)
    disc_size: str = "base"                 # cogvx_train.vae.discriminator.DISC_SIZES
    disc_lr: float | None = None            # None: optim.lr
    disc_betas: tuple[float, float] | None = None  # None: optim.betas
    adaptive_weight_max: float = 1e4

    @classmethod
    def from_any(cls, value: "VAELossConfig | dict[str, Any] | None") -> "VAELossConfig":
        cfg = plain_config(cls, value, "vae_loss")
        if cfg.disc_betas is not None:
            cfg.disc_betas = tuple(cfg.disc_betas)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out["disc_betas"] is not None:
            out["disc_betas"] = list(out["disc_betas"])
        return out


class VAELoss(nn.Module):
    """Generator and discriminator losses. Holds the (frozen) LPIPS network, nothing trainable."""

    def __init__(self, l1_weight: float = 1.0, lpips_weight: float = 0.1, kl_weight: float = 1e-6,
                 lpips_frames: str | int = "all", lpips_net: str = "vgg", lpips_backbone_path: str | None = None,
                 lpips_linear_path: str | None = None, lpips_random_backbone: bool = False,
                 disc_start: int = 5000, disc_weight: float = 0.5, disc_loss: str = "hinge",
                 adaptive_weight_max: float = 1e4):
        super().__init__()
        for name, w in (("l1_weight", l1_weight), ("lpips_weight", lpips_weight), ("kl_weight", kl_weight),
                        ("disc_weight", disc_weight)):
            if w < 0:
                raise ValueError(f"vae_loss.{name}={w} must be >= 0.")
        if lpips_frames != "all" and not (isinstance(lpips_frames, int) and lpips_frames > 0):
            raise ValueError(f"vae_loss.lpips_frames={lpips_frames!r} must be 'all' or a positive number of frames.")
        if disc_loss not in DISC_LOSSES:
            raise ValueError(f"vae_loss.disc_loss={disc_loss!r} is not one of {', '.join(DISC_LOSSES)}.")
        if not isinstance(disc_start, int) or disc_start < 0:
            raise ValueError(f"vae_loss.disc_start={disc_start!r} must be an integer step >= 0.")
        self.l1_weight, self.lpips_weight, self.kl_weight = l1_weight, lpips_weight, kl_weight
        self.lpips_frames = lpips_frames
        self.disc_start, self.disc_weight, self.disc_loss = disc_start, disc_weight, disc_loss
        self.adaptive_weight_max = adaptive_weight_max
        self.perceptual = PerceptualLoss(lpips_net, lpips_backbone_path, lpips_linear_path, lpips_random_backbone)

    @classmethod
    def from_config(cls, cfg: VAELossConfig) -> "VAELoss":
        return cls(l1_weight=cfg.l1_weight, lpips_weight=cfg.lpips_weight, kl_weight=cfg.kl_weight,
                   lpips_frames=cfg.lpips_frames, lpips_net=cfg.lpips_net,
                   lpips_backbone_path=cfg.lpips_backbone_path, lpips_linear_path=cfg.lpips_linear_path,
                   lpips_random_backbone=cfg.lpips_random_backbone, disc_start=cfg.disc_start,
                   disc_weight=cfg.disc_weight, disc_loss=cfg.disc_loss,
                   adaptive_weight_max=cfg.adaptive_weight_max)

    def gan_active(self, step: int) -> bool:
        """The GAN term and D updates are on from generator step ``disc_start`` (inclusive)."""
        return step >= self.disc_start

    # ---- terms -------------------------------------------------------------------------------------------------

    def l1(self, x: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor,
           real_per_clip: torch.Tensor | None = None) -> torch.Tensor:
        """Mean |x - x_hat| over the real frames; ``real_per_clip`` [B]: real frames of each whole clip when x holds
        a context-parallel share (default: the mask's count)."""
        per_frame = (x - x_hat).abs().mean(dim=(1, 3, 4))  # [B, T]
        per_clip = (per_frame * mask).sum(1) / (mask.sum(1) if real_per_clip is None else real_per_clip)
        return per_clip.mean()

    def lpips_frame_index(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(clip, frame) indices of the frames LPIPS looks at: every real frame, or ``lpips_frames`` random real
        frames per clip (fewer when a clip has fewer real frames). Random draws use the global RNG, which
        Lightning seeds per rank."""
        clips, frames = [], []
        for b in range(mask.shape[0]):
            real = mask[b].nonzero().flatten()
            if self.lpips_frames != "all" and real.numel() > self.lpips_frames:
                real = real[torch.randperm(real.numel(), device=real.device)[: self.lpips_frames]].sort().values
            clips.append(torch.full_like(real, b))
            frames.append(real)
        return torch.cat(clips), torch.cat(frames)

    def lpips(self, x: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor,
              share: ClipShare | None = None) -> torch.Tensor:
        """Mean LPIPS over the chosen frames; ``mask`` [B, T_clip] covers whole clips, x this rank's share."""
        share = share or ClipShare.whole(mask.shape[1])
        clip_idx, frame_idx = self.lpips_frame_index(mask)
        share.broadcast_(clip_idx)  # one draw for the whole group (every rank's has the same size: same mask)
        share.broadcast_(frame_idx)
        b = mask.shape[0]
        chosen = torch.bincount(clip_idx, minlength=b).clamp(min=1)  # frames per whole clip
        mine = (frame_idx >= share.start) & (frame_idx < share.start + share.frames)
        clip_idx, frame_idx = clip_idx[mine], frame_idx[mine] - share.start
        # advanced indices on dims 0 and 2 around a slice: [B, C, T, H, W] -> [N, C, H, W]
        d = self.perceptual(x[clip_idx, :, frame_idx], x_hat[clip_idx, :, frame_idx])  # [N]
        per_clip = torch.zeros(b, device=d.device).index_add_(0, clip_idx, d)
        return (per_clip / chosen).mean()

    def kl(self, posterior, x: torch.Tensor, clip_frames: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(KL per pixel value, KL per clip) in fp32, both batch means (see the module docstring for the scale);
        ``clip_frames``: frames of the whole clip when x and the posterior are a context-parallel share."""
        kl_per_clip = posterior.kl().float()  # [B], summed over the latent's C, T, H, W
        pixels = x[0, :, 0].numel() * (x.shape[2] if clip_frames is None else clip_frames)
        return (kl_per_clip / pixels).mean(), kl_per_clip.mean()

    def generator_adversarial(self, logits_fake: torch.Tensor) -> torch.Tensor:
        logits_fake = logits_fake.float()
        if self.disc_loss == "hinge":
            return -logits_fake.mean()
        return F.softplus(-logits_fake).mean()

    def adaptive_weight(self, rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        share: ClipShare | None = None) -> torch.Tensor:
        """lambda = clamp(||grad_W rec|| / (||grad_W g|| + 1e-4), 0, max): balances the GAN gradient against the
        reconstruction gradient where they meet, at the decoder's output layer. A constant (no gradient).
        With a ``share`` the losses are this rank's shares and their gradients are summed over the group."""
        share = share or ClipShare.whole(1)
        rec_grad = share.sum(torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0])
        g_grad = share.sum(torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0])
        ratio = rec_grad.float().norm() / (g_grad.float().norm() + 1e-4)
        return ratio.clamp(0.0, self.adaptive_weight_max).detach()

    # ---- the two losses ----------------------------------------------------------------------------------------

    def generator_loss(self, x: torch.Tensor, x_hat: torch.Tensor, posterior, step: int,
                       discriminator: nn.Module | None = None, last_layer: torch.Tensor | None = None,
                       num_real_frames: torch.Tensor | None = None,
                       share: ClipShare | None = None) -> dict[str, torch.Tensor]:
        """Every term by name, fp32 scalars. ``total`` is what the VAE minimises.

        Before ``disc_start`` the discriminator is not run at all (not in the graph) and ``gan_active`` is 0; from
        then on ``g_loss``, ``adaptive_weight``, ``gan_weight`` (= lambda * disc_weight) and ``logits_fake`` join.
        ``share``: x, x_hat and the posterior hold this rank's frames of each clip (see the module docstring).
        """
        if x.shape != x_hat.shape or x.ndim != 5:
            raise ValueError(f"the VAE loss compares two [B, 3, T, H, W] clips of one shape, got {tuple(x.shape)} "
                             f"and {tuple(x_hat.shape)}.")
        share = share or ClipShare.whole(x.shape[2])
        if x.shape[2] != share.frames:
            raise ValueError(f"this rank's share of the clip has {share.frames} frames, but x has {x.shape[2]}.")
        gan_on = self.gan_active(step)
        logits_fake = None
        if gan_on:
            if discriminator is None or last_layer is None:
                raise ValueError(f"step {step} >= vae_loss.disc_start={self.disc_start}: the generator loss needs "
                                 "the discriminator and the decoder's last-layer weight.")
            # whole clips (the group's slices gathered); under the trainer's autocast, the loss math below is fp32
            logits_fake = discriminator(share.gather(x_hat))
        with torch.autocast(device_type=x.device.type, enabled=False):
            x, x_hat = x.float(), x_hat.float()
            clip_mask = real_frame_mask(num_real_frames, x.shape[0], share.clip_frames, x.device).float()  # [B, T]
            out: dict[str, torch.Tensor] = {"l1": self.l1(x, x_hat, share.local(clip_mask, 1), clip_mask.sum(1))}
            out["rec"] = self.l1_weight * out["l1"]
            if self.lpips_weight > 0:  # with weight 0 the term is absent, not a silent zero
                out["lpips"] = self.lpips(x, x_hat, clip_mask, share)
                out["rec"] = out["rec"] + self.lpips_weight * out["lpips"]
            out["kl"], out["kl_per_clip"] = self.kl(posterior, x, share.clip_frames)
            total = out["rec"] + self.kl_weight * out["kl"]
            out["gan_active"] = x.new_tensor(float(gan_on))
            if gan_on:
                out["g_loss"] = self.generator_adversarial(logits_fake)
                g_share = out["g_loss"] / share.size  # every rank holds the whole-clip g_loss
                out["adaptive_weight"] = self.adaptive_weight(out["rec"], g_share, last_layer, share)
                out["gan_weight"] = out["adaptive_weight"] * self.disc_weight
                out["logits_fake"] = logits_fake.detach().float().mean()
                total = total + out["gan_weight"] * g_share
            out["total"] = total
        return out

    def discriminator_loss(self, x: torch.Tensor, x_hat: torch.Tensor,
                           discriminator: nn.Module) -> dict[str, torch.Tensor]:
        """D's loss on a real clip and the (detached) reconstruction, plus the mean logits for monitoring."""
        logits_real = discriminator(x.detach())
        logits_fake = discriminator(x_hat.detach())
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits_real, logits_fake = logits_real.float(), logits_fake.float()
            if self.disc_loss == "hinge":
                d_loss = 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
            else:
                d_loss = 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
        return {"d_loss": d_loss, "logits_real": logits_real.detach().mean(),
                "logits_fake": logits_fake.detach().mean()}
