"""Chunked (streamed) encode/decode equals one pass; spatial tiling blends correctly and stays close to untiled."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from vae_model_helpers import max_diff, randomize_, set_diffusers_batching

from cogvx_train.vae import build_vae

TOL = 5e-5  # fp32; the chunked path sums the same terms in another order (observed ~1e-5)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return randomize_(build_vae("tiny", encoder_norm_window=4, decoder_norm_window=1), seed=0).eval()


@pytest.fixture(scope="module")
def clip():
    return torch.randn(1, 3, 17, 16, 24, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
@pytest.mark.parametrize("chunk", [4, 8])
def test_chunked_encode_equals_one_pass(vae, clip, chunk):
    one_pass = vae.encode(clip)
    chunked = vae.encode(clip, chunk_frames=chunk)
    assert chunked.mean.shape == one_pass.mean.shape == (1, 16, 5, 2, 3)
    assert max_diff(chunked.mean, one_pass.mean) <= TOL
    assert max_diff(chunked.logvar, one_pass.logvar) <= TOL


@torch.no_grad()
@pytest.mark.parametrize("chunk", [1, 3])
def test_chunked_decode_equals_one_pass(vae, clip, chunk):
    z = vae.encode(clip).mean
    one_pass = vae.decode(z)
    chunked = vae.decode(z, chunk_latent_frames=chunk)
    assert chunked.shape == one_pass.shape == clip.shape
    assert max_diff(chunked, one_pass) <= TOL


@torch.no_grad()
def test_chunking_is_not_trivially_equal(vae, clip):
    """Guard: without the carried conv cache (each chunk padded as a fresh clip) the result differs."""
    z = vae.encode(clip).mean  # 5 latent frames
    one_pass = vae.decode(z)
    first = vae.decode(z[:, :, :3])
    rest = vae.decode(torch.cat([z[:, :, 3:4], z[:, :, 3:]], dim=2))[:, :, 1:]  # restarted stream
    assert max_diff(torch.cat([first, rest], dim=2), one_pass) > 1e-2


@torch.no_grad()
def test_default_windows_match_diffusers_batching_on_a_long_clip():
    """25 frames (= 3 diffusers encoder batches, 7 latents = 3 decoder batches) against diffusers' own loop."""
    from vae_model_helpers import tiny_diffusers_vae

    ref = tiny_diffusers_vae(seed=4)
    set_diffusers_batching(ref, one_pass=False)
    ours = build_vae("tiny").eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 25, 8, 16, generator=torch.Generator().manual_seed(4))
    post = ours.encode(x, chunk_frames=8)
    assert max_diff(post.mean, ref.encode(x).latent_dist.mean) <= 1e-4
    assert max_diff(ours.decode(post.mean, chunk_latent_frames=2), ref.decode(post.mean).sample) <= 1e-4


def test_bad_chunking_requests_are_refused(clip):
    whole = build_vae("tiny", encoder_norm_window=None, decoder_norm_window=None)
    with pytest.raises(ValueError, match="whole clip"):
        whole.encode(clip, chunk_frames=8)
    with pytest.raises(ValueError, match="multiple of the GroupNorm window 8"):
        build_vae("tiny").encode(clip, chunk_frames=4)
    with pytest.raises(ValueError, match="multiple of the GroupNorm window 2"):
        build_vae("tiny").decode(torch.zeros(1, 16, 7, 2, 2), chunk_latent_frames=3)


def test_tiles_blend_to_the_exact_answer_for_a_local_function():
    vae = build_vae("tiny")
    x = torch.randn(1, 3, 5, 64, 96, generator=torch.Generator().manual_seed(2))
    local = lambda crop: F.avg_pool3d(crop, (1, 8, 8))  # noqa: E731  (each output depends on its own 8x8 patch)
    blended = vae._tiled(local, x, (32, 48), (16, 16), 1 / 8)
    assert max_diff(blended, local(x)) <= 1e-6


@torch.no_grad()
def test_tiling_a_frame_smaller_than_a_tile_changes_nothing(vae):
    x = torch.randn(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(3))  # tiny tiles are 32x32
    assert torch.equal(vae.encode(x, tile=True).mean, vae.encode(x).mean)
    z = vae.encode(x).mean
    assert torch.equal(vae.decode(z, tile=True), vae.decode(z))


@torch.no_grad()
def test_tiling_is_as_close_to_untiled_as_diffusers_tiling():
    """Tiles see per-tile GroupNorm statistics and zero borders, so tiled output only approximates untiled
    output (random weights make that approximation poor); ours must be at least as close as diffusers' tiling on
    the same weights, tiles and overlap."""
    from vae_model_helpers import tiny_diffusers_vae

    ref = tiny_diffusers_vae(seed=5)
    set_diffusers_batching(ref, one_pass=False)
    ref.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_overlap_factor_height=0.5,
                      tile_overlap_factor_width=0.5)
    ours = build_vae("tiny", tile_sample_size=(32, 32), tile_overlap=(16, 16)).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 9, 32, 40, generator=torch.Generator().manual_seed(6))  # diffusers needs 8k+1
    rel = lambda a, b: ((a - b).norm() / a.norm()).item()  # noqa: E731
    exact = ours.encode(x).mean
    tiled = ours.encode(x, tile=True).mean
    assert rel(exact, tiled) <= rel(exact, ref.encode(x).latent_dist.mean) + 0.02
    exact_x = ours.decode(exact)
    assert rel(exact_x, ours.decode(exact, tile=True)) <= rel(exact_x, ref.decode(exact).sample) + 0.02


@torch.no_grad()
def test_tiling_composes_exactly_with_chunking(vae):
    x = torch.randn(1, 3, 9, 16, 48, generator=torch.Generator().manual_seed(7))  # two 32-wide tiles
    assert max_diff(vae.encode(x, chunk_frames=4, tile=True).mean, vae.encode(x, tile=True).mean) <= TOL
