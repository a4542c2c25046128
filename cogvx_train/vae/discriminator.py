"""PatchGAN discriminators for the VAE's GAN loss: a 3D one that judges space-time patches (catches flicker and
temporal smearing) and a per-frame 2D one (cheaper; judges texture only).

Both map ``[B, 3, T, H, W]`` in [-1, 1] to a map of logits (one per patch); the hinge loss averages over it.
GroupNorm instead of the usual BatchNorm: batch statistics with 1-2 clips per GPU are noise, and BatchNorm
couples ranks and real/fake batches in ways that destabilise D.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

DISC_KINDS = ("3d", "2d")


@dataclass(frozen=True)
class DiscriminatorConfig:
    base_channels: int = 64
    num_layers: int = 3       # strided layers; receptive field grows with each
    norm: str = "group"       # group | none


DISC_SIZES: dict[str, DiscriminatorConfig] = {
    "tiny": DiscriminatorConfig(base_channels=8, num_layers=2),
    "small": DiscriminatorConfig(base_channels=32, num_layers=3),
    "base": DiscriminatorConfig(base_channels=64, num_layers=3),
}


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    return nn.GroupNorm(num_groups=min(32, channels // 4) or 1, num_channels=channels, eps=1e-6)


class PatchDiscriminator(nn.Module):
    """Strided conv stack -> one logit per patch.

    kind "3d": Conv3d with kernel (3, 4, 4); space is halved by every strided layer and time by every strided layer
    too, except that time is never reduced below one frame (so 1-frame image batches work).
    kind "2d": the same stack with Conv2d applied to every frame on its own.
    """

    def __init__(self, kind: str = "3d", base_channels: int = 64, num_layers: int = 3, norm: str = "group",
                 in_channels: int = 3):
        super().__init__()
        if kind not in DISC_KINDS:
            raise ValueError(f"vae_loss.disc_kind={kind!r} is not one of {', '.join(DISC_KINDS)}.")
        if norm not in ("group", "none"):
            raise ValueError(f"discriminator norm={norm!r} is not one of group, none.")
        self.kind = kind
        conv = nn.Conv3d if kind == "3d" else nn.Conv2d

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            if kind == "3d":
                # time: kernel 3, padding 1 keeps a single frame a single frame even with stride 2
                return [conv(c_in, c_out, (3, 4, 4), stride=(stride, stride, stride), padding=(1, 1, 1))]
            return [conv(c_in, c_out, 4, stride=stride, padding=1)]

        channels = [base_channels * min(2 ** i, 8) for i in range(num_layers + 1)]
        layers: list[nn.Module] = block(in_channels, channels[0], 2) + [nn.LeakyReLU(0.2)]  # no norm on the input
        for i in range(1, num_layers + 1):
            stride = 2 if i < num_layers else 1  # the last hidden layer keeps resolution, as in PatchGAN
            layers += block(channels[i - 1], channels[i], stride) + [_norm(norm, channels[i]), nn.LeakyReLU(0.2)]
        layers += block(channels[-1], 1, 1)  # logits
        self.layers = nn.Sequential(*layers)
        self.init_weights()

    def init_weights(self) -> None:
        """DCGAN/PatchGAN init: conv weights N(0, 0.02), zero biases, unit norm scales."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, 3, T, H, W]`` -> logits ``[B, 1, T', H', W']`` (3d) or ``[B * T, 1, H', W']`` (2d)."""
        if video.ndim != 5:
            raise ValueError(f"the discriminator takes [B, 3, T, H, W] videos, got shape {tuple(video.shape)}.")
        if self.kind == "2d":
            b, c, t, h, w = video.shape
            video = video.transpose(1, 2).reshape(b * t, c, h, w)  # [B, C, T, H, W] -> [B*T, C, H, W]
        return self.layers(video)


def build_discriminator(kind: str = "3d", size: str = "base", **overrides) -> PatchDiscriminator:
    """A discriminator from the named size registry; ``overrides`` replace single DiscriminatorConfig fields."""
    if size not in DISC_SIZES:
        raise ValueError(f"discriminator size {size!r} is not one of {', '.join(DISC_SIZES)}.")
    cfg = DISC_SIZES[size]
    unknown = set(overrides) - set(cfg.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown discriminator setting(s) {sorted(unknown)}; known: "
                         f"{', '.join(cfg.__dataclass_fields__)}.")
    fields = {**cfg.__dict__, **overrides}
    return PatchDiscriminator(kind=kind, **fields)
