"""The CogVideoX expert transformer (DiT), its ablation variants and the size registry.

    temb   = MLP(sinusoid(t))                                   [B, E]
    x      = [text_proj(text); patch_embed(latents) (+ sincos)]  [B, L+N, D]
    block:   h = LN(x)(1 + scale_m) + shift_m ;  x += gate_m * Attn(h)      (m = token modality)
             h = LN(x)(1 + scale_m) + shift_m ;  x += gate_m * FFN(h)
    out    = proj_out(AdaLN(LN(x_vision))) -> unpatchify           [B, C, T, H, W]

Parameter names follow diffusers' CogVideoXTransformer3DModel (see diffusers_format.py for the three renames).

Memory: q/k norm + RoPE, the modulated LayerNorms, the gated residuals and the GELU MLP are small autograd
Functions that save only what backward cannot cheaply recompute (the GELU output, 4x the hidden size, is
recomputed). Time: q, k and v come from one matmul; RoPE is one complex multiply.
The blocks therefore read some Linear weights directly instead of calling the Linear modules. Wrapped layers (LoRA
adapters, parametrizations) are detected and called. A sharding engine must hold a whole block's weights while
the block runs: wrap FSDP units at ExpertBlock granularity (no_split_modules) or coarser. DeepSpeed ZeRO-3 runs
as is (tests/scale trains this model under it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cogvx_train.dit.attention import ATTENTION_MODES, JointAttention
from cogvx_train.dit.embeddings import PatchEmbed, TimestepEmbedding, unpatchify
from cogvx_train.dit.expert_adaln import (ExpertAdaLN, FinalAdaLN, compute_dtype, gated_residual, layer_norm,
                                            no_autocast)
from cogvx_train.dit.rope3d import rope3d_frequencies, rope_axis_dims, rotation
from cogvx_train.dit.sincos3d import sincos3d_embedding

POSITIONS = ("rope3d", "sincos3d")
TEXT_FUSIONS = ("expert_adaln", "shared_adaln", "expert_ffn", "mmdit")


@dataclass(frozen=True)
class DiTConfig:
    """Everything that shapes the expert transformer. Sizes in DIT_SIZES; overrides via build_dit(size, **kw)."""

    num_layers: int
    num_heads: int
    head_dim: int = 64
    in_channels: int = 16  # latent channels in
    out_channels: int = 16  # latent channels predicted (v)
    time_embed_dim: int = 512
    text_embed_dim: int = 4096  # T5 hidden size
    patch_size: int = 2
    ffn_mult: int = 4
    norm_eps: float = 1e-5
    max_text_tokens: int = 226  # longest text input accepted
    positions: str = "rope3d"  # "rope3d" (5B) | "sincos3d" (2B)
    rope_theta: float = 1e4
    spatial_interpolation_scale: float = 1.875  # sincos3d: spatial positions are divided by this
    temporal_interpolation_scale: float = 1.0
    sample_frames: int = 13  # latent frames / height / width of the training sample (export metadata)
    sample_height: int = 60
    sample_width: int = 90
    attention: str = "full"  # "full" 3D attention | "spatial_temporal" (2D+1D, alternating blocks)
    text_fusion: str = "expert_adaln"  # | "shared_adaln" | "expert_ffn" | "mmdit"
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile each block (see ExpertTransformer.compile_blocks)

    def __post_init__(self):
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.text_fusion not in TEXT_FUSIONS:
            raise ValueError(f"text_fusion must be one of {TEXT_FUSIONS}, got {self.text_fusion!r}")
        for name in ("num_layers", "num_heads", "head_dim", "in_channels", "out_channels", "time_embed_dim",
                     "text_embed_dim", "patch_size", "ffn_mult", "max_text_tokens", "sample_frames",
                     "sample_height", "sample_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.positions == "rope3d":
            rope_axis_dims(self.head_dim)
        elif self.hidden_size % 16 != 0:
            raise ValueError(f"sincos3d positions need a hidden size divisible by 16, got {self.hidden_size}")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def experts(self) -> bool:
        """Per-modality modulation (every variant but shared_adaln)."""
        return self.text_fusion != "shared_adaln"

    def attention_mode(self, layer: int) -> str:
        """"full", or "spatial" for even and "temporal" for odd layers under spatial_temporal."""
        if self.attention == "full":
            return "full"
        return "spatial" if layer % 2 == 0 else "temporal"


DIT_SIZES: dict[str, DiTConfig] = {
    "tiny": DiTConfig(num_layers=2, num_heads=2, time_embed_dim=64, text_embed_dim=32, sample_frames=3,
                      sample_height=8, sample_width=8),
    "2b": DiTConfig(num_layers=30, num_heads=30, positions="sincos3d"),
    "5b": DiTConfig(num_layers=42, num_heads=48, positions="rope3d"),
}


_GELU_K, _GELU_A = 2 * math.sqrt(2 / math.pi), 0.044715  # tanh-GELU(u) = u * sigmoid(K (u + A u^3))


def _gelu_tanh(u: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation. For float32 on CPU, where aten's tanh-GELU is not vectorised (2-3x slower
    than this), it runs as the identical u * sigmoid(2z); elsewhere as the fused aten kernel."""
    if u.device.type != "cpu" or u.dtype != torch.float32:
        return F.gelu(u, approximate="tanh")
    return (u * u).mul_(_GELU_A * _GELU_K).add_(_GELU_K).mul_(u).sigmoid_().mul_(u)


