"""Peak RAM and time of VAE decoding at big sizes, tiled against untiled, with a full-size SD 1.5 VAE.

The VAE has random weights (seeded, the same in every case) and runs on the CPU in fp32 under
torch.inference_mode. Each case decodes a random latent in a fresh process and reports that process's
peak RSS (ru_maxrss), so no case inherits another's allocations:

    python scripts/measure_vae_memory.py                      # tiled 2048 px; untiled and tiled 1024 px
    python scripts/measure_vae_memory.py --cases tiled:2048 untiled:768 --threads 4

A case is MODE:SIZE, a square image side in pixels, MODE "tiled" (sdcli.tiling.decode_tiled with its default
tile) or "untiled" (vae.decode). The untiled decode of 2048 px is not run by default (it needs about 16 GiB
here, more with an attention kernel that materializes its matrix): it is extrapolated from the largest
untiled case (activations grow with the area). When a size is decoded both
ways, the tiled image's difference from the untiled one is reported too (in [-1, 1] image units).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, torch
mode, size, threads, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(threads)
from sdcli.config import VAEConfig
from sdcli.models.vae import AutoencoderKL
from sdcli.tiling import decode_tiled

torch.manual_seed(0)  # the same random VAE and latent in every case
vae = AutoencoderKL(VAEConfig()).eval()
f = vae.cfg.downsample_factor
z = torch.randn(1, vae.cfg.embed_dim, size // f, size // f)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # torch, the VAE and the latent
with torch.inference_mode():
    t = time.perf_counter()
    image = decode_tiled(vae, z) if mode == "tiled" else vae.decode(z)
    seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if out:
    torch.save(image, out)
print(json.dumps({"peak_rss": peak, "base_rss": base, "seconds": seconds}))
"""

GIB = 2**30


def measure(mode: str, size: int, threads: int, out: Path | None) -> dict:
    """Decode one case in a fresh process: its peak and pre-decode RSS (bytes) and decode seconds."""
    args = [sys.executable, "-c", CHILD, mode, str(size), str(threads), str(out or "")]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{mode} {size} px failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_case(text: str) -> tuple[str, int]:
    mode, _, size = text.partition(":")
    if mode not in ("tiled", "untiled") or not size.isdigit() or int(size) % 8:
        raise argparse.ArgumentTypeError(f"expected tiled:SIZE or untiled:SIZE, SIZE a multiple of 8, not {text!r}")
    return mode, int(size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", type=parse_case, metavar="MODE:SIZE",
                    default=[("untiled", 1024), ("tiled", 1024), ("tiled", 2048)])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: this machine's cores")
    args = ap.parse_args()

    import torch

    results = {}
    print(f"SD 1.5 VAE decode, random weights, CPU fp32, {args.threads} threads")
    print(f"{'case':<16} {'peak RSS GiB':>12} {'before GiB':>10} {'seconds':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        both = {size for _, size in args.cases if (("tiled", size) in args.cases and ("untiled", size) in args.cases)}
        for mode, size in args.cases:
            out = Path(tmp) / f"{mode}-{size}.pt" if size in both else None
            r = results[mode, size] = measure(mode, size, args.threads, out)
            print(f"{f'{mode} {size} px':<16} {r['peak_rss'] / GIB:>12.2f} {r['base_rss'] / GIB:>10.2f} "
                  f"{r['seconds']:>8.1f}", flush=True)
        for size in sorted(both):
            untiled = torch.load(Path(tmp) / f"untiled-{size}.pt")
            diff = (torch.load(Path(tmp) / f"tiled-{size}.pt") - untiled).abs()
            print(f"tiled - untiled at {size} px: mean abs {diff.mean():.4f}, max abs {diff.max():.4f} "
                  f"(the untiled image: std {untiled.std():.4f}, mean abs {untiled.abs().mean():.4f})")

    untiled_cases = [(size, r) for (mode, size), r in results.items() if mode == "untiled"]
    if untiled_cases and ("untiled", 2048) not in results:
        size, r = max(untiled_cases, key=lambda item: item[0])
        # what the decode added above the process's baseline grows with the area
        estimate = r["base_rss"] + (r["peak_rss"] - r["base_rss"]) * (2048 / size) ** 2
        print(f"untiled 2048 px, extrapolated from {size} px by area: ~{estimate / GIB:.0f} GiB peak RSS")


if __name__ == "__main__":
    main()
