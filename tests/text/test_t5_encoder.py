"""Frozen T5 encoder: tiny random T5 + ByT5, the local-path loading code, freezing, padding, caption dropout."""

import json

import pytest
import torch
from torch import nn

from cogvx_train.text import FrozenT5Encoder, build_text_encoder, build_tiny_t5, drop_captions

CAPTIONS = ["a red circle moves from left to right", "a blue square"]


def test_tiny_encoder_is_deterministic_in_the_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = build_text_encoder("tiny", max_length=32, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build_text_encoder("tiny", max_length=32, seed=0)
    c = build_text_encoder("tiny", max_length=32, seed=1)
    ea, eb, ec = a(CAPTIONS), b(CAPTIONS), c(CAPTIONS)
    assert torch.equal(ea, eb)
    assert not torch.allclose(ea, ec)


def test_shape_dtype_and_caption_dependence():
    encoder = build_text_encoder("tiny", max_length=32)
    out = encoder(CAPTIONS)
    assert out.shape == (2, 32, 32) and out.dtype == torch.float32 and encoder.embed_dim == 32
    assert not torch.allclose(out[0], out[1])
    assert build_text_encoder("tiny", max_length=16, dtype=torch.bfloat16)(CAPTIONS).dtype == torch.bfloat16


def test_padding_and_truncation_to_max_length():
    encoder = build_text_encoder("tiny", max_length=16)
    ids = encoder.tokenize(["hi", "x" * 100])
    assert ids.shape == (2, 16)
    pad, eos = encoder.tokenizer.pad_token_id, encoder.tokenizer.eos_token_id
    # "hi" -> 2 bytes + </s>, then padding; the long caption is cut and still ends in </s>.
    assert ids[0, 2].item() == eos and bool((ids[0, 3:] == pad).all())
    assert ids[1, -1].item() == eos and bool((ids[1, :-1] != pad).all())
    # Padded positions are real outputs (no attention mask): they differ between captions.
    out = encoder(["hi", "a different caption"])
    assert out.shape == (2, 16, 32)
    assert not torch.allclose(out[0, -1], out[1, -1])


def test_no_attention_mask_downstream_like_cogvideox():
    # CogVideoX runs T5 on the padded ids without a mask; the result must equal that call, not the masked one.
    encoder = build_text_encoder("tiny", max_length=24)
    ids = encoder.tokenize(["short"])
    unmasked = encoder.encoder(input_ids=ids).last_hidden_state
    masked = encoder.encoder(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
    out = encoder(["short"])
    assert torch.equal(out, unmasked)
    assert not torch.allclose(out, masked)


def test_frozen_no_grads_and_stays_in_eval():
    encoder = build_text_encoder("tiny", max_length=16)
    assert all(not p.requires_grad for p in encoder.parameters())
    parent = nn.ModuleDict({"text": encoder, "head": nn.Linear(32, 4)})
    parent.train()
    assert parent["head"].training and not encoder.training and not encoder.encoder.training
    out = encoder(CAPTIONS)
    assert not out.requires_grad
    loss = parent["head"](out).sum()
    loss.backward()
    assert all(p.grad is None for p in encoder.parameters())


def test_save_and_load_through_the_local_path_code(tmp_path):
    encoder, tokenizer = build_tiny_t5(seed=3)
    encoder.save_pretrained(tmp_path / "flat")
    tokenizer.save_pretrained(tmp_path / "flat")
    reference = FrozenT5Encoder(encoder, tokenizer, max_length=20)(CAPTIONS)

    loaded = build_text_encoder("t5", path=str(tmp_path / "flat"), max_length=20, dtype=torch.float32)
    assert torch.equal(loaded(CAPTIONS), reference)
    assert not loaded.training and all(not p.requires_grad for p in loaded.parameters())

    # A diffusers-style model root (CogVideoX checkout): text_encoder/ and tokenizer/ side by side.
    encoder.save_pretrained(tmp_path / "root" / "text_encoder")
    tokenizer.save_pretrained(tmp_path / "root" / "tokenizer")
    from_root = FrozenT5Encoder.from_pretrained(tmp_path / "root", max_length=20, dtype=torch.float32)
    assert torch.equal(from_root(CAPTIONS), reference)

    bf16 = build_text_encoder("t5", path=str(tmp_path / "flat"), max_length=20)  # the default dtype for "t5"
    assert bf16.dtype == torch.bfloat16


def test_missing_or_incomplete_path_gives_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        build_text_encoder("t5", path=str(tmp_path / "nowhere"), max_length=16)
    with pytest.raises(ValueError, match="needs a local path"):
        build_text_encoder("t5", path=None, max_length=16)
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match=r"missing: weights in .*tokenizer files"):
        build_text_encoder("t5", path=str(tmp_path / "partial"), max_length=16)
    with pytest.raises(ValueError, match="kind"):
        build_text_encoder("clip", max_length=16)
    with pytest.raises(ValueError, match="takes no path"):
        build_text_encoder("tiny", path=str(tmp_path), max_length=16)


def test_drop_captions_is_deterministic_and_zeroes_rows():
    embeds = torch.randn(64, 4, 8) + 3.0
    out_a, mask_a = drop_captions(embeds, 0.25, torch.Generator().manual_seed(0))
    out_b, mask_b = drop_captions(embeds, 0.25, torch.Generator().manual_seed(0))
    _, mask_c = drop_captions(embeds, 0.25, torch.Generator().manual_seed(1))
    assert torch.equal(out_a, out_b) and torch.equal(mask_a, mask_b) and not torch.equal(mask_a, mask_c)
    assert mask_a.dtype == torch.bool and mask_a.shape == (64,)
    assert 4 <= int(mask_a.sum()) <= 30
    assert bool((out_a[mask_a] == 0).all())
    assert torch.equal(out_a[~mask_a], embeds[~mask_a])
    assert torch.equal(drop_captions(embeds, 0.0)[0], embeds)
    assert bool((drop_captions(embeds, 1.0)[0] == 0).all())
    with pytest.raises(ValueError, match="probability"):
        drop_captions(embeds, 1.5)
