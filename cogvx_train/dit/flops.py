"""Analytic parameter and FLOP counts of the expert transformer, for MFU / HFU logging.

Convention (PaLM, torchtitan): a training step costs 6 FLOPs per matmul parameter per token (2 forward, 4
backward) plus 12 * L * d * T per token for attention scores and the weighted sum, which have no parameters.
Here every matmul is counted exactly instead of as "6N":
  * matmuls applied per token (qkv, out, FFN, patch / text projections, proj_out) scale with their token count;
  * matmuls applied once per sample (the time MLP and every AdaLN modulation Linear, ~0.1% at 2B scale) are
    counted once per sample;
  * the first layers (patch_embed.proj, patch_embed.text_proj, time_embedding.linear_1) read inputs that need
    no gradient, so their backward is the weight gradient only (2 FLOPs per MAC instead of 4);
  * attention follows the token grouping of each layer (full, spatial or temporal).
Elementwise work (norms, softmax, GELU, RoPE) is not counted, as in torch.utils.flop_counter.FlopCounterMode.

Modes of flops_per_step:
  "model"    - the MFU numerator: forward + backward, no recomputation of any kind.
  "hardware" - the HFU numerator: what the device executes. Adds the QK^T recompute inside flash-style attention
               backward kernels (FlopCounterMode counts it: 5 matmuls in backward instead of 4) and, with gradient
               checkpointing, the blocks' second forward.
  "forward"  - one forward pass (inference, 2N + 4LdT per token).
"""

from __future__ import annotations

import torch
from torch.utils import flop_counter

from cogvx_train.dit.transformer import DiTConfig

FLOP_MODES = ("model", "hardware", "forward")


def count_parameters(cfg: DiTConfig) -> int:
    """Exact number of parameters of ExpertTransformer(cfg), without building it."""
    d, e, hd, p = cfg.hidden_size, cfg.time_embed_dim, cfg.head_dim, cfg.patch_size
    ffn = cfg.ffn_mult * d
    rows = 2 if cfg.experts else 1
    mmdit = cfg.text_fusion == "mmdit"
    per_modality = 2 if mmdit else 1

    def linear(n_in, n_out):
        return n_in * n_out + n_out

    embed = linear(cfg.in_channels * p * p, d) + linear(cfg.text_embed_dim, d) + linear(d, e) + linear(e, e)
    norm = 2 * linear(e, 3 * rows * d) + 2 * (2 * d) * per_modality  # norm1 + norm2: modulation + LN affine
    attn = (4 * linear(d, d) + 2 * (2 * hd)) * per_modality  # q, k, v, out + q/k LayerNorms
    ff = linear(d, ffn) + linear(ffn, d)
    ff *= 2 if cfg.text_fusion in ("expert_ffn", "mmdit") else 1
    head = 2 * d + linear(e, 2 * d) + 2 * d + linear(d, p * p * cfg.out_channels)
    return embed + cfg.num_layers * (norm + attn + ff) + head


def _attention_macs(cfg: DiTConfig, mode: str, text_tokens: int, grid: tuple[int, int, int]) -> int:
    """Forward MACs of QK^T plus softmax(.)V for one sample in one layer (summed over heads)."""
    t, h, w = grid
    d, n = cfg.hidden_size, t * h * w
    if mode == "full":
        return 2 * (text_tokens + n) ** 2 * d
    if mode == "spatial":
        return 2 * t * (text_tokens + h * w) ** 2 * d
    return 2 * (h * w * t * t + text_tokens**2) * d  # temporal: per location over time, text among itself


def _forward_macs(cfg: DiTConfig, text_tokens: int, grid: tuple[int, int, int]) -> dict[str, int]:
    """Forward MACs of one sample, split by how their backward is counted."""
    d, e, p = cfg.hidden_size, cfg.time_embed_dim, cfg.patch_size
    n = grid[0] * grid[1] * grid[2]
    s = text_tokens + n
    rows = 2 if cfg.experts else 1
    first = n * cfg.in_channels * p * p * d + text_tokens * cfg.text_embed_dim * d + d * e  # inputs need no grad
    per_layer = 2 * e * 3 * rows * d + s * (4 * d * d + 2 * d * cfg.ffn_mult * d)  # AdaLN + qkv/out/FFN
    head = e * e + e * 2 * d + n * d * p * p * cfg.out_channels  # linear_2, norm_out.linear, proj_out
    attention = sum(_attention_macs(cfg, cfg.attention_mode(i), text_tokens, grid) for i in range(cfg.num_layers))
    return {"first": first, "blocks": cfg.num_layers * per_layer, "head": head, "attention": attention}


def flops_per_step(
    cfg: DiTConfig,
    batch_size: int,
    num_frames: int,
    height: int,
    width: int,
    text_tokens: int | None = None,
    mode: str = "model",
    gradient_checkpointing: bool | None = None,
    weight_grads: bool = True,
) -> int:
    """FLOPs of one training step (or one forward) on a batch of latents [B, C, num_frames, height, width].

    height/width are latent sizes (pixels / 8). text_tokens defaults to cfg.max_text_tokens.
    gradient_checkpointing defaults to the config's (it only changes "hardware").
    weight_grads=False drops every weight-gradient matmul: the LoRA-style count with frozen base weights
    (adapter FLOPs not included).
    """
    if mode not in FLOP_MODES:
        raise ValueError(f"mode must be one of {FLOP_MODES}, got {mode!r}")
    if height % cfg.patch_size or width % cfg.patch_size:
        raise ValueError(f"latent height/width must be multiples of the patch size {cfg.patch_size}, "
                         f"got {height}x{width}")
    text_tokens = cfg.max_text_tokens if text_tokens is None else text_tokens
    grid = (num_frames, height // cfg.patch_size, width // cfg.patch_size)
    macs = _forward_macs(cfg, text_tokens, grid)
    forward = sum(macs.values())
    if mode == "forward":
        return 2 * batch_size * forward
    weight_grad = 1 if weight_grads else 0
    # backward: input grad + weight grad per matmul; first layers have no input grad; attention has no weights
    backward = (1 + weight_grad) * (macs["blocks"] + macs["head"]) + weight_grad * macs["first"]
    backward += 2 * macs["attention"]  # dS = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q (4 matmuls, 2 each)
    total = forward + backward
    if mode == "hardware":
        total += macs["attention"] // 2  # flash backward recomputes S = Q K^T
        checkpointing = cfg.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
        if checkpointing:
            total += macs["blocks"] + macs["attention"]  # each block runs its forward again
    return 2 * batch_size * total


def mfu(flops_per_step: float, step_time_s: float, peak_flops: float) -> float:
    """Model (or hardware) FLOPs utilisation: achieved FLOP/s over the device's peak (e.g. 989e12 for H100 bf16)."""
    if step_time_s <= 0 or peak_flops <= 0:
        raise ValueError(f"step time and peak FLOP/s must be positive, got {step_time_s} s and {peak_flops}")
    return flops_per_step / (step_time_s * peak_flops)


def flop_counter_mapping() -> dict:
    """Extra formulas for torch.utils.flop_counter.FlopCounterMode(custom_mapping=...).

    FlopCounterMode has no formula for the CPU flash-attention kernels that F.scaled_dot_product_attention runs on
    CPU, so without this it counts attention as zero there. The formulas are torch's own SDPA ones.
    """
    aten = torch.ops.aten

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)

    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,  # FlopCounterMode passes shapes
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}
