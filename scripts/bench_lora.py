"""Cost of a LoRA in sdcli against diffusers, on a full-size random SD 1.5 model, in one run.

    python scripts/bench_lora.py --work /tmp/bench-lora [--size 512|256] [--repeats 3] [--locon] [--profile]

1. Writes a rank-64 kohya-ss LoRA (fp16 tensors, alpha 32) on the common SD 1.5 target set: the UNet's attention
   projections, feed-forwards and proj_in/out, the text encoder's q/k/v/out_proj/fc1/fc2 (with --locon also the
   resnets' convolutions), its names taken from the diffusers/transformers modules (tests/lora_files.py).
2. sdcli: the time to apply it (Loras.prepare + switch: read the file, compute the deltas, merge) and to take it
   off (switch to ()), median of --repeats, on the fp32 CPU model loaded from the single file; every weight is
   then compared with the file, bit for bit.
3. diffusers (the reference): load_lora_weights + fuse_lora, then unfuse_lora + unload_lora_weights, median of
   --repeats, on the same weights saved as a diffusers folder.
4. One guided UNet step (batch 2) at --size, with the LoRA merged and without: merged weights cost nothing per
   step, so the ratio should be 1.00.
5. The ratios, and the largest difference between sdcli's merged weights and diffusers' fused ones.

sdcli.runtime.keep_freed_memory() is applied first, as the sdcli CLI does for its process (it applies to the
diffusers side too: same process). Page faults (minor) are printed beside the times: where memory is slow to
fault in (a VM, other processes), they explain most of the spread between repeats.

The random model (single file + diffusers folder, ~4.3 GB each, fp32) and the LoRA are cached in --work.
The sdcli model is freed before diffusers' pipeline is loaded (only its merged LoRA-target weights are kept
for the comparison), so the two full models are never in memory together.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]
import lora_files  # noqa: E402  (tests/: kohya names from the diffusers modules)
import make_random_model  # noqa: E402

UNET = "model.diffusion_model."
TEXT = "cond_stage_model.transformer."
RANK, ALPHA = 64, 32.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for the cached model files and the LoRA")
    ap.add_argument("--size", type=int, default=512, help="image size of the UNet step (256 for a quick run)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--locon", action="store_true", help="also the resnets' convolutions (LoCon)")
    ap.add_argument("--profile", action="store_true", help="cProfile one sdcli apply and removal, print the top")
    args = ap.parse_args()
    if args.size % 64 or args.size < 64:
        ap.error("--size must be a multiple of 64")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    from sdcli.runtime import keep_freed_memory

    kept = keep_freed_memory()
    print(f"SD 1.5 random, fp32 CPU, {args.threads} threads, torch {torch.__version__}, step at {args.size} px, "
          f"median of {args.repeats}, keep_freed_memory {kept}, load average {os.getloadavg()[0]:.1f}")

    single, folder = model_files(args.work)
    lora = lora_file(args.work, folder, args.locon)
    ours = bench_sdcli(single, lora, args)
    print(f"  peak memory so far (max RSS, the model's mapped file included) {max_rss():.1f} GiB")
    theirs = bench_diffusers(folder, lora, ours, args)

    print("\nratios")
    print(f"  sdcli apply / diffusers load+fuse        {ours['apply'] / theirs['apply']:6.3g}")
    print(f"  sdcli remove / diffusers unfuse+unload   {ours['remove'] / theirs['remove']:6.3g}")
    print(f"  merged step / plain step                 {ours['step_merged'] / ours['step_plain']:6.2f} (medians), "
          f"{ours['step_fastest']:.2f} (fastest of each)")
    print(f"peak memory (max RSS) {max_rss():.1f} GiB (keep_freed_memory keeps sdcli's freed heap in the process)")


def max_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# --- files --------------------------------------------------------------------------------------------------

def model_files(work: Path) -> tuple[Path, Path]:
    """The random SD 1.5 single file (make_random_model.py) and the same weights as a diffusers folder."""
    from sdcli.loading import load_model
    from sdcli.loading.save import save_diffusers

    single, folder = work / "sd15-random.safetensors", work / "sd15-random-diffusers"
    if not single.is_file():
        t = time.perf_counter()
        make_random_model.write("sd15", single, "fp32")
        print(f"made {single} in {time.perf_counter() - t:.0f} s")
    if not (folder / "model_index.json").is_file():
        t = time.perf_counter()
        model = load_model(single)
        save_diffusers(model, folder)
        del model
        gc.collect()
        print(f"made {folder} in {time.perf_counter() - t:.0f} s")
    return single, folder


def lora_file(work: Path, folder: Path, locon: bool) -> Path:
    """A kohya-ss LoRA written from the diffusers UNet's and the transformers text encoder's module names
    (modules built on the meta device: only their names and shapes are needed)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = work / f"lora-r{RANK}-a{ALPHA:g}{'-locon' if locon else ''}.safetensors"
    if not path.is_file():
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
            text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        ref = SimpleNamespace(unet=unet, text_encoder=text)
        tmp = path.with_suffix(".tmp")
        lora_files.kohya_lora(ref, tmp, rank=RANK, alpha=ALPHA, locon=locon, dtype=torch.float16)
        tmp.replace(path)
    print(f"LoRA {path.name}: {path.stat().st_size / 2**20:.0f} MiB")
    return path


