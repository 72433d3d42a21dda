"""Speed of our UNet, VAE decoder and text encoder against diffusers/transformers, same weights, same run.

    python scripts/bench_engine.py [--arch sd15|sd2-768-v] [--latent 32] [--repeats 3]

Builds the full-size architecture with random weights, copies them into the diffusers modules, checks
that both compute the same thing, then times them alternately (median of --repeats, after a warm-up).
A CFG step is one UNet call on batch 2. Ratios below 1 mean sdcli is faster.

Two phases: first with glibc's default allocator behaviour (the modules alone, kernel for kernel),
then after sdcli.runtime.keep_freed_memory(), which the sdcli CLI applies to its process. The last
line compares sdcli as it runs against diffusers as it runs by default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
TABLES = {"sd15": "sd15", "sd2-768-v": "sd2_768v"}


def compare(name: str, ours, theirs, repeats: int) -> tuple[float, float]:
    """Median times, the two implementations alternating so that machine drift hits both alike."""
    with torch.inference_mode():
        a, b = ours(), theirs()  # also the warm-up
        err = (a - b).abs().max().item() / b.abs().max().item()
        times = {ours: [], theirs: []}
        for i in range(repeats):
            for fn in (ours, theirs) if i % 2 == 0 else (theirs, ours):
                t = time.perf_counter()
                fn()
                times[fn].append(time.perf_counter() - t)
        t_ours, t_theirs = statistics.median(times[ours]), statistics.median(times[theirs])
    print(f"{name:<44} sdcli {t_ours:7.3f} s   diffusers {t_theirs:7.3f} s   ratio {t_ours / t_theirs:5.2f}"
          f"   (max rel. difference {err:.1e})")
    return t_ours, t_theirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=list(TABLES), default="sd15")
    ap.add_argument("--latent", type=int, default=32, help="latent size: 32 = 256 px, 64 = 512 px")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from sdcli.config import ARCHITECTURES

    cfg = ARCHITECTURES[args.arch]
    print(f"{args.arch}, latent {args.latent}x{args.latent} ({args.latent * 8} px), {args.threads} threads, "
          f"torch {torch.__version__}")
    bench_unet(cfg, TABLES[args.arch], args)
    bench_vae(cfg, TABLES[args.arch], args)


def randomized(module: torch.nn.Module) -> torch.nn.Module:
    """Random weights scaled so that activations stay finite through the full-size networks."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.normal_(1.0, 0.02)
    return module.eval()


def bench_unet(cfg, table: str, args) -> None:
    from diffusers import UNet2DConditionModel

    from sdcli.loading.keymaps import rename_layout, unet_diffusers_name
    from sdcli.models.unet import UNetModel
    from sdcli.runtime import keep_freed_memory

    unet = randomized(UNetModel(cfg.unet))
    ref = UNet2DConditionModel.from_config(json.loads((DATA / f"{table}.unet_config.json").read_text())).eval()
    names = rename_layout(list(unet.state_dict()), unet_diffusers_name(cfg.unet))
    ref.load_state_dict(names.to_file(unet.state_dict()), strict=True)
    x = torch.randn(2, 4, args.latent, args.latent)
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, cfg.unet.context_dim)

    def ours():
        return unet(x, t, ctx)

    def theirs():
        return ref(x, t, encoder_hidden_states=ctx).sample

    _, theirs_default = compare("UNet, batch 2 (one CFG step), default malloc", ours, theirs, args.repeats)
    applied = keep_freed_memory()
    ours_kept, _ = compare(f"UNet, batch 2, keep_freed_memory={applied}", ours, theirs, args.repeats)
    print(f"{'UNet step: sdcli as the CLI runs it / diffusers default':<44} ratio {ours_kept / theirs_default:5.2f}")


def bench_vae(cfg, table: str, args) -> None:
    from diffusers import AutoencoderKL as DiffusersVAE

    from sdcli.loading.keymaps import rename_layout, vae_diffusers_name
    from sdcli.models.vae import AutoencoderKL

    vae = randomized(AutoencoderKL(cfg.vae))
    ref = DiffusersVAE.from_config(json.loads((DATA / f"{table}.vae_config.json").read_text())).eval()
    state = rename_layout(list(vae.state_dict()), vae_diffusers_name(cfg.vae)).to_file(vae.state_dict())
    shapes = ref.state_dict()
    ref.load_state_dict({k: v.reshape(shapes[k].shape) for k, v in state.items()}, strict=True)
    z = torch.randn(1, 4, args.latent, args.latent)
    compare("VAE decode, batch 1 (both keep_freed_memory)", lambda: vae.decode(z), lambda: ref.decode(z).sample,
            args.repeats)


if __name__ == "__main__":
    main()
