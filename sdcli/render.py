"""`sdcli generate`: gather the requests, plan every image, load the model once, render, write atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sdcli import __version__, distributed
from sdcli.batch import (
    HIRES_STRENGTH, NAME, REQUEST_KEYS, UPSCALE_NAME, Job, Request, check_outputs, check_run, done_keys, load_preset,
    merge, plan, read_prompts, read_prompts_file, tiling,
)
from sdcli.errors import SdcliError
from sdcli.progress import Progress


@dataclass(frozen=True)
class RunFlags:
    overwrite: bool = False  # replace existing images
    resume: bool = False  # skip images a previous run of the same batch already wrote
    as_json: bool = False  # one JSON line per image on stdout
    quiet: bool = False  # no progress bars or messages


# Request keys that only some commands take (every rendering command takes the others), per task
_HIRES_ONLY = ("hires_strength", "hires_steps", "tile", "tile_overlap")  # generate: need --hires-scale
TASK_KEYS = {
    "txt2img": ("width", "height", "hires_scale", *_HIRES_ONLY),
    "img2img": ("width", "height", "image", "strength", "resize"),
    "inpaint": ("width", "height", "image", "strength", "resize", "mask", "invert_mask", "mask_blur", "extend",
                "crop_to_mask"),
    "upscale": ("image", "strength", "scale", "noise_level", "tile", "tile_overlap"),
}
COMMANDS = {"txt2img": "generate", "img2img": "img2img", "inpaint": "inpaint", "upscale": "upscale"}
_SPECIFIC = {k for keys in TASK_KEYS.values() for k in keys}
_DEFAULTS = Request()
# what a stored image record can set again (the rest is per-run or per-batch), per task
_RERENDER_KEYS = {
    task: tuple(k for k in REQUEST_KEYS if k not in ("output", "n_images", "batch_size")
                and (k not in _SPECIFIC or k in keys))
    for task, keys in TASK_KEYS.items()
}
DEFAULT_STRENGTH = {"img2img": 0.75, "inpaint": 1.0, "upscale": 0.3}  # diffusers' for img2img and inpaint
DEFAULT_NOISE_LEVEL = 20  # diffusers' for the x4 upscaler
MAX_SIZE = 8192  # px a side


def gather(task: str, prompt: str | None, flags: dict, run: dict, preset: str | None, from_file: str | None,
           from_image: str | None, images: list[str] | None = None) -> tuple[list[Request], dict, dict | None]:
    """-> (requests, run settings, the --from-image record) by precedence: defaults < --from-image < --preset
    < flags < a prompts-file line; for the model: -m < preset < the image's model < SDCLI_MODEL."""
    base, run_settings, record = Request(), {}, None
    if from_image:
        from sdcli.metadata import read_png

        record = read_png(from_image)
        base = merge(base, {k: record[k] for k in _RERENDER_KEYS[task] if record.get(k) is not None}, from_image)
        stored = {"model": record.get("model_path"), "vae": record.get("vae_path"),
                  "prediction": record.get("prediction")}
        run_settings.update(check_run({k: v for k, v in stored.items() if v is not None}, from_image))
    if preset:  # a preset serves every command: what this one does not take is left out
        preset_request, preset_run = load_preset(preset)
        preset_request = {k: v for k, v in preset_request.items()
                          if k.replace("-", "_") not in _SPECIFIC or k.replace("-", "_") in TASK_KEYS[task]}
        base = merge(base, preset_request, f"preset {preset}")
        run_settings.update(preset_run)
    base = merge(base, flags)
    run_settings.update({k: v for k, v in run.items() if v is not None})
    if not run_settings.get("model") and os.environ.get("SDCLI_MODEL"):
        run_settings["model"] = os.environ["SDCLI_MODEL"]

    if images and prompt == "-":
        raise SdcliError("--prompt - reads prompts from stdin, which IMAGE arguments leave no room for: give the "
                         "prompt as text, or lines such as 'a cat -i in.png' on stdin")
    if from_file and (prompt is not None or images):
        raise SdcliError(f"give either {'IMAGE arguments' if images else 'a PROMPT'} or --from-file, not both")
    need_prompt = task != "upscale"  # upscales take an optional --prompt
    if from_file:
        return read_prompts_file(from_file, base, need_prompt), run_settings, record
    if prompt == "-":
        return read_prompts(sys.stdin, "stdin", base, need_prompt), run_settings, record
    if images:
        return [dataclasses.replace(base, image=i, prompt=prompt or base.prompt) for i in images], run_settings, record
    if prompt is not None:
        return [dataclasses.replace(base, prompt=prompt)], run_settings, record
    if from_image or not need_prompt:
        return [base], run_settings, record
    raise SdcliError("no prompt: give a PROMPT, '-' to read prompts from stdin, --from-file FILE or --from-image PNG")


