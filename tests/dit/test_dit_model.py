"""The expert transformer's public API: sizes, inputs, positions, checkpointing, mixed precision."""

import dataclasses

import pytest
import torch

from dit_weights import randomized

from cogvx_train.dit import DIT_SIZES, DiTConfig, build_dit, rope3d_frequencies, sincos3d_embedding, summarize


def inputs(b=2, t=3, h=4, w=6, text=8, text_dim=32, seed=1):
    torch.manual_seed(seed)
    return torch.randn(b, 16, t, h, w), torch.tensor([10, 500][:b]), torch.randn(b, text, text_dim)


def test_named_sizes():
    assert DIT_SIZES["2b"].hidden_size == 1920 and DIT_SIZES["2b"].num_layers == 30
    assert DIT_SIZES["2b"].positions == "sincos3d" and DIT_SIZES["2b"].spatial_interpolation_scale == 1.875
    assert DIT_SIZES["5b"].hidden_size == 3072 and DIT_SIZES["5b"].num_layers == 42
    assert DIT_SIZES["5b"].positions == "rope3d"
    assert DIT_SIZES["tiny"].hidden_size == 128 and DIT_SIZES["tiny"].text_embed_dim == 32
    for cfg in DIT_SIZES.values():
        assert cfg.time_embed_dim in (64, 512) and cfg.patch_size == 2 and cfg.max_text_tokens == 226


def test_fresh_model_is_adaln_zero_and_output_shape():
    model = build_dit("tiny")
    latents, t, text = inputs()
    out = model(latents, t, text)
    assert out.shape == latents.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output projection: training starts from v = 0
    out.sum().backward()
    assert model.proj_out.weight.grad.abs().sum() > 0


def test_timestep_kinds_and_text_length():
    model = randomized(build_dit("tiny"))
    latents, _, text = inputs()
    a = model(latents, torch.tensor([7, 7]), text)
    assert torch.equal(a, model(latents, 7, text))
    assert torch.allclose(a, model(latents, torch.tensor([7.0, 7.0]), text))
    assert not torch.allclose(a, model(latents, 8, text))
    assert model(latents, 7, text[:, :3]).shape == latents.shape  # any text length up to max_text_tokens


def test_bad_inputs_raise_one_clear_sentence():
    model = build_dit("tiny", max_text_tokens=8)
    latents, t, text = inputs()
    with pytest.raises(ValueError, match="channel-first"):
        model(latents.transpose(1, 2), t, text)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(latents[..., :5], t, text)
    with pytest.raises(ValueError, match="max_text_tokens"):
        model(latents, t, torch.randn(2, 9, 32))
    with pytest.raises(ValueError, match="at least one token"):
        model(latents, t, torch.randn(2, 0, 32))
    with pytest.raises(ValueError, match="text_embeds must be"):
        model(latents, t, torch.randn(2, 8, 31))
    with pytest.raises(ValueError, match="timesteps"):
        model(latents, torch.tensor([1, 2, 3]), text)
    with pytest.raises(ValueError, match="positions must be"):
        build_dit("tiny", positions="alibi")
    with pytest.raises(ValueError, match="unknown DiT size"):
        build_dit("7b")
    with pytest.raises(ValueError, match="unknown DiTConfig field"):
        build_dit("tiny", num_layer=3)
    with pytest.raises(ValueError, match="divisible by 16"):
        build_dit("tiny", head_dim=40)


def test_gradient_checkpointing_gives_identical_results():
    latents, t, text = inputs()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = randomized(build_dit("tiny", gradient_checkpointing=checkpointing))
        out = model(latents, t, text)
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5)


def test_checkpointing_keeps_only_block_inputs():
    """With checkpointing, what autograd saves inside the blocks is the per-layer input, not the activations."""
    latents, t, text = inputs()

    def saved_bytes(model):
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {}

        def pack(x):
            if x.untyped_storage().data_ptr() not in params:
                storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            model(latents, t, text)
        return sum(storages.values())

    plain = saved_bytes(build_dit("tiny", num_layers=4))
    checkpointed = saved_bytes(build_dit("tiny", num_layers=4, gradient_checkpointing=True))
    assert checkpointed < 0.35 * plain


