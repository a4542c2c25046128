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
    """Running sums (sum z, sum z^2, count) of posterior samples over a validation epoch."""

    def __init__(self) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64)

    def reset(self) -> None:
        self.sums.zero_()

    def add(self, posterior: DiagonalGaussian) -> None:
        mean, var = posterior.mean.detach().double(), posterior.var.detach().double()
        self.sums += torch.stack([mean.sum(), (mean.square() + var).sum(),
                                  torch.tensor(float(mean.numel()), dtype=torch.float64, device=mean.device)]).cpu()

    def reduce(self, strategy=None) -> tuple[float | None, float | None]:
        """(mean, std) over all ranks (a collective when ``strategy`` is distributed); (None, None) before any
        latent was added."""
        sums = self.sums
        if strategy is not None:
            sums = strategy.reduce(sums.to(strategy.root_device), reduce_op="sum").cpu()
        total, total_sq, count = sums.tolist()
        if count == 0:
            return None, None
        mean = total / count
        return mean, math.sqrt(max(total_sq / count - mean * mean, 0.0))
