"""The frozen text encoder: T5 (T5-v1.1-XXL for CogVideoX) from a local directory, or a tiny random T5 for tests.

CogVideoX tokenizes every caption to exactly `max_length` (226) tokens, padding and truncating, runs the encoder
*without* an attention mask and hands all 226 embeddings, padding included, to the transformer (diffusers'
`_get_t5_prompt_embeds` does the same). The padded positions therefore carry real, caption-dependent vectors and
must be kept: the DiT was trained on them.

Caption dropout (10 % in CogVideoX) replaces the whole embedding by zeros, which is also the unconditional input
used for classifier-free guidance at sampling time.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

TEXT_ENCODERS = ("t5", "tiny")
TINY_POSITION_BIAS_SCALE = 20.0  # see build_tiny_t5
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "spiece.model")


class FrozenT5Encoder(nn.Module):
    """Tokenizer + T5 encoder, frozen: no gradients, always in eval mode (also after a parent's `.train()`, so
    T5's dropout never switches on inside a training LightningModule)."""

    def __init__(self, encoder: nn.Module, tokenizer, max_length: int = 226) -> None:
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length must be positive (226 for CogVideoX), got {max_length}.")
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.encoder.requires_grad_(False)
        self.train(False)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, max_length: int = 226, dtype: torch.dtype = torch.bfloat16
    ) -> "FrozenT5Encoder":
        """Load from a local directory, never from the hub. `path` is either one directory holding both the
        encoder (config.json + weights) and the tokenizer files, or a diffusers model root (e.g. a CogVideoX-2b
        checkout) with `text_encoder/` and `tokenizer/` subfolders."""
        from transformers import AutoTokenizer, T5EncoderModel

        model_dir, tokenizer_dir = _resolve_local_dirs(Path(path))
        encoder = T5EncoderModel.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        return cls(encoder, tokenizer, max_length)

    @property
    def embed_dim(self) -> int:
        return int(self.encoder.config.d_model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    def train(self, mode: bool = True) -> "FrozenT5Encoder":
        return super().train(False)

    def tokenize(self, captions: list[str]) -> Tensor:
        """Token ids [B, max_length]: padded and truncated to max_length, with the end-of-sequence token."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError("captions must be a list of strings (wrap a single caption in a list).")
        tokens = self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return tokens.input_ids

    @torch.no_grad()
    def forward(self, captions: list[str]) -> Tensor:
        """Caption embeddings [B, max_length, d_model] in the encoder's dtype; no attention mask (see module doc)."""
        input_ids = self.tokenize(captions).to(next(self.encoder.parameters()).device)
        return self.encoder(input_ids=input_ids).last_hidden_state


def build_tiny_t5(
    d_model: int = 32, num_layers: int = 2, num_heads: int = 2, d_ff: int = 64, seed: int = 0
) -> tuple[nn.Module, object]:
    """A randomly initialised T5-v1.1-style encoder (gated GELU) and the file-free ByT5 tokenizer, for tests and the
    CPU demo. The weights depend only on `seed` (the global RNG is left untouched); the vocabulary is ByT5's 384
    ids (256 bytes + 3 specials + 125 sentinels)."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    if d_model % num_heads:
        raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads}).")
    tokenizer = ByT5Tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = T5EncoderModel(config)
    # transformers initialises the relative-position bias with std ~0.18: attention is then nearly uniform and the
    # random T5's outputs hardly depend on word order (mean-pooled, "from left to right" and "from right to left"
    # differ by ~1%, colours by ~30%). A 20x larger bias gives each head strong preferences for particular offsets,
    # so word order shows in the embeddings as it does in a trained T5 (~20%): the demo DiT can then learn directions.
    with torch.no_grad():
        encoder.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.mul_(TINY_POSITION_BIAS_SCALE)
    return encoder.eval(), tokenizer


def build_text_encoder(
    kind: str,
    path: str | os.PathLike | None = None,
    max_length: int = 226,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> FrozenT5Encoder:
    """kind "t5": load from the local `path` (dtype defaults to bf16, the dtype CogVideoX runs T5-XXL in);
    kind "tiny": build_tiny_t5(seed=seed) (dtype defaults to fp32), `path` must be None."""
    if kind == "t5":
        if path is None:
            raise ValueError(
                "text_encoder kind 't5' needs a local path: a T5 directory or a CogVideoX checkout with "
                "text_encoder/ and tokenizer/ (or use kind 'tiny' for tests)."
            )
        return FrozenT5Encoder.from_pretrained(path, max_length, dtype or torch.bfloat16)
    if kind == "tiny":
        if path is not None:
            raise ValueError(f"text_encoder kind 'tiny' is randomly initialised and takes no path, got {path!r}.")
        encoder, tokenizer = build_tiny_t5(seed=seed)
        return FrozenT5Encoder(encoder.to(dtype or torch.float32), tokenizer, max_length)
    raise ValueError(f"Unknown text encoder kind {kind!r}; choose one of {', '.join(TEXT_ENCODERS)}.")


def drop_captions(
    embeds: Tensor, p: float = 0.1, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Caption dropout: each row of `embeds` ([B, L, D]) is replaced by zeros with probability p.
    Returns (embeds with dropped rows zeroed, bool mask [B], True = dropped). Deterministic given `generator`
    (its device decides where the draw happens); None draws from the global RNG."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"Caption dropout probability must be in [0, 1], got {p}.")
    if embeds.ndim != 3:
        raise ValueError(f"embeds must be [B, L, D], got shape {tuple(embeds.shape)}.")
    device = generator.device if generator is not None else embeds.device
    dropped = (torch.rand(embeds.shape[0], generator=generator, device=device) < p).to(embeds.device)
    return torch.where(dropped[:, None, None], torch.zeros_like(embeds), embeds), dropped


def _resolve_local_dirs(path: Path) -> tuple[Path, Path]:
    """(encoder dir, tokenizer dir) inside `path`, or one clear error saying what is missing."""
    if not path.is_dir():
        raise ValueError(
            f"T5 path {str(path)!r} is not a directory; point text_encoder.path at a local T5 directory "
            "(config.json + weights + tokenizer files) or a CogVideoX checkout with text_encoder/ and tokenizer/."
        )
    if (path / "text_encoder").is_dir() and (path / "tokenizer").is_dir():
        model_dir, tokenizer_dir = path / "text_encoder", path / "tokenizer"
    else:
        model_dir = tokenizer_dir = path
    missing = []
    if not (model_dir / "config.json").is_file():
        missing.append(f"{model_dir / 'config.json'}")
    if not any((model_dir / name).is_file() for name in _WEIGHT_FILES):
        missing.append(f"weights in {model_dir} (one of {', '.join(_WEIGHT_FILES)})")
    if not any((tokenizer_dir / name).is_file() for name in _TOKENIZER_FILES):
        missing.append(f"tokenizer files in {tokenizer_dir} (one of {', '.join(_TOKENIZER_FILES)})")
    if missing:
        raise ValueError(f"T5 path {str(path)!r} is incomplete; missing: {'; '.join(missing)}.")
    return model_dir, tokenizer_dir
