"""CogVideoX expert transformer (DiT): model, sizes, ablation variants, FLOP accounting, checkpoint formats.

    model = build_dit("2b")  # or "tiny", "5b"; any DiTConfig field as override: build_dit("5b", attention=...)
    v = model(latents [B, 16, T, H, W], timesteps [B], text_embeds [B, L, 4096])  # -> [B, 16, T, H, W]
"""

from cogvx_train.dit.diffusers_format import (
    export_diffusers_transformer,
    load_diffusers_transformer,
    load_dit,
    save_dit,
)
from cogvx_train.dit.flops import count_parameters, flop_counter_mapping, flops_per_step, mfu
from cogvx_train.dit.rope3d import rope3d_frequencies
from cogvx_train.dit.sincos3d import sincos3d_embedding
from cogvx_train.dit.transformer import DIT_SIZES, DiT, DiTConfig, ExpertTransformer, build_dit, summarize

__all__ = [
    "DIT_SIZES",
    "DiT",
    "DiTConfig",
    "ExpertTransformer",
    "build_dit",
    "count_parameters",
    "export_diffusers_transformer",
    "flop_counter_mapping",
    "flops_per_step",
    "load_diffusers_transformer",
    "load_dit",
    "mfu",
    "rope3d_frequencies",
    "save_dit",
    "sincos3d_embedding",
    "summarize",
]
