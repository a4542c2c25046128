"""DDIM sampler: step and loop parity with diffusers' CogVideoXDDIMScheduler, eta > 0 against diffusers' DDIMScheduler,
and a whole CogVideoXPipeline run (tiny random transformer + VAE) reproduced through our `sample`."""

import math

import pytest
import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DDIMScheduler,
)
from released_scheduler import released_scheduler

from cogvx_train.diffusion import NoiseSchedule, ddim_step, guidance_scale_at, sample, trailing_timesteps

B, C, T, H, W, L, D = 2, 4, 3, 8, 8, 8, 16


def fake_denoiser(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """A fixed, deterministic stand-in for the transformer: depends on x, t and the text."""
    scale = (1 - t.double() / 1000).float().view(-1, 1, 1, 1, 1)
    text_term = text.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
    return torch.tanh(0.7 * x) * scale + 0.3 * text_term + 0.05 * x


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(B, C, T, H, W, generator=g)
    cond = torch.randn(B, L, D, generator=g)
    uncond = torch.zeros(B, L, D)
    return noise, cond, uncond


def _diffusers_loop(noise, cond, uncond, num_steps, guidance_scale, dynamic, snr_shift=3.0):
    """CogVideoXPipeline's denoising loop, on a layout-agnostic fake model, driven by diffusers' scheduler."""
    scheduler = released_scheduler(snr_shift)
    scheduler.set_timesteps(num_steps)
    latents = noise.clone()
    cfg = guidance_scale > 1
    text = torch.cat([uncond, cond]) if cfg else cond
    for t in scheduler.timesteps:
        model_in = torch.cat([latents] * 2) if cfg else latents
        v = fake_denoiser(model_in, t.expand(model_in.shape[0]), text).float()
        scale = guidance_scale
        if dynamic:
            scale = 1 + guidance_scale * ((1 - math.cos(math.pi * ((num_steps - t.item()) / num_steps) ** 5.0)) / 2)
        if cfg:
            v_uncond, v_text = v.chunk(2)
            v = v_uncond + scale * (v_text - v_uncond)
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
    return latents


@pytest.mark.parametrize("num_steps", [1, 7, 50, 61, 1000])
def test_trailing_timesteps_match_diffusers(num_steps):
    scheduler = released_scheduler()
    scheduler.set_timesteps(num_steps)
    ours = trailing_timesteps(num_steps)
    assert ours[0] == 999 and len(ours) == num_steps and ours == sorted(ours, reverse=True)
    # diffusers' arange sometimes yields num_steps + 1 entries ending in -1 (61 steps); the first num_steps agree.
    assert scheduler.timesteps.tolist()[:num_steps] == ours


@pytest.mark.parametrize("t", [999, 979, 499, 19])
def test_one_step_equals_diffusers(t):
    noise, cond, _ = _inputs(1)
    schedule, scheduler = NoiseSchedule(snr_shift=3.0), released_scheduler(3.0)
    scheduler.set_timesteps(50)
    v = fake_denoiser(noise, torch.full((B,), t), cond)
    ref = scheduler.step(v, torch.tensor(t), noise, return_dict=False)[0]
    timesteps = trailing_timesteps(50)
    t_prev = timesteps[timesteps.index(t) + 1] if t != 19 else -1
    ours = ddim_step(schedule, noise, v, t, t_prev)
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("snr_shift", [1.0, 3.0])
@pytest.mark.parametrize("num_steps", [5, 8, 10])
@pytest.mark.parametrize("guidance_scale, dynamic", [(1.0, False), (6.0, False), (6.0, True)])
def test_full_loop_equals_diffusers(num_steps, guidance_scale, dynamic, snr_shift):
    noise, cond, uncond = _inputs(2)
    ref = _diffusers_loop(noise, cond, uncond, num_steps, guidance_scale, dynamic, snr_shift)
    ours = sample(
        fake_denoiser,
        noise,
        cond,
        uncond,
        NoiseSchedule(snr_shift=snr_shift),
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        guidance_schedule="dynamic_cosine" if dynamic else "constant",
    )
    assert ours.dtype == torch.float32 and ours.shape == noise.shape
    assert (ours - ref).abs().max().item() <= 1e-5


def test_guidance_changes_the_result():
    noise, cond, uncond = _inputs(3)
    schedule = NoiseSchedule()
    plain = sample(fake_denoiser, noise, cond, None, schedule, num_steps=5, guidance_scale=1.0)
    constant = sample(fake_denoiser, noise, cond, uncond, schedule, num_steps=5, guidance_scale=6.0)
    dynamic = sample(fake_denoiser, noise, cond, uncond, schedule, 5, 6.0, "dynamic_cosine")
    assert (plain - constant).abs().max() > 1e-2 and (constant - dynamic).abs().max() > 1e-2


def test_dynamic_cosine_uses_training_timestep():
    # CogVideoX's released rule evaluates the cosine at (num_steps - t) / num_steps with t the training timestep.
    assert guidance_scale_at(6.0, "constant", 999, 50) == 6.0
    scales = [guidance_scale_at(6.0, "dynamic_cosine", t, 50) for t in trailing_timesteps(50)]
    assert all(1.0 <= s <= 7.0 for s in scales)
    expected_first = 1 + 6.0 * (1 - math.cos(math.pi * ((50 - 999) / 50) ** 5)) / 2
    assert scales[0] == expected_first
    # Not monotone: the weight jumps around between steps ("wave-like", THUDM/CogVideo#267).
    diffs = [b - a for a, b in zip(scales, scales[1:])]
    assert any(d > 0.5 for d in diffs) and any(d < -0.5 for d in diffs)


def test_non_divisor_step_count_goes_to_next_scheduled_timestep_and_ends_clean():
    noise, cond, _ = _inputs(4)
    schedule = NoiseSchedule()
    seen = []

    def recording(x, t, text):
        seen.append(int(t[0]))
        return fake_denoiser(x, t, text)

    out = sample(recording, noise, cond, None, schedule, num_steps=7, guidance_scale=1.0)
    assert seen == trailing_timesteps(7) == [999, 856, 713, 570, 428, 285, 142]
    # Re-run the chain by hand: every step lands on the next scheduled timestep and the last one on abar = 1,
    # so the result is exactly the final x0 prediction.
    x = noise.clone()
    for i, t in enumerate(seen[:-1]):
        x = ddim_step(schedule, x, fake_denoiser(x, torch.full((B,), t), cond), t, seen[i + 1])
    x0, _ = schedule.predict_x0_eps_from_v(x, fake_denoiser(x, torch.full((B,), 142), cond), 142)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-6)


