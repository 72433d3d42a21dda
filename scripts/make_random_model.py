"""Write a random-weight Stable Diffusion checkpoint in the original single-file layout.

    python scripts/make_random_model.py tiny.safetensors              # a few MB, loads in a second
    python scripts/make_random_model.py --arch sd15 sd15-random.safetensors --dtype fp16
    python scripts/make_random_model.py --arch sdxl-base sdxl-random.safetensors --dtype fp16  # 6.9 GB

For trying the loader without a real model, and for measurements at full size. The images such a
model makes are noise. Tensors are made and written one at a time, so a full-size SDXL file needs
no more memory than its largest tensor.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

TINY, TINY_XL = "tiny", "tiny-xl"
# original-layout keys of normalization gains: around 1, so that activations keep their scale
GAINS = ("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "norm_out.weight", "ln_1.weight",
         "ln_2.weight", "ln_final.weight", "layer_norm1.weight", "layer_norm2.weight", "final_layer_norm.weight",
         "in_layers.0.weight", "out_layers.0.weight", "out.0.weight")


def architectures():
    from sdcli.config import ARCHITECTURES, ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig

    tiny = ModelConfig(
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
                        cross_attention_only=(False, False), context_dim=64),
        vae=VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
        text=replace(TextEncoderConfig(), width=64, layers=2, heads=1, mlp_width=128),
    )
    # SDXL base's shape (no attention at the first level, per-level depth, 64-wide heads, two encoders joined,
    # pooled text + six 8-wide size embeddings) at a small width
    xl = ARCHITECTURES["sdxl-base"]
    tiny_xl = replace(
        xl, unet=replace(xl.unet, model_channels=64, transformer_depth=(0, 1, 2), middle_depth=2, context_dim=192,
                         adm_in_channels=6 * 8 + 128),
        vae=tiny.vae, text=replace(xl.text, width=64, layers=2, heads=1, mlp_width=128),
        text_2=replace(xl.text_2, width=128, layers=2, heads=2, mlp_width=256, projection_dim=128),
    )
    return {TINY: tiny, TINY_XL: tiny_xl, **ARCHITECTURES}


def write(arch: str, out: Path, dtype: str = "fp32", seed: int = 0) -> None:
    import torch

    from sdcli.fileio import atomic_path
    from sdcli.loading import original_layout
    from sdcli.models import StableDiffusion

    with torch.device("meta"):
        model = StableDiffusion(architectures()[arch])
    shapes = {key: meta.shape for key, meta in original_layout(model).items()}
    g = torch.Generator().manual_seed(seed)
    target = torch.float16 if dtype == "fp16" else torch.float32

    def tensor(key: str):
        t = torch.randn(shapes[key], generator=g) * 0.02
        return (t + 1.0 if key.endswith(GAINS) else t).to(target)

    with atomic_path(out, overwrite=True) as tmp:
        _write_safetensors(tmp, shapes, target, tensor)


def _write_safetensors(path: Path, shapes: dict, dtype, tensor) -> None:
    """A .safetensors file whose tensors `tensor(key)` makes one at a time, in `shapes`' order (the format:
    8-byte header length, JSON header padded to 8 bytes, then the tensors' bytes back to back)."""
    import math

    import torch

    size = torch.empty((), dtype=dtype).element_size()
    header, offset = {}, 0
    for key, shape in shapes.items():
        n = math.prod(shape) * size
        header[key] = {"dtype": {torch.float16: "F16", torch.float32: "F32"}[dtype], "shape": list(shape),
                       "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for key in shapes:
            f.write(memoryview(tensor(key).contiguous().reshape(-1).view(torch.uint8).numpy()))


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
