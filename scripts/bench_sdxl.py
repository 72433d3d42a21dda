"""Speed and memory of SDXL base against diffusers: the same random full-size weights, in the same run.

    python scripts/bench_sdxl.py [--sizes 512 1024] [--rounds 2] [--warmups 1] [--repeats 1] [--dir /tmp]
    python scripts/bench_sdxl.py --tiny          # the same measurements on a tiny SDXL-shaped model, in a minute

Writes a random SDXL base single file in fp16 with the release's layout (make_random_model.py, 6.9 GB; kept
in --dir for the next run), then:

- speed: one CFG step = one UNet forward on batch 2 with the added conditioning (pooled text 1280 wide,
  six size numbers), fp32. Each side runs in its own process (the UNet is 10.3 GB in fp32) that loads the
  UNet from the file: sdcli with its loader, diffusers with its own single-file converter into a
  UNet2DConditionModel built from the release's config (tests/data). Per size: --warmups forwards, then
  --repeats timed ones. --rounds processes per side, alternating (A B B A ...), so that machine drift hits
  both alike; the medians are over all timed forwards. sdcli runs as its CLI does (keep_freed_memory),
  diffusers as it does by default (--same-malloc: both with it). Both outputs are checked equal.
- memory: the peak RSS (ru_maxrss) of loading the whole fp16 file as fp32, ready to run (UNet, VAE, both
  text encoders, every weight touched), each side in a fresh process: sdcli's load_model, diffusers'
  StableDiffusionXLPipeline.from_single_file with local configs. A process is stopped when the machine's
  available memory falls under --reserve GiB (the figure is then a lower bound).

Ratios below 1 mean sdcli is faster or smaller.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
DATA = SCRIPTS.parent / "tests" / "data"
GIB = 2**30
UNET_PREFIX = "model.diffusion_model."
# tests/data holds the release's diffusers configs; --tiny overrides them to make_random_model's tiny-xl
TINY_CONFIGS = {
    "unet": dict(block_out_channels=[64, 128, 256], attention_head_dim=[1, 2, 4], transformer_layers_per_block=[1, 1, 2],
                 cross_attention_dim=192, addition_time_embed_dim=8, projection_class_embeddings_input_dim=176),
    "vae": dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1),
    "text_encoder": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1),
    "text_encoder_2": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                           projection_dim=128),
}


# --- the child processes -------------------------------------------------------------------------


def child_speed(side: str, path: str, folder: str, inputs: str, out: str, args: dict) -> dict:
    import torch

    torch.set_num_threads(args["threads"])
    t0 = time.perf_counter()
    step = (load_ours if side == "sdcli" else load_diffusers)(path, folder)
    result = {"load_s": time.perf_counter() - t0, "times": {}}
    if side == "sdcli" or args["same_malloc"]:
        from sdcli.runtime import keep_freed_memory

        result["keep_freed_memory"] = keep_freed_memory()  # as the sdcli CLI does for its process
    outputs = {}
    with torch.inference_mode():
        for size, inp in torch.load(inputs).items():
            for _ in range(args["warmups"]):
                step(**inp)
            times = []
            for _ in range(args["repeats"]):
                t = time.perf_counter()
                outputs[size] = step(**inp)
                times.append(time.perf_counter() - t)
            result["times"][size] = times
    torch.save(outputs, out)
    return result


def load_ours(path: str, folder: str):
    """sdcli's UNet alone (the other parts stay on the meta device), by the loader `sdcli generate` uses."""
    import torch

    from sdcli.loading import open_checkpoint
    from sdcli.loading.component import load_component
    from sdcli.models.unet import timestep_embedding

    ckpt = open_checkpoint(path)
    model = ckpt.meta_model()
    ckpt.check(model)
    unet = load_component(model.component("unet"), ckpt.parts["unet"], "cpu", torch.float32,
                          variant=ckpt.config.variant, what="unet", checked=True).eval().requires_grad_(False)
    width = ckpt.config.added_width

    def step(x, t, context, text_embeds, time_ids):
        # the added conditioning as sdcli.conditioning.with_added builds it: pooled text, then each number's sinusoid
        sizes = timestep_embedding(time_ids.flatten(), width).reshape(len(x), -1)
        return unet(x, t, context, y=torch.cat([text_embeds, sizes], dim=1))

    return step


