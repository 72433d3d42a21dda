"""Write a random-weight Stable Diffusion checkpoint in the original single-file layout.

    python scripts/make_random_model.py tiny.safetensors              # a few MB, loads in a second
    python scripts/make_random_model.py --arch sd15 sd15-random.safetensors --dtype fp16

For trying the loader without a real model, and for measurements at full size. The images such a
model makes are noise.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

TINY = "tiny"


def architectures():
    from sdcli.config import ARCHITECTURES, ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig

    tiny = ModelConfig(
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
                        cross_attention_only=(False, False), context_dim=64),
        vae=VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
        text=replace(TextEncoderConfig(), width=64, layers=2, heads=1, mlp_width=128),
    )
    return {TINY: tiny, **ARCHITECTURES}


def write(arch: str, out: Path, dtype: str = "fp32", seed: int = 0) -> None:
    import torch
    from safetensors.torch import save_file

    from sdcli.fileio import atomic_path
    from sdcli.loading import original_layout
    from sdcli.models import StableDiffusion

    with torch.device("meta"):
        model = StableDiffusion(architectures()[arch])
    g = torch.Generator().manual_seed(seed)
    target = torch.float16 if dtype == "fp16" else torch.float32
    state = {}
    for key, meta in original_layout(model).items():
        t = torch.randn(meta.shape, generator=g) * 0.02
        if key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "norm_out.weight",
                         "ln_1.weight", "ln_2.weight", "ln_final.weight", "layer_norm1.weight",
                         "layer_norm2.weight", "final_layer_norm.weight", "in_layers.0.weight",
                         "out_layers.0.weight", "out.0.weight")):
            t += 1.0  # normalization gains around 1, so activations keep their scale
        state[key] = t.to(target)
    with atomic_path(out, overwrite=True) as tmp:
        save_file(state, str(tmp))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the .safetensors file to write")
    ap.add_argument("--arch", choices=list(architectures()), default=TINY)
    ap.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    write(args.arch, args.out, args.dtype, args.seed)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB, random {args.arch} weights)")


if __name__ == "__main__":
    main()
