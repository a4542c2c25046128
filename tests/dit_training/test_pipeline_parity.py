"""Our sampling (cogvx_train.sampling.sample_videos) reproduces diffusers' CogVideoXPipeline given the same weights
(our tiny DiT exported to CogVideoXTransformer3DModel, our tiny VAE exported to AutoencoderKLCogVideoX), the same
text embeddings (negative = zeros, our unconditional branch) and the same initial noise: both the latents
(output_type="latent") and the decoded video.

RoPE: the pipeline builds the rotary table from a crop of its base grid (sample_height/width / patch size) resized
to the requested grid, i.e. it INTERPOLATES positions when the size differs from the base; we use integer positions
(extrapolation, the paper's choice). The two agree exactly when the requested grid equals the base grid, which is
what the RoPE case below uses; at other sizes they differ by design (last test)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

from cogvx_train.diffusion import NoiseSchedule
from cogvx_train.dit import build_dit, export_diffusers_transformer
from cogvx_train.sampling import initial_noise, sample_videos
from cogvx_train.vae import build_vae, export_diffusers_vae

FRAMES, HEIGHT, WIDTH, STEPS, SCALE, SNR_SHIFT = 9, 64, 64, 5, 6.0, 3.0


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """adaLN-zero starts every block as the identity; parity needs every weight to matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = p.ndim == 1 and name.endswith("weight")  # LayerNorm / q-k norm gains: around 1, so that
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if gain else 0.05) + (1.0 if gain else 0.0))  # attention
            # logits (and with them the positions) matter


def _models(tmp_path, positions: str):
    torch.manual_seed(0)
    dit = build_dit("tiny", positions=positions, sample_height=HEIGHT // 8, sample_width=WIDTH // 8,
                    sample_frames=(FRAMES - 1) // 4 + 1, max_text_tokens=8).eval()  # diffusers' sincos table
    # includes max_text_seq_length text rows, so its text length must equal ours
    _randomise(dit, 1)
    vae = build_vae("tiny", scaling_factor=0.7).eval()
    pipe = CogVideoXPipeline(
        tokenizer=None, text_encoder=None,
        vae=AutoencoderKLCogVideoX.from_pretrained(export_diffusers_vae(vae, tmp_path / "vae")).eval(),
        transformer=CogVideoXTransformer3DModel.from_pretrained(
            export_diffusers_transformer(dit, tmp_path / "transformer")).eval(),
        scheduler=CogVideoXDDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=True,
                                         prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                         snr_shift_scale=SNR_SHIFT, timestep_spacing="trailing"))
    pipe.set_progress_bar_config(disable=True)
    return dit, vae, pipe


def _inputs(dit, count: int = 2, seed: int = 11):
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(count, 8, dit.config.text_embed_dim, generator=g)
    shape = (16, (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)
    noise = torch.stack([initial_noise(seed, i, shape) for i in range(count)])  # what sample_videos draws
    return cond, noise


def _pipeline(pipe, cond, noise, output_type, height=HEIGHT, width=WIDTH, frames=FRAMES):
    out = pipe(prompt_embeds=cond, negative_prompt_embeds=torch.zeros_like(cond),
               latents=noise.permute(0, 2, 1, 3, 4),  # diffusers' [B, T, C, H, W]
               height=height, width=width, num_frames=frames, num_inference_steps=STEPS, guidance_scale=SCALE,
               output_type=output_type).frames
    return out.permute(0, 2, 1, 3, 4)  # latents -> [B, C, T, H, W]; "pt" video [B, T, 3, H, W] -> [B, 3, T, H, W]


@pytest.mark.parametrize("positions", ["sincos3d", "rope3d"])
def test_sampling_matches_the_diffusers_pipeline(tmp_path, positions):
    dit, vae, pipe = _models(tmp_path, positions)
    cond, noise = _inputs(dit)
    ours = sample_videos(dit, vae, NoiseSchedule(snr_shift=SNR_SHIFT), ["a", "b"], text_embeds=cond,
                         num_frames=FRAMES, height=HEIGHT, width=WIDTH, num_steps=STEPS, guidance_scale=SCALE,
                         seed=11, batch_size=2, out_dir=tmp_path / "ours")
    with torch.no_grad():
        ref_latents = _pipeline(pipe, cond, noise, "latent")
        ref_video = _pipeline(pipe, cond, noise, "pt")
    assert (ours.latents - noise).abs().max() > 0.1  # the chain moved
    assert torch.allclose(ours.latents, ref_latents, atol=1e-4), (ours.latents - ref_latents).abs().max()
    ours_01 = (ours.videos / 2 + 0.5).clamp(0, 1)  # diffusers' postprocess: [-1, 1] -> [0, 1]
    assert ours_01.shape == ref_video.shape == (2, 3, FRAMES, HEIGHT, WIDTH)
    assert torch.allclose(ours_01, ref_video, atol=1e-4), (ours_01 - ref_video).abs().max()
    assert len(ours.paths) == 2 and all(p.stat().st_size > 0 for p in ours.paths)


def test_rope_positions_differ_from_diffusers_away_from_its_base_grid(tmp_path):
    dit, vae, pipe = _models(tmp_path, "rope3d")
    cond, _ = _inputs(dit, count=1)
    noise = torch.stack([initial_noise(11, 0, (16, 3, 8, 12))])  # 64x96: not the 64x64 base grid
    ours = sample_videos(dit, None, NoiseSchedule(snr_shift=SNR_SHIFT), ["a"], text_embeds=cond, num_frames=FRAMES,
                         height=64, width=96, num_steps=STEPS, guidance_scale=SCALE, noise=noise, decode=False)
    with torch.no_grad():
        ref = _pipeline(pipe, cond, noise, "latent", height=64, width=96)
    assert (ours.latents - ref).abs().max() > 1e-3  # interpolated (diffusers) vs integer (ours) positions
