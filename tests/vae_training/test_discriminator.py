"""3D and per-frame 2D PatchGAN discriminators: shapes (videos and 1-frame images), init, what each one sees."""

from __future__ import annotations

import pytest
import torch

from cogvx_train.vae.discriminator import DISC_SIZES, PatchDiscriminator, build_discriminator


def clip(b: int = 2, t: int = 5, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1


def test_3d_logit_map_shapes_for_videos_and_images():
    torch.manual_seed(0)
    d = build_discriminator("3d", "tiny")
    out = d(clip())
    assert out.shape == (2, 1, 2, 6, 6)  # T 5 -> 3 -> 2 (stride 2 twice), H 32 -> 16 -> 8 -> 7 -> 6
    assert d(clip(t=1)).shape == (2, 1, 1, 6, 6)  # image batches keep one frame
    base = build_discriminator("3d", "base")
    assert base(clip(b=1, t=9, h=64, w=64)).shape == (1, 1, 2, 6, 6)


def test_2d_is_per_frame_and_frame_order_equivariant():
    torch.manual_seed(0)
    d = build_discriminator("2d", "tiny")
    x = clip(b=1)
    out = d(x)
    assert out.shape == (5, 1, 6, 6)  # one map per frame: [B*T, 1, H', W']
    perm = torch.tensor([4, 2, 0, 1, 3])
    assert torch.allclose(d(x[:, :, perm]), out[perm], atol=1e-6)


def test_3d_sees_time():
    torch.manual_seed(0)
    d = build_discriminator("3d", "tiny")
    x = clip(b=1)
    shuffled = x[:, :, torch.tensor([4, 2, 0, 1, 3])]
    # permuting frames is not a mere permutation of a 3D discriminator's outputs: it judges motion
    assert not torch.allclose(d(shuffled).sum(), d(x).sum(), atol=1e-4)


def test_init_weights_and_gradient_to_input():
    torch.manual_seed(0)
    d = build_discriminator("3d", "small")
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv3d)]
    w = torch.cat([m.weight.flatten() for m in convs])
    assert abs(w.std().item() - 0.02) < 0.002
    assert all(torch.all(m.bias == 0) for m in convs)
    x = clip(b=1).requires_grad_(True)
    d(x).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_no_norm_variant_and_overrides():
    d = build_discriminator("2d", "tiny", norm="none", num_layers=1)
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in d.modules())
    assert isinstance(d, PatchDiscriminator)
    assert set(DISC_SIZES) >= {"tiny", "small", "base"}


@pytest.mark.parametrize("call, fragment", [
    (lambda: build_discriminator("4d"), "disc_kind"),
    (lambda: build_discriminator("3d", "huge"), "size"),
    (lambda: build_discriminator("3d", "tiny", width=3), "unknown discriminator setting"),
    (lambda: build_discriminator("3d", "tiny", norm="batch"), "norm"),
    (lambda: build_discriminator("3d", "tiny")(torch.zeros(1, 3, 32, 32)), r"\[B, 3, T, H, W\]"),
])
def test_bad_input_raises(call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call()
