"""The UNet's spatial transformer, named as in the LDM checkpoints (`proj_in`, `transformer_blocks`...)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        # [B, N, heads*d] -> [B, heads, N, d]
        q, k, v = (
            t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)
            for t in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, cross_only: bool, dropout: float):
        super().__init__()
        self.cross_only = cross_only  # x4 upscaler: attn1 attends to the text as well
        self.attn1 = CrossAttention(dim, context_dim if cross_only else dim, heads, head_dim, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        # models.tome's TokenMerging while a run merges tokens here (not a module: no weights, no state)
        self.token_merging = None

    def forward(self, x: torch.Tensor, context: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """x [B, h*w, dim] (`size` = (h, w)), context [B, T, context_dim] -> [B, h*w, dim]."""
        self_context = context if self.cross_only else None
        if self.token_merging is None:
            x = x + self.attn1(self.norm1(x), self_context)
        else:  # ToMe: attn1 on fewer tokens, each merged one's output copied back to the tokens it stood for
            merge, unmerge = self.token_merging.matching(x, size)
            x = x + unmerge(self.attn1(merge(self.norm1(x)), self_context))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(
        self, channels: int, heads: int, head_dim: int, depth: int, context_dim: int,
        use_linear: bool, cross_only: bool = False, dropout: float = 0.0,
    ):
        super().__init__()
        inner = heads * head_dim
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        # SD 1.x projects with 1x1 convs, SD 2.x with Linear layers: same maths, different weight shapes.
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, context_dim, cross_only, dropout) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        # [B, C, H, W] -> [B, HW, C], copied once to contiguous: a strided view here would send a
        # channels-last layout on to the convolutions that follow.
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context, (h, w))
        if self.use_linear:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()  # [B, HW, C] -> [B, C, H, W]
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in
