"""Grade a model on the shapes grammar: render random grammar prompts with `sdcli generate` and check every
image by pixel analysis (see shapes.analyze).

    python scripts/eval_demo.py                       # the built-in demo model at its default settings
    python scripts/eval_demo.py --model runs/demo/unet --prompts 20 --seeds 2 -- --steps 10

Prints the accuracy per attribute (background colour, object colour, shape; position over the prompts that
name one) and the time per image: as `sdcli generate` reports it (rendering), and the whole command's wall
time divided by the images (start-up and model load included). --check exits 1 below the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import analyze, caption, parse, sample  # noqa: E402

ATTRIBUTES = ("background", "color", "shape", "position")
TARGETS = {"background": 0.90, "color": 0.90, "shape": 0.90, "position": 0.80}
MAX_SECONDS = 3.0  # per image, on the 2-core CPU the demo targets


def prompts(n: int, seed: int) -> list[str]:
    """n different grammar sentences, combinations drawn at random; half of them name a position."""
    rng, chosen = random.Random(seed), []
    while len(chosen) < n:
        text = caption(sample(rng, p_position=0.5))
        if text not in chosen:
            chosen.append(text)
    return chosen


def render(lines: list[str], seeds: int, out: Path, model: str | None, extra: list[str]) -> tuple[list[dict], float]:
    """Render every prompt with seeds 1..seeds in one `sdcli generate --from-file` run -> (JSON records, wall s)."""
    prompts_file = out / "prompts.txt"
    prompts_file.write_text("".join(f"{p} --seed 1 --n-images {seeds}\n" for p in lines))
    command = [sys.executable, "-m", "sdcli", "generate", "--from-file", str(prompts_file),
               "-o", str(out / "{index}-{seed}.png"), "--json", "--quiet", *extra]  # prompts' slugs can collide
    if model:
        command += ["--model", model]
    start = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "SDCLI_MODEL"}  # no --model: the demo, whatever is set
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"eval_demo.py: {' '.join(command)} failed:\n{done.stderr.strip()}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")], wall


def grade(records: list[dict]) -> tuple[Counter, Counter, list[str]]:
    """-> (right, asked, failures) per attribute."""
    right, asked, failures = Counter(), Counter(), []
    for r in records:
        want, got = parse(r["prompt"]), analyze_file(r["path"])
        wrong = []
        for attr in ATTRIBUTES:
            if want[attr] is None:  # no position named
                continue
            asked[attr] += 1
            right[attr] += got[attr] == want[attr]
            if got[attr] != want[attr]:
                wrong.append(f"{attr} {got[attr]}")
        if wrong:
            failures.append(f"{Path(r['path']).name}: {', '.join(wrong)}")
    return right, asked, failures


def analyze_file(path: str) -> dict:
    from PIL import Image

    with Image.open(path) as image:
        return analyze(image)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="default: the built-in demo model ($SDCLI_MODEL is ignored)")
    ap.add_argument("--prompts", type=int, default=40, help="different prompts")
    ap.add_argument("--seeds", type=int, default=3, help="images per prompt (seeds 1, 2, ...)")
    ap.add_argument("--seed", type=int, default=2026, help="picks the prompts")
    ap.add_argument("--out", type=Path, help="keep the images here (default: a temporary folder)")
    ap.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    ap.add_argument("--show-failures", action="store_true")
    ap.add_argument("extra", nargs="*", help="after --: more sdcli generate options (e.g. --steps 10)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        records, wall = render(prompts(args.prompts, args.seed), args.seeds, out, args.model, args.extra)
        right, asked, failures = grade(records)
    n = len(records)
    rendering = sum(r["seconds"] for r in records) / n
    print(f"{n} images: {args.prompts} prompts x {args.seeds} seeds, model {records[0]['model']}, "
          f"{records[0]['steps']} steps {records[0]['sampler']}, cfg {records[0]['cfg_scale']:g}, "
          f"{records[0]['width']}x{records[0]['height']}")
    missed = []
    for attr in ATTRIBUTES:
        accuracy = right[attr] / asked[attr]
        print(f"  {attr:<10} {accuracy:6.1%}  ({right[attr]}/{asked[attr]}, target {TARGETS[attr]:.0%})")
        if accuracy < TARGETS[attr]:
            missed.append(attr)
    print(f"  time       {rendering:.2f} s per image rendering, {wall / n:.2f} s per image for the whole command "
          f"(start-up and model load included; target {MAX_SECONDS:g} s)")
    if args.show_failures:
        print("\n".join(failures))
    if rendering > MAX_SECONDS:
        missed.append("time")
    if args.check and missed:
        sys.exit(f"eval_demo.py: below target: {', '.join(missed)}")


if __name__ == "__main__":
    main()
