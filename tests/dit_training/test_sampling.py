"""cogvx_train.sampling: the unconditional branch is zeros, every prompt has its own fixed noise (independent of
batching), guidance changes the result, the VAE decodes, mp4s are written, bad settings get one sentence; and the
module's validation samples come out of this very function."""

from __future__ import annotations

import pytest
import torch
from dit_helpers import module_kwargs
from torch import nn

from cogvx_train.diffusion import NoiseSchedule
from cogvx_train.dit import build_dit
from cogvx_train.dit.module import DiTTrainingModule
from cogvx_train.sampling import initial_noise, sample_videos, slug
from cogvx_train.vae import build_vae

SCHEDULE = NoiseSchedule(snr_shift=1.0)


class RecordingDenoiser(nn.Module):
    """A fixed stand-in for the DiT that depends on x, t and the text, and records the text it is given."""

    def __init__(self):
        super().__init__()
        self.config = build_dit("tiny").config
        self.scale = nn.Parameter(torch.tensor(0.7))
        self.texts: list[torch.Tensor] = []

    def forward(self, x, t, text):
        self.texts.append(text.clone())
        text_term = text.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        return torch.tanh(self.scale * x) * (1 - t.float() / 1000).view(-1, 1, 1, 1, 1) + 0.3 * text_term


def _cond(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 4, 32, generator=torch.Generator().manual_seed(0)) + 1.0


def test_unconditional_branch_is_zeros_and_guidance_matters():
    denoiser, cond = RecordingDenoiser(), _cond(2)
    guided = sample_videos(denoiser, None, SCHEDULE, text_embeds=cond, num_frames=5, height=16, width=16,
                           num_steps=3, guidance_scale=5.0, batch_size=2, decode=False)
    assert len(denoiser.texts) == 3
    for text in denoiser.texts:  # [uncond; cond] in one batched forward
        assert torch.equal(text[:2], torch.zeros_like(cond)) and torch.equal(text[2:], cond)
    denoiser.texts.clear()
    plain = sample_videos(denoiser, None, SCHEDULE, text_embeds=cond, num_frames=5, height=16, width=16,
                          num_steps=3, guidance_scale=1.0, batch_size=2, decode=False)
    assert all(torch.equal(text, cond) for text in denoiser.texts)  # scale 1: no unconditional pass
    assert (guided.latents - plain.latents).abs().max() > 1e-3


def test_each_prompt_has_its_own_fixed_noise_whatever_the_batching():
    denoiser, cond = RecordingDenoiser(), _cond(3)
    kwargs = dict(text_embeds=cond, num_frames=5, height=16, width=16, num_steps=3, guidance_scale=4.0, decode=False)
    one = sample_videos(denoiser, None, SCHEDULE, seed=9, batch_size=1, **kwargs)
    three = sample_videos(denoiser, None, SCHEDULE, seed=9, batch_size=3, **kwargs)
    assert torch.allclose(one.latents, three.latents, atol=1e-6)
    noise = torch.stack([initial_noise(9, i, (16, 2, 2, 2)) for i in range(3)])
    explicit = sample_videos(denoiser, None, SCHEDULE, noise=noise, **kwargs)
    assert torch.equal(explicit.latents, one.latents)
    other_seed = sample_videos(denoiser, None, SCHEDULE, seed=10, **kwargs)
    assert (other_seed.latents - one.latents).abs().max() > 1e-3
    assert torch.equal(initial_noise(9, 1, (16, 2, 2, 2)), noise[1])


def test_decodes_with_the_vae_and_writes_named_mp4s(tmp_path):
    torch.manual_seed(0)
    dit, vae = build_dit("tiny"), build_vae("tiny", scaling_factor=0.5)
    result = sample_videos(dit, vae, SCHEDULE, ["A red circle!", "blue"], text_embeds=_cond(2), num_frames=5,
                           height=16, width=32, num_steps=2, guidance_scale=3.0, out_dir=tmp_path, fps=4)
    assert result.latents.shape == (2, 16, 2, 2, 4) and result.videos.shape == (2, 3, 5, 16, 32)
    assert result.videos.min() >= -1 and result.videos.max() <= 1
    with torch.no_grad():  # decode = VAE(latents / scaling_factor)
        assert torch.allclose(result.videos, vae.decode(result.latents / 0.5).clamp(-1, 1), atol=1e-5)
    assert [p.name for p in result.paths] == ["sample_00_a_red_circle.mp4", "sample_01_blue.mp4"]
    assert slug("  !!  ") == "prompt"


@pytest.mark.parametrize("changes,message", [
    ({"num_frames": 6}, "4k\\+1"),
    ({"height": 8}, "multiples of 16"),
    ({"guidance_schedule": "linear"}, "guidance_schedule"),
    ({"num_steps": 0}, "num_steps"),
    ({"noise": torch.zeros(1, 16, 2, 2, 2)}, "noise must be"),
])
def test_bad_settings_get_one_sentence(changes, message):
    torch.manual_seed(0)
    kwargs = dict(text_embeds=_cond(2), num_frames=5, height=16, width=16, num_steps=2)
    kwargs.update(changes)
    with pytest.raises(ValueError, match=message):
        sample_videos(build_dit("tiny"), build_vae("tiny"), SCHEDULE, **kwargs)
    with pytest.raises(ValueError, match="text_encoder"):
        sample_videos(build_dit("tiny"), None, SCHEDULE, ["a"], decode=False)


def test_validation_samples_come_from_the_sampling_function_with_ema_weights(tmp_path):
    torch.manual_seed(0)
    module = DiTTrainingModule(**module_kwargs(samples_dir=str(tmp_path / "val"), use_latent_cache=True))
    with torch.no_grad():  # make the EMA differ from the live weights
        for p in module.dit.parameters():
            p.add_(0.01)
    module._sample_shape = (5, 16, 16)
    paths = module.write_samples(step=3)
    assert [p.name for p in paths] == ["step0000003_0.mp4", "step0000003_1.mp4"]
    s = module.sampling_cfg
    with module.eval_weights():  # EMA swapped in, as validation does
        direct = sample_videos(module.dit, module.frozen.vae, module.schedule, s.prompts,
                               text_encoder=module.encoders(vae=False, text=True).text_encoder,
                               scaling_factor=module.scaling_factor, num_frames=5, height=16, width=16,
                               num_steps=s.num_steps, guidance_scale=s.guidance_scale, seed=s.seed,
                               out_dir=tmp_path / "direct", name_format="{i}.mp4", fps=s.fps)
    for i, path in enumerate(paths):
        assert path.read_bytes() == direct.paths[i].read_bytes()
    live = sample_videos(module.dit, module.frozen.vae, module.schedule, s.prompts[:1],
                         text_encoder=module.frozen.text_encoder or module.encoders(vae=False, text=True).text_encoder,
                         scaling_factor=module.scaling_factor, num_frames=5, height=16, width=16,
                         num_steps=s.num_steps, guidance_scale=s.guidance_scale, seed=s.seed)
    assert (live.latents[0] - direct.latents[0]).abs().max() > 1e-4  # validation really used the EMA
