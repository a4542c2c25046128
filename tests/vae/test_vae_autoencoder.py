"""CausalVAE API: sizes, shapes, the released architecture's keys, posterior, input checks, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from vae_model_helpers import randomize_

from cogvx_train.vae import VAE_SIZES, CausalVAE, DiagonalGaussian, VAEConfig, build_vae


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_vae("tiny").eval()


@torch.no_grad()
@pytest.mark.parametrize("frames", [1, 5, 9])
def test_shapes_for_videos_and_images(tiny, frames):
    x = torch.randn(2, 3, frames, 32, 48, generator=torch.Generator().manual_seed(frames))
    posterior = tiny.encode(x)
    assert isinstance(posterior, DiagonalGaussian)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 16, (frames - 1) // 4 + 1, 4, 6)
    assert tiny.decode(posterior.mode()).shape == x.shape


def test_released_architecture_matches_diffusers_keys_and_shapes():
    """The cogvideox size has exactly the parameters of diffusers' default AutoencoderKLCogVideoX (meta device)."""
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ours = build_vae("cogvideox")
        theirs = diffusers.AutoencoderKLCogVideoX()
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours_shapes["encoder.down_blocks.0.resnets.2.conv1.conv.weight"] == (128, 128, 3, 3, 3)
    assert ours_shapes["decoder.up_blocks.3.resnets.3.norm2.conv_y.conv.weight"] == (128, 16, 1, 1, 1)
    assert ours_shapes["encoder.conv_out.conv.weight"] == (32, 512, 3, 3, 3)
    assert 2.1e8 < sum(math.prod(s) for s in ours_shapes.values()) < 2.2e8
    assert ours.scaling_factor == 1.15258426


def test_registry_and_config_checks():
    assert set(VAE_SIZES) >= {"tiny", "cogvideox"}
    assert VAE_SIZES["cogvideox"].block_out_channels == (128, 256, 256, 512)
    assert VAE_SIZES["cogvideox"].spatial_compression == 8 and VAE_SIZES["cogvideox"].layers_per_block == 3
    assert VAE_SIZES["cogvideox-5b"].scaling_factor == 0.7 and VAE_SIZES["cogvideox"].scaling_factor == 1.15258426
    with pytest.raises(ValueError, match="Unknown VAE size 'huge'"):
        build_vae("huge")
    with pytest.raises(ValueError, match="Unknown VAEConfig field"):
        build_vae("tiny", channels=3)
    with pytest.raises(ValueError, match="multiples of norm_num_groups=8"):
        build_vae("tiny", block_out_channels=(32, 36, 64, 64))
    with pytest.raises(ValueError, match="power of 2"):
        build_vae("tiny", temporal_compression_ratio=3)
    with pytest.raises(ValueError, match="encoder_norm_window"):
        build_vae("tiny", encoder_norm_window=6)
    with pytest.raises(ValueError, match="tile_sample_size"):
        CausalVAE(VAEConfig(tile_sample_size=(100, 100)))
    assert build_vae("tiny", block_out_channels=[16, 16, 32, 32]).config.block_out_channels == (16, 16, 32, 32)


@pytest.mark.parametrize(
    "shape, match",
    [((1, 3, 10, 32, 32), "T = 4k\\+1"), ((1, 3, 9, 30, 32), "multiples of 8"), ((1, 4, 9, 32, 32), "\\[B, 3,"),
     ((3, 9, 32, 32), "got shape \\(3, 9, 32, 32\\)")],
)
def test_bad_video_shapes_get_one_sentence(tiny, shape, match):
    with pytest.raises(ValueError, match=match):
        tiny.encode(torch.zeros(shape))


def test_bad_latent_shape(tiny):
    with pytest.raises(ValueError, match="The latent must be \\[B, 16,"):
        tiny.decode(torch.zeros(1, 8, 3, 4, 4))


