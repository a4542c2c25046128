"""Reconstruction quality of a video VAE on fixed held-out clips: PSNR, SSIM, LPIPS and temporal flicker.

Every metric takes ``[B, 3, T, H, W]`` clips in [-1, 1] plus ``num_real_frames`` ``[B]`` and scores only the real
frames: frames padded by repeating the last real one would otherwise flatter a model that copies well.
Each returns one value per clip (``[B]``), so the caller can average over clips (the paper's convention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cogvx_train.vae.lpips_loss import PerceptualLoss

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check(x: torch.Tensor, x_hat: torch.Tensor) -> None:
    if x.shape != x_hat.shape or x.ndim != 5 or x.shape[1] != 3:
        raise ValueError(f"metrics compare two [B, 3, T, H, W] clips of one shape, got {tuple(x.shape)} and "
                         f"{tuple(x_hat.shape)}.")


def real_frame_mask(num_real_frames: torch.Tensor | None, batch: int, frames: int,
                    device: torch.device) -> torch.Tensor:
    """``[B, T]`` bool, True on frames that come from the source clip."""
    if num_real_frames is None:
        return torch.ones(batch, frames, dtype=torch.bool, device=device)
    n = num_real_frames.to(device).long().clamp(1, frames)
    return torch.arange(frames, device=device)[None, :] < n[:, None]


def _per_clip_mean(per_frame: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` values, ``[B, T]`` mask -> ``[B]`` mean over the masked frames."""
    mask = mask.to(per_frame.dtype)
    return (per_frame * mask).sum(1) / mask.sum(1)


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] in fp32, clipped as a written video would be."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


@torch.no_grad()
def psnr(x: torch.Tensor, x_hat: torch.Tensor, num_real_frames: torch.Tensor | None = None) -> torch.Tensor:
    """PSNR in dB per clip, on [0, 1] pixels: 10 log10(1 / MSE), MSE over the clip's real frames (capped at 100 dB
    for a perfect copy)."""
    _check(x, x_hat)
    b, _, t, _, _ = x.shape
    mask = real_frame_mask(num_real_frames, b, t, x.device)
    mse_per_frame = (to_unit_range(x) - to_unit_range(x_hat)).pow(2).mean(dim=(1, 3, 4))  # [B, T]
    mse = _per_clip_mean(mse_per_frame, mask).clamp(min=1e-10)
    return 10.0 * torch.log10(1.0 / mse)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # [1, 1, size, size]


@torch.no_grad()
def ssim_frames(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM (Wang et al. 2004) per image for ``[N, C, H, W]`` in [0, 1]: 11x11 Gaussian window (sigma 1.5),
    K1 = 0.01, K2 = 0.03, statistics over valid window positions only, averaged over pixels and channels -> ``[N]``.
    This matches skimage's ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1)``."""
    n, c, h, w = a.shape
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {h}x{w}.")
    window = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA, a.device).expand(c, 1, -1, -1)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, window, groups=c)  # depthwise, no padding: valid positions only

    # float64: (co)variances as E[ab] - E[a]E[b] cancel in fp32 to errors of ~1e-8, not small next to C2 = 9e-4
    a, b = a.double(), b.double()
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.pow(2)
    var_b = blur(b * b) - mu_b.pow(2)
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2  # data range 1
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.pow(2) + mu_b.pow(2) + c1) * (var_a + var_b + c2))
    return ssim_map.mean(dim=(1, 2, 3)).float()


@torch.no_grad()
def ssim(x: torch.Tensor, x_hat: torch.Tensor, num_real_frames: torch.Tensor | None = None) -> torch.Tensor:
    """SSIM per clip: per-frame SSIM on [0, 1] pixels, averaged over the real frames."""
    _check(x, x_hat)
    b, c, t, h, w = x.shape
    frames = lambda v: to_unit_range(v).transpose(1, 2).reshape(b * t, c, h, w)  # [B,C,T,H,W] -> [B*T,C,H,W]
    per_frame = ssim_frames(frames(x), frames(x_hat)).view(b, t)
    return _per_clip_mean(per_frame, real_frame_mask(num_real_frames, b, t, x.device))


