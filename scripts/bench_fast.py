"""The fast modes, measured in one run: for each mode at its recommended setting, seconds per image and the ratio
to the full render on full-size SD 1.5 weights (512 px, 20 steps), the mean pixel difference from the full
render, and the built-in demo model's accuracy on the shapes grammar (scripts/eval_demo.py) with the same flags.

    python scripts/make_random_model.py --arch sd15 /tmp/sd15.safetensors
    python scripts/bench_fast.py /tmp/sd15.safetensors [--size 512] [--steps 20] [--modes full,cache,fast]

Random weights make noise images, so the pixel difference says how far a mode moves the arithmetic, not how
an image looks; the demo's accuracy is the quality measure (a mode that costs more than 3 points on any
attribute is not recommended). Times are single renders after a warm-up, in this process, one after another.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_demo  # noqa: E402

# name -> the generate options it sets (Request fields); "fast" is presets/fast.yaml, read from the file
MODES = {
    "full": {},
    "cache": {"cache_interval": 3, "cache_branch": 6},
    "cfg-cutoff": {"cfg_cutoff": 0.5},
    "ngms": {"skip_uncond_below": 1.0},
    "tome": {"token_merging": 0.5},
    "fast": "preset",
}


def settings(name: str) -> dict:
    if MODES[name] == "preset":
        from sdcli.prompts_file import load_preset

        return {k.replace("-", "_"): v for k, v in load_preset("fast")[0].items()}
    return MODES[name]


def flags(options: dict) -> list[str]:
    return [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def render(engine, options: dict, size: int, steps: int) -> tuple[float, torch.Tensor]:
    from sdcli.batch import Request
    from sdcli.engine import Sampling
    from sdcli.sampling import SAMPLERS
    from sdcli.sampling.fast import fast_modes
    from sdcli.tasks.txt2img import txt2img

    r = dataclasses.replace(Request(steps=steps), **options)
    s = Sampling(r.steps, r.cfg_scale, r.sampler, r.schedule or SAMPLERS[r.sampler].schedule, fast=fast_modes(r))
    start = time.perf_counter()
    image = txt2img(engine, "a photograph of an astronaut riding a horse", s, [1], width=size, height=size,
                    negative_prompt="blurry")[0]
    return time.perf_counter() - start, image.float()


def demo_accuracy(options: dict, prompts: int, seeds: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        records, _ = eval_demo.render(eval_demo.prompts(prompts, 2026), seeds, Path(tmp), None, flags(options))
        right, asked, _ = eval_demo.grade(records)
    return {a: 100 * right[a] / asked[a] for a in eval_demo.ATTRIBUTES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a full-size SD 1.5 single file (scripts/make_random_model.py --arch sd15)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--modes", default=",".join(MODES), help=f"some of {', '.join(MODES)}")
    ap.add_argument("--prompts", type=int, default=40, help="demo prompts (x --seeds images) per mode")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = args.modes.split(",")
    if unknown := [n for n in names if n not in MODES]:
        sys.exit(f"bench_fast.py: unknown mode(s) {', '.join(unknown)}; modes are {', '.join(MODES)}")
    names = ["full"] + [n for n in names if n != "full"]

    from sdcli.engine import Engine
    from sdcli.loading import load_model
    from sdcli.runtime import keep_freed_memory

    keep_freed_memory()  # as the CLI runs
    engine = Engine(load_model(args.model), torch.device("cpu"))
    print(f"{engine.cfg.variant}, {args.size}x{args.size}, {args.steps} steps (the preset's own for fast), "
          f"{args.threads} threads, torch {torch.__version__}; demo: {args.prompts} prompts x {args.seeds} seeds")
    render(engine, {}, args.size, 2)  # warm-up
    print(f"{'mode':<11} {'options':<58} {'s/image':>8} {'ratio':>6} {'pixel diff':>10}   demo accuracy "
          "(background color shape position)")
    full_time = full_image = full_demo = None
    for name in names:
        options = settings(name)
        seconds, image = render(engine, options, args.size, args.steps)
        demo = demo_accuracy(options, args.prompts, args.seeds)
        if name == "full":
            full_time, full_image, full_demo = seconds, image, demo
        diff = (image - full_image).abs().mean().item()
        worst = min(demo[a] - full_demo[a] for a in demo)
        verdict = "" if name == "full" else ("  ok" if worst >= -3 else f"  costs {-worst:.1f} points")
        print(f"{name:<11} {' '.join(flags(options)) or '-':<58} {seconds:8.1f} {seconds / full_time:6.2f} "
              f"{diff:10.2f}   {' '.join(f'{demo[a]:5.1f}' for a in eval_demo.ATTRIBUTES)}{verdict}", flush=True)


if __name__ == "__main__":
    main()
