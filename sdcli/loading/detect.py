"""Architecture configs from what a checkpoint holds: tensor shapes (single files) or diffusers configs."""

from __future__ import annotations

import re

from sdcli.architecture import MAX_WIDTH
from sdcli.config import NoiseSchedule, TextEncoderConfig, UNetConfig, VAEConfig
from sdcli.errors import ModelLoadError, shown
from sdcli.loading.settings import FLAG, REQUIRED, Settings, field_of, integer, number, text

Shapes = dict[str, tuple[int, ...]]  # keys relative to the component (prefix removed)


class Unsupported(ValueError):
    """Shapes that say an architecture sdcli cannot build; the message says why, for the file's error."""


def _count(shapes: Shapes, pattern: str) -> int:
    """How many distinct indices N appear where `pattern` has {n}."""
    rx = re.compile("^" + re.escape(pattern).replace(r"\{n\}", r"(\d+)") + r"\.")
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def unet_from_shapes(s: Shapes) -> UNetConfig:
    mc = s["input_blocks.0.0.weight"][0]
    n_blocks = _count(s, "input_blocks.{n}")
    downs = [i for i in range(n_blocks) if f"input_blocks.{i}.0.op.weight" in s]
    L = downs[0] - 1 if downs else n_blocks - 1
    levels = len(downs) + 1
    first = [lv * (L + 1) + 1 for lv in range(levels)]  # first resnet block of each level
    widths = [s[f"input_blocks.{b}.0.out_layers.3.weight"][0] for b in first]
    attention = tuple(f"input_blocks.{b}.1.proj_in.weight" in s for b in first)
    mid = "middle_block.1."
    context_dim = s[mid + "transformer_blocks.0.attn2.to_k.weight"][1]
    cross_only = tuple(
        att and s[f"input_blocks.{b}.1.transformer_blocks.0.attn1.to_k.weight"][1] != w
        for b, w, att in zip(first, widths, attention, strict=True)
    )
    num_classes = s["label_emb.weight"][0] if "label_emb.weight" in s else 0
    adm_in_channels = s["label_emb.0.0.weight"][1] if "label_emb.0.0.weight" in s else 0
    depth = tuple(_count(s, f"input_blocks.{b}.1.transformer_blocks.{{n}}") if att else 0
                  for b, att in zip(first, attention, strict=True))
    use_linear = len(s[mid + "proj_in.weight"]) == 2
    # Heads are not in the shapes. SD 2.x (linear projections) uses 64-wide heads; SD 1.x and the
    # x4 upscaler use 8 heads.
    head_dim = 64 if use_linear and not num_classes else 0
    attended = [w for w, att in zip(widths, attention, strict=True) if att] + [widths[-1]]  # + the middle block
    if head_dim and any(w % head_dim for w in attended):
        raise Unsupported(f"the UNet's widths {widths} do not fit the {head_dim}-wide attention heads that its "
                          "linear projections say (SD 2.x, SDXL): not a checkpoint sdcli can load")
    return UNetConfig(
        in_channels=s["input_blocks.0.0.weight"][1],
        out_channels=s["out.2.weight"][0],
        model_channels=mc,
        channel_mult=tuple(w // mc for w in widths),
        num_res_blocks=L,
        transformer_depth=depth,
        middle_depth=_count(s, mid + "transformer_blocks.{n}"),
        num_heads=8,
        head_dim=head_dim,
        context_dim=context_dim,
        use_linear_projection=use_linear,
        cross_attention_only=cross_only,
        num_classes=num_classes,
        adm_in_channels=adm_in_channels,
    )


# (levels, first resnet of level {i}, resnets of level 0) as LDM and diffusers name them
_VAE_NAMES = {
    "ldm": ("encoder.down.{n}", "encoder.down.{i}.block.0", "encoder.down.0.block.{n}"),
    "diffusers": ("encoder.down_blocks.{n}", "encoder.down_blocks.{i}.resnets.0", "encoder.down_blocks.0.resnets.{n}"),
}


def vae_from_shapes(s: Shapes, names: str = "ldm") -> VAEConfig:
    levels_at, first_resnet, resnets_at = _VAE_NAMES[names]
    ch = s["encoder.conv_in.weight"][0]
    levels = _count(s, levels_at)
    return VAEConfig(
        in_channels=s["encoder.conv_in.weight"][1],
        out_channels=s["decoder.conv_out.weight"][0],
        ch=ch,
        ch_mult=tuple(s[first_resnet.format(i=i) + ".conv2.weight"][0] // ch for i in range(levels)),
        num_res_blocks=_count(s, resnets_at),
        z_channels=s["decoder.conv_in.weight"][1],
        embed_dim=s["post_quant_conv.weight"][1],
    )


def clip_text_from_shapes(s: Shapes) -> TextEncoderConfig:
    """OpenAI CLIP layout (keys under text_model.); CLIP text towers use 64-wide heads."""
    width = s["text_model.embeddings.token_embedding.weight"][1]
    return TextEncoderConfig(
        vocab_size=s["text_model.embeddings.token_embedding.weight"][0],
        width=width,
        layers=_count(s, "text_model.encoder.layers.{n}"),
        heads=max(width // 64, 1),
        mlp_width=s["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        max_positions=s["text_model.embeddings.position_embedding.weight"][0],
    )


def openclip_text_from_shapes(s: Shapes) -> TextEncoderConfig:
    """OpenCLIP layout (SD 2.x): gelu, conditioning on the penultimate layer, padding with '!'."""
    width = s["token_embedding.weight"][1]
    return TextEncoderConfig(
        layout="openclip",
        vocab_size=s["token_embedding.weight"][0],
        width=width,
        layers=_count(s, "transformer.resblocks.{n}"),
        heads=max(width // 64, 1),
        mlp_width=s["transformer.resblocks.0.mlp.c_fc.weight"][0],
        max_positions=s["positional_embedding"][0],
        activation="gelu",
        skip_last_layers=1,
        pad_token="!",
        projection_dim=s["text_projection"][1] if "text_projection" in s else 0,
    )


# --- diffusers configs ---------------------------------------------------------------------------


def _unsupported(source: str, what: str) -> ModelLoadError:
    return ModelLoadError(f"{source}: unsupported {what}; sdcli loads Stable Diffusion 1.x/2.x UNets and VAEs")


def unet_from_diffusers(c: dict, source: str) -> UNetConfig:
    """A UNet2DConditionModel config (read from `source`, named in errors): every value checked first."""
    s = Settings(c, source)
    for key in ("class_embed_type", "time_cond_proj_dim", "encoder_hid_dim"):
        if c.get(key) is not None:
            raise _unsupported(source, f"UNet option {key}={shown(c[key])}")
    adm = 0  # SDXL's added conditioning: the pooled text vector and the size embeddings, one vector
    if s.get("addition_embed_type", text("text_time"), None, null=True):
        adm = s.get("projection_class_embeddings_input_dim", field_of(UNetConfig, "adm_in_channels"))
    widths = s.levels("block_out_channels", field_of(UNetConfig, "model_channels"))
    n, mc = len(widths), widths[0]
    groups = s.get("norm_num_groups", integer(1, MAX_WIDTH), 32, null=True)
    if groups != 32 or any(w % mc for w in widths):
        raise _unsupported(source, f"UNet widths {list(widths)} / norm groups {groups}")
    attention = tuple("CrossAttn" in t for t in s.levels("down_block_types", text(), count=n))
    # diffusers' "attention_head_dim" is historically the number of heads
    heads_key = "num_attention_heads" if c.get("num_attention_heads") is not None else "attention_head_dim"
    heads = s.levels(heads_key, field_of(UNetConfig, "num_heads"), (8,) * n, count=n, scalar=True)
    # + the middle block's, which diffusers gives the last level's heads (with or without attention there)
    dims = {w // h for w, h, a in zip(widths, heads, attention, strict=True) if a} | {widths[-1] // heads[-1]}
    if len(set(heads)) == 1:
        num_heads, head_dim = heads[0], 0
    elif len(dims) == 1:
        num_heads, head_dim = 8, dims.pop()
    else:
        raise _unsupported(source, f"attention heads {list(heads)}")
    depth = s.levels("transformer_layers_per_block", field_of(UNetConfig, "middle_depth"), (1,) * n, count=n,
                     scalar=True, null=True)
    # the up blocks mirror the down blocks' depths unless the config says otherwise
    up = s.levels("reverse_transformer_layers_per_block", field_of(UNetConfig, "middle_depth"), depth[::-1],
                  count=n, scalar=True, null=True)
    if list(up) != list(depth[::-1]):
        raise _unsupported(source, f"reverse_transformer_layers_per_block={list(up)}")
    cross_only = s.levels("only_cross_attention", FLAG, (False,) * n, count=n, scalar=True, null=True)
    return UNetConfig(
        in_channels=s.get("in_channels", field_of(UNetConfig, "in_channels")),
        out_channels=s.get("out_channels", field_of(UNetConfig, "out_channels")),
        model_channels=mc,
        channel_mult=tuple(w // mc for w in widths),
        num_res_blocks=s.get("layers_per_block", field_of(UNetConfig, "num_res_blocks")),
        transformer_depth=tuple(d if a else 0 for d, a in zip(depth, attention, strict=True)),
        middle_depth=depth[-1],
        num_heads=num_heads,
        head_dim=head_dim,
        context_dim=s.get("cross_attention_dim", field_of(UNetConfig, "context_dim")),
        use_linear_projection=s.get("use_linear_projection", FLAG, False, null=True),
        cross_attention_only=tuple(x and a for x, a in zip(cross_only, attention, strict=True)),
        num_classes=s.get("num_class_embeds", field_of(UNetConfig, "num_classes"), 0, null=True),
        adm_in_channels=adm,
    )


def vae_from_diffusers(c: dict, source: str) -> VAEConfig:
    """An AutoencoderKL config (read from `source`, named in errors): every value checked first."""
    s = Settings(c, source)
    widths = s.levels("block_out_channels", field_of(VAEConfig, "ch"))
    groups = s.get("norm_num_groups", integer(1, MAX_WIDTH), 32, null=True)
    if groups != 32 or any(w % widths[0] for w in widths):
        raise _unsupported(source, f"VAE widths {list(widths)} / norm groups {groups}")
    if not s.get("use_quant_conv", FLAG, True, null=True) or not s.get("use_post_quant_conv", FLAG, True, null=True):
        raise _unsupported(source, "VAE without quant convs")
    latents = s.get("latent_channels", field_of(VAEConfig, "embed_dim"), 4)
    return VAEConfig(
        in_channels=s.get("in_channels", field_of(VAEConfig, "in_channels"), 3),
        out_channels=s.get("out_channels", field_of(VAEConfig, "out_channels"), 3),
        ch=widths[0],
        ch_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=s.get("layers_per_block", field_of(VAEConfig, "num_res_blocks"), 2),
        z_channels=latents,
        embed_dim=latents,
    )


def text_from_diffusers(c: dict, source: str, pad_token: str) -> TextEncoderConfig:
    """A CLIPTextModel config (read from `source`, named in errors): every value checked first."""
    s, default = Settings(c, source), TextEncoderConfig()

    def read(key: str, name: str, fallback=REQUIRED):
        return s.get(key, field_of(TextEncoderConfig, name), fallback)

    return TextEncoderConfig(
        vocab_size=read("vocab_size", "vocab_size", default.vocab_size),
        width=read("hidden_size", "width"),
        layers=read("num_hidden_layers", "layers"),
        heads=read("num_attention_heads", "heads"),
        mlp_width=read("intermediate_size", "mlp_width"),
        max_positions=read("max_position_embeddings", "max_positions", default.max_positions),
        activation=s.get("hidden_act", text(*TextEncoderConfig.ACTIVATIONS), default.activation),
        pad_token=pad_token,
    )


# scheduler options that change the training schedule itself, and their value when they do not
_SCHEDULE_CHANGES = {"trained_betas": None, "rescale_betas_zero_snr": False}
SCHEDULE_KEYS = ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps")


def schedule_from_diffusers(c: dict, source: str) -> NoiseSchedule:
    """A scheduler config's training schedule (read from `source`, named in errors); what it does not say is
    NoiseSchedule's default (SD's scaled_linear 0.00085-0.012 over 1000 steps)."""
    s, default = Settings(c, source), NoiseSchedule()
    for key, off in _SCHEDULE_CHANGES.items():  # they change the training schedule: ignoring them is wrong
        if c.get(key, off) not in (off, None):
            raise s.error(f"{key} is {shown(c[key])}: sdcli cannot use a schedule changed that way (it builds "
                          "the betas from beta_schedule, beta_start, beta_end and num_train_timesteps only)")
    return NoiseSchedule(
        beta_schedule=s.get("beta_schedule", text(*NoiseSchedule.SCHEDULES), default.beta_schedule),
        beta_start=s.get("beta_start", number(0, 1), default.beta_start),
        beta_end=s.get("beta_end", number(0, 1), default.beta_end),
        num_train_timesteps=s.get("num_train_timesteps", field_of(NoiseSchedule, "num_train_timesteps"),
                                  default.num_train_timesteps),
    )
