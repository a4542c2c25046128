"""Numerical parity with diffusers' CogVideoXTransformer3DModel (reference only) and the checkpoint formats."""

import json

import pytest
import torch

from dit_weights import randomized

from cogvx_train.dit import (
    build_dit,
    export_diffusers_transformer,
    load_diffusers_transformer,
    load_dit,
    rope3d_frequencies,
    save_dit,
)
from cogvx_train.dit.diffusers_format import config_to_diffusers, from_diffusers_key, to_diffusers_key

diffusers = pytest.importorskip("diffusers")
CogVideoXTransformer3DModel = diffusers.CogVideoXTransformer3DModel

TEXT_TOKENS = 8
LATENT = (2, 16, 3, 4, 6)  # B, C, T, H, W -> 3 * 2 * 3 = 18 vision tokens


def random_model(positions: str, **overrides):
    torch.manual_seed(0)
    model = build_dit("tiny", positions=positions, max_text_tokens=TEXT_TOKENS, sample_frames=3, sample_height=4,
                      sample_width=6, **overrides)
    return randomized(model, seed=0)


def reference_of(model):
    config = {k: v for k, v in config_to_diffusers(model.config).items() if not k.startswith("_")}
    ref = CogVideoXTransformer3DModel(**config)
    ref.load_state_dict({to_diffusers_key(k): v for k, v in model.state_dict().items()}, strict=True)
    return ref


def inputs(seed: int = 1):
    torch.manual_seed(seed)
    return (torch.randn(*LATENT), torch.tensor([3, 871]), torch.randn(LATENT[0], TEXT_TOKENS, 32))


def run_reference(ref, latents, timesteps, text):
    rope = None
    if ref.config.use_rotary_positional_embeddings:
        t, h, w = latents.shape[2], latents.shape[3] // 2, latents.shape[4] // 2
        rope = rope3d_frequencies(t, h, w, ref.config.attention_head_dim)
    out = ref(latents.transpose(1, 2), text, timesteps, image_rotary_emb=rope, return_dict=False)[0]
    return out.transpose(1, 2)  # diffusers is [B, T, C, H, W]


@pytest.mark.parametrize("positions", ["sincos3d", "rope3d"])
def test_forward_and_gradients_match_diffusers(positions):
    model = random_model(positions)
    ref = reference_of(model)
    latents, timesteps, text = inputs()
    ours = model(latents, timesteps, text)
    theirs = run_reference(ref, latents, timesteps, text)
    assert ours.shape == latents.shape
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert ours.abs().mean() > 1e-2  # not a trivially-zero output

    target = torch.randn_like(latents)
    torch.nn.functional.mse_loss(ours, target).backward()
    torch.nn.functional.mse_loss(theirs, target).backward()
    ref_grads = {from_diffusers_key(k): p.grad for k, p in ref.named_parameters()}
    for name, p in model.named_parameters():
        g = ref_grads[name]
        scale = g.abs().max().item()
        if scale < 1e-10:  # e.g. the k-norm bias without RoPE: its gradient is exactly zero in theory
            assert p.grad.abs().max().item() < 1e-10, name
            continue
        assert (p.grad - g).abs().max().item() <= 1e-4 * scale, name


def test_float_and_int_timesteps_match_diffusers():
    model = random_model("rope3d")
    ref = reference_of(model)
    latents, _, text = inputs()
    for t in (torch.tensor([5.5, 999.0]), 250):
        t_ref = torch.as_tensor(t).expand(LATENT[0])
        diff = (model(latents, t, text) - run_reference(ref, latents, t_ref, text)).abs().max().item()
        assert diff <= 1e-5


@pytest.mark.parametrize("positions", ["sincos3d", "rope3d"])
def test_export_loads_in_diffusers_with_same_output(tmp_path, positions):
    model = random_model(positions)
    export_diffusers_transformer(model, tmp_path / "transformer")
    ref = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "transformer")
    latents, timesteps, text = inputs()
    with torch.no_grad():
        diff = (model(latents, timesteps, text) - run_reference(ref, latents, timesteps, text)).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("positions", ["sincos3d", "rope3d"])
def test_load_diffusers_checkpoint_single_and_sharded(tmp_path, positions):
    ref = reference_of(random_model(positions))
    ref.save_pretrained(tmp_path / "single")
    ref.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="200KB")
    assert (tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    latents, timesteps, text = inputs()
    with torch.no_grad():
        expected = run_reference(ref, latents, timesteps, text)
        for path in (tmp_path / "single", tmp_path / "pipe"):  # a pipeline root finds transformer/
            model = load_diffusers_transformer(path)
            assert model.config.positions == positions
            assert model.config.sample_frames == 3 and model.config.max_text_tokens == TEXT_TOKENS
            assert (model(latents, timesteps, text) - expected).abs().max().item() <= 1e-5


def test_our_sharded_export_round_trips(tmp_path):
    model = random_model("rope3d")
    export_diffusers_transformer(model, tmp_path, max_shard_bytes=300_000)
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = load_diffusers_transformer(tmp_path)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    ref = CogVideoXTransformer3DModel.from_pretrained(tmp_path)
    latents, timesteps, text = inputs()
    with torch.no_grad():
        assert (model(latents, timesteps, text) - run_reference(ref, latents, timesteps, text)).abs().max() <= 1e-5


def test_released_layouts_map_to_named_sizes():
    from cogvx_train.dit import DIT_SIZES
    from cogvx_train.dit.diffusers_format import config_from_diffusers

    two_b = {"num_attention_heads": 30, "num_layers": 30, "use_rotary_positional_embeddings": False}
    five_b = {"num_attention_heads": 48, "num_layers": 42, "use_rotary_positional_embeddings": True}
    assert config_from_diffusers(two_b) == DIT_SIZES["2b"]
    assert config_from_diffusers(five_b) == DIT_SIZES["5b"]
    assert config_to_diffusers(DIT_SIZES["2b"])["sample_frames"] == 49


@pytest.mark.parametrize("overrides", [{"text_fusion": "mmdit"}, {"text_fusion": "shared_adaln"},
                                       {"text_fusion": "expert_ffn"}, {"attention": "spatial_temporal"}])
def test_ablation_variants_refuse_diffusers_export_but_save_natively(tmp_path, overrides):
    model = random_model("rope3d", **overrides)
    with pytest.raises(ValueError, match="save_dit"):
        export_diffusers_transformer(model, tmp_path / "diffusers")
    save_dit(model, tmp_path / "native")
    loaded = load_dit(tmp_path / "native")
    assert loaded.config == model.config
    latents, timesteps, text = inputs()
    with torch.no_grad():
        assert torch.equal(model(latents, timesteps, text), loaded(latents, timesteps, text))


def test_bad_checkpoints_give_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_diffusers_transformer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"patch_size_t": 2}))
    with pytest.raises(ValueError, match="patch_size_t"):
        load_diffusers_transformer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"num_layers": 1}))
    with pytest.raises(ValueError, match="safetensors"):
        load_diffusers_transformer(tmp_path)
    model = random_model("rope3d")
    export_diffusers_transformer(model, tmp_path / "ok")
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    with pytest.raises(ValueError, match="missing"):
        load_diffusers_transformer(tmp_path / "ok")
    with pytest.raises(ValueError, match="load_diffusers_transformer"):
        load_dit(tmp_path / "ok")
