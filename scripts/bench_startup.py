"""Start-up, measured: a fresh `sdcli generate PROMPT` on the built-in demo model (or --model), its wall time
minus its rendering time (the `seconds` of its --json line: encode, sample, decode), against the wall time of
`python -c "import torch"`, both run in turns in this one run, medians of --runs each. Target: at most 1.5x.

    python scripts/bench_startup.py [--runs 5] [--model PATH] [--breakdown]

--breakdown adds where one start-up's imports go (python -X importtime, cumulative, by top-level package).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

PROMPT = "a large red circle on a blue background in the top left"


def sdcli_command() -> list[str]:
    """The console script beside this interpreter (as a user runs it), else `python -m sdcli`."""
    script = Path(sys.executable).parent / "sdcli"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "sdcli"]


def wall(command: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"bench_startup.py: {' '.join(command[:3])} ... failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, done.stdout


def breakdown(command: list[str], env: dict) -> None:
    """Cumulative import time by top-level package, from one run under -X importtime."""
    done = subprocess.run([sys.executable, "-X", "importtime", *command], capture_output=True, text=True, env=env)
    total: dict[str, float] = defaultdict(float)
    for line in done.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| ( *)(\S+)", line)
        if m and not m[2]:  # a top-level import: its cumulative time
            total[m[3].split(".")[0]] += int(m[1]) / 1e6
    print("imports, cumulative seconds by package (one run):")
    for name, seconds in sorted(total.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {name:<16} {seconds:6.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--model", help="a model instead of the built-in demo")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--breakdown", action="store_true")
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "SDCLI_MODEL"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.png"
        generate = [*sdcli_command(), "generate", PROMPT, "--steps", str(args.steps), "--seed", "1", "--json",
                    "--quiet", "--overwrite", "-o", str(out), *(["-m", args.model] if args.model else [])]
        wall(generate, env)  # warm the page cache for both
        wall([sys.executable, "-c", "import torch"], env)
        torch_s, walls, renders = [], [], []
        for _ in range(args.runs):
            torch_s.append(wall([sys.executable, "-c", "import torch"], env)[0])
            seconds, stdout = wall(generate, env)
            walls.append(seconds)
            renders.append(json.loads(stdout.splitlines()[-1])["seconds"])
        if args.breakdown:  # `python -X importtime` of the same command: the script file, or -m sdcli
            breakdown(generate[1:] if generate[0] == sys.executable else generate, env)
    t, w, r = (statistics.median(x) for x in (torch_s, walls, renders))
    print(f"{args.runs} runs each, medians: import torch {t:.2f} s; sdcli generate {w:.2f} s wall, {r:.2f} s "
          f"rendering, {w - r:.2f} s start-up")
    print(f"start-up / import torch = {(w - r) / t:.2f}  (target <= 1.5)")


if __name__ == "__main__":
    main()
