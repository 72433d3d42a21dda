"""How our module keys (= original LDM keys) are named in other layouts.

A Layout turns a state dict keyed by our module names into the file's keys and back. Original
single files are a prefix away from our names; diffusers folders and OpenCLIP text encoders are
renamed by rules derived from the architecture config (no per-key tables).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from sdcli.config import UNetConfig, VAEConfig

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Layout:
    to_file: Callable[[State], State]  # our keys -> the file's keys (also used for exports)
    from_file: Callable[[State], State]  # the file's keys -> our keys


def rename_layout(our_keys, file_key: Callable[[str], str]) -> Layout:
    names = {k: file_key(k) for k in our_keys}
    ours = {v: k for k, v in names.items()}
    return Layout(
        to_file=lambda state: {names[k]: v for k, v in state.items()},
        from_file=lambda state: {ours[k]: v for k, v in state.items()},
    )


def _rename_blocks(key: str, blocks: dict[str, str], inner: dict[str, str]) -> str:
    """Replace the longest block prefix of `key` found in `blocks`, then an inner-layer prefix."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:n]) + "."
        if prefix in blocks:
            rest = key[len(prefix) :]
            for old, new in inner.items():
                if rest.startswith(old):
                    rest = new + rest[len(old) :]
                    break
            return blocks[prefix] + rest
    return key


# --- UNet: LDM <-> diffusers -------------------------------------------------------------------

_RESNET_INNER = {
    "in_layers.0.": "norm1.", "in_layers.2.": "conv1.", "emb_layers.1.": "time_emb_proj.",
    "out_layers.0.": "norm2.", "out_layers.3.": "conv2.", "skip_connection.": "conv_shortcut.",
}


def unet_diffusers_blocks(cfg: UNetConfig) -> dict[str, str]:
    """Block prefixes, LDM -> diffusers, for this architecture."""
    L, n = cfg.num_res_blocks, len(cfg.channel_mult)
    blocks = {
        "time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
        "label_emb.": "class_embedding.", "input_blocks.0.0.": "conv_in.",
        "middle_block.0.": "mid_block.resnets.0.", "middle_block.1.": "mid_block.attentions.0.",
        "middle_block.2.": "mid_block.resnets.1.", "out.0.": "conv_norm_out.", "out.2.": "conv_out.",
    }
    if cfg.adm_in_channels:  # SDXL's added conditioning MLP, not the x4 upscaler's class embedding
        del blocks["label_emb."]
        blocks |= {"label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2."}
    for i in range(n):
        for j in range(L):
            blocks[f"input_blocks.{i * (L + 1) + j + 1}.0."] = f"down_blocks.{i}.resnets.{j}."
            if cfg.attention_levels[i]:
                blocks[f"input_blocks.{i * (L + 1) + j + 1}.1."] = f"down_blocks.{i}.attentions.{j}."
        if i < n - 1:
            blocks[f"input_blocks.{(i + 1) * (L + 1)}.0.op."] = f"down_blocks.{i}.downsamplers.0.conv."
    for i in range(n):  # diffusers up block i works at level n-1-i; it has L+1 resnets
        level = n - 1 - i
        for j in range(L + 1):
            blocks[f"output_blocks.{i * (L + 1) + j}.0."] = f"up_blocks.{i}.resnets.{j}."
            if cfg.attention_levels[level]:
                blocks[f"output_blocks.{i * (L + 1) + j}.1."] = f"up_blocks.{i}.attentions.{j}."
        if level > 0:
            slot = 2 if cfg.attention_levels[level] else 1
            blocks[f"output_blocks.{i * (L + 1) + L}.{slot}.conv."] = f"up_blocks.{i}.upsamplers.0.conv."
    return blocks


def unet_diffusers_name(cfg: UNetConfig) -> Callable[[str], str]:
    blocks = unet_diffusers_blocks(cfg)
    return lambda key: _rename_blocks(key, blocks, _RESNET_INNER)


# --- VAE: LDM <-> diffusers --------------------------------------------------------------------

_VAE_INNER = {
    "nin_shortcut.": "conv_shortcut.",
    # mid attention (its 1x1-conv weights are Linear [C, C] in diffusers: shapes are reconciled on load)
    "norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0.",
}


