"""The frozen text encoder (T5 from a local path, or a tiny random T5 + ByT5 tokenizer) and caption dropout."""

from cogvx_train.text.t5_encoder import (
    TEXT_ENCODERS,
    FrozenT5Encoder,
    build_text_encoder,
    build_tiny_t5,
    drop_captions,
)

__all__ = ["TEXT_ENCODERS", "FrozenT5Encoder", "build_text_encoder", "build_tiny_t5", "drop_captions"]