@torch.no_grad()
def lpips_distance(perceptual: PerceptualLoss, x: torch.Tensor, x_hat: torch.Tensor,
                   num_real_frames: torch.Tensor | None = None) -> torch.Tensor:
    """LPIPS per clip: the loss's own LPIPS network on every real frame, averaged."""
    _check(x, x_hat)
    b, c, t, h, w = x.shape
    frames = lambda v: v.float().clamp(-1, 1).transpose(1, 2).reshape(b * t, c, h, w)  # -> [B*T, C, H, W]
    per_frame = perceptual(frames(x), frames(x_hat)).view(b, t)
    return _per_clip_mean(per_frame, real_frame_mask(num_real_frames, b, t, x.device))


def _adjacent_pairs_mask(num_real_frames: torch.Tensor | None, b: int, t: int, device: torch.device) -> torch.Tensor:
    """``[B, T-1]``: pair (i, i+1) counts when both frames are real."""
    return real_frame_mask(num_real_frames, b, t, device)[:, 1:]


@torch.no_grad()
def flicker(x_hat: torch.Tensor, num_real_frames: torch.Tensor | None = None) -> torch.Tensor:
    """Flickering score as we read the CogVideoX paper's VAE table: the mean absolute difference between adjacent
    reconstructed frames, on the 0-255 pixel scale, per clip. It is a property of the reconstruction alone: compare
    models only on the same clips (a static clip scores 0, real motion scores > 0). NaN for 1-frame clips."""
    if x_hat.ndim != 5:
        raise ValueError(f"flicker takes a [B, 3, T, H, W] clip, got shape {tuple(x_hat.shape)}.")
    b, _, t, _, _ = x_hat.shape
    if t < 2:
        return torch.full((b,), float("nan"), device=x_hat.device)
    pixels = to_unit_range(x_hat) * 255.0
    diff = (pixels[:, :, 1:] - pixels[:, :, :-1]).abs().mean(dim=(1, 3, 4))  # [B, T-1]
    return _per_clip_mean(diff, _adjacent_pairs_mask(num_real_frames, b, t, x_hat.device))


@torch.no_grad()
def temporal_error(x: torch.Tensor, x_hat: torch.Tensor, num_real_frames: torch.Tensor | None = None) -> torch.Tensor:
    """Reference-relative flicker: mean |(x_hat[t+1] - x_hat[t]) - (x[t+1] - x[t])| on the 0-255 scale, per clip.
    Zero for a perfect reconstruction whatever the motion, so unlike :func:`flicker` it can be tracked during
    training on any data; it grows when the VAE adds frame-to-frame changes the source does not have (or loses
    ones it has). NaN for 1-frame clips."""
    _check(x, x_hat)
    b, _, t, _, _ = x.shape
    if t < 2:
        return torch.full((b,), float("nan"), device=x.device)
    px, px_hat = to_unit_range(x) * 255.0, to_unit_range(x_hat) * 255.0
    d, d_hat = px[:, :, 1:] - px[:, :, :-1], px_hat[:, :, 1:] - px_hat[:, :, :-1]
    err = (d_hat - d).abs().mean(dim=(1, 3, 4))  # [B, T-1]
    return _per_clip_mean(err, _adjacent_pairs_mask(num_real_frames, b, t, x.device))


def reconstruction_metrics(x: torch.Tensor, x_hat: torch.Tensor, num_real_frames: torch.Tensor | None = None,
                           perceptual: PerceptualLoss | None = None) -> dict[str, torch.Tensor]:
    """All metrics per clip, ``{name: [B]}``; ``flicker`` and ``temporal_error`` only for clips with T > 1."""
    out = {"psnr": psnr(x, x_hat, num_real_frames), "ssim": ssim(x, x_hat, num_real_frames)}
    if perceptual is not None:
        out["lpips"] = lpips_distance(perceptual, x, x_hat, num_real_frames)
    if x.shape[2] > 1:
        out["flicker"] = flicker(x_hat, num_real_frames)
        out["temporal_error"] = temporal_error(x, x_hat, num_real_frames)
    return out
