"""The VAE objective on the real tiny CausalVAE: every term, the GAN gate, the adaptive weight, fp32 math.

The public reference loss has its GAN gate inverted, never applies its adaptive weight and has no KL term; each of
those is pinned here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from cogvx_train.vae import build_vae
from cogvx_train.vae.discriminator import build_discriminator
from cogvx_train.vae.losses import VAELoss, VAELossConfig

DISC_START = 3


@pytest.fixture(scope="module")
def loss() -> VAELoss:
    return VAELoss(lpips_net="alex", lpips_random_backbone=True, lpips_weight=0.5, kl_weight=1e-3,
                   disc_start=DISC_START, disc_weight=0.5)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return build_vae("tiny")


def clip(b: int = 1, t: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, 32, 32, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def recon(vae):
    """One clip through the VAE, graph kept (the losses only take gradients with retain_graph)."""
    x = clip()
    x_hat, posterior = vae(x)
    return x, x_hat, posterior


class CountingDiscriminator(torch.nn.Module):
    """A real tiny 3D discriminator that counts its calls."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.inner = build_discriminator("3d", "tiny")
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_terms_before_disc_start_and_no_discriminator_in_the_graph(loss, vae, recon):
    x, x_hat, posterior = recon
    d = CountingDiscriminator()
    out = loss.generator_loss(x, x_hat, posterior, step=DISC_START - 1, discriminator=d,
                              last_layer=vae.last_decoder_layer_weight())
    assert d.calls == 0
    assert out["gan_active"].item() == 0.0
    assert not {"g_loss", "adaptive_weight", "gan_weight"} & set(out)
    assert out["l1"].item() == pytest.approx((x - x_hat).abs().mean().item(), rel=1e-5)
    kl_expected = (posterior.kl() / x[0].numel()).mean()
    assert out["kl"].item() == pytest.approx(kl_expected.item(), rel=1e-5)
    assert out["kl_per_clip"].item() == pytest.approx(posterior.kl().mean().item(), rel=1e-5)
    # KL is in the total (the reference omits it), with its weight
    expected_total = out["l1"] + 0.5 * out["lpips"] + 1e-3 * out["kl"]
    assert out["total"].item() == pytest.approx(expected_total.item(), rel=1e-6)
    assert all(torch.isfinite(v) and v.item() != 0 for k, v in out.items() if k != "gan_active")


def test_gan_switches_on_exactly_at_disc_start_with_the_adaptive_weight_applied(loss, vae, recon):
    x, x_hat, posterior = recon
    d = CountingDiscriminator()
    last = vae.last_decoder_layer_weight()
    out = loss.generator_loss(x, x_hat, posterior, step=DISC_START, discriminator=d, last_layer=last)
    assert d.calls == 1 and out["gan_active"].item() == 1.0
    # the adaptive weight by hand: gradient norms of rec and g at the decoder's last conv weight
    rec_grad, = torch.autograd.grad(out["rec"], last, retain_graph=True)
    g_grad, = torch.autograd.grad(out["g_loss"], last, retain_graph=True)
    lam = rec_grad.norm() / (g_grad.norm() + 1e-4)
    assert out["adaptive_weight"].item() == pytest.approx(lam.item(), rel=1e-4)
    assert out["gan_weight"].item() == pytest.approx(0.5 * lam.item(), rel=1e-4)
    assert out["g_loss"].item() == pytest.approx(-d.inner(x_hat).mean().item(), rel=1e-5)
    # applied: the total carries lambda * disc_weight * g_loss, and its gradient does too
    no_gan = out["rec"] + 1e-3 * out["kl"]
    assert out["total"].item() == pytest.approx((no_gan + out["gan_weight"] * out["g_loss"]).item(), rel=1e-6)
    total_grad, = torch.autograd.grad(out["total"], last, retain_graph=True)
    base_grad, = torch.autograd.grad(no_gan, last, retain_graph=True)
    assert torch.allclose(total_grad, base_grad + out["gan_weight"] * g_grad, rtol=1e-4, atol=1e-7)
    assert not out["adaptive_weight"].requires_grad
    later = loss.generator_loss(x, x_hat, posterior, step=DISC_START + 100, discriminator=d, last_layer=last)
    assert later["gan_active"].item() == 1.0


def test_adaptive_weight_is_clamped(vae, recon):
    x, x_hat, posterior = recon
    flat = build_discriminator("3d", "tiny")
    with torch.no_grad():  # D ignores its input: the GAN gradient at the decoder vanishes, lambda explodes
        flat.layers[-1].weight.zero_()
    capped = VAELoss(lpips_net="alex", lpips_random_backbone=True, lpips_weight=0.0, disc_start=0,
                     adaptive_weight_max=7.0)
    out = capped.generator_loss(x, x_hat, posterior, 0, flat, vae.last_decoder_layer_weight())
    assert out["adaptive_weight"].item() == 7.0
    default = VAELoss(lpips_net="alex", lpips_random_backbone=True, lpips_weight=0.0, disc_start=0)
    out = default.generator_loss(x, x_hat, posterior, 0, flat, vae.last_decoder_layer_weight())
    assert 0 < out["adaptive_weight"].item() <= 1e4 and torch.isfinite(out["adaptive_weight"])
    assert "lpips" not in out  # weight 0: the term is absent, not a silent zero


def test_gan_needs_discriminator_and_last_layer(loss, recon):
    x, x_hat, posterior = recon
    with pytest.raises(ValueError, match="disc_start"):
        loss.generator_loss(x, x_hat, posterior, step=DISC_START)


