"""Peak RAM and speed of a full-size SD 1.5 generate with fp32 against fp16 weight storage (models.manual_cast).

Uses (or writes) a random-weight SD 1.5 single file with the real key/shape layout, then in a fresh process per
case loads it (Checkpoint.load, storage float32 or float16), renders one 512 px image with guidance (Euler, CFG
7) as the CLI does (keep_freed_memory), and reports the peak RSS (ru_maxrss: load, encode, denoise and decode)
and the seconds per guided step (the median time between step callbacks, the first step left out):

    python scripts/measure_weights_memory.py [--model FILE] [--dtype fp32|fp16] [--steps 4] [--repeats 2]

Cases alternate (fp32 fp16 fp16 fp32 ...) so that neither order nor a busy moment favours one; the peak is each
side's largest, the step time its smallest median. The two images are compared too (the weights are random, so
the images are noise: the difference is what rounding the weights to fp16 changes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import os
os.environ["HF_HUB_OFFLINE"] = "1"
import json, resource, statistics, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
path, weights, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[5]
from sdcli.engine import Engine, Sampling
from sdcli.loading import open_checkpoint
from sdcli.runtime import keep_freed_memory
from sdcli.tasks.txt2img import txt2img
keep_freed_memory()  # as the CLI runs
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.perf_counter()
model = open_checkpoint(path).load("cpu", storage=torch.float16 if weights == "fp16" else None)
load_s, load_peak = time.perf_counter() - t, peak()
stamps = []
image = txt2img(Engine(model, torch.device("cpu")), "a photograph of an astronaut riding a horse",
                Sampling(steps, 7.0, "euler", "normal"), [42], width=512, height=512, negative_prompt="blurry",
                callback=lambda d: stamps.append(time.perf_counter()))[0]
torch.save(image, out)
intervals = [b - a for a, b in zip(stamps, stamps[1:])]
print(json.dumps({"peak_rss": peak(), "load_peak_rss": load_peak, "load_s": load_s,
                  "step_s": statistics.median(intervals), "steps_s": intervals}))
"""


def measure(path: Path, weights: str, steps: int, threads: int, image: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), weights, str(steps), str(threads), str(image)],
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"measuring {weights} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="an SD 1.5 single file (default: a random one, written once)")
    ap.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="the random file's dtype")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--steps", type=int, default=4, help="Euler steps per image (at least 3)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each case")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    path = args.model or args.dir / f"sdcli-random-sd15-{args.dtype}.safetensors"
    if not path.exists():
        t = time.perf_counter()
        script = Path(__file__).resolve().parent / "make_random_model.py"
        subprocess.run([sys.executable, str(script), str(path), "--arch", "sd15", "--dtype", args.dtype], check=True)
        print(f"wrote {path} in {time.perf_counter() - t:.0f} s")
    with open(path, "rb") as f:  # into the page cache, so that neither case pays for the disk
        while f.read(64 << 20):
            pass

    runs: dict[str, list[dict]] = {"fp32": [], "fp16": []}
    with tempfile.TemporaryDirectory() as tmp:
        images = {w: Path(tmp) / f"{w}.pt" for w in runs}
        for i in range(args.repeats):
            for weights in ("fp32", "fp16") if i % 2 == 0 else ("fp16", "fp32"):
                r = measure(path, weights, args.steps, args.threads, images[weights])
                print(f"  {weights}: peak {r['peak_rss'] / 2**30:.2f} GiB, steps "
                      f"{', '.join(f'{s:.2f}' for s in r['steps_s'])} s", flush=True)
                runs[weights].append(r)
        a, b = (torch.load(images[w]).double() for w in ("fp32", "fp16"))
        diff = float((a - b).abs().max())

    gib = 2**30
    best = {w: {"peak_rss": max(r["peak_rss"] for r in rs), "load_peak_rss": max(r["load_peak_rss"] for r in rs),
                "step_s": min(r["step_s"] for r in rs), "load_s": min(r["load_s"] for r in rs)}
            for w, rs in runs.items()}
    print(f"{path.name} ({path.stat().st_size / gib:.2f} GiB), 512x512, Euler CFG 7, {args.threads} threads, "
          f"torch {torch.__version__}")
    for w, r in best.items():
        print(f"weights {w}: peak RSS {r['peak_rss'] / gib:.2f} GiB (after load {r['load_peak_rss'] / gib:.2f}), "
              f"{r['step_s']:.2f} s per guided step, load {r['load_s']:.1f} s")
    f32, f16 = best["fp32"], best["fp16"]
    print(f"ratio fp16/fp32: peak RSS {f16['peak_rss'] / f32['peak_rss']:.2f}, "
          f"step time {f16['step_s'] / f32['step_s']:.3f}; max pixel difference {diff:.0f}/255")


if __name__ == "__main__":
    main()