def load_diffusers(path: str, folder: str):
    """diffusers' UNet2DConditionModel from the release's config, filled by diffusers' own single-file converter."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from safetensors import safe_open

    config = json.loads((Path(folder) / "unet" / "config.json").read_text())
    with safe_open(path, framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(UNET_PREFIX)}
    converted = convert_ldm_unet_checkpoint(state, config)
    del state
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    weights = {k: converted.pop(k).float() for k in list(converted)}  # each fp16 tensor dropped once cast
    unet.load_state_dict(weights, strict=True, assign=True)
    unet.eval().requires_grad_(False)

    def step(x, t, context, text_embeds, time_ids):
        return unet(x, t, encoder_hidden_states=context,
                    added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample

    return step


def child_memory(side: str, path: str, folder: str, out: str, args: dict) -> dict:
    import importlib
    import resource

    import torch

    import sdcli.loading

    importlib.import_module("transformers.models.clip.modeling_clip")  # imports outside the timer
    from sdcli.models.text import clip_tokenizer

    torch.set_num_threads(args["threads"])
    clip_tokenizer()
    if side == "diffusers":
        from diffusers import StableDiffusionXLPipeline
    imports = _rss()
    t = time.perf_counter()
    if side == "sdcli":
        modules = [sdcli.loading.load_model(path)]
    else:
        p = StableDiffusionXLPipeline.from_single_file(path, config=folder, local_files_only=True,
                                                       torch_dtype=torch.float32)
        modules = [p.unet, p.vae, p.text_encoder, p.text_encoder_2]
    load_s = time.perf_counter() - t
    total, dtypes = 0.0, set()
    with torch.no_grad():
        for mod in modules:
            for q in mod.parameters():
                total += float(q.float().sum())  # touch every weight, as inference would
                dtypes.add(str(q.dtype))
    return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "imports_rss": imports,
            "load_s": load_s, "dtypes": sorted(dtypes),
            "parameters": sum(q.numel() for mod in modules for q in mod.parameters())}


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# --- the parent ----------------------------------------------------------------------------------


def run_child(kind: str, side: str, *rest: str, args: dict, reserve: float) -> dict:
    """One child process; stopped (result None, with the last peak seen) when the machine's available memory falls
    under `reserve` GiB, so that a side that needs more than there is does not take the others' memory."""
    cmd = [sys.executable, __file__, "--child", kind, side, *rest, json.dumps(args)]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        peak, stopped = 0, False
        while True:
            try:
                stdout, _ = proc.communicate(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                peak = max(peak, _proc_kib(proc.pid, "VmHWM:") * 1024)
                if _proc_kib(None, "MemAvailable:") < reserve * 2**20 and not stopped:
                    os.kill(proc.pid, signal.SIGKILL)
                    stopped = True
        if stopped:
            return {"stopped": True, "peak_rss": peak}
        if proc.returncode:
            err.seek(0)
            sys.exit(f"{kind} {side} failed:\n{err.read()[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def _proc_kib(pid: int | None, field: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status" if pid else "/proc/meminfo").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in text.splitlines() if line.startswith(field)), 0)


def diffusers_folder(folder: Path, tiny: bool) -> None:
    """A local diffusers config folder for SDXL base (configs and tokenizers, no weights) for from_single_file."""
    from sdcli.models.text import clip_tokenizer

    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        config = json.loads((DATA / f"sdxl_base.{name}_config.json").read_text())
        config |= TINY_CONFIGS[name] if tiny else {}
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(json.dumps(config))
    clip_tokenizer().save_pretrained(folder / "tokenizer")
    clip_tokenizer("!").save_pretrained(folder / "tokenizer_2")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "timestep_spacing": "leading", "steps_offset": 1}))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "force_zeros_for_empty_prompt": True}))


