"""Attention of the expert transformer: joint full 3D attention, or 2D spatial + 1D temporal attention.

Per block: q, k, v = [text'; vision'] W_qkv (one matmul), per-head LayerNorm on q and k (eps 1e-6),
3D RoPE on the vision part of q and k, softmax(q k^T / sqrt(64)) v through SDPA, output projection.

`spatial_temporal` (the paper's 2D+1D ablation) alternates the token grouping block by block, with the same
weights as full attention:
  * spatial blocks (even index): each latent frame attends within itself, together with the text. Every frame's
    sequence is [text; frame t], so vision is conditioned on the prompt in every frame; a text query gets one
    answer per frame, and the text update is their mean over frames.
  * temporal blocks (odd index): each spatial location attends over time ([B*h*w] sequences of T tokens); text
    tokens attend only among themselves there (joining the prompt to every location's sequence would cost
    h*w times the text length per block).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cogvx_train.dit.expert_adaln import no_autocast
from cogvx_train.dit.rope3d import rotate_

ATTENTION_MODES = ("full", "spatial_temporal")


def _modality_blocks(x: torch.Tensor, num_rows: int, text_len: int) -> list[tuple[torch.Tensor, int]]:
    """[(tokens, norm row)]: the whole sequence with row 0, or (vision, row 0) and (text, row 1)."""
    return [(x, 0)] if num_rows == 1 else [(x[:, text_len:], 0), (x[:, :text_len], 1)]


class _QKNormRoPE(torch.autograd.Function):
    """Per-head LayerNorm on q and k, then RoPE on the vision tokens.

    Saves only its inputs (views of the qkv projection, which SDPA keeps alive for v anyway) and the LN
    statistics: backward undoes the rotation (it is orthogonal) and runs the fused LayerNorm-backward kernel.
    """

    @staticmethod
    def forward(ctx, q, k, w_q, b_q, w_k, b_k, rot, text_len: int, eps: float):
        outs, stats = [], []
        with no_autocast(q):
            for x, w, b in ((q, w_q, b_q), (k, w_k, b_k)):
                blocks = _modality_blocks(x, w.shape[0], text_len)
                if len(blocks) == 1:
                    y, mean, rstd = torch.native_layer_norm(x, [x.shape[-1]], w[0].to(x.dtype), b[0].to(x.dtype), eps)
                    stats += [mean, rstd]
                else:
                    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # [B, S, H, hd] contiguous
                    for (xs, m), (ys, _) in zip(blocks, _modality_blocks(y, 2, text_len)):
                        out, mean, rstd = torch.native_layer_norm(xs, [x.shape[-1]], w[m].to(x.dtype),
                                                                  b[m].to(x.dtype), eps)
                        ys.copy_(out)
                        stats += [mean, rstd]
                if rot is not None:
                    rotate_(y[:, text_len:], rot)
                outs.append(y)
        ctx.save_for_backward(q, k, w_q, w_k, rot, *stats)
        ctx.text_len = text_len
        return tuple(outs)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        q, k, w_q, w_k, rot, *stats = ctx.saved_tensors
        text_len, rows = ctx.text_len, w_q.shape[0]
        grads = []
        for x, w, g, x_stats in ((q, w_q, grad_q, stats[:2 * rows]), (k, w_k, grad_k, stats[2 * rows:])):
            if rot is not None:  # undo the rotation on a copy (the incoming gradient is not ours to modify)
                g = g.clone(memory_format=torch.contiguous_format)
                rotate_(g[:, text_len:], rot, inverse=True)
            grad_x = torch.empty(g.shape, dtype=g.dtype, device=g.device) if rows > 1 else None
            grad_w, grad_b = torch.empty_like(w), torch.empty_like(w)
            for i, ((gs, m), (xs, _)) in enumerate(zip(_modality_blocks(g, rows, text_len),
                                                       _modality_blocks(x, rows, text_len))):
                weight = w[m].to(x.dtype)
                gx, grad_w[m], grad_b[m] = torch.ops.aten.native_layer_norm_backward(
                    gs, xs, [x.shape[-1]], x_stats[2 * i], x_stats[2 * i + 1], weight, weight, [True, True, True])
                if grad_x is None:
                    grad_x = gx
                else:
                    _modality_blocks(grad_x, rows, text_len)[i][0].copy_(gx)
            grads += [grad_x, grad_w, grad_b]
        grad_x_q, grad_w_q, grad_b_q, grad_x_k, grad_w_k, grad_b_k = grads
        return grad_x_q, grad_x_k, grad_w_q, grad_b_q, grad_w_k, grad_b_k, None, None, None


def qk_norm_rope(q, k, w_q, b_q, w_k, b_k, rope, text_len: int, eps: float = 1e-6):
    """q, k [B, S, H, hd] -> normalised (and vision-rotated) q, k [B, S, H, hd].

    Norm weights are [M, hd] rows (vision, text) or [1, hd]; rope is the rotation [N, 1, hd/2, 2] (cos, sin) or None.
    """
    return _QKNormRoPE.apply(q, k, w_q, b_q, w_k, b_k, rope, text_len, eps)


def _sdpa(q, k, v):
    """[batch, S, H, hd] inputs -> [batch, S, H, hd] (SDPA wants heads before tokens)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def spatial_attention(q, k, v, text_len: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Every frame attends to [text; its own tokens]. [B, S, H, hd] -> [B, S, H, hd]."""
    b, _, heads, hd = q.shape
    t, h, w = grid

    def per_frame(x):  # [B, L+N, H, hd] -> [B*T, L+h*w, H, hd]
        text = x[:, :text_len, None].expand(b, text_len, t, heads, hd).transpose(1, 2)  # [B, T, L, H, hd]
        vision = x[:, text_len:].unflatten(1, (t, h * w))  # [B, T, h*w, H, hd]
        return torch.cat([text, vision], dim=2).flatten(0, 1)

    out = _sdpa(per_frame(q), per_frame(k), per_frame(v)).unflatten(0, (b, t))  # [B, T, L+h*w, H, hd]
    text_out = out[:, :, :text_len].mean(dim=1)  # [B, L, H, hd]: one answer per frame, averaged
    return torch.cat([text_out, out[:, :, text_len:].flatten(1, 2)], dim=1)


def temporal_attention(q, k, v, text_len: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Every spatial location attends over time; text attends to text. [B, S, H, hd] -> [B, S, H, hd]."""
    b, _, heads, hd = q.shape
    t, h, w = grid

    def per_location(x):  # [B, L+N, H, hd] -> [B*h*w, T, H, hd]
        return x[:, text_len:].unflatten(1, (t, h * w)).transpose(1, 2).flatten(0, 1)

    vision = _sdpa(per_location(q), per_location(k), per_location(v))  # [B*h*w, T, H, hd]
    vision = vision.unflatten(0, (b, h * w)).transpose(1, 2).flatten(1, 2)  # [B, N, H, hd]
    text = _sdpa(q[:, :text_len], k[:, :text_len], v[:, :text_len])  # [B, L, H, hd]
    return torch.cat([text, vision], dim=1)


class JointAttention(nn.Module):
    """attn1 of a block. separate_text=True (the `mmdit` ablation) gives text tokens their own q/k/v/out
    projections and q/k norms (`*_text`); attention itself stays joint."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, separate_text: bool = False):
        super().__init__()
        if hidden_size != num_heads * head_dim:
            raise ValueError(f"hidden size {hidden_size} must equal num_heads * head_dim = {num_heads * head_dim}")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(hidden_size, hidden_size) for _ in range(4))
        self.norm_q, self.norm_k = nn.LayerNorm(head_dim, eps=1e-6), nn.LayerNorm(head_dim, eps=1e-6)
        self.separate_text = separate_text
        if separate_text:
            self.to_q_text, self.to_k_text, self.to_v_text, self.to_out_text = (
                nn.Linear(hidden_size, hidden_size) for _ in range(4))
            self.norm_q_text, self.norm_k_text = nn.LayerNorm(head_dim, eps=1e-6), nn.LayerNorm(head_dim, eps=1e-6)

    def _qkv(self, h: torch.Tensor, suffix: str = "") -> torch.Tensor:
        """[.., D] -> [.., 3D] q|k|v, as one matmul on the concatenated weights. Wrapped projections (LoRA
        adapters, parametrizations) are called instead, so the wrapper applies."""
        projs = [getattr(self, f"to_{n}{suffix}") for n in "qkv"]
        if any(type(p) is not nn.Linear for p in projs):
            return torch.cat([p(h) for p in projs], dim=-1)
        return F.linear(h, torch.cat([p.weight for p in projs]), torch.cat([p.bias for p in projs]))

    def _norm_rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """[M, hd] LayerNorm weight and bias rows (vision, text)."""
        norms = [getattr(self, name)] + ([getattr(self, name + "_text")] if self.separate_text else [])
        return torch.stack([n.weight for n in norms]), torch.stack([n.bias for n in norms])

    def forward(self, h: torch.Tensor, text_len: int, grid: tuple[int, int, int], rope, mode: str) -> torch.Tensor:
        """h [B, L+N, D] -> attention output [B, L+N, D]; mode is "full", "spatial" or "temporal"."""
        b, s, d = h.shape
        if self.separate_text:
            qkv = torch.cat([self._qkv(h[:, :text_len], "_text"), self._qkv(h[:, text_len:])], dim=1)
        else:
            qkv = self._qkv(h)  # [B, S, 3D]
        q, k, v = qkv.view(b, s, 3, self.num_heads, self.head_dim).unbind(2)  # each [B, S, H, hd]
        q, k = qk_norm_rope(q, k, *self._norm_rows("norm_q"), *self._norm_rows("norm_k"), rope, text_len,
                            self.norm_q.eps)
        if mode == "full":
            out = _sdpa(q, k, v)
        elif mode == "spatial":
            out = spatial_attention(q, k, v, text_len, grid)
        elif mode == "temporal":
            out = temporal_attention(q, k, v, text_len, grid)
        else:
            raise ValueError(f"attention mode must be 'full', 'spatial' or 'temporal', got {mode!r}")
        out = out.reshape(b, s, d)  # [B, S, H*hd]
        if self.separate_text:
            return torch.cat([self.to_out_text(out[:, :text_len]), self.to_out(out[:, text_len:])], dim=1)
        return self.to_out(out)