def test_posterior_clamps_samples_and_kl():
    moments = torch.randn(2, 8, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    moments[:, 4:, 0] = 50.0  # logvar above the clamp
    post = DiagonalGaussian(moments)
    assert post.logvar.max() == 20.0 and torch.equal(post.mode(), moments[:, :4])
    torch.testing.assert_close(post.std, torch.exp(0.5 * post.logvar))
    a, b = post.sample(torch.Generator().manual_seed(1)), post.sample(torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, post.sample(torch.Generator().manual_seed(2)))
    q = torch.distributions.Normal(post.mean.double(), post.std.double())
    p = torch.distributions.Normal(torch.zeros(()), torch.ones(()))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(post.kl().double(), expected, rtol=1e-5, atol=1e-3)
    assert post.kl().shape == (2,)
    with pytest.raises(ValueError, match="2C"):
        DiagonalGaussian(torch.zeros(1, 3, 1, 2, 2))


def test_sampling_statistics():
    mean, logvar = torch.full((1, 1, 1, 64, 64), 2.0), torch.full((1, 1, 1, 64, 64), math.log(0.25))
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    z = post.sample(torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 2.0) < 0.02 and abs(z.std().item() - 0.5) < 0.02


@torch.no_grad()
@pytest.mark.parametrize("factorized", [False, True])
def test_fresh_posterior_starts_narrow_so_the_latent_is_not_buried_in_noise(factorized):
    """At the default init the posterior mean has std ~0.3; a logvar of ~0 would add noise of std 1 and the
    decoder would see mostly noise for the first thousand steps (measured: 4x slower held-out PSNR gains)."""
    torch.manual_seed(0)
    vae = build_vae("tiny", factorized=factorized)
    post = vae.encode(torch.rand(2, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert torch.equal(post.logvar, torch.full_like(post.logvar, -6.0))  # std 0.05
    assert post.mean.std() > 4 * post.std.max()  # signal above noise from step 0
    other = build_vae("tiny", logvar_init=-2.0, factorized=factorized).encode(torch.zeros(1, 3, 1, 8, 8))
    assert torch.equal(other.logvar, torch.full_like(other.logvar, -2.0))
    with pytest.raises(ValueError, match="logvar_init 25.0 must lie in"):
        build_vae("tiny", logvar_init=25.0)


def test_forward_backward_reaches_every_parameter_and_checkpointing_agrees():
    torch.manual_seed(0)
    vae = randomize_(build_vae("tiny"), seed=0)
    x = torch.randn(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(1))

    def grads():
        vae.zero_grad()
        recon, post = vae(x, generator=torch.Generator().manual_seed(2))
        ((recon - x).abs().mean() + 1e-3 * post.kl().mean()).backward()
        return {n: p.grad.clone() for n, p in vae.named_parameters()}

    plain = grads()
    assert all(g.abs().sum() > 0 for g in plain.values())
    assert vae.last_decoder_layer_weight() is vae.decoder.conv_out.conv.weight
    vae.enable_gradient_checkpointing()
    for name, grad in grads().items():
        torch.testing.assert_close(grad, plain[name], atol=1e-6, rtol=1e-5)
    recon_a, _ = vae(x, sample_posterior=False)
    recon_b, _ = vae(x, sample_posterior=False)
    assert torch.equal(recon_a, recon_b)


def test_factorized_variant_trains():
    torch.manual_seed(0)
    vae = build_vae("tiny", factorized=True)
    x = torch.randn(1, 3, 5, 16, 16)
    recon, post = vae(x)
    recon.abs().mean().backward()
    assert vae.last_decoder_layer_weight() is vae.decoder.conv_out.temporal_conv.weight
    assert vae.last_decoder_layer_weight().grad is not None
    assert "decoder.conv_out.temporal_conv.weight" in vae.state_dict()


@torch.no_grad()
def test_bf16_autocast_stays_close_to_fp32(tiny):
    x = torch.randn(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(5))
    exact = tiny.encode(x).mean
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = tiny.encode(x, chunk_frames=8).mean
        recon = tiny.decode(low)
    assert ((low.float() - exact).norm() / exact.norm()) < 0.05
    assert recon.shape == x.shape and torch.isfinite(recon).all()