def make_inputs(path: Path, sizes: list[int], tiny: bool) -> None:
    """Each size's UNet inputs for one CFG step (batch 2), saved once so that both sides get the very same."""
    import torch

    context, pooled = (192, 128) if tiny else (2048, 1280)
    g = torch.Generator().manual_seed(0)
    inputs = {}
    for px in sizes:
        inputs[px] = {"x": torch.randn(2, 4, px // 8, px // 8, generator=g), "t": torch.tensor([500.0, 500.0]),
                      "context": torch.randn(2, 77, context, generator=g),
                      "text_embeds": torch.randn(2, pooled, generator=g),
                      "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * 2, dtype=torch.float32)}
    torch.save(inputs, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="image sides in px (multiples of 32)")
    ap.add_argument("--rounds", type=int, default=2, help="processes per side for the speed, alternating")
    ap.add_argument("--warmups", type=int, default=1, help="untimed forwards per size and process")
    ap.add_argument("--repeats", type=int, default=1, help="timed forwards per size and process")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--same-malloc", action="store_true", help="diffusers with keep_freed_memory too")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the random file is kept")
    ap.add_argument("--tiny", action="store_true", help="a tiny SDXL-shaped model: checks the script quickly")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--tolerance", type=float, default=1e-3, help="largest relative difference of the outputs")
    ap.add_argument("--reserve", type=float, default=1.0, help="GiB of the machine's memory a child must leave")
    args = ap.parse_args()
    if any(px % 32 for px in args.sizes) or min(args.sizes) < 64:
        ap.error("--sizes: multiples of 32 px, at least 64")

    import torch

    sys.path.insert(0, str(SCRIPTS))
    import diffusers
    import make_random_model

    arch = make_random_model.TINY_XL if args.tiny else "sdxl-base"
    model = args.dir / f"sdcli-random-{arch}-fp16.safetensors"
    if not model.exists():
        t = time.perf_counter()
        make_random_model.write(arch, model, "fp16")
        print(f"wrote {model} in {time.perf_counter() - t:.0f} s")
    size = model.stat().st_size
    with open(model, "rb") as f:  # into the page cache, so that neither side pays for the disk
        while f.read(64 << 20):
            pass
    child_args = {k: getattr(args, k) for k in ("threads", "warmups", "repeats", "same_malloc")}
    print(f"{arch}, random weights, file {model} ({size / GIB:.2f} GiB fp16); fp32 on CPU, {args.threads} threads, "
          f"torch {torch.__version__}, diffusers {diffusers.__version__}")
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        diffusers_folder(tmp / "config", args.tiny)
        if not args.no_speed:
            failed = speed(model, tmp, args, child_args)
        if not args.no_memory:
            memory(model, tmp, size, args, child_args)
    if failed:
        sys.exit(f"the outputs differ by more than --tolerance {args.tolerance}: the timings compare different work")


def speed(model: Path, tmp: Path, args, child_args: dict) -> bool:
    import torch

    make_inputs(tmp / "inputs.pt", args.sizes, args.tiny)
    runs = {"sdcli": [], "diffusers": []}
    for r in range(args.rounds):
        for side in ("sdcli", "diffusers") if r % 2 == 0 else ("diffusers", "sdcli"):
            out = tmp / f"{side}-{len(runs[side])}.pt"
            res = run_child("speed", side, str(model), str(tmp / "config"), str(tmp / "inputs.pt"), str(out),
                            args=child_args, reserve=args.reserve)
            if res.get("stopped"):
                sys.exit(f"speed {side}: stopped, the machine's memory ran short (peak {res['peak_rss'] / GIB:.1f} GiB)")
            runs[side].append(res)
    malloc = "both keep_freed_memory" if args.same_malloc else "sdcli keep_freed_memory as its CLI, diffusers default"
    print(f"UNet, batch 2 (one CFG step, added conditioning); {args.rounds} processes per side alternating, "
          f"{args.warmups} warm-up + {args.repeats} timed per size in each; {malloc}")
    failed = False
    for px in args.sizes:
        ours, theirs = (sum((r["times"][str(px)] for r in runs[s]), []) for s in ("sdcli", "diffusers"))
        a, b = torch.load(tmp / "sdcli-0.pt")[px], torch.load(tmp / "diffusers-0.pt")[px]
        err = ((a - b).abs().max() / b.abs().max()).item()
        again = max(((torch.load(tmp / f"{s}-{i}.pt")[px] - (a if s == "sdcli" else b)).abs().max().item()
                     for s in runs for i in range(1, len(runs[s]))), default=0.0)
        failed |= not err <= args.tolerance
        t_ours, t_theirs = statistics.median(ours), statistics.median(theirs)
        print(f"  {px:>4} px (latent {px // 8}x{px // 8}): sdcli {t_ours:8.2f} s   diffusers {t_theirs:8.2f} s   "
              f"ratio {t_ours / t_theirs:5.2f}   (max rel. difference {err:.1e}, output |max| {b.abs().max():.2f}; "
              f"between processes {again:.1e})")
        print(f"        timed forwards: sdcli {fmt(ours)}, diffusers {fmt(theirs)}")
    loads = {s: statistics.median(r["load_s"] for r in runs[s]) for s in runs}
    print(f"  loading the UNet alone (fp16 file -> fp32), median: sdcli {loads['sdcli']:.1f} s, "
          f"diffusers {loads['diffusers']:.1f} s")
    return failed


def memory(model: Path, tmp: Path, size: int, args, child_args: dict) -> None:
    res = {s: run_child("memory", s, str(model), str(tmp / "config"), "-", args=child_args, reserve=args.reserve)
           for s in ("sdcli", "diffusers")}
    print(f"memory: loading the whole fp16 file ({size / GIB:.2f} GiB) as fp32 (UNet, VAE, both text encoders; "
          f"{size / GIB * 2:.2f} GiB in fp32), a fresh process each")
    for side, what in (("sdcli", "sdcli load_model"), ("diffusers", "diffusers from_single_file")):
        r = res[side]
        if r.get("stopped"):
            print(f"  {what:<28} stopped when the machine's memory ran short: peak RSS >= {r['peak_rss'] / GIB:.2f} GiB")
            continue
        print(f"  {what:<28} peak RSS {r['peak_rss'] / GIB:6.2f} GiB = {r['peak_rss'] / size:.2f}x the file "
              f"({(r['peak_rss'] - r['imports_rss']) / size:.2f}x above its {r['imports_rss'] / GIB:.2f} GiB after "
              f"imports), load {r['load_s']:.1f} s; {r['parameters'] / 1e9:.3f} B parameters, {', '.join(r['dtypes'])}")
    a, b = res["sdcli"], res["diffusers"]
    bound = "<= " if b.get("stopped") else ""
    line = f"  ratio sdcli/diffusers: peak RSS {bound}{a['peak_rss'] / b['peak_rss']:.2f}"
    print(line + ("" if a.get("stopped") or b.get("stopped") else f", load time {a['load_s'] / b['load_s']:.2f}"))


def fmt(times: list[float]) -> str:
    return "[" + ", ".join(f"{t:.2f}" for t in times) + "] s"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub
        kind, side, path, folder, *rest, child_args = sys.argv[2:]
        fn = child_speed if kind == "speed" else child_memory
        rest = rest if kind == "speed" else rest[-1:]
        print(json.dumps(fn(side, path, folder, *rest, json.loads(child_args))))
    else:
        main()