def vae_diffusers_blocks(cfg: VAEConfig) -> dict[str, str]:
    n, L = len(cfg.ch_mult), cfg.num_res_blocks
    blocks = {}
    for i in range(n):
        for j in range(L):
            blocks[f"encoder.down.{i}.block.{j}."] = f"encoder.down_blocks.{i}.resnets.{j}."
        blocks[f"encoder.down.{i}.downsample.conv."] = f"encoder.down_blocks.{i}.downsamplers.0.conv."
        # the decoder's levels are stored deepest-last in LDM, deepest-first in diffusers
        for j in range(L + 1):
            blocks[f"decoder.up.{n - 1 - i}.block.{j}."] = f"decoder.up_blocks.{i}.resnets.{j}."
        blocks[f"decoder.up.{n - 1 - i}.upsample.conv."] = f"decoder.up_blocks.{i}.upsamplers.0.conv."
    for part in ("encoder", "decoder"):
        blocks[f"{part}.mid.block_1."] = f"{part}.mid_block.resnets.0."
        blocks[f"{part}.mid.attn_1."] = f"{part}.mid_block.attentions.0."
        blocks[f"{part}.mid.block_2."] = f"{part}.mid_block.resnets.1."
        blocks[f"{part}.norm_out."] = f"{part}.conv_norm_out."
    return blocks


def vae_diffusers_name(cfg: VAEConfig) -> Callable[[str], str]:
    blocks = vae_diffusers_blocks(cfg)
    return lambda key: _rename_blocks(key, blocks, _VAE_INNER)


# --- Text encoder: CLIP (transformers) <-> OpenCLIP ----------------------------------------------

_CLIP = "transformer.text_model."
_OPENCLIP_NAMES = [  # (CLIPTextModel name, OpenCLIP name) with {n} the layer index
    ("embeddings.token_embedding.weight", "token_embedding.weight"),
    ("embeddings.position_embedding.weight", "positional_embedding"),
    ("final_layer_norm.", "ln_final."),
    ("encoder.layers.{n}.layer_norm1.", "transformer.resblocks.{n}.ln_1."),
    ("encoder.layers.{n}.layer_norm2.", "transformer.resblocks.{n}.ln_2."),
    ("encoder.layers.{n}.self_attn.out_proj.", "transformer.resblocks.{n}.attn.out_proj."),
    ("encoder.layers.{n}.mlp.fc1.", "transformer.resblocks.{n}.mlp.c_fc."),
    ("encoder.layers.{n}.mlp.fc2.", "transformer.resblocks.{n}.mlp.c_proj."),
]
_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")


def _openclip_name(key: str) -> str:
    if not key.startswith(_CLIP):  # text_projection, logit_scale
        return key
    key = key[len(_CLIP) :]
    for ours, theirs in _OPENCLIP_NAMES:
        pattern = "^" + re.escape(ours).replace(r"\{n\}", r"(?P<n>\d+)")
        m = re.match(pattern, key)
        if m:
            return theirs.format(**m.groupdict()) + key[m.end() :]
    raise KeyError(f"no OpenCLIP name for {key}")


def openclip_layout(our_keys, prefix: str) -> Layout:
    """OpenCLIP stores q, k and v fused as in_proj [3C, C]; everything else is a rename."""
    plain = [k for k in our_keys if not _QKV.search(k)]
    names = {k: prefix + _openclip_name(k) for k in plain}
    ours = {v: k for k, v in names.items()}

    def to_file(state: State) -> State:
        out = {names[k]: v for k, v in state.items() if k in names}
        for k in state:
            m = _QKV.search(k)
            if m and m.group(2) == "q":
                layer, kind = m.group(1), m.group(3)
                parts = [state[k.replace(f".q_proj.{kind}", f".{x}_proj.{kind}")] for x in "qkv"]
                out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(parts)
        return out

    def from_file(state: State) -> State:
        out = {}
        for k, v in state.items():
            m = _IN_PROJ.search(k)
            if m:
                layer, kind = m.groups()
                for x, part in zip("qkv", v.chunk(3), strict=True):  # views, no copy
                    out[f"{_CLIP}encoder.layers.{layer}.self_attn.{x}_proj.{kind}"] = part
            else:
                out[ours[k]] = v
        return out

    return Layout(to_file, from_file)
