"""A small pre-LayerNorm causal transformer shared by the in-context regression and language
model experiments: learned positional embeddings, multi-head attention, optional MLPs.

Written out in full (no ``nn.TransformerEncoder``) so that attention patterns are easy to read
and so that the model runs under ``torch.func`` (vmap over SGLD chains).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["Block", "CausalSelfAttention", "Transformer"]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t attends to positions ≤ t."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width ({width}) must be a multiple of num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        # (batch, seq, width) -> (batch, heads, seq, head_dim)
        q, k, v = (t.view(batch, seq, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        mask = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        return self.out((weights @ v).transpose(1, 2).reshape(batch, seq, width))


class Block(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x)) when ``mlp`` (attention-only otherwise)."""

    def __init__(self, width: int, num_heads: int, mlp: bool) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, num_heads)
        self.ln_mlp = nn.LayerNorm(width) if mlp else None
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width)) if mlp else None

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_attn(x))
        if self.mlp is not None:
            x = x + self.mlp(self.ln_mlp(x))
        return x


class Transformer(nn.Module):
    """Embedded tokens (batch, seq, width) + positions -> blocks -> final LayerNorm."""

    def __init__(self, width: int, num_layers: int, num_heads: int, max_len: int,
                 mlp: bool = True) -> None:
        super().__init__()
        self.pos = nn.Parameter(0.02 * torch.randn(max_len, width))
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp) for _ in range(num_layers))
        self.ln_out = nn.LayerNorm(width)

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.pos[: h.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.ln_out(h)