# --- sdcli ----------------------------------------------------------------------------------------------------

def bench_sdcli(single: Path, lora: Path, args) -> dict:
    from sdcli.loading import load_model
    from sdcli.loading.keymaps import unet_diffusers_name
    from sdcli.networks.tags import LoraUse

    model = load_model(single)
    model.eval()
    uses = (LoraUse(str(lora)),)
    step = unet_step(model, args.size)
    before_out = step()  # also the warm-up
    applies, removes, merged = apply_and_remove(model, uses, args.repeats)
    same, total, missing = compare_with_file(model, single)
    now = model.state_dict()
    plain = {k: now[k] for k in merged}
    change = max((merged[k] - plain[k]).abs().max().item() for k in merged)
    outs, times = step_times(model, step, plain, merged, args.repeats)
    t_plain, t_merged = statistics.median(times["plain"]), statistics.median(times["merged"])
    unet_keys = [k for k in merged if k.startswith(UNET)]
    result = dict(apply=statistics.median(c.wall for c in applies), remove=statistics.median(c.wall for c in removes),
                  step_plain=t_plain, step_merged=t_merged,
                  step_fastest=min(times["merged"]) / min(times["plain"]))  # the least disturbed of each
    ok = same == total and not missing
    print(f"\nsdcli   ({len(merged)} weights patched: {len(unet_keys)} UNet, {len(merged) - len(unet_keys)} text)")
    print(f"  apply  (prepare + switch)  {result['apply']:7.3f} s   [{fmt(applies)}]")
    print(f"  remove (switch to ())      {result['remove']:7.3f} s   [{fmt(removes)}]")
    print(f"  after removal: {same} of {total} weights bit for bit the file's (torch.equal), "
          f"{missing} not in the file -> {'OK' if ok else 'NOT EQUAL'}")
    print(f"  largest weight change of the LoRA {change:.3e}")
    print(f"  UNet step [2, 4, {args.size // 8}, {args.size // 8}]: plain {t_plain:.3f} s [{fmt(times['plain'])}], "
          f"merged {t_merged:.3f} s [{fmt(times['merged'])}], ratio {t_merged / t_plain:.2f}")
    print(f"  step output: merged vs plain max |diff| {(outs['merged'] - outs['plain']).abs().max().item():.3e}; "
          f"plain after removal equal to before any LoRA: {torch.equal(outs['plain'], before_out)}")
    if args.profile:
        profile(model, uses)

    # keep only the merged UNet and text weights, by diffusers/transformers names; free the rest
    diffusers_name = unet_diffusers_name(model.cfg.unet)
    result["unet"] = {diffusers_name(k[len(UNET):]): merged[k] for k in unet_keys}
    result["text"] = {k[len(TEXT):].removeprefix("text_model."): merged[k] for k in merged if k.startswith(TEXT)}
    kept = sum(v.numel() * v.element_size() for v in merged.values()) / 2**30
    del model, now, merged, plain, step, outs, before_out
    gc.collect()
    print(f"  freed the sdcli model before loading diffusers (kept its {len(unet_keys)} merged UNet and "
          f"{len(result['text'])} text weights for the comparison: {kept:.2f} GiB)")
    return result


def apply_and_remove(model, uses, repeats: int) -> tuple[list, list, dict]:
    """Clocks of each apply (Loras.prepare + switch) and removal (switch to ()), and the last merge's weights:
    {state-dict name: merged tensor} (new tensors, the Patcher's, kept alive after the removal)."""
    from sdcli.networks.loras import Loras

    applies, removes = [], []
    for i in range(repeats):
        loras = Loras([])  # a fresh one each time: prepare reads, matches and checks the file again
        with Clock() as c:
            loras.prepare(uses, model, model.cfg.variant)
            loras.switch(model, uses)
        applies.append(c)
        if i == repeats - 1:  # taken the last time only: an earlier merge held on would add to the next one's peak
            now = model.state_dict()
            merged = {k: now[k] for k in sorted(set(loras.matched[uses[0].name].values()))}
        with Clock() as c:
            loras.switch(model, ())
        removes.append(c)
    return applies, removes, merged


