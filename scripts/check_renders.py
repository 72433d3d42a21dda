"""Render a fixed set of images through the CLI, across every task, and compare them with a reference set.

    python scripts/check_renders.py OUT                       # models + reference renders into OUT
    python scripts/check_renders.py NEW --against OUT         # the same renders with OUT's models, compared

For refactors that must not change a pixel: run it before the change (from a checkout of the old code, e.g.
`PYTHONPATH=old-checkout`), then after, against the first run. It builds tiny random-weight models with
diffusers (tests/tiny.py: an SD 1.x-style eps folder, an SD 2.x-style v-prediction single file, a 9-channel
inpainting model, an x4 upscaler) and uses the built-in demo model. The renders cover txt2img (8 samplers,
batches, long and weighted prompts, unequal negative prompts, clip skip, the hires fix, bf16 autocast),
img2img, inpaint (ordinary and 9-channel, --crop-to-mask, --extend), upscale (x4 and Lanczos + tiled
img2img) and VAE tiling. Exits 1 when any image differs by more than --tolerance (in 1/255 steps).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
LONG = ", ".join(["a (very:1.2) detailed [painting] of a red circle on a blue background"] * 8)

# (name, model key, command, arguments, prompts-file lines or None)
TXT2IMG_LINES = [
    *(f'a large red circle on a blue background --sampler {s} --seed 11 --steps 8' for s in
      ("euler", "euler_a", "heun", "lms", "dpm++2m", "dpm++2m_sde", "ddim", "pndm")),
    "a small green square on a white background in the top left --seed 3 --steps 6 --n-images 3 --batch-size 2",
    f'{LONG} --seed 5 --steps 6 --negative-prompt "blurry"',
    "(a yellow:1.4) triangle BREAK on a black background --seed 6 --steps 6 --schedule exponential --cfg-scale 4",
    "a purple circle on an orange background --seed 7 --steps 6 --clip-skip 2 --cfg-scale 1",
]
TINY_LINES = [
    "a castle --sampler euler --seed 1 --steps 5",
    "a castle --sampler dpm++2m --seed 2 --steps 5 --n-images 2 --batch-size 2",
    f"{LONG} --sampler ddim --seed 3 --steps 5",
    "a castle --sampler euler_a --seed 4 --steps 5 -W 72 -H 56",
]


def runs(m: dict[str, Path], inputs: Path) -> list[tuple[str, list[str], list[str] | None]]:
    """(name, CLI arguments, prompts-file lines): each run writes its images into its own folder."""
    demo, base, small = str(inputs / "demo.png"), str(inputs / "tiny.png"), str(inputs / "small.png")
    return [
        ("demo-txt2img", ["generate"], TXT2IMG_LINES),
        ("demo-hires", ["generate", "a large blue square on a red background", "--seed", "9", "--steps", "6",
                        "--hires-scale", "2", "--hires-steps", "4"], None),
        ("demo-img2img", ["img2img", "a large green circle on a blue background", "-i", demo, "--seed", "4",
                          "--steps", "8", "--strength", "0.6", "--sampler", "euler_a"], None),
        ("demo-inpaint", ["inpaint", "a yellow triangle", "-i", demo, "--mask", str(inputs / "mask.png"),
                          "--seed", "4", "--steps", "6"], None),
        ("demo-inpaint-crop", ["inpaint", "a yellow triangle", "-i", demo, "--mask", str(inputs / "mask.png"),
                               "--seed", "4", "--steps", "6", "--crop-to-mask", "4", "--strength", "0.8"], None),
        ("demo-outpaint", ["inpaint", "a red circle on a white background", "-i", demo, "--extend", "right=16",
                           "--seed", "2", "--steps", "6"], None),
        ("demo-upscale", ["upscale", demo, "--scale", "2", "--seed", "1", "--steps", "8", "--tile", "96",
                          "--tile-overlap", "32"], None),
        ("sd1-txt2img", ["generate", "-m", str(m["sd1"]), "-W", "64", "-H", "64"], TINY_LINES),
        ("sd1-bf16", ["generate", "a castle", "-m", str(m["sd1"]), "-W", "64", "-H", "64", "--seed", "8",
                      "--steps", "4", "--precision", "bf16"], None),
        ("sd1-vae-tiling", ["generate", "a castle", "-m", str(m["sd1"]), "-W", "128", "-H", "96", "--seed", "8",
                            "--steps", "3", "--vae-tiling"], None),
        ("sd1-inpaint-ordinary", ["inpaint", "a door", "-m", str(m["sd1"]), "-i", base, "--mask",
                                  str(inputs / "tiny-mask.png"), "--seed", "3", "--steps", "5", "--strength",
                                  "0.9", "--invert-mask"], None),
        ("sd2v-txt2img", ["generate", "-m", str(m["sd2"]), "-W", "64", "-H", "64"], TINY_LINES),
        ("sd2v-img2img", ["img2img", "a castle at night", "-m", str(m["sd2"]), "-i", base, "--seed", "5",
                          "--steps", "6", "--strength", "0.7", "--sampler", "heun"], None),
        ("inpaint9", ["inpaint", "a door", "-m", str(m["inpaint"]), "-i", base, "--mask",
                      str(inputs / "tiny-mask.png"), "--seed", "3", "--steps", "5", "--n-images", "2"], None),
        ("x4-upscale", ["upscale", small, "-m", str(m["x4"]), "-p", "a castle", "--seed", "6", "--steps", "5",
                        "--noise-level", "40"], None),
        ("x4-upscale-tiled", ["upscale", small, "-m", str(m["x4"]), "--seed", "6", "--steps", "4",
                              "--sampler", "euler_a", "--tile", "64", "--tile-overlap", "16"], None),
    ]


def build_models(folder: Path) -> dict[str, Path]:
    """The tiny models (diffusers folders and single files), built once into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "tests"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tiny

    for kind in ("sd1", "sd2", "inpaint", "x4"):
        if not (folder / f"tiny-{kind}.safetensors").is_file():
            tiny.build(kind, folder)
    return models(folder)


