"""Diagonal Gaussian posterior q(z|x) = N(mean, diag(exp(logvar))) of the VAE encoder."""

from __future__ import annotations

import torch


class DiagonalGaussian:
    """Posterior from the encoder's moments [B, 2C, T, H, W] (mean channels first, then log-variance).

    The log-variance is clamped to [logvar_min, logvar_max] (released: [-30, 20]) so exp() stays finite early in
    training, when the encoder's output is still large.
    """

    def __init__(self, moments: torch.Tensor, logvar_min: float = -30.0, logvar_max: float = 20.0):
        if moments.dim() != 5 or moments.shape[1] % 2:
            raise ValueError(
                f"DiagonalGaussian needs moments [B, 2C, T, H, W] (mean and logvar stacked on channels), "
                f"got shape {tuple(moments.shape)}."
            )
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(logvar_min, logvar_max)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps (reparameterised, so gradients reach mean and logvar)."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample [B], summed over every latent element (C, T, H, W)."""
        terms = self.mean.float().pow(2) + self.var.float() - 1.0 - self.logvar.float()
        return 0.5 * terms.flatten(1).sum(dim=1)