def generate(task: str, prompt: str | None, flags: dict, run: dict, preset: str | None, from_file: str | None,
             from_image: str | None, opts: RunFlags, images: list[str] | None = None) -> None:
    """`task`: txt2img, img2img, inpaint or upscale (`images`: its input files). Everything that can be wrong
    with the input is found before the model loads or a file is written.

    Under torchrun every process plans the whole run the same way (the same names, seeds and checks; rank 0's
    clock and random seeds), then renders its share of the batches (see _share)."""
    from sdcli.engine import pick_device, pick_precision
    from sdcli.loading import inspect_model

    processes = distributed.world()[1]
    if processes > 1 and prompt == "-" and not from_file:  # each process would read a part of it
        raise SdcliError(f"reading prompts from stdin does not work under torchrun ({processes} processes): "
                         "put them in a file and pass --from-file FILE")
    requests, settings, record = gather(task, prompt, flags, run, preset, from_file, from_image, images)
    if processes > 1 and any(r.output == "-" for r in requests):
        raise SdcliError(f"writing images to stdout does not work under torchrun ({processes} processes): "
                         "give an output folder")
    sources = _check_images(task, requests)
    model_path = settings.get("model")
    if not model_path:
        model_path = demo_model()
        if distributed.is_main():
            Progress(quiet=opts.quiet).message(
                "using the built-in demo model (64x64 coloured shapes, e.g. \"a large red circle on a blue background "
                "in the top left\"); for real images pass --model/-m FILE.safetensors|FOLDER or set SDCLI_MODEL")
    if opts.as_json and any(r.output == "-" for r in requests):
        raise SdcliError("--json and -o - would both write to stdout: choose one")
    device = distributed.device_for_rank(pick_device(settings.get("device") or "auto"))
    precision = pick_precision(settings.get("precision") or "auto", device)
    checkpoint = inspect_model(model_path, vae=settings.get("vae"), prediction=settings.get("prediction"))
    cfg = checkpoint.config
    usable = {"txt2img": ("txt2img",), "img2img": ("txt2img",), "inpaint": ("txt2img", "inpainting"),
              "upscale": ("txt2img", "upscale-x4")}[task]
    if cfg.task not in usable:
        wanted = " or ".join({"txt2img": "a text-to-image", "inpainting": "an inpainting",
                              "upscale-x4": "an x4 upscaler"}[t] for t in usable)
        raise SdcliError(f"{model_path} is a {cfg.variant} model; {COMMANDS[task]} needs {wanted} model")
    if record and task == "upscale":  # --from-image of another kind of render: the setting this model does
        other = "strength" if cfg.task == "upscale-x4" else "noise_level"  # not take is left out
        if other not in flags:
            requests = [dataclasses.replace(r, **{other: None}) if getattr(r, other) == record.get(other) else r
                        for r in requests]
    requests = [_resolve(task, r, cfg) for r in requests]

    model_name = Path(model_path).stem if Path(model_path).is_file() else Path(model_path).resolve().name
    native = cfg.native_size

    def size(r: Request) -> tuple[int, int]:
        """The size the model renders at (the output's, but for --crop-to-mask and the hires fix)."""
        if task == "txt2img":
            w, h = r.width or native, r.height or native
            if r.hires_scale:
                _scaled(w, h, r.hires_scale)  # the size limit, checked before the first image
            return w, h
        if task == "upscale":
            w, h = sources[r.image].size
            return _scaled(w, h, r.scale, multiple=1)  # exact: rendered at multiples of 8, then resized
        image, mask = _inpaint_inputs(r, sources) if task == "inpaint" else (sources[r.image], None)
        if r.crop_to_mask is not None and not (r.width and r.height):
            from sdcli.images import mask_box

            left, top, right, bottom = mask_box(mask, r.crop_to_mask)  # the box's shape: its longer side native,
            bw, bh = right - left, bottom - top  # or the side given
            w, h = _scaled(bw, bh, r.width / bw if r.width else r.height / bh if r.height else native / max(bw, bh))
        else:  # the input's size (grown by --extend), down to multiples of 8
            w, h = max(8, image.size[0] // 8 * 8), max(8, image.size[1] // 8 * 8)
        return r.width or w, r.height or h

    owned = not distributed.initialized()  # leave a process group made by someone else (a training run) alone
    distributed.init(device.type)
    try:
        _plan_and_render(task, requests, sources, size, model_name, model_path, checkpoint, device, precision,
                         settings, record, from_image, opts)
    finally:
        if owned:
            distributed.cleanup()


def _plan_and_render(task: str, requests: list[Request], sources: dict, size, model_name: str, model_path: str,
                     checkpoint, device, precision: str, settings: dict, record: dict | None,
                     from_image: str | None, opts: RunFlags) -> None:
    """generate, once the requests are checked: plan every image, check the outputs, load the model, render."""
    from sdcli.engine import Engine

    cfg = checkpoint.config
    rank, processes, _ = distributed.world()
    now = draw = None
    if processes > 1:  # every process plans the run; rank 0's clock ({date}, {time}) and random seeds serve all
        import datetime
        import random
        import secrets

        now, entropy = distributed.broadcast((datetime.datetime.now(), secrets.randbits(128)))
        draw = random.Random(entropy).randrange  # randrange(n): below n, like secrets.randbelow
    jobs = plan(requests, model_name, size, now=now, name=UPSCALE_NAME if task == "upscale" else NAME, draw=draw)
    console = Progress(quiet=opts.quiet)
    if processes > 1 and os.environ.get("LOCAL_WORLD_SIZE") != "1":
        console.live = False  # bars of processes sharing a terminal would overwrite each other's lines
    if opts.resume:  # under torchrun: what any process finds (their folders may not be shared)
        done = done_keys(jobs) if processes == 1 else set().union(*distributed.all_gather(done_keys(jobs)))
        if any(j.key in done for j in jobs) and rank == 0:
            console.message(f"--resume: {sum(j.key in done for j in jobs)} image(s) already written, "
                            f"{sum(j.key not in done for j in jobs)} to go")
        jobs = [j for j in jobs if j.key not in done]
    check_outputs(jobs, opts.overwrite)
    if not jobs:
        return
    distributed.barrier()  # every process has checked the outputs (and read --resume's) before any is written
    total = len(jobs)
    jobs = _share(jobs, rank, processes)
    if not jobs:  # fewer batches than processes
        return

    from sdcli.metadata import model_hash

    engine = Engine(checkpoint.load(device), device, precision, vae_tiling=settings.get("vae_tiling"))
    vae = settings.get("vae")
    digest = model_hash(model_path)
    if record and rank == 0:
        _explain_differences(record, from_image, digest, console)
    common = dict(model=model_name, model_path=str(Path(model_path).resolve()), model_hash=digest,
                  vae=Path(vae).name if vae else None, vae_path=str(Path(vae).resolve()) if vae else None,
                  prediction=cfg.prediction, precision=precision, version=f"sdcli {__version__}")
    render(task, engine, jobs, sources, common, opts, console, total=total)


def demo_model() -> str:
    """The built-in demo model: a diffusers folder shipped inside the package (trained by scripts/train_demo.sh)."""
    folder = Path(__file__).resolve().parent / "demo"
    if not (folder / "model_index.json").is_file():
        raise SdcliError(f"no model: the built-in demo model is missing from this install ({folder}); pass "
                         "--model/-m PATH or set SDCLI_MODEL, or reinstall sdcli")
    return str(folder)


def _share(jobs: list[Job], rank: int, processes: int) -> list[Job]:
    """The jobs process `rank` of `processes` renders: whole batches (the batches of a single-process run, so
    every image is rendered with the same batch-mates, and gets the same pixels), dealt round robin. Rendering
    the share batches it the same way again: a batch short of its batch size is its prompt's last."""
    return [job for group in distributed.shard(_batches(jobs), rank, processes) for job in group]


def _resolve(task: str, r: Request, cfg) -> Request:
    """The task's defaults that depend on the model, and the checks that need it."""
    from sdcli.engine import img2img_steps

    x4 = cfg.task == "upscale-x4"
    if task == "upscale" and x4:
        if r.strength is not None:
            raise SdcliError("--strength is for upscaling with ordinary models: an x4 upscaler model starts from "
                             "noise; to keep closer to the input, lower --noise-level")
        r = dataclasses.replace(r, scale=r.scale or 4.0, noise_level=DEFAULT_NOISE_LEVEL if r.noise_level is None
                                else r.noise_level)
        if r.noise_level > cfg.max_noise_level:
            raise SdcliError(f"--noise-level {r.noise_level} is above this model's highest, {cfg.max_noise_level}")
    elif task == "upscale":
        if r.noise_level is not None:
            raise SdcliError("--noise-level is for x4 upscaler models; this model upscales with Lanczos and a "
                             "low-strength img2img pass: use --strength")
        r = dataclasses.replace(r, scale=r.scale or 2.0)
    if task in DEFAULT_STRENGTH and not x4:
        r = dataclasses.replace(r, strength=r.strength or DEFAULT_STRENGTH[task])
        if img2img_steps(r.steps, r.strength) < 1:
            raise SdcliError(f"--strength {r.strength:g} of {r.steps} steps runs no step: raise --strength or "
                             "--steps")
    if task == "txt2img" and not r.hires_scale:
        unused = [k for k in _HIRES_ONLY if getattr(r, k) is not None]
        if unused:
            raise SdcliError(f"--{unused[0].replace('_', '-')} applies to the hires fix: add --hires-scale (e.g. 2)")
    if task == "txt2img" and r.hires_scale:
        r = dataclasses.replace(r, hires_strength=r.hires_strength or HIRES_STRENGTH)
    if task == "upscale" or r.hires_scale:
        tile, overlap = tiling(r)
        r = dataclasses.replace(r, tile=tile, tile_overlap=overlap)
    if r.clip_skip + cfg.text.skip_last_layers > cfg.text.layers:
        raise SdcliError(f"--clip-skip {r.clip_skip} is more than this model's text encoder has layers "
                         f"({cfg.text.layers - cfg.text.skip_last_layers} usable)")
    return r


def _scaled(width: int, height: int, scale: float, multiple: int = 8) -> tuple[int, int]:
    """width x height times `scale`, rounded to multiples of `multiple`, or an error above MAX_SIZE."""
    w, h = (max(multiple, round(v * scale / multiple) * multiple) for v in (width, height))
    if max(w, h) > MAX_SIZE:
        raise SdcliError(f"{width}x{height} scaled by {scale:g} is {w}x{h}, over {MAX_SIZE} px a side: "
                         "lower the scale")
    return w, h


def steps_run(task: str, r: Request, cfg) -> int:
    """UNet steps one image takes (the progress bar's length, recorded with the image)."""
    from sdcli.engine import img2img_steps

    if task == "txt2img":
        return r.steps + ((r.hires_steps or r.steps) if r.hires_scale else 0)
    if task == "upscale" and cfg.task == "upscale-x4":
        return r.steps
    return img2img_steps(r.steps, r.strength)


def _check_images(task: str, requests: list[Request]) -> dict:
    """-> {path: PIL image} of every input image and mask, read now so that a bad file stops the run before it
    starts."""
    from sdcli.images import load_image, mask_tensor

    sources = {}
    for r in requests:
        for key in _SPECIFIC.difference(TASK_KEYS[task]):
            if getattr(r, key) != getattr(_DEFAULTS, key):
                takers = " and ".join(COMMANDS[t] for t, keys in TASK_KEYS.items() if key in keys)
                raise SdcliError(f"--{key.replace('_', '-')} is for {takers}, not {COMMANDS[task]}"
                                 + (" (upscale takes --scale)" if key in ("width", "height") else ""))
        if task != "txt2img" and r.image is None:
            raise SdcliError(f"{task} needs an input image: "
                             + ("sdcli upscale IN.png" if task == "upscale" else "--image IN.png")
                             + " (or --image on each prompts-file line)")
        if task == "inpaint" and r.mask is None and r.extend is None:
            raise SdcliError("inpaint needs a mask: --mask MASK.png (white = repaint), or --extend to outpaint")
        for path in (r.image, r.mask):
            if path is not None and path not in sources:
                sources[path] = load_image(path)
        if task == "inpaint":
            image, mask = sources[r.image], sources.get(r.mask)
            if mask is not None and mask.size != image.size:
                raise SdcliError(f"mask {r.mask} is {mask.size[0]}x{mask.size[1]} but image {r.image} is "
                                 f"{image.size[0]}x{image.size[1]}: give a mask of the image's size")
            repaint = mask_tensor(_inpaint_inputs(r, sources)[1], 0) >= 0.5
            if not repaint.any():
                raise SdcliError(f"mask {r.mask} has nothing to repaint{' once inverted' if r.invert_mask else ''}: "
                                 "white (or light grey) marks what to repaint")
            if repaint.all() and distributed.is_main():
                print(f"note: mask {r.mask} covers the whole image: this is img2img at strength "
                      f"{r.strength or DEFAULT_STRENGTH[task]:g}", file=sys.stderr)
    return sources


def _inpaint_inputs(r: Request, sources: dict):
    """(image, mask) to inpaint, the mask white where to repaint: inverted by --invert-mask, and with
    --extend grown together with the image (its new border always repainted). Cached in `sources`."""
    from PIL import ImageOps

    from sdcli.images import extend, parse_extend

    key = ("inpaint", r.image, r.mask, r.extend, r.invert_mask)
    if key not in sources:
        mask = sources.get(r.mask)
        if mask is not None and r.invert_mask:
            mask = ImageOps.invert(mask.convert("L"))
        sources[key] = extend(sources[r.image], mask, parse_extend(r.extend)) if r.extend else (sources[r.image], mask)
    return sources[key]


def _cached(sources: dict, key: tuple, make):
    """`sources` doubles as the run's cache of what its inputs give (hashes, fitted tensors)."""
    if key not in sources:
        sources[key] = make()
    return sources[key]


def _render_group(task: str, engine, r: Request, s, seeds: list[int], sources: dict, step):
    """One batch of one request -> (uint8 images [B, H, W, 3], the task's own record fields)."""
    from sdcli.engine import img2img, img2img_schedule, inpaint, txt2img, upscale_x4
    from sdcli.images import composite, file_hash, fit, lanczos, mask_box, mask_tensor, paste, to_tensor

    extra = {"steps_run": steps_run(task, r, engine.cfg)}
    if task == "txt2img":
        images = txt2img(engine, r.prompt, r.negative_prompt, s, seeds, r.width, r.height, step)
        if r.hires_scale:  # the hires fix: upscale's path (Lanczos, then tiled img2img) on the same seeds
            big = to_tensor(lanczos(images, *_scaled(r.width, r.height, r.hires_scale)))
            hires = dataclasses.replace(s, steps=img2img_schedule(r.hires_steps or r.steps, r.hires_strength))
            images = img2img(engine, big, r.prompt, r.negative_prompt, hires, r.hires_strength, seeds, step,
                             (r.tile, r.tile_overlap))
        return images, extra
    extra["image_hash"] = _cached(sources, ("hash", r.image), lambda: file_hash(r.image))
    source = sources[r.image]
    if task == "upscale":
        extra.update(width=r.width, height=r.height)  # the output's size
        if engine.cfg.task == "upscale-x4":
            image = _cached(sources, ("tensor", r.image), lambda: to_tensor(source))
            images = upscale_x4(engine, image, r.prompt, r.negative_prompt, s, r.noise_level, seeds, step,
                                (r.tile, r.tile_overlap))
        else:  # Lanczos to multiples of 8, then a tiled img2img pass at low strength
            size = _scaled(r.width, r.height, 1)
            big = _cached(sources, ("tensor", r.image, size), lambda: to_tensor(lanczos(source, *size)))
            images = img2img(engine, big, r.prompt, r.negative_prompt, s, r.strength, seeds, step,
                             (r.tile, r.tile_overlap))
        if images.shape[1:3] != (r.height, r.width):  # x4 at another --scale, or a size not a multiple of 8
            images = lanczos(images, r.width, r.height)
        return images, extra
    if task == "img2img":
        # the same tensor for every batch of the request, so the engine encodes the image once
        image = _cached(sources, ("tensor", r.image, r.width, r.height, r.resize),
                        lambda: to_tensor(fit(source, r.width, r.height, r.resize)))
        return img2img(engine, image, r.prompt, r.negative_prompt, s, r.strength, seeds, step), extra
    source, source_mask = _inpaint_inputs(r, sources)
    extra["mask_hash"] = _cached(sources, ("hash", r.mask), lambda: file_hash(r.mask)) if r.mask else None
    if r.crop_to_mask is None:
        region, region_mask = (fit(i, r.width, r.height, r.resize) for i in (source, source_mask))
    else:  # only the mask's box, rendered at -W x -H (so small masks get the model's full resolution)
        box = mask_box(source_mask, r.crop_to_mask, r.width / r.height)
        region, region_mask = (fit(i.crop(box), r.width, r.height, "stretch") for i in (source, source_mask))
    mask = mask_tensor(region_mask, r.mask_blur)
    generated = inpaint(engine, to_tensor(region), mask, r.prompt, r.negative_prompt, s, r.strength, seeds, step)
    if r.crop_to_mask is None:
        return composite(region, generated, mask), extra  # outside the mask: the original pixels
    extra["crop_box"] = list(box)  # pasted back into the full-size input, then composited the same way
    return composite(source, paste(source, generated, box), mask_tensor(source_mask, r.mask_blur)), extra


def render(task: str, engine, jobs: list[Job], sources: dict, common: dict, opts: RunFlags,
           console: Progress, total: int | None = None) -> None:
    """Render the jobs batch by batch; each image is written (or streamed) as soon as it is done. `total`: the
    run's images, when `jobs` is this process's share of them (under torchrun)."""
    from sdcli.engine import Sampling

    total = len(jobs) if total is None else total
    written = 0
    with console.batch(len(jobs)) as bar:
        try:
            for group in _batches(jobs):
                r = group[0].request
                label = f"{group[0].index}" + (f"-{group[-1].index}" if len(group) > 1 else "") + f"/{total}"
                start = time.perf_counter()
                s = Sampling(r.steps, r.cfg_scale, r.sampler, r.schedule, r.clip_skip)
                with bar.image(label, steps_run(task, r, engine.cfg)) as step:
                    images, extra = _render_group(task, engine, r, s, [j.request.seed for j in group], sources, step)
                seconds = (time.perf_counter() - start) / len(group)
                for job, pixels in zip(group, images, strict=True):
                    record = {**{k: getattr(job.request, k) for k in _RERENDER_KEYS[task]}, **common, **extra,
                              "batch_index": job.batch_index, "job": job.key}
                    _write(job, pixels.numpy(), record, opts.overwrite)
                    written += 1
                    bar.advance()
                    if opts.as_json:
                        print(json.dumps({"path": job.path, **record, "seconds": round(seconds, 3)}), flush=True)
                    console.message(f"{'stdout' if job.path == '-' else job.path}  seed {job.request.seed}  "
                                    f"{seconds:.1f} s", force=True)  # the seed is always printed
        except KeyboardInterrupt:
            if total == len(jobs):
                console.message(f"interrupted after {written} of {len(jobs)} image(s); "
                                "rerun the same command with --resume to continue", force=True)
            elif distributed.is_main():  # the others' counts are theirs
                console.message("interrupted; rerun the same command with --resume to continue", force=True)
            raise


def _explain_differences(record: dict, source: str, digest: str | None, console: Progress) -> None:
    """--from-image: say what will not be the same as in the source image."""
    if record.get("extra"):  # A1111 settings we have no counterpart for (hires fix, variation seeds, ...)
        console.message(f"note: {source}: not reproduced: {', '.join(record['extra'])}", force=True)
    if record.get("model_hash") and digest and record["model_hash"] != digest:
        console.message(f"note: {source} was made with model {record.get('model', '?')} (hash "
                        f"{record['model_hash']}); this model's hash is {digest}", force=True)


def _batches(jobs: list[Job]) -> list[list[Job]]:
    """Consecutive images of the same prompt, at most batch_size at a time."""
    groups: list[list[Job]] = []
    for job in jobs:
        last = groups[-1] if groups else None
        if last and last[0].group == job.group and len(last) < job.request.batch_size:
            last.append(job)
        else:
            groups.append([job])
    return groups


def _write(job: Job, pixels, record: dict, overwrite: bool) -> None:
    from PIL import Image

    from sdcli.fileio import atomic_path
    from sdcli.metadata import encode_png

    data = encode_png(Image.fromarray(pixels), record)
    if job.path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    path = Path(job.path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SdcliError(f"cannot create folder {path.parent}: {e.strerror or e}") from None
    with atomic_path(path, overwrite) as tmp:
        tmp.write_bytes(data)
