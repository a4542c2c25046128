"""CausalConv3d: front-only padding, frame-0 replicate, the cache carried between chunks, the factorized variant."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cogvx_train.vae import build_vae
from cogvx_train.vae import causal_conv
from cogvx_train.vae.causal_conv import CausalConv3d, FrameContext


def _x(frames: int = 7, channels: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, channels, frames, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("factorized", [False, True])
def test_frame_t_never_sees_later_frames(factorized):
    torch.manual_seed(0)
    conv = CausalConv3d(4, 5, 3, factorized=factorized)
    if factorized:
        torch.nn.init.normal_(conv.temporal_conv.weight)  # not the identity init
    x = _x()
    y = conv(x, FrameContext())
    x2 = x.clone()
    x2[:, :, 3] += 1.0
    y2 = conv(x2, FrameContext())
    changed = (y - y2).abs().amax(dim=(0, 1, 3, 4))
    assert changed[:3].max() == 0  # the past is untouched
    assert changed[3:6].min() > 1e-3 and changed[6] == 0  # a 3-frame kernel: outputs 3, 4, 5 see frame 3


def test_front_padding_is_two_copies_of_frame_zero_and_spatial_zero_padding():
    torch.manual_seed(1)
    conv = CausalConv3d(4, 5, 3)
    x = _x()
    padded = torch.cat([x[:, :, :1], x[:, :, :1], x], dim=2)
    expected = F.conv3d(padded, conv.conv.weight, conv.conv.bias, padding=(0, 1, 1))
    torch.testing.assert_close(conv(x, FrameContext()), expected, atol=1e-5, rtol=1e-5)
    assert conv(x, FrameContext()).shape == (1, 5, 7, 8, 8)


@pytest.mark.parametrize("factorized", [False, True])
def test_streaming_with_the_cache_equals_one_pass(factorized):
    torch.manual_seed(2)
    conv = CausalConv3d(4, 5, 3, factorized=factorized)
    x = _x(frames=9)
    whole = conv(x, FrameContext())
    ctx = FrameContext(cache={})
    parts = []
    for i, (start, end) in enumerate([(0, 3), (3, 4), (4, 9)]):  # a 1-frame chunk too
        ctx.has_first_frame = i == 0
        parts.append(conv(x[:, :, start:end], ctx))
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, atol=1e-5, rtol=1e-5)
    assert ctx.cache[conv].shape[2] == 2 and ctx.cache[conv].is_contiguous()


def test_a_later_chunk_without_cache_is_refused():
    conv = CausalConv3d(4, 5, 3)
    with pytest.raises(ValueError, match="causal-conv cache"):
        conv(_x(), FrameContext(has_first_frame=False))
    with pytest.raises(ValueError, match="odd kernel"):
        CausalConv3d(4, 5, 2)


def test_factorized_conv_starts_as_its_per_frame_spatial_conv():
    vae = build_vae("tiny", factorized=True)
    conv = vae.encoder.conv_in
    assert conv.factorized and conv.temporal_conv.weight.shape == (32, 32, 3, 1, 1)
    x = torch.randn(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(3))
    per_frame = F.conv3d(x, conv.conv.weight, conv.conv.bias, padding=(0, 1, 1))
    torch.testing.assert_close(conv(x, FrameContext()), per_frame, atol=1e-5, rtol=1e-5)
    full = sum(p.numel() for p in build_vae("tiny").parameters())
    assert sum(p.numel() for p in vae.parameters()) < 0.6 * full


@torch.no_grad()
def test_encoder_is_causal_at_groupnorm_window_granularity():
    """With per-window statistics, frames of a later window never change latents of an earlier one (this is what
    makes streaming exact); within a window the shared statistics do mix frames, by design."""
    vae = build_vae("tiny", encoder_norm_window=4).eval()
    x = torch.randn(1, 3, 13, 16, 16, generator=torch.Generator().manual_seed(4))  # windows [0:5] [5:9] [9:13]
    x2 = x.clone()
    x2[:, :, 6] += 1.0  # second window -> latent frame 2
    a, b = vae.encode(x).mean, vae.encode(x2).mean
    assert torch.equal(a[:, :, :2], b[:, :, :2])
    assert (a[:, :, 2:] - b[:, :, 2:]).abs().max() > 1e-3


def test_onednn_conv_path_matches_pytorch_dispatch_in_values_and_gradients(monkeypatch):
    """causal_conv.conv3d sends CPU float32 convs straight to oneDNN; it must compute what F.conv3d computes."""
    torch.manual_seed(0)
    vae = build_vae("tiny")
    x = torch.randn(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(5))
    results = []
    for use_onednn in (True, False):
        monkeypatch.setattr(causal_conv, "_MKLDNN", use_onednn)
        vae.zero_grad()
        recon, post = vae(x, sample_posterior=False)
        (recon.square().mean() + post.mean.square().mean()).backward()
        results.append((recon.detach(), {n: p.grad.clone() for n, p in vae.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, atol=1e-4 * grad.abs().max().item(), rtol=1e-4)
