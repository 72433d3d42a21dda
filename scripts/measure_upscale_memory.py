"""Peak RAM and time of one guided denoising step of an upscale, tiled (sdcli.sampling.denoisers.TiledDenoiser)
against untiled, with a full-size SD 1.5 UNet.

The UNet has random weights (seeded) and runs on the CPU in fp32 under torch.inference_mode; one step is
one classifier-free-guided denoiser call (the conditional and unconditional passes batched), as every
sampler step of `sdcli upscale` and of the hires fix makes. Each case runs in a fresh process and reports
that process's peak RSS (ru_maxrss) above what it held before the step (torch and the UNet's weights):

    python scripts/measure_upscale_memory.py                  # 1024 px untiled; 1024 and 2048 px in 512 px tiles
    python scripts/measure_upscale_memory.py --cases tiled:4096 --tile 512 --overlap 128 --threads 4

A case is MODE:SIZE, a square output side in pixels, MODE "tiled" (tiles of --tile px overlapping by
--overlap px) or "untiled". The VAE's part of an upscale is tiled separately (scripts/measure_vae_memory.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
mode, size, tile, overlap, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
from sdcli.conditioning import Conditioning
from sdcli.config import NoiseSchedule, UNetConfig
from sdcli.models.unet import UNetModel
from sdcli.sampling import CFGDenoiser, Denoiser, DiscreteSigmas
from sdcli.sampling.denoisers import TiledDenoiser

torch.manual_seed(0)
unet = UNetModel(UNetConfig()).eval()
denoiser = CFGDenoiser(Denoiser(unet, DiscreteSigmas(NoiseSchedule()), "eps"))
model = TiledDenoiser(denoiser, tile // 8, overlap // 8) if mode == "tiled" else denoiser
x = torch.randn(1, 4, size // 8, size // 8)
cond, uncond = Conditioning(torch.randn(1, 77, 768)), Conditioning(torch.randn(1, 77, 768))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
with torch.inference_mode():
    t = time.perf_counter()
    model(x, torch.tensor([2.0]), cond=cond, uncond=uncond, cond_scale=7.0)
    seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_rss": peak, "base_rss": base, "seconds": seconds}))
"""

GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["untiled:1024", "tiled:1024", "tiled:2048"])
    parser.add_argument("--tile", type=int, default=512, help="tile side in output px")
    parser.add_argument("--overlap", type=int, default=128, help="tile overlap in output px")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(f"SD 1.5 UNet, fp32 CPU, {args.threads} threads, one CFG step; tiles {args.tile} px overlapping "
          f"{args.overlap} px")
    print(f"{'case':<14} {'peak RSS':>10} {'step memory':>12} {'seconds':>8}")
    for case in args.cases:
        mode, _, size = case.partition(":")
        if mode not in ("tiled", "untiled") or not size.isdigit() or int(size) % 8:
            sys.exit(f"bad case {case!r}: write MODE:SIZE, MODE tiled or untiled, SIZE a multiple of 8")
        proc = subprocess.run([sys.executable, "-c", CHILD, mode, size, str(args.tile), str(args.overlap),
                               str(args.threads)], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{case} failed:\n{proc.stderr[-2000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{case:<14} {r['peak_rss'] / GIB:>8.2f} GiB {(r['peak_rss'] - r['base_rss']) / GIB:>8.2f} GiB "
              f"{r['seconds']:>8.1f}")


if __name__ == "__main__":
    main()
