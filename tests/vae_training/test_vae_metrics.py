"""PSNR, SSIM, LPIPS and flicker metrics: known values, known properties, real frames only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cogvx_train.vae.lpips_loss import PerceptualLoss
from cogvx_train.vae.metrics import (
    flicker,
    lpips_distance,
    psnr,
    reconstruction_metrics,
    ssim,
    ssim_frames,
    temporal_error,
)


def clip(b: int = 2, t: int = 5, h: int = 32, w: int = 32, seed: int = 0, lo: float = -1.0,
         hi: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(b, 3, t, h, w, generator=g)


@pytest.fixture(scope="module")
def perceptual() -> PerceptualLoss:
    return PerceptualLoss("alex", random_backbone=True)


def test_psnr_known_value_and_perfect_copy():
    x = clip(lo=-0.8, hi=0.8)
    # +0.2 in [-1, 1] is +0.1 in [0, 1]: MSE 0.01 -> 20 dB exactly
    assert torch.allclose(psnr(x, x + 0.2), torch.full((2,), 20.0), atol=1e-3)
    assert torch.all(psnr(x, x) == 100.0)  # capped, not inf


def test_psnr_scores_only_real_frames():
    x = clip()
    x_hat = x.clone()
    x_hat[:, :, :2] += 0.2 * torch.sign(-x_hat[:, :, :2])  # damage the real frames a little
    x_hat[:, :, 3:] = -x[:, :, 3:]  # wreck the padded frames
    n_real = torch.tensor([3, 3])
    damaged_real_only = x.clone()
    damaged_real_only[:, :, :3] = x_hat[:, :, :3]
    assert torch.allclose(psnr(x, x_hat, n_real), psnr(x[:, :, :3], damaged_real_only[:, :, :3]))
    assert torch.all(psnr(x, x_hat, n_real) > psnr(x, x_hat))


def test_ssim_identity_noise_and_symmetry():
    x = clip(b=1)
    assert torch.allclose(ssim(x, x), torch.ones(1), atol=1e-5)
    g = torch.Generator().manual_seed(1)
    little = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    lots = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    s_little, s_lots = ssim(x, little), ssim(x, lots)
    assert 1.0 > s_little > s_lots
    assert torch.allclose(ssim(little, x), s_little, atol=1e-6)


def test_ssim_closed_form_for_constant_images():
    # constant frames: no variance, so SSIM is the luminance term (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)
    a, b = torch.full((1, 3, 16, 16), 0.3), torch.full((1, 3, 16, 16), 0.7)
    c1 = 0.01 ** 2
    expected = (2 * 0.3 * 0.7 + c1) / (0.3 ** 2 + 0.7 ** 2 + c1)
    assert ssim_frames(a, b).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="11x11"):
        ssim_frames(a[..., :8, :8], b[..., :8, :8])


def test_ssim_matches_skimage_when_installed():
    skimage_metrics = pytest.importorskip("skimage.metrics")  # not a dependency: cross-check only where present
    g = torch.Generator().manual_seed(2)
    a = torch.rand(1, 3, 40, 48, generator=g)
    b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    ours = ssim_frames(a, b).item()
    ref = skimage_metrics.structural_similarity(
        a[0].permute(1, 2, 0).numpy(), b[0].permute(1, 2, 0).numpy(), channel_axis=2, gaussian_weights=True,
        sigma=1.5, use_sample_covariance=False, data_range=1.0)
    assert ours == pytest.approx(float(ref), abs=1e-4)


def test_lpips_distance_zero_for_identity_and_real_frames_only(perceptual):
    x = clip(b=1)
    assert lpips_distance(perceptual, x, x).item() == pytest.approx(0.0, abs=1e-6)
    x_hat = x.clone()
    x_hat[:, :, 3:] = -x[:, :, 3:]
    assert lpips_distance(perceptual, x, x_hat, torch.tensor([3])).item() == pytest.approx(0.0, abs=1e-6)
    assert lpips_distance(perceptual, x, x_hat).item() > 0.0


def test_flicker_paper_definition():
    static = clip(b=1, t=1).expand(1, 3, 5, 32, 32)
    assert flicker(static).item() == pytest.approx(0.0)
    alternating = torch.stack([torch.full((3, 8, 8), (-1.0) ** k) for k in range(5)], dim=1)[None]
    assert flicker(alternating).item() == pytest.approx(255.0)  # every adjacent pair differs by the full range
    # padded frames (copies of the last real one) are excluded: only pairs (0,1) and (1,2) count
    assert flicker(alternating, torch.tensor([3])).item() == pytest.approx(255.0)
    assert math.isnan(flicker(clip(b=1, t=1)).item())


def test_temporal_error_is_reference_relative():
    x = clip(b=1, lo=-0.5, hi=0.5)
    assert temporal_error(x, x).item() == pytest.approx(0.0)
    assert temporal_error(x, x + 0.3).item() == pytest.approx(0.0, abs=1e-3)  # a constant offset does not flicker
    g = torch.Generator().manual_seed(3)
    jitter = 0.2 * torch.randn(1, 1, 5, 1, 1, generator=g)  # per-frame brightness jumps
    assert temporal_error(x, x + jitter).item() > 5.0
    assert psnr(x, x + 0.3).item() < 30  # while PSNR punishes the offset


def test_reconstruction_metrics_keys_for_videos_and_images(perceptual):
    x = clip()
    video = reconstruction_metrics(x, x * 0.9, torch.tensor([5, 4]), perceptual)
    assert set(video) == {"psnr", "ssim", "lpips", "flicker", "temporal_error"}
    assert all(v.shape == (2,) and torch.isfinite(v).all() for v in video.values())
    image = reconstruction_metrics(x[:, :, :1], x[:, :, :1] * 0.9, None, perceptual)
    assert set(image) == {"psnr", "ssim", "lpips"}
    with pytest.raises(ValueError, match="one shape"):
        psnr(x, x[:, :, :2])


def test_metrics_are_float32_and_finite_for_bf16_input():
    x = clip(b=1).bfloat16()
    out = reconstruction_metrics(x, (x * 0.8).bfloat16())
    assert all(v.dtype == torch.float32 and np.isfinite(v.numpy()).all() for v in out.values())