def compare_with_file(model, single: Path) -> tuple[int, int, int]:
    """(weights equal to the file's, weights, weights the file lacks), read one tensor at a time."""
    from safetensors import safe_open

    now = model.state_dict()
    with safe_open(str(single), framework="pt") as f:
        keys = set(f.keys())
        same = sum(torch.equal(v, f.get_tensor(k)) for k, v in now.items() if k in keys)
    return same, len(now), sum(k not in keys for k in now)


def step_times(model, step, plain: dict, merged: dict, repeats: int) -> tuple[dict, dict]:
    """The step with plain and merged weights alternating (swapped in by hand: no merge cost between calls, and
    drift on a shared machine hits both alike); the first round is the warm-up. -> outputs, times."""
    outs, times = {}, {"plain": [], "merged": []}
    for i in range(repeats + 1):
        for name in ("plain", "merged") if i % 2 == 0 else ("merged", "plain"):
            swap(model, plain if name == "plain" else merged)
            t = time.perf_counter()
            outs[name] = step()
            if i:
                times[name].append(time.perf_counter() - t)
    swap(model, plain)
    return outs, times


def unet_step(model, size: int):
    """One classifier-free-guidance UNet call: batch 2 (cond + uncond)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size // 8, size // 8, generator=g)
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, model.cfg.unet.context_dim, generator=g)

    def step():
        with torch.inference_mode():
            return model.unet(x, t, context)
    return step


def swap(model, tensors: dict) -> None:
    """Make `tensors` the model's weights (by state-dict name) without copying: for the step's timing only."""
    for name, t in tensors.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)


class Clock:
    """Wall time and minor page faults of a block."""

    def __enter__(self):
        self.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.start
        self.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.faults


def profile(model, uses) -> None:
    import cProfile
    import pstats

    from sdcli.networks.loras import Loras

    loras = Loras([])
    prof = cProfile.Profile()
    prof.enable()
    loras.prepare(uses, model, model.cfg.variant)
    loras.switch(model, uses)
    loras.switch(model, ())
    prof.disable()
    print("\n  cProfile of one sdcli apply + removal (top 20 by own time):")
    pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(20)


# --- diffusers --------------------------------------------------------------------------------------------------

def bench_diffusers(folder: Path, lora: Path, ours: dict, args) -> dict:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging
    from safetensors import safe_open

    logging.set_verbosity_error()
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    fuses, unfuses = [], []
    for i in range(args.repeats):
        with Clock() as c:
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
            pipe.fuse_lora()
        fuses.append(c)
        if i == args.repeats - 1:
            unet_err = max_difference(ours["unet"], pipe.unet.state_dict())
            text_err = max_difference(ours["text"], pipe.text_encoder.state_dict())
        with Clock() as c:
            pipe.unfuse_lora()
            pipe.unload_lora_weights()
        unfuses.append(c)

    # is diffusers' removal exact? (it subtracts the delta again)
    state = pipe.unet.state_dict()
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        back = [(state[k] - f.get_tensor(k)).abs().max().item() for k in ours["unet"]]
    result = dict(apply=statistics.median(c.wall for c in fuses), remove=statistics.median(c.wall for c in unfuses))
    print("\ndiffusers")
    print(f"  load_lora_weights + fuse_lora        {result['apply']:7.3f} s   [{fmt(fuses)}]")
    print(f"  unfuse_lora + unload_lora_weights    {result['remove']:7.3f} s   [{fmt(unfuses)}]")
    print(f"  after removal: {sum(e == 0 for e in back)} of {len(back)} patched UNet weights bit for bit, "
          f"max |W - original| {max(back):.3e}")
    print(f"  sdcli merged vs diffusers fused: max |diff| UNet {unet_err[0]:.3e} ({unet_err[1]} weights), "
          f"text encoder {text_err[0]:.3e} ({text_err[1]} weights)")
    return result


def max_difference(ours: dict, state: dict) -> tuple[float, int]:
    """Largest |ours - theirs| over our weights; PEFT's wrapped layers keep theirs under base_layer."""
    theirs = {k.replace(".base_layer.", "."): v for k, v in state.items()}
    missing = [k for k in ours if k not in theirs]
    if missing:
        raise SystemExit(f"{len(missing)} merged weights have no diffusers counterpart, e.g. {missing[:3]}")
    return max((ours[k] - theirs[k]).abs().max().item() for k in ours), len(ours)


def fmt(times: list) -> str:
    """Each repeat: seconds, and the page faults of Clock-timed blocks."""
    return ", ".join(f"{t:.3f}" if isinstance(t, float) else f"{t.wall:.3f} ({t.faults // 1000}k faults)"
                     for t in times)


if __name__ == "__main__":
    main()
