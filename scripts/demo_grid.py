"""The README's grid of demo outputs: one `sdcli generate --from-file` run over PROMPTS, tiled with captions.

    python scripts/demo_grid.py scripts/demo/grid.png [--model PATH] [--seed 1] [-- more generate options]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PROMPTS = [
    "a large red circle on a blue background",
    "a small yellow square on a black background in the top left",
    "a large white triangle on a green background",
    "a small purple circle on a yellow background in the bottom right",
    "a large orange square on a purple background in the center",
    "a small blue triangle on a white background in the top right",
    "a large green circle on a orange background in the bottom left",
    "a small black square on a red background",
]
SCALE, COLUMNS, CAPTION_LINES = 3, 4, 3  # each 64x64 image shown at 3x, with its prompt below


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the .png to write")
    ap.add_argument("--model", help="default: the built-in demo model ($SDCLI_MODEL is ignored)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("extra", nargs="*", help="after --: more sdcli generate options")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("".join(f"{p} --seed {args.seed}\n" for p in PROMPTS))
        command = [sys.executable, "-m", "sdcli", "generate", "--from-file", str(prompts), "-o", tmp, "--json",
                   "--quiet", *args.extra]
        if args.model:
            command += ["--model", args.model]
        env = {k: v for k, v in os.environ.items() if k != "SDCLI_MODEL"}  # no --model: the demo
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            sys.exit(f"demo_grid.py: {' '.join(command)} failed:\n{done.stderr.strip()}")
        records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        images = [Image.open(r["path"]).convert("RGB") for r in records]

    font = ImageFont.load_default(size=13)
    line_height, cell = 16, images[0].width * SCALE + 8
    rows = -(-len(images) // COLUMNS)
    grid = Image.new("RGB", (COLUMNS * cell, rows * (cell + CAPTION_LINES * line_height + 6)), "white")
    pen = ImageDraw.Draw(grid)
    for i, (image, record) in enumerate(zip(images, records, strict=True)):
        x, y = i % COLUMNS * cell, i // COLUMNS * (cell + CAPTION_LINES * line_height + 6)
        grid.paste(image.resize((cell - 8, cell - 8), Image.Resampling.NEAREST), (x + 4, y + 4))
        for j, line in enumerate(textwrap.wrap(record["prompt"], 26)[:CAPTION_LINES]):
            pen.text((x + 4, y + cell + j * line_height), line, fill="black", font=font)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out} ({len(images)} images, model {records[0]['model']}, seed {args.seed})")


if __name__ == "__main__":
    main()