def test_eta_positive_matches_diffusers_ddim_and_is_seeded():
    noise, cond, _ = _inputs(5)
    schedule = NoiseSchedule(snr_shift=3.0)
    num_steps, eta = 10, 0.7
    ours = sample(fake_denoiser, noise, cond, None, schedule, num_steps, 1.0, eta=eta,
                  generator=torch.Generator().manual_seed(9))
    again = sample(fake_denoiser, noise, cond, None, schedule, num_steps, 1.0, eta=eta,
                   generator=torch.Generator().manual_seed(9))
    other = sample(fake_denoiser, noise, cond, None, schedule, num_steps, 1.0, eta=eta,
                   generator=torch.Generator().manual_seed(10))
    assert torch.equal(ours, again) and (ours - other).abs().max() > 1e-3

    # diffusers' DDIMScheduler implements eta (CogVideoXDDIMScheduler ignores it); give it our table.
    ref = DDIMScheduler(prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing",
                        set_alpha_to_one=True)
    ref.alphas_cumprod = schedule.alphas_cumprod.clone()
    ref.final_alpha_cumprod = torch.tensor(1.0)
    ref.set_timesteps(num_steps)
    g = torch.Generator().manual_seed(9)
    x = noise.clone()
    for i, t in enumerate(ref.timesteps):
        last = i == num_steps - 1
        z = torch.zeros_like(x) if last else torch.randn(x.shape, generator=g)  # no noise into abar = 1
        v = fake_denoiser(x, t.expand(B), cond)
        x = ref.step(v, t, x, eta=eta, variance_noise=z, return_dict=False)[0]
    assert (ours - x).abs().max().item() <= 1e-5


def test_bad_inputs_raise():
    noise, cond, uncond = _inputs(6)
    schedule = NoiseSchedule()
    with pytest.raises(ValueError, match="uncond"):
        sample(fake_denoiser, noise, cond, None, schedule, 5, 6.0)
    with pytest.raises(ValueError, match="guidance_schedule"):
        sample(fake_denoiser, noise, cond, uncond, schedule, 5, 6.0, "linear")
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
        sample(fake_denoiser, noise[0], cond, uncond, schedule, 5, 6.0)
    with pytest.raises(ValueError, match="Generator"):
        sample(fake_denoiser, noise, cond, uncond, schedule, 5, 6.0, eta=0.5)
    with pytest.raises(ValueError, match="num_steps"):
        sample(fake_denoiser, noise, cond, uncond, schedule, 0, 6.0)


# ------------------------------------------------------------------------------------------- whole pipeline
def _tiny_pipeline() -> CogVideoXPipeline:
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=C,
        out_channels=C,
        time_embed_dim=8,
        text_embed_dim=D,
        num_layers=2,
        sample_width=W,
        sample_height=H,
        sample_frames=(T - 1) * 4 + 1,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=L,
        use_rotary_positional_embeddings=False,  # sincos: no image_rotary_emb to rebuild on our side
    ).eval()
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 2,
        up_block_types=("CogVideoXUpBlock3D",) * 2,
        block_out_channels=(8, 8),
        latent_channels=C,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    ).eval()
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                             scheduler=released_scheduler(3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("dynamic", [False, True])
def test_cogvideox_pipeline_parity(dynamic):
    pipe = _tiny_pipeline()
    noise, cond, _ = _inputs(7)
    uncond = torch.randn(B, L, D, generator=torch.Generator().manual_seed(8))  # a real negative prompt embedding
    num_steps, scale = 5, 6.0
    spatial = pipe.vae_scale_factor_spatial  # the pipeline asks for pixel sizes; latents are given directly
    ref = pipe(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        latents=noise.permute(0, 2, 1, 3, 4),  # [B, T, C, H, W], diffusers' layout
        height=H * spatial,
        width=W * spatial,
        num_frames=(T - 1) * pipe.vae_scale_factor_temporal + 1,
        num_inference_steps=num_steps,
        guidance_scale=scale,
        use_dynamic_cfg=dynamic,
        output_type="latent",
    ).frames.permute(0, 2, 1, 3, 4)

    def denoise(x, t, text):
        out = pipe.transformer(hidden_states=x.permute(0, 2, 1, 3, 4), encoder_hidden_states=text, timestep=t,
                               return_dict=False)[0]
        return out.permute(0, 2, 1, 3, 4)

    ours = sample(denoise, noise, cond, uncond, NoiseSchedule(snr_shift=3.0), num_steps, scale,
                  "dynamic_cosine" if dynamic else "constant")
    assert (ours - noise).abs().max() > 0.1  # the chain did something
    assert (ours - ref).abs().max().item() <= 1e-4