def test_bf16_autocast_runs_and_tracks_fp32():
    model = randomized(build_dit("tiny"))
    latents, t, text = inputs()
    reference = model(latents, t, text)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(latents, t, text)
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters())
    assert (out.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_bf16_weights_run_forward_and_backward():
    model = randomized(build_dit("tiny")).to(torch.bfloat16)
    latents, t, text = inputs()
    out = model(latents.bfloat16(), t, text.bfloat16())
    out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_rope3d_frequencies_split_and_extrapolate():
    cos, sin = rope3d_frequencies(3, 4, 5, head_dim=64)
    assert cos.shape == sin.shape == (60, 64)
    assert torch.equal(cos[:, 0::2], cos[:, 1::2])  # interleaved pairs share an angle
    angles = torch.atan2(sin[:, 0::2], cos[:, 0::2])  # [N, 32]: t 8 pairs | h 12 | w 12
    grid = angles.view(3, 4, 5, 32)
    assert torch.allclose(grid[1, 0, 0, 0], torch.tensor(1.0))  # t=1, lowest temporal frequency: 1 radian
    assert torch.allclose(grid[:, :, :, :8], grid[:, :1, :1, :8].expand(-1, 4, 5, -1))  # t block ignores h, w
    assert torch.allclose(grid[0, 2, 0, 8], torch.tensor(2.0))  # h=2 -> angle 2 in the first h channel
    assert torch.allclose(grid[0, 0, 3, 20], torch.tensor(3.0))  # w=3 -> angle 3 in the first w channel
    big_cos, _ = rope3d_frequencies(3, 8, 10, head_dim=64)
    assert torch.equal(big_cos.view(3, 8, 10, 64)[:, :4, :5], cos.view(3, 4, 5, 64))  # extrapolation
    cos32, _ = rope3d_frequencies(2, 2, 2, head_dim=32)
    assert cos32.shape == (8, 32)


def test_rope3d_matches_diffusers_integer_grid():
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    ours = rope3d_frequencies(3, 4, 5, head_dim=64)
    theirs = embeddings.get_3d_rotary_pos_embed(64, None, (4, 5), 3, grid_type="slice", max_size=(4, 5))
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-5)


def test_sincos3d_matches_diffusers_table():
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    ours = sincos3d_embedding(3, 4, 5, 128, spatial_scale=1.875, temporal_scale=1.0)
    theirs = embeddings.get_3d_sincos_pos_embed(128, (5, 4), 3, 1.875, 1.0).flatten(0, 1)
    assert ours.shape == (60, 128)
    assert torch.allclose(ours, theirs.float(), atol=1e-6)


def test_summarize_lists_components_and_total():
    model = build_dit("tiny", text_fusion="expert_ffn")
    text = summarize(model)
    total = sum(p.numel() for p in model.parameters())
    assert f"{total:,}" in text and "ff_text" in text and "attn1" in text and "text_fusion=expert_ffn" in text


def test_config_is_a_plain_frozen_dataclass():
    cfg = DIT_SIZES["tiny"]
    assert dataclasses.replace(cfg, num_layers=3).num_layers == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_layers = 3
    assert isinstance(build_dit("tiny").config, DiTConfig)


class _LowRank(torch.nn.Module):
    """A LoRA-style wrapper: base Linear plus a trainable low-rank update."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.down = torch.nn.Linear(base.in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def test_wrapped_projections_are_called_so_adapters_apply():
    model = randomized(build_dit("tiny"))
    latents, t, text = inputs()
    with torch.no_grad():
        plain = model(latents, t, text)
    for block in model.transformer_blocks:
        for name in ("to_q", "to_v"):
            setattr(block.attn1, name, _LowRank(getattr(block.attn1, name)))
        block.ff.proj_in = _LowRank(block.ff.proj_in)
    with torch.no_grad():
        assert torch.allclose(model(latents, t, text), plain, atol=1e-5)  # zero-initialised adapters: same model
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = [m for m in model.modules() if isinstance(m, _LowRank)]
    for a in adapters:
        a.up.weight.requires_grad_(True)
    model(latents, t, text).square().mean().backward()
    assert all(a.up.weight.grad.abs().sum() > 0 for a in adapters)
    with torch.no_grad():
        adapters[0].up.weight.normal_()
        assert (model(latents, t, text) - plain).abs().max() > 1e-3