def test_hinge_discriminator_loss_direction(loss, recon):
    x, x_hat, _ = recon
    torch.manual_seed(2)
    d = build_discriminator("3d", "tiny")
    out = loss.discriminator_loss(x, x_hat, d)
    real, fake = d(x), d(x_hat)
    expected = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    assert out["d_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    # training D on it separates real from fake (D(real) - D(fake) grows): the sign is the right way round
    opt = torch.optim.SGD(d.parameters(), lr=0.002)
    for _ in range(5):
        opt.zero_grad()
        loss.discriminator_loss(x, x_hat, d)["d_loss"].backward()
        opt.step()
    after = loss.discriminator_loss(x, x_hat, d)
    assert after["logits_real"] - after["logits_fake"] > out["logits_real"] - out["logits_fake"]
    assert after["d_loss"] < out["d_loss"]


def test_vanilla_gan_variant(vae, recon):
    x, x_hat, posterior = recon
    torch.manual_seed(2)
    d = build_discriminator("2d", "tiny")
    vanilla = VAELoss(lpips_net="alex", lpips_random_backbone=True, disc_start=0, disc_loss="vanilla")
    out = vanilla.generator_loss(x, x_hat, posterior, 0, d, vae.last_decoder_layer_weight())
    assert out["g_loss"].item() == pytest.approx(F.softplus(-d(x_hat)).mean().item(), rel=1e-5)
    d_out = vanilla.discriminator_loss(x, x_hat, d)
    expected = 0.5 * (F.softplus(-d(x)).mean() + F.softplus(d(x_hat)).mean())
    assert d_out["d_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_real_frames_only_and_lpips_frame_subset(vae):
    subset = VAELoss(lpips_net="alex", lpips_random_backbone=True, lpips_frames=2, disc_start=100)
    seen = []
    subset.perceptual.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    x = clip(b=2, t=5)
    x_hat, posterior = vae(x)
    n_real = torch.tensor([5, 3])
    torch.manual_seed(0)
    out = subset.generator_loss(x, x_hat, posterior, 0, num_real_frames=n_real)
    assert seen == [4]  # 2 frames from each clip
    clip_idx, frame_idx = subset.lpips_frame_index(torch.tensor([[True] * 9, [True] * 3 + [False] * 6]))
    assert len(clip_idx) == 4
    assert clip_idx.tolist().count(0) == 2 and clip_idx.tolist().count(1) == 2
    assert all(f < 3 for c, f in zip(clip_idx.tolist(), frame_idx.tolist()) if c == 1)
    # padded frames do not count: wrecking them changes neither L1 nor LPIPS
    wrecked = x_hat.detach().clone()
    wrecked[1, :, 3:] = 1.0
    torch.manual_seed(0)
    out2 = subset.generator_loss(x, wrecked, posterior, 0, num_real_frames=n_real)
    assert out2["l1"].item() == pytest.approx(out["l1"].item(), rel=1e-6)
    assert out2["lpips"].item() == pytest.approx(out["lpips"].item(), rel=1e-6)

    every = VAELoss(lpips_net="alex", lpips_random_backbone=True, lpips_frames="all", disc_start=100)
    seen_all = []
    every.perceptual.register_forward_hook(lambda m, inp, out: seen_all.append(inp[0].shape[0]))
    every.generator_loss(x, x_hat, posterior, 0, num_real_frames=n_real)
    assert seen_all == [8]  # 5 + 3 real frames


def test_losses_are_fp32_under_bf16_autocast(loss, vae, recon):
    x, x_hat, posterior = recon
    d = build_discriminator("3d", "tiny")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 activations in, fp32 loss terms out
        out = loss.generator_loss(x.bfloat16(), x_hat.bfloat16(), posterior, DISC_START, d,
                                  vae.last_decoder_layer_weight())
        d_out = loss.discriminator_loss(x, x_hat, d)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
    assert all(v.dtype == torch.float32 for v in d_out.values())


def test_image_batches(loss, vae):
    x = clip(b=2, t=1)
    x_hat, posterior = vae(x)
    out = loss.generator_loss(x, x_hat, posterior, DISC_START, build_discriminator("3d", "tiny"),
                              vae.last_decoder_layer_weight())
    assert torch.isfinite(out["total"]) and out["g_loss"].item() != 0


def test_config_matches_the_yaml_group_and_rejects_mistakes():
    root = OmegaConf.load("conf/train.yaml")
    group = OmegaConf.to_container(root.vae_loss, resolve=True)
    cfg = VAELossConfig.from_any(group)
    assert cfg.disc_lr == root.optim.lr and cfg.lpips_net == group["lpips_net"]
    assert VAELossConfig.from_any(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown vae_loss setting"):
        VAELossConfig.from_any({"lpips_wieght": 1.0})
    with pytest.raises(ValueError, match="lpips_frames"):
        VAELoss(lpips_frames=0, lpips_random_backbone=True)
    with pytest.raises(ValueError, match="disc_loss"):
        VAELoss(disc_loss="wgan", lpips_random_backbone=True)
    with pytest.raises(ValueError, match="kl_weight"):
        VAELoss(kl_weight=-1.0, lpips_random_backbone=True)


def test_adaptive_weight_through_gradient_checkpointing(loss):
    """The VAE's non-reentrant checkpointing supports torch.autograd.grad: same lambda with and without it."""
    x = clip()
    d = build_discriminator("3d", "tiny")
    weights = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_vae("tiny")
        model.enable_gradient_checkpointing(checkpointing)
        x_hat, posterior = model(x, sample_posterior=False)
        out = loss.generator_loss(x, x_hat, posterior, DISC_START, d, model.last_decoder_layer_weight())
        weights.append(out["adaptive_weight"].item())
    assert weights[0] == pytest.approx(weights[1], rel=1e-5)
