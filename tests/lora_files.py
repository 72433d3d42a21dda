"""LoRA files for the tiny models, written from the diffusers/transformers reference modules' own names (the
independent side of the tests): kohya-ss's layout, and diffusers' PEFT layout through diffusers itself."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
LOCON = ("conv1", "conv2", "conv_shortcut", "time_emb_proj")  # resnets: 3x3 convolutions among them
TEXT = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def modules(root: torch.nn.Module, endings: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in root.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            and n.endswith(endings)}


def kohya_lora(ref, path: Path, *, rank: int = 4, alpha: float | None = 2.0, seed: int = 0, text: bool = True,
               locon: bool = True, dtype=torch.float32) -> Path:
    """kohya-ss's layout: lora_unet_<diffusers path with _>.lora_down/.lora_up/.alpha, lora_te_<...> for the
    text encoder; LoCon's resnet convolutions (3x3 down, 1x1 up) when `locon`."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    groups = [("lora_unet_", modules(ref.unet, ATTENTION + (LOCON if locon else ())))]
    if text:  # transformers 5 dropped CLIPTextModel's text_model level, which kohya's names have
        groups.append(("lora_te_text_model_", modules(ref.text_encoder, TEXT)))
    for prefix, found in groups:
        for name, m in found.items():
            key = prefix + name.replace(".", "_")
            if isinstance(m, torch.nn.Conv2d):
                down = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g)
                up = torch.randn(m.out_channels, rank, 1, 1, generator=g)
            else:
                down = torch.randn(rank, m.in_features, generator=g)
                up = torch.randn(m.out_features, rank, generator=g)
            fan = down[0].numel()
            state[f"{key}.lora_down.weight"] = (down / fan**0.5).to(dtype)
            state[f"{key}.lora_up.weight"] = (up * 0.3 / rank**0.5).to(dtype)
            if alpha is not None:
                state[f"{key}.alpha"] = torch.tensor(alpha, dtype=dtype)
    save_file(state, str(path), metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
                                          "ss_base_model_version": "sd_v1"})
    return path


def kohya_delta(path: Path, key: str, shape) -> torch.Tensor:
    """The closed form of one kohya module's change: up @ down * alpha / rank, in the weight's shape."""
    from safetensors.torch import load_file

    t = load_file(str(path))
    down, up = t[f"{key}.lora_down.weight"].float(), t[f"{key}.lora_up.weight"].float()
    rank = down.shape[0]
    alpha = float(t[f"{key}.alpha"]) if f"{key}.alpha" in t else rank
    return (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(shape) * alpha / rank


def peft_lora(ref, folder: Path, *, rank: int = 4, alpha: float = 8.0, seed: int = 0, convert: bool = False) -> Path:
    """diffusers' own LoRA file, saved by diffusers from PEFT adapters on copies of the reference modules, with
    alphas in the header: PEFT keys (unet.*.lora_A.weight / text_encoder.*), or with `convert` the older
    diffusers keys its training scripts write (.lora.down.weight, .lora_linear_layer.down.weight)."""
    import copy

    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    unet, text = copy.deepcopy(ref.unet), copy.deepcopy(ref.text_encoder)
    unet_targets, text_targets = ["to_q", "to_k", "to_v", "to_out.0"], ["q_proj", "v_proj"]
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=unet_targets, init_lora_weights=False))
    text_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=text_targets, init_lora_weights=False)
    text = inject_adapter_in_model(text_config, text)  # (transformers' add_adapter wants a newer peft)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (unet, text):
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3 / rank**0.5)
    layers = [get_peft_model_state_dict(unet),
              {k.replace(".default", ""): v for k, v in text.state_dict().items() if "lora_" in k}]
    if convert:
        layers = [convert_state_dict_to_diffusers(state) for state in layers]
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=layers[0], text_encoder_lora_layers=layers[1],
        unet_lora_adapter_metadata={"r": rank, "lora_alpha": alpha, "target_modules": unet_targets},
        text_encoder_lora_adapter_metadata={"r": rank, "lora_alpha": alpha, "target_modules": text_targets},
        safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


# --- one-module files for the checks (module names of the tiny SD 1.x) ---------------------------------------

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # a [32, 32] weight
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # a [32, 32, 3, 3] weight


def module_file(path: Path, tensors: dict[str, torch.Tensor], module: str = Q, metadata=None) -> Path:
    """A LoRA of one module: `tensors` by their name after "<module>." (lora_down.weight, hada_w1_a, alpha)."""
    save_file({f"{module}.{k}": v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def factors(rank: int = 4, out: int = 32, inputs: int = 32, seed: int = 0, alpha: float = 2.0) -> dict:
    """A plain LoRA's well-formed tensors for an [out, inputs] weight (change values about 0.01)."""
    g = torch.Generator().manual_seed(seed)
    return {"lora_down.weight": torch.randn(rank, inputs, generator=g) * 0.1,
            "lora_up.weight": torch.randn(out, rank, generator=g) * 0.1, "alpha": torch.tensor(alpha)}
