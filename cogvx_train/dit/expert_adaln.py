"""Expert adaptive LayerNorm: one LayerNorm, per-modality (shift, scale, gate) from the timestep embedding.

The transformer keeps text and vision in one sequence x = [text (L tokens); vision (N tokens)]. Modulation tensors
have shape [B, M, D]: M = 2 rows in the released checkpoints' order (row 0 vision, row 1 text) for the expert
variants, M = 1 when both modalities share one modulation (the `shared_adaln` ablation).

    h = LN(x) * (1 + scale_m) + shift_m            (m = modality of the token)
    x = x + gate_m * sublayer(h)

Both equations run as small autograd Functions so that backward keeps only what it cannot cheaply recompute:
the modulated LayerNorm saves its input (the residual stream) and the LN statistics (its backward kernel
recomputes the normalised tensor), and the gated residual saves the sub-layer output. Plain autograd would also
keep LN(x) and the modulated copy.
The LayerNorm's own affine (w, b) is folded into the modulation on the small [B, M, D] tensors:
LN(x)*w + b then *(1+s) + t  ==  x_hat * (w (1+s)) + (b (1+s) + t).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a fused op computes in: autocast's dtype when autocast is on for x's device, else x's dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def token_rows(num_rows: int, text_len: int) -> list[tuple[slice, int]]:
    """(token slice of a [B, S, ...] sequence, its modulation row): all tokens with row 0, or the vision tokens with
    row 0 and the text tokens with row 1 (M=2, the released checkpoints' order)."""
    return [(slice(None), 0)] if num_rows == 1 else [(slice(text_len, None), 0), (slice(0, text_len), 1)]


def no_autocast(x: torch.Tensor):
    """Autocast switched off for x's device inside a fused op (it picks its own dtypes); a no-op context when
    autocast is off already, which skips the ~12 us cost of entering torch.autocast on every call."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def row_blocks(x: torch.Tensor, num_rows: int, text_len: int) -> list[tuple[torch.Tensor, int]]:
    """x [B, S, ...] as (block, modulation row) pairs in memory order, rows indexing [B * M] flattened modulation:
    per sample the whole sequence (row b), or its text (row 2b+1) then its vision tokens (row 2b)."""
    if num_rows == 1:
        return [(sample, b) for b, sample in enumerate(x.unbind(0))]
    blocks = []
    for b, sample in enumerate(x.unbind(0)):
        text, vision = sample.split([text_len, sample.shape[0] - text_len])
        blocks += [(text, 2 * b + 1), (vision, 2 * b)]
    return blocks


class _ModulatedLayerNorm(torch.autograd.Function):
    """h = LN(x) * scale_m + shift_m as one affine LayerNorm kernel per (sample, modality) block. Saves x and the
    LN statistics only; backward is one fused LayerNorm-backward kernel per block."""

    @staticmethod
    def forward(ctx, x, scale, shift, text_len: int, eps: float):
        rows = scale.shape[1]
        scales, shifts = scale.to(x.dtype).flatten(0, 1).unbind(0), shift.to(x.dtype).flatten(0, 1).unbind(0)
        with no_autocast(x):
            outs = [torch.native_layer_norm(block, [x.shape[-1]], scales[r], shifts[r], eps)
                    for block, r in row_blocks(x, rows, text_len)]
        ctx.save_for_backward(x, scale, *(t for out in outs for t in out[1:]))
        ctx.text_len = text_len
        return torch.cat([out[0] for out in outs]).view_as(x)  # blocks are in memory order

    @staticmethod
    def backward(ctx, grad_h):
        x, scale, *stats = ctx.saved_tensors
        rows = scale.shape[1]
        scales = scale.to(x.dtype).flatten(0, 1).unbind(0)
        grad_x, grad_scale, grad_shift = [], [None] * len(scales), [None] * len(scales)
        for i, ((g, r), (block, _)) in enumerate(zip(row_blocks(grad_h, rows, ctx.text_len),
                                                    row_blocks(x, rows, ctx.text_len))):
            # the bias argument only has to be present for its gradient (= grad_shift) to be returned
            gx, grad_scale[r], grad_shift[r] = torch.ops.aten.native_layer_norm_backward(
                g, block, [x.shape[-1]], stats[2 * i], stats[2 * i + 1], scales[r], scales[r], [True, True, True])
            grad_x.append(gx)
        grad_x = torch.cat(grad_x).view_as(x)
        return (grad_x, torch.stack(grad_scale).view_as(scale).to(scale.dtype),
                torch.stack(grad_shift).view_as(scale).to(scale.dtype), None, None)


class _GatedResidual(torch.autograd.Function):
    """x + gate_m * update; saves update and gate (the residual needs nothing)."""

    @staticmethod
    def forward(ctx, x, update, gate, text_len: int):
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, update.dtype), device=x.device)
        g = gate.to(update.dtype)
        with no_autocast(x):
            for tok, m in token_rows(gate.shape[1], text_len):
                torch.addcmul(x[:, tok], update[:, tok], g[:, m:m + 1], out=out[:, tok])
        ctx.save_for_backward(update, gate)
        ctx.text_len, ctx.x_dtype = text_len, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        update, gate = ctx.saved_tensors
        g = gate.to(grad_out.dtype)
        grad_update = torch.empty_like(update)
        grad_times_update = grad_out * update  # [B, S, D]; summed over each modality's tokens = grad of its gate
        grad_gate = []
        for tok, m in token_rows(gate.shape[1], ctx.text_len):
            torch.mul(grad_out[:, tok], g[:, m:m + 1], out=grad_update[:, tok])
            grad_gate.append(grad_times_update[:, tok].sum(1, dtype=torch.float32))
        return grad_out.to(ctx.x_dtype), grad_update, torch.stack(grad_gate, 1).to(gate.dtype), None


def modulated_layer_norm(x, scale, shift, text_len: int, eps: float) -> torch.Tensor:
    """LN(x) (no affine) * scale_m + shift_m for x [B, S, D] and rows [B, M, D]."""
    return _ModulatedLayerNorm.apply(x, scale, shift, text_len, eps)


def gated_residual(x, update, gate, text_len: int) -> torch.Tensor:
    """x + gate_m * update for x, update [B, S, D] and gate rows [B, M, D]."""
    return _GatedResidual.apply(x, update, gate, text_len)


class ExpertAdaLN(nn.Module):
    """norm1 / norm2 of a block: Linear(E -> 3*M*D)(SiLU(temb)) -> (shift, scale, gate) per modality.

    experts=False is the `shared_adaln` ablation (one modulation for both modalities); separate_norms=True
    (the `mmdit` ablation) gives the text tokens their own LayerNorm affine `norm_text`.
    """

    def __init__(self, time_embed_dim: int, hidden_size: int, eps: float, experts: bool = True,
                 separate_norms: bool = False):
        super().__init__()
        if separate_norms and not experts:
            raise ValueError("separate per-modality LayerNorms need per-modality (expert) modulation")
        self.num_rows = 2 if experts else 1
        self.eps = eps
        self.linear = nn.Linear(time_embed_dim, 3 * self.num_rows * hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps)
        self.norm_text = nn.LayerNorm(hidden_size, eps) if separate_norms else None

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, D], SiLU(temb) [B, E] -> (modulated h [B, S, D], gate rows [B, M, D])."""
        mod = self.linear(temb_act).unflatten(1, (self.num_rows, 3, -1))  # [B, M, 3, D]
        shift, scale, gate = mod.unbind(2)  # each [B, M, D]
        weight, bias = self.norm.weight, self.norm.bias
        if self.norm_text is not None:
            weight = torch.stack([weight, self.norm_text.weight])  # [2, D] rows (vision, text)
            bias = torch.stack([bias, self.norm_text.bias])
        scale_eff = weight * (1 + scale)  # LN affine folded into the modulation
        shift_eff = torch.addcmul(shift, bias, 1 + scale)
        return modulated_layer_norm(x, scale_eff, shift_eff, text_len, self.eps), gate


class FinalAdaLN(nn.Module):
    """norm_out: LN(x) * (1 + scale) + shift on the vision tokens, (shift, scale) = Linear(E -> 2D)(SiLU(temb))."""

    def __init__(self, time_embed_dim: int, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(time_embed_dim, 2 * hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps)

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(temb_act)[:, None].chunk(2, dim=-1)  # [B, 1, D] each
        scale_eff = self.norm.weight * (1 + scale)
        shift_eff = torch.addcmul(shift, self.norm.bias, 1 + scale)
        return modulated_layer_norm(x, scale_eff, shift_eff, 0, self.eps)


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """Plain LayerNorm through the functional op (no module hooks on the hot path)."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
