"""Peak RAM of loading a full-size SD 1.5 single file, against the file size and against diffusers.

Writes a random-weight SD 1.5 checkpoint with the real key/shape layout (4.3 GB in fp32), then
loads it in fresh processes and reports each one's peak RSS (ru_maxrss):

    python scripts/measure_load_memory.py [--dtype fp32|fp16] [--dir /tmp] [--no-diffusers]

Every weight is touched after loading, as inference would, so memory-mapped pages count too.
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
os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub
import json, resource, sys, time, torch
torch.set_num_threads(2)
what, path = sys.argv[1], sys.argv[2]
# imports first, outside the timer: the load time is the loading alone
import transformers.models.clip.modeling_clip, sdcli.loading
from sdcli.models.text import clip_tokenizer
clip_tokenizer()
if what == "diffusers":
    from diffusers import StableDiffusionPipeline
t = time.perf_counter()
if what == "baseline":
    modules = []
elif what == "sdcli":
    modules = [sdcli.loading.load_model(path)]
else:
    p = StableDiffusionPipeline.from_single_file(path, config=sys.argv[3], local_files_only=True,
                                                 safety_checker=None, requires_safety_checker=False)
    modules = [p.unet, p.vae, p.text_encoder]
load_s = time.perf_counter() - t
total = 0.0
with torch.no_grad():
    for mod in modules:
        for p in mod.parameters():
            total += float(p.float().sum())  # touch every weight
print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "load_s": load_s}))
"""


def write_checkpoint(path: Path, dtype: str) -> None:
    script = Path(__file__).resolve().parent / "make_random_model.py"
    subprocess.run([sys.executable, str(script), str(path), "--arch", "sd15", "--dtype", dtype], check=True)


def write_diffusers_config(folder: Path) -> None:
    """A local diffusers config folder for SD 1.5 (configs only, no weights) for from_single_file."""
    from transformers import CLIPTextConfig

    from sdcli.models.text import clip_tokenizer

    data = Path(__file__).resolve().parent.parent / "tests" / "data"
    for sub in ("unet", "vae", "text_encoder", "scheduler"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "unet" / "config.json").write_text((data / "sd15.unet_config.json").read_text())
    (folder / "vae" / "config.json").write_text((data / "sd15.vae_config.json").read_text())
    CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                   ).save_pretrained(folder / "text_encoder")
    clip_tokenizer().save_pretrained(folder / "tokenizer")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "skip_prk_steps": True, "steps_offset": 1}))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None]}))


def measure(what: str, path: Path, config: Path | None = None) -> dict:
    args = [sys.executable, "-c", CHILD, what, str(path)] + ([str(config)] if config else [])
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"measuring {what} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best(a: dict, b: dict) -> dict:
    """Two runs of one side: the larger peak (the honest memory figure), the shorter load time."""
    return {"peak_rss": max(a["peak_rss"], b["peak_rss"]), "load_s": min(a["load_s"], b["load_s"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--no-diffusers", action="store_true")
    args = ap.parse_args()

    path = Path(args.dir) / f"sdcli-random-sd15-{args.dtype}.safetensors"
    if not path.exists():
        t = time.perf_counter()
        write_checkpoint(path, args.dtype)
        print(f"wrote {path} in {time.perf_counter() - t:.0f} s")
    size = path.stat().st_size
    gib = 2**30
    with open(path, "rb") as f:  # into the page cache, so that neither side pays for the disk
        while f.read(64 << 20):
            pass
    base = measure("baseline", path)
    ours = measure("sdcli", path)
    ref = None
    if not args.no_diffusers:
        # each side twice, alternating (A B B A), so that neither order nor a single slow run favours one
        with tempfile.TemporaryDirectory() as tmp:
            write_diffusers_config(Path(tmp))
            ref = best(measure("diffusers", path, Path(tmp)), measure("diffusers", path, Path(tmp)))
        ours = best(ours, measure("sdcli", path))

    print(f"file: {size / gib:.2f} GiB ({args.dtype}); model in RAM as fp32: "
          f"{size / gib * (2 if args.dtype == 'fp16' else 1):.2f} GiB")
    print(f"process after imports (torch, transformers, sdcli): {base['peak_rss'] / gib:.2f} GiB")
    print(f"sdcli load_model:   peak RSS {ours['peak_rss'] / gib:.2f} GiB = {ours['peak_rss'] / size:.2f}x the file "
          f"({(ours['peak_rss'] - base['peak_rss']) / size:.2f}x above the import baseline), load {ours['load_s']:.1f} s")
    if ref:
        print(f"diffusers from_single_file: peak RSS {ref['peak_rss'] / gib:.2f} GiB = {ref['peak_rss'] / size:.2f}x "
              f"the file, load {ref['load_s']:.1f} s")
        print(f"ratio sdcli/diffusers: peak RSS {ours['peak_rss'] / ref['peak_rss']:.2f}, "
              f"load time {ours['load_s'] / ref['load_s']:.2f}")

if __name__ == "__main__":
    main()