def _gelu_tanh_and_grad(u: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(GELU(u), grad * GELU'(u)) sharing one sigmoid on CPU:
    s = sigmoid(K (u + A u^3)),  GELU = u s,  GELU' = s (1 + u (1 - s) K (1 + 3 A u^2))."""
    if u.device.type != "cpu" or u.dtype != torch.float32:
        return F.gelu(u, approximate="tanh"), torch.ops.aten.gelu_backward(grad, u, approximate="tanh")
    u2 = u * u
    s = torch.addcmul(u, u2, u, value=_GELU_A).mul_(_GELU_K).sigmoid_()
    a = u2.mul_(3 * _GELU_A * _GELU_K).add_(_GELU_K).mul_(u)  # u K (1 + 3 A u^2), in u2's buffer
    a.addcmul_(a, s, value=-1)  # * (1 - s), without allocating 1 - s
    slope = torch.addcmul(s, a, s, out=a).mul_(grad)  # s (1 + a) * grad
    return s.mul_(u), slope


class _GeluMLP(torch.autograd.Function):
    """Linear -> GELU(tanh) -> Linear that saves the input and the pre-activation only (the GELU output, 4x the
    hidden size, is recomputed in backward)."""

    @staticmethod
    def forward(ctx, h, w1, b1, w2, b2):
        dtype = compute_dtype(h)
        ctx.dtypes = (h.dtype, w1.dtype, b1.dtype, w2.dtype, b2.dtype)
        h, w1, b1, w2, b2 = (t.to(dtype) for t in (h, w1, b1, w2, b2))
        with no_autocast(h):
            h2d = h.reshape(-1, h.shape[-1])  # [B*S, D]
            u = torch.addmm(b1, h2d, w1.t())  # [B*S, F]
            out = torch.addmm(b2, _gelu_tanh(u), w2.t())  # [B*S, D]
        ctx.save_for_backward(h2d, u, w1, w2)
        return out.view(*h.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out):
        h2d, u, w1, w2 = ctx.saved_tensors
        g2d = grad_out.reshape(-1, grad_out.shape[-1]).to(u.dtype)  # [B*S, D]
        gelu, grad_u = _gelu_tanh_and_grad(u, g2d @ w2)  # [B*S, F] each
        grad_w2 = g2d.t() @ gelu
        grad_w1 = grad_u.t() @ h2d
        grad_h = (grad_u @ w1).view(*grad_out.shape[:-1], -1)
        grads = (grad_h, grad_w1, grad_u.sum(0), grad_w2, g2d.sum(0))
        return tuple(g.to(dt) for g, dt in zip(grads, ctx.dtypes))


class FeedForward(nn.Module):
    """ff: Linear(D, 4D) -> GELU(tanh) -> Linear(4D, D)."""

    def __init__(self, hidden_size: int, mult: int):
        super().__init__()
        self.proj_in = nn.Linear(hidden_size, mult * hidden_size)
        self.proj_out = nn.Linear(mult * hidden_size, hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if type(self.proj_in) is not nn.Linear or type(self.proj_out) is not nn.Linear:
            # wrapped layers (LoRA adapters, parametrizations): call them, so the wrapper applies
            return self.proj_out(F.gelu(self.proj_in(h), approximate="tanh"))
        return _GeluMLP.apply(h, self.proj_in.weight, self.proj_in.bias, self.proj_out.weight, self.proj_out.bias)


class ExpertBlock(nn.Module):
    """One transformer block; text_fusion picks which weights are per-modality (see DiTConfig)."""

    def __init__(self, cfg: DiTConfig, layer: int):
        super().__init__()
        d, mmdit = cfg.hidden_size, cfg.text_fusion == "mmdit"
        self.attention_mode = cfg.attention_mode(layer)
        self.norm1 = ExpertAdaLN(cfg.time_embed_dim, d, cfg.norm_eps, cfg.experts, separate_norms=mmdit)
        self.attn1 = JointAttention(d, cfg.num_heads, cfg.head_dim, separate_text=mmdit)
        self.norm2 = ExpertAdaLN(cfg.time_embed_dim, d, cfg.norm_eps, cfg.experts, separate_norms=mmdit)
        self.ff = FeedForward(d, cfg.ffn_mult)  # vision tokens (all tokens when shared)
        self.ff_text = FeedForward(d, cfg.ffn_mult) if cfg.text_fusion in ("expert_ffn", "mmdit") else None

    def feed_forward(self, h: torch.Tensor, text_len: int) -> torch.Tensor:
        if self.ff_text is None:
            return self.ff(h)
        return torch.cat([self.ff_text(h[:, :text_len]), self.ff(h[:, text_len:])], dim=1)

    def forward(self, x, temb_act, text_len: int, grid: tuple[int, int, int], rope) -> torch.Tensor:
        h, gate = self.norm1(x, temb_act, text_len)
        x = gated_residual(x, self.attn1(h, text_len, grid, rope, self.attention_mode), gate, text_len)
        h, gate = self.norm2(x, temb_act, text_len)
        return gated_residual(x, self.feed_forward(h, text_len), gate, text_len)


class ExpertTransformer(nn.Module):
    """model(latents [B, C, T, H, W], timesteps [B], text_embeds [B, L, text_dim]) -> prediction [B, C, T, H, W].

    timesteps: int or float, scalar or [B]. text_embeds: 1 <= L <= max_text_tokens tokens, no mask (zeros for the
    unconditional branch). `gradient_checkpointing` (attribute, initialised from the config) reruns each block in
    backward; `compile` in the config compiles each block (compile_blocks).
    """

    no_split_modules = ("ExpertBlock",)  # the unit FSDP / ZeRO-3 must gather at once (see the module docstring)

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.patch_embed = PatchEmbed(cfg.in_channels, d, cfg.text_embed_dim, cfg.patch_size)
        self.time_embedding = TimestepEmbedding(d, cfg.time_embed_dim)
        self.transformer_blocks = nn.ModuleList(ExpertBlock(cfg, i) for i in range(cfg.num_layers))
        self.norm_final = nn.LayerNorm(d, cfg.norm_eps)
        self.norm_out = FinalAdaLN(cfg.time_embed_dim, d, cfg.norm_eps)
        self.proj_out = nn.Linear(d, cfg.patch_size**2 * cfg.out_channels)
        self.gradient_checkpointing = cfg.gradient_checkpointing
        self._position_cache: dict = {}  # token grid -> sincos table or RoPE angles (not part of the state)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()
        if cfg.compile:
            self.compile_blocks()

    def compile_blocks(self, **compile_kwargs) -> None:
        """torch.compile every block in place (nn.Module.compile: parameter names and the state dict are unchanged).

        Per block rather than the whole model, as torchtitan does: the blocks share one compiled graph (inductor
        inlines the modules and takes their weights as inputs), so compile time does not grow with depth, and the
        unit gradient checkpointing and FSDP wrap stays the same. Inductor fuses the element-wise work around the
        matmuls and SDPA (modulation, gates, q/k norm, RoPE, GELU) into a few kernels.
        """
        for block in self.transformer_blocks:
            block.compile(**compile_kwargs)

    @torch.no_grad()
    def init_weights(self) -> None:
        """DiT-style init: Xavier linears, zero biases, N(0, 0.02) time MLP, adaLN-Zero (modulation and output
        projection start at zero, so every block starts as the identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        proj = self.patch_embed.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.out_channels, -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.time_embedding.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_embedding.linear_2.weight, std=0.02)
        for block in self.transformer_blocks:
            for norm in (block.norm1, block.norm2):
                nn.init.zeros_(norm.linear.weight)
                nn.init.zeros_(norm.linear.bias)
        for layer in (self.norm_out.linear, self.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _positions(self, grid: tuple[int, int, int], device: torch.device, dtype: torch.dtype):
        """Cached sincos table [N, D] or RoPE rotation ([N, 1, hd/2, 2] cos, sin) for a token grid."""
        cfg = self.config
        key = (grid, device, dtype)
        if key not in self._position_cache:
            if cfg.positions == "sincos3d":
                value = sincos3d_embedding(*grid, cfg.hidden_size, cfg.spatial_interpolation_scale,
                                           cfg.temporal_interpolation_scale, device=device, dtype=dtype)
            else:
                value = rotation(*rope3d_frequencies(*grid, cfg.head_dim, cfg.rope_theta, device=device))
            self._position_cache[key] = value
        return self._position_cache[key]

    def _check_inputs(self, latents, timesteps, text_embeds) -> torch.Tensor:
        cfg = self.config
        if latents.dim() != 5 or latents.shape[1] != cfg.in_channels:
            raise ValueError(f"latents must be [B, {cfg.in_channels}, T, H, W] (channel-first), got "
                             f"{tuple(latents.shape)}")
        if latents.shape[3] % cfg.patch_size or latents.shape[4] % cfg.patch_size:
            raise ValueError(f"latent height and width must be multiples of the patch size {cfg.patch_size}, got "
                             f"{tuple(latents.shape[3:])}")
        b = latents.shape[0]
        if text_embeds.dim() != 3 or text_embeds.shape[0] != b or text_embeds.shape[2] != cfg.text_embed_dim:
            raise ValueError(f"text_embeds must be [{b}, L, {cfg.text_embed_dim}], got {tuple(text_embeds.shape)}")
        if text_embeds.shape[1] < 1:
            raise ValueError("text_embeds must have at least one token; the unconditional branch uses zeros")
        if text_embeds.shape[1] > cfg.max_text_tokens:
            raise ValueError(f"text_embeds has {text_embeds.shape[1]} tokens but the model accepts at most "
                             f"max_text_tokens={cfg.max_text_tokens}; truncate the prompt embedding")
        timesteps = torch.as_tensor(timesteps, device=latents.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(b)
        if timesteps.shape != (b,):
            raise ValueError(f"timesteps must be a scalar or shape [{b}], got {tuple(timesteps.shape)}")
        return timesteps

    def forward(self, latents: torch.Tensor, timesteps, text_embeds: torch.Tensor) -> torch.Tensor:
        timesteps = self._check_inputs(latents, timesteps, text_embeds)
        cfg, p = self.config, self.config.patch_size
        grid = (latents.shape[2], latents.shape[3] // p, latents.shape[4] // p)  # latent token grid (t, h, w)
        text_len = text_embeds.shape[1]
        dtype = self.proj_out.weight.dtype

        temb_act = F.silu(self.time_embedding(timesteps, dtype))  # SiLU(temb) [B, E], shared by all AdaLNs
        vision = self.patch_embed(latents)  # [B, N, D], tokens in (t, h, w) order
        rope = None
        if cfg.positions == "sincos3d":
            vision = vision + self._positions(grid, vision.device, vision.dtype)
        else:
            rope = self._positions(grid, vision.device, torch.float32)
        text = self.patch_embed.text_proj(text_embeds.to(dtype))  # [B, L, D]
        x = torch.cat([text, vision.to(text.dtype)], dim=1)  # [B, L+N, D]

        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, temb_act, text_len, grid, rope, use_reentrant=False)
            else:
                x = block(x, temb_act, text_len, grid, rope)

        vision = self.norm_out(layer_norm(x[:, text_len:], self.norm_final), temb_act)  # [B, N, D]
        return unpatchify(self.proj_out(vision), cfg.out_channels, grid, p)


DiT = ExpertTransformer


def build_dit(size: str = "tiny", **overrides) -> ExpertTransformer:
    """Model of a named size with config fields overridden, e.g. build_dit("2b", attention="spatial_temporal")."""
    if size not in DIT_SIZES:
        raise ValueError(f"unknown DiT size {size!r}; choose one of {sorted(DIT_SIZES)}")
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown DiTConfig field(s) {unknown}; valid fields are {sorted(fields)}")
    return ExpertTransformer(dataclasses.replace(DIT_SIZES[size], **overrides))


def summarize(model: ExpertTransformer) -> str:
    """Per-component parameter counts, one line each."""
    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    cfg, blocks = model.config, model.transformer_blocks
    rows = [("patch_embed.proj", count(model.patch_embed.proj)),
            ("patch_embed.text_proj", count(model.patch_embed.text_proj)),
            ("time_embedding", count(model.time_embedding))]
    for name in ("norm1", "attn1", "norm2", "ff", "ff_text"):
        per_block = [getattr(b, name) for b in blocks if getattr(b, name) is not None]
        if per_block:
            rows.append((f"transformer_blocks.*.{name} (x{len(per_block)})", sum(count(m) for m in per_block)))
    rows += [("norm_final + norm_out", count(model.norm_final) + count(model.norm_out)),
             ("proj_out", count(model.proj_out))]
    total = count(model)
    head = (f"ExpertTransformer: {cfg.num_layers} layers, {cfg.num_heads}x{cfg.head_dim} = {cfg.hidden_size} "
            f"hidden, positions={cfg.positions}, attention={cfg.attention}, text_fusion={cfg.text_fusion}")
    width = max(len(r[0]) for r in rows)
    lines = [head] + [f"  {n:<{width}}  {c:>15,}  {100 * c / total:5.1f}%" for n, c in rows]
    return "\n".join(lines + [f"  {'total':<{width}}  {total:>15,}"])
