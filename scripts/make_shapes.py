"""Write the demo model's training data: N images of coloured shapes with their captions (see shapes.py).

    python scripts/make_shapes.py data/shapes --n 20000 --seed 0 --size 64

The same seed, count and size give the same files, byte for byte. The folder gets NNNNNN.png images and a
metadata.jsonl of {"file_name", "text"} lines, the layout `sdcli train-vae` and `sdcli train-unet` read.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import caption, draw, sample  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="a new (or empty) folder")
    ap.add_argument("--n", type=int, default=20000, help="images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=64, help="pixels a side (at least 64)")
    args = ap.parse_args()
    if args.size < 64 or args.n < 1:
        sys.exit("make_shapes.py: --size must be at least 64 and --n at least 1")
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"make_shapes.py: {args.out} is not empty: choose a new folder")
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    width = len(str(args.n - 1))
    lines = []
    for i in range(args.n):
        scene = sample(rng)
        name = f"{i:0{width}d}.png"
        draw(scene, args.size).save(args.out / name)
        lines.append(json.dumps({"file_name": name, "text": caption(scene)}))
    (args.out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.n} images of {args.size}x{args.size} and metadata.jsonl to {args.out}")


if __name__ == "__main__":
    main()
