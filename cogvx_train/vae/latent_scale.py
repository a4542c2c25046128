"""The VAE's latent scaling factor, measured: 1 / std of the latents of held-out clips.

The DiT is trained on x0 = z * scaling_factor with a noise schedule designed for data of unit variance (Stable
Diffusion's convention; CogVideoX's 1.15258426 and 0.7 are such measurements for its released VAEs). A VAE trained
from scratch here has latents of its own scale: the demo VAE's have std ~0.47, so at a factor of 1 the DiT would
see every timestep at about a fifth of the signal-to-noise ratio the schedule intends. With
``model.vae.scaling_factor: null`` the VAE stage measures the factor at every validation, on the held-out clips and
with the weights it validates and exports (the EMA), and keeps it in its checkpoints and its diffusers export, from
which the DiT stages read it (``model.vae.scaling_factor: null`` there means "the VAE's own").

The std is that of posterior samples z ~ N(mean, exp(logvar)), taken over every latent element of every clip on
every rank, without drawing any: E[z] = mean and E[z^2] = mean^2 + exp(logvar), summed in float64.
"""

from __future__ import annotations

import math

import torch

from cogvx_train.vae.posterior import DiagonalGaussian


class LatentMoments:
    """Running sums (sum z, sum z^2, count) of posterior samples over a validation epoch.

    The sums are Python floats (float64), not a tensor: a tensor built with the LightningModule would travel to the
    ranks of a spawn launcher (``strategy=ddp_spawn``, CPU tests) in shared memory, where every rank would add into
    the same three numbers, and lose some of the additions when two ranks add at once.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total, self.total_sq, self.count = 0.0, 0.0, 0.0

    def add(self, posterior: DiagonalGaussian) -> None:
        mean, var = posterior.mean.detach().double(), posterior.var.detach().double()
        total, total_sq = torch.stack([mean.sum(), (mean.square() + var).sum()]).tolist()  # one device sync
        self.total += total
        self.total_sq += total_sq
        self.count += mean.numel()

    def reduce(self, strategy=None) -> tuple[float | None, float | None]:
        """(mean, std) over all ranks (a collective when ``strategy`` is distributed); (None, None) before any
        latent was added."""
        sums = torch.tensor([self.total, self.total_sq, self.count], dtype=torch.float64)
        if strategy is not None:
            sums = strategy.reduce(sums.to(strategy.root_device), reduce_op="sum").cpu()
        total, total_sq, count = sums.tolist()
        if count == 0:
            return None, None
        mean = total / count
        return mean, math.sqrt(max(total_sq / count - mean * mean, 0.0))
