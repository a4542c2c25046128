"""Numerical parity with diffusers' AutoencoderKLCogVideoX on tiny seeded weights, and the diffusers file format.

Both GroupNorm semantics are compared apples to apples: whole-clip statistics against diffusers with its frame
batching turned off (one encoder/decoder call per clip), and per-window statistics (8 frames / 2 latent frames)
against diffusers' default batching.
"""

from __future__ import annotations

import json

import pytest
import torch
from vae_model_helpers import max_diff, randomize_, set_diffusers_batching, tiny_diffusers_vae

from cogvx_train.vae import build_vae, export_diffusers_vae, load_diffusers_vae

pytest.importorskip("diffusers")
TOL = 1e-4

MODES = {
    "whole_clip_vs_one_pass": dict(encoder_norm_window=None, decoder_norm_window=None),
    "windows_vs_default_batching": dict(encoder_norm_window=8, decoder_norm_window=2),
}


@pytest.fixture(scope="module")
def reference():
    return tiny_diffusers_vae(seed=0)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("frames", [1, 9, 17])
def test_posterior_and_decode_match_diffusers(reference, mode, frames):
    set_diffusers_batching(reference, one_pass=mode == "whole_clip_vs_one_pass")
    ours = build_vae("tiny", **MODES[mode]).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, frames, 16, 24, generator=torch.Generator().manual_seed(frames))
    with torch.no_grad():
        ref_post = reference.encode(x).latent_dist
        post = ours.encode(x)
        assert post.mean.shape == (1, 16, (frames - 1) // 4 + 1, 2, 3)
        assert max_diff(post.mean, ref_post.mean) <= TOL
        assert max_diff(post.logvar, ref_post.logvar) <= TOL
        z = ref_post.mean
        ref_x, x_hat = reference.decode(z).sample, ours.decode(z)
    assert x_hat.shape == x.shape
    assert max_diff(x_hat, ref_x) <= TOL


def test_the_two_groupnorm_semantics_really_differ(reference):
    """Guards the test above: on 17 frames, one-pass and batched diffusers disagree, and so do our two modes."""
    x = torch.randn(1, 3, 17, 16, 24, generator=torch.Generator().manual_seed(3))
    whole = build_vae("tiny", **MODES["whole_clip_vs_one_pass"]).eval()
    whole.load_state_dict(reference.state_dict())
    windowed = build_vae("tiny", **MODES["windows_vs_default_batching"]).eval()
    windowed.load_state_dict(reference.state_dict())
    with torch.no_grad():
        assert max_diff(whole.encode(x).mean, windowed.encode(x).mean) > 100 * TOL


def test_export_loads_in_diffusers_with_identical_reconstruction(tmp_path):
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(1)
    ours = randomize_(build_vae("tiny", scaling_factor=0.7), seed=1).eval()
    export_diffusers_vae(ours, tmp_path / "vae")
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["scaling_factor"] == 0.7
    theirs = AutoencoderKLCogVideoX.from_pretrained(tmp_path / "vae").eval()  # default batching = our windows
    x = torch.randn(1, 3, 17, 16, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        recon, _ = ours(x, sample_posterior=False)
        ref = theirs(x, sample_posterior=False).sample
    assert max_diff(recon, ref) <= TOL
    # and back: a pipeline folder with a vae/ subfolder loads into an identical model
    again = load_diffusers_vae(tmp_path)
    assert again.config.scaling_factor == 0.7 and again.config.block_out_channels == ours.config.block_out_channels
    for key, value in ours.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_load_saved_diffusers_model(tmp_path, reference):
    reference.save_pretrained(tmp_path)
    ours = load_diffusers_vae(tmp_path / "diffusion_pytorch_model.safetensors", encoder_norm_window=None)
    assert ours.config.block_out_channels == (32, 32, 64, 64) and ours.config.encoder_norm_window is None
    assert ours.config.decoder_norm_window == 2
    for key, value in reference.state_dict().items():
        assert torch.equal(value, ours.state_dict()[key]), key


def test_bad_checkpoints_get_one_clear_sentence(tmp_path, reference):
    with pytest.raises(ValueError, match="No config.json"):
        load_diffusers_vae(tmp_path)
    reference.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps(config | {"layers_per_block": 2}))
    with pytest.raises(ValueError, match="does not match the config: missing"):
        load_diffusers_vae(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps(config | {"use_quant_conv": True}))
    with pytest.raises(ValueError, match="use_quant_conv"):
        load_diffusers_vae(tmp_path / "a")
    with pytest.raises(ValueError, match="factorized"):
        export_diffusers_vae(build_vae("tiny", factorized=True), tmp_path / "b")
