"""Analytic parameter and FLOP counts agree with the real model and with torch's FlopCounterMode."""

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cogvx_train.dit import (
    DIT_SIZES,
    ExpertTransformer,
    build_dit,
    count_parameters,
    flop_counter_mapping,
    flops_per_step,
    mfu,
)
from cogvx_train.dit.transformer import TEXT_FUSIONS

LATENT = (2, 16, 3, 4, 6)
TEXT = 8


@pytest.mark.parametrize("size", ["tiny", "2b", "5b"])
@pytest.mark.parametrize("fusion", TEXT_FUSIONS)
def test_count_parameters_is_exact(size, fusion):
    cfg = dataclasses.replace(DIT_SIZES[size], text_fusion=fusion, attention="spatial_temporal")
    with torch.device("meta"):  # no memory for the 2B / 5B weights
        model = ExpertTransformer(cfg)
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())


def test_released_sizes_match_the_reference_counts():
    assert round(count_parameters(DIT_SIZES["2b"]) / 1e9, 2) == 1.69
    assert round(count_parameters(DIT_SIZES["5b"]) / 1e9, 2) == 5.57


def counted_flops(model, backward=True, backend=None):
    torch.manual_seed(0)
    latents, text = torch.randn(*LATENT), torch.randn(LATENT[0], TEXT, 32)
    mapping = flop_counter_mapping()
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        if backend is None:
            out = model(latents, torch.tensor([1, 2]), text)
        else:
            with sdpa_kernel(backend):
                out = model(latents, torch.tensor([1, 2]), text)
        if backward:
            if backend is None:
                out.square().mean().backward()
            else:
                with sdpa_kernel(backend):
                    out.square().mean().backward()
    return counter.get_total_flops()


def analytic(cfg, mode, **kw):
    return flops_per_step(cfg, LATENT[0], *LATENT[2:], text_tokens=TEXT, mode=mode, **kw)


@pytest.mark.parametrize("attention", ["full", "spatial_temporal"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_hardware_flops_match_flop_counter(attention, checkpointing):
    """What runs: flash-style attention recomputes Q K^T in backward; checkpointing reruns every block forward."""
    model = build_dit("tiny", attention=attention, gradient_checkpointing=checkpointing)
    counted = counted_flops(model)
    assert abs(counted / analytic(model.config, "hardware") - 1) < 0.02
    if checkpointing:
        assert analytic(model.config, "hardware") > 1.2 * analytic(model.config, "model")


@pytest.mark.parametrize("fusion", TEXT_FUSIONS)
def test_model_flops_match_flop_counter_without_recompute(fusion):
    """The MFU numerator: the math attention backend recomputes nothing, so FlopCounterMode sees exactly it."""
    model = build_dit("tiny", text_fusion=fusion)
    counted = counted_flops(model, backend=SDPBackend.MATH)
    assert abs(counted / analytic(model.config, "model") - 1) < 0.02


def test_forward_flops_match_flop_counter():
    model = build_dit("tiny", attention="spatial_temporal")
    with torch.no_grad():
        counted = counted_flops(model, backward=False)
    assert abs(counted / analytic(model.config, "forward") - 1) < 0.02


def test_flops_follow_the_palm_convention_at_scale():
    """For the 5B model at 49x480x720 the count is 6N + 12 L d T per token up to the per-sample terms."""
    cfg = DIT_SIZES["5b"]
    tokens = 13 * 30 * 45 + 226
    d, layers = cfg.hidden_size, cfg.num_layers
    n_per_token = layers * 12 * d * d  # qkv + out + FFN
    palm = tokens * (6 * n_per_token + 12 * layers * d * tokens)
    ours = flops_per_step(cfg, 1, 13, 60, 90)
    assert abs(ours / palm - 1) < 0.01
    assert 0.95e15 < ours < 1.1e15  # performance.md: ~1.0e15 per sample
    assert flops_per_step(cfg, 1, 13, 60, 90, mode="forward") == pytest.approx(ours / 3, rel=0.01)
    lora = flops_per_step(cfg, 1, 13, 60, 90, weight_grads=False)
    assert lora < ours and lora == pytest.approx(ours - 2 * tokens * n_per_token, rel=0.01)
    assert flops_per_step(cfg, 4, 13, 60, 90) == 4 * ours


def test_mfu_and_bad_arguments():
    assert mfu(989e12 * 0.45 * 2.0, 2.0, 989e12) == pytest.approx(0.45)
    with pytest.raises(ValueError, match="positive"):
        mfu(1e12, 0.0, 989e12)
    with pytest.raises(ValueError, match="mode"):
        flops_per_step(DIT_SIZES["tiny"], 1, 3, 4, 6, mode="mfu")
    with pytest.raises(ValueError, match="patch size"):
        flops_per_step(DIT_SIZES["tiny"], 1, 3, 5, 6)