def models(folder: Path) -> dict[str, Path]:
    return {"sd1": folder / "tiny-sd1", "sd2": folder / "tiny-sd2.safetensors",
            "inpaint": folder / "tiny-inpaint", "x4": folder / "tiny-x4"}


def make_inputs(folder: Path) -> None:
    """Input images and masks, drawn deterministically."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    demo = np.zeros((64, 64, 3), np.uint8)
    demo[:] = (30, 60, 200)
    demo[(yy - 30) ** 2 + (xx - 34) ** 2 < 200] = (220, 30, 30)
    Image.fromarray(demo).save(folder / "demo.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[8:30, 36:60] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    base = (rng.random((64, 64, 3)) * 80 + np.stack([xx * 2, yy * 3, xx + yy], -1)).clip(0, 255).astype(np.uint8)
    Image.fromarray(base).save(folder / "tiny.png")
    tmask = np.zeros((64, 64), np.uint8)
    tmask[20:44, 16:48] = 255
    Image.fromarray(tmask).save(folder / "tiny-mask.png")
    Image.fromarray(base[::2, ::2][:24, :32].copy()).save(folder / "small.png")


def render(out: Path, model_folder: Path, only: list[str] | None) -> None:
    inputs = out / "inputs"
    make_inputs(inputs)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("SDCLI_MODEL", None)
    for name, args, lines in runs(models(model_folder), inputs):
        if only and name not in only:
            continue
        folder = out / "renders" / name
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "sdcli", *args, "-o", str(folder / "{index}-{seed}.png"), "--quiet",
               "--overwrite", "--device", "cpu"]
        if lines is not None:
            prompts = out / f"{name}.txt"
            prompts.write_text("\n".join(lines) + "\n")
            cmd += ["--from-file", str(prompts)]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if result.returncode:
            sys.exit(f"{name}: {' '.join(cmd)}\nexit {result.returncode}: {result.stderr[-2000:]}")
        print(f"{name}: {len(list(folder.glob('*.png')))} images", flush=True)


def compare(new: Path, ref: Path, tolerance: int, only: list[str] | None) -> bool:
    """Every reference image (of the runs in `only`, if given) against the new one; prints the differences."""
    ok = True
    refs = sorted(p for p in (ref / "renders").rglob("*.png") if not only or p.parent.name in only)
    if not refs:
        sys.exit(f"{ref}: no reference renders")
    worst = 0
    for path in refs:
        rel = path.relative_to(ref / "renders")
        other = new / "renders" / rel
        if not other.is_file():
            print(f"MISSING {rel}")
            ok = False
            continue
        a, b = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in (path, other))
        if a.shape != b.shape:
            print(f"SIZE    {rel}: {a.shape} vs {b.shape}")
            ok = False
            continue
        diff = int(np.abs(a - b).max())
        worst = max(worst, diff)
        if diff > tolerance:
            print(f"DIFFER  {rel}: max {diff}/255, {(np.abs(a - b) > 0).mean():.1%} of values")
            ok = False
        elif diff:
            print(f"near    {rel}: max {diff}/255, {(np.abs(a - b) > 0).mean():.1%} of values")
    identical = "all identical" if worst == 0 else f"largest difference {worst}/255"
    print(f"{len(refs)} images compared: {'OK' if ok else 'FAILED'}, {identical}")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="folder for the models (without --against), inputs and renders")
    ap.add_argument("--against", type=Path, help="a reference folder made by an earlier run: use its models, "
                    "compare with its renders")
    ap.add_argument("--tolerance", type=int, default=0, help="largest accepted difference, in 1/255 (default 0)")
    ap.add_argument("--only", nargs="*", help="only these runs (names as printed)")
    args = ap.parse_args()
    model_folder = args.against / "models" if args.against else args.out / "models"
    if not args.against:
        build_models(model_folder)
    render(args.out, model_folder, args.only)
    if args.against:
        sys.exit(0 if compare(args.out, args.against, args.tolerance, args.only) else 1)


if __name__ == "__main__":
    main()
