"""The CLIP text transformer, with transformers' CLIPTextModel's module names (so its state-dict keys, LoRA
names and checkpoints are those of every Hugging Face CLIP text model) and its arithmetic, without importing
transformers (3-4 s of every start-up; tests/test_clip.py checks the outputs against transformers' model).

    model = CLIPTextTransformer(cfg)              # embeddings, encoder.layers.N, final_layer_norm
    h = model.run(model.embeddings(ids), 0, n)   # [B, T, width]: the raw output of layers 0..n-1
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdcli.architecture import TextEncoderConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation (transformers' QuickGELUActivation)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, width]
        # positions 0..T-1 are the table's first T rows: no position_ids buffer to rebuild after a meta build
        tokens = self.token_embedding(ids)
        return tokens + self.position_embedding.weight[:ids.shape[-1]].to(tokens.dtype)


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (width // heads) ** -0.5
        self.k_proj, self.v_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.q_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, width], causal
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)  # [B, heads, T, d]
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.fc1, self.fc2 = nn.Linear(cfg.width, cfg.mlp_width), nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg.width, cfg.heads)
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(cfg.width), nn.LayerNorm(cfg.width)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pre-norm residual blocks
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width)
        self.init_weights(cfg)

    def init_weights(self, cfg: TextEncoderConfig) -> None:
        """CLIP's initialisation, as transformers' CLIPTextModel draws it: a text encoder trained from scratch
        (train-unet without --init) starts where it did. Biases 0, norms 1."""
        in_std, width_std = (cfg.width ** -0.5) * ((2 * cfg.layers) ** -0.5), cfg.width ** -0.5
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for emb in (self.embeddings.token_embedding, self.embeddings.position_embedding):
            nn.init.normal_(emb.weight, std=0.02)
        for layer in self.encoder.layers:
            a, mlp = layer.self_attn, layer.mlp
            for proj, std in ((a.q_proj, in_std), (a.k_proj, in_std), (a.v_proj, in_std), (a.out_proj, width_std),
                              (mlp.fc1, (2 * cfg.width) ** -0.5), (mlp.fc2, in_std)):
                nn.init.normal_(proj.weight, std=std)

    def run(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Layers start..stop-1 on h [B, T, width] (layer `start`'s input)."""
        for layer in self.encoder.layers[start:stop]:
            h = layer(h)
        return h
