"""`sdcli generate`: gather the requests, plan every image, load the model once, render, write atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sdcli import __version__
from sdcli.batch import (
    REQUEST_KEYS, Job, Request, check_outputs, check_run, default_size, done_keys, load_preset, merge, plan,
    read_prompts, read_prompts_file,
)
from sdcli.errors import SdcliError
from sdcli.progress import Progress


@dataclass(frozen=True)
class RunFlags:
    overwrite: bool = False  # replace existing images
    resume: bool = False  # skip images a previous run of the same batch already wrote
    as_json: bool = False  # one JSON line per image on stdout
    quiet: bool = False  # no progress bars or messages


# what a stored image record can set again (the rest is per-run or per-batch), per task
_IMAGE_KEYS = ("image", "strength", "resize")
_MASK_KEYS = ("mask", "invert_mask", "mask_blur", "extend")
_RERENDER_KEYS = {
    task: tuple(k for k in REQUEST_KEYS if k not in ("output", "n_images", "batch_size", *excluded))
    for task, excluded in {"txt2img": _IMAGE_KEYS + _MASK_KEYS, "img2img": _MASK_KEYS, "inpaint": ()}.items()
}
DEFAULT_STRENGTH = {"img2img": 0.75, "inpaint": 1.0}  # diffusers' defaults


def gather(task: str, prompt: str | None, flags: dict, run: dict, preset: str | None, from_file: str | None,
           from_image: str | None) -> tuple[list[Request], dict, dict | None]:
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
    if preset:
        preset_request, preset_run = load_preset(preset)
        base = merge(base, preset_request, f"preset {preset}")
        run_settings.update(preset_run)
    base = merge(base, flags)
    run_settings.update({k: v for k, v in run.items() if v is not None})
    if not run_settings.get("model") and os.environ.get("SDCLI_MODEL"):
        run_settings["model"] = os.environ["SDCLI_MODEL"]

    if from_file and prompt is not None:
        raise SdcliError("give either a PROMPT or --from-file, not both")
    if from_file:
        return read_prompts_file(from_file, base), run_settings, record
    if prompt == "-":
        return read_prompts(sys.stdin, "stdin", base), run_settings, record
    if prompt is not None:
        return [dataclasses.replace(base, prompt=prompt)], run_settings, record
    if from_image:
        return [base], run_settings, record
    raise SdcliError("no prompt: give a PROMPT, '-' to read prompts from stdin, --from-file FILE or --from-image PNG")


def generate(task: str, prompt: str | None, flags: dict, run: dict, preset: str | None, from_file: str | None,
             from_image: str | None, opts: RunFlags) -> None:
    """`task`: txt2img or img2img. Everything that can be wrong with the input is found before the model
    loads or a file is written."""
    from sdcli.engine import Engine, img2img_steps, pick_device, pick_precision
    from sdcli.loading import inspect_model

    requests, settings, record = gather(task, prompt, flags, run, preset, from_file, from_image)
    if task in DEFAULT_STRENGTH:
        requests = [dataclasses.replace(r, strength=r.strength or DEFAULT_STRENGTH[task]) for r in requests]
    sources = _check_images(task, requests)
    model_path = settings.get("model")
    if not model_path:
        raise SdcliError("no model: pass --model/-m PATH or set SDCLI_MODEL")
    if opts.as_json and any(r.output == "-" for r in requests):
        raise SdcliError("--json and -o - would both write to stdout: choose one")
    device = pick_device(settings.get("device") or "auto")
    precision = pick_precision(settings.get("precision") or "auto", device)
    checkpoint = inspect_model(model_path, vae=settings.get("vae"), prediction=settings.get("prediction"))
    cfg = checkpoint.config
    if cfg.task != "txt2img" and not (task == "inpaint" and cfg.task == "inpainting"):
        wanted = "a text-to-image or an inpainting" if task == "inpaint" else "a text-to-image"
        raise SdcliError(f"{model_path} is a {cfg.variant} model; {task} needs {wanted} model")
    for r in requests:
        if task != "txt2img" and img2img_steps(r.steps, r.strength) < 1:
            raise SdcliError(f"--strength {r.strength:g} of {r.steps} steps runs no step: raise --strength or "
                             "--steps")
        if r.clip_skip + cfg.text.skip_last_layers > cfg.text.layers:
            raise SdcliError(f"--clip-skip {r.clip_skip} is more than this model's text encoder has layers "
                             f"({cfg.text.layers - cfg.text.skip_last_layers} usable)")

    model_name = Path(model_path).stem if Path(model_path).is_file() else Path(model_path).resolve().name
    native = default_size(cfg.family, cfg.prediction)

    def size(r: Request) -> tuple[int, int]:
        if r.image is None:
            return r.width or native, r.height or native
        image = _inpaint_inputs(r, sources)[0] if r.extend else sources[r.image]
        w, h = image.size  # the input's size (grown by --extend), down to multiples of 8
        return r.width or max(8, w // 8 * 8), r.height or max(8, h // 8 * 8)

    jobs = plan(requests, model_name, size)
    console = Progress(quiet=opts.quiet)
    if opts.resume:
        done = done_keys(jobs)
        if any(j.key in done for j in jobs):
            console.message(f"--resume: {sum(j.key in done for j in jobs)} image(s) already written, "
                            f"{sum(j.key not in done for j in jobs)} to go")
        jobs = [j for j in jobs if j.key not in done]
    check_outputs(jobs, opts.overwrite)
    if not jobs:
        return

    from sdcli.metadata import model_hash

    engine = Engine(checkpoint.load(device), device, precision, vae_tiling=settings.get("vae_tiling"))
    vae = settings.get("vae")
    digest = model_hash(model_path)
    if record:
        _explain_differences(record, from_image, digest, console)
    common = dict(model=model_name, model_path=str(Path(model_path).resolve()), model_hash=digest,
                  vae=Path(vae).name if vae else None, vae_path=str(Path(vae).resolve()) if vae else None,
                  prediction=cfg.prediction, precision=precision, version=f"sdcli {__version__}")
    render(task, engine, jobs, sources, common, opts, console)


def _check_images(task: str, requests: list[Request]) -> dict:
    """-> {path: PIL image} of every input image and mask, read now so that a bad file stops the run before it
    starts."""
    from sdcli.images import load_image, mask_tensor

    sources = {}
    for r in requests:
        if task == "txt2img" and r.image is not None:
            raise SdcliError("--image is for img2img and inpaint: run 'sdcli img2img PROMPT --image IN.png'")
        if task != "txt2img" and r.image is None:
            raise SdcliError(f"{task} needs an input image: --image IN.png (or --image on each prompts-file line)")
        if task != "inpaint" and r.mask is not None:
            raise SdcliError("--mask is for inpaint: run 'sdcli inpaint PROMPT --image IN.png --mask MASK.png'")
        if task == "inpaint" and r.mask is None and r.extend is None:
            raise SdcliError("inpaint needs a mask: --mask MASK.png (white = repaint), or --extend to outpaint")
        if task != "inpaint" and r.extend is not None:
            raise SdcliError("--extend is for inpaint: run 'sdcli inpaint PROMPT --image IN.png --extend left=128'")
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
            if repaint.all():
                print(f"note: mask {r.mask} covers the whole image: this is img2img at strength {r.strength:g}",
                      file=sys.stderr)
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
    from sdcli.engine import img2img, img2img_steps, inpaint, txt2img
    from sdcli.images import composite, file_hash, fit, mask_tensor, to_tensor

    if task == "txt2img":
        return txt2img(engine, r.prompt, r.negative_prompt, s, seeds, r.width, r.height, step), {}
    extra = {"image_hash": _cached(sources, ("hash", r.image), lambda: file_hash(r.image)),
             "steps_run": img2img_steps(r.steps, r.strength)}
    if task == "img2img":
        # the same tensor for every batch of the request, so the engine encodes the image once
        image = _cached(sources, ("tensor", r.image, r.width, r.height, r.resize),
                        lambda: to_tensor(fit(sources[r.image], r.width, r.height, r.resize)))
        return img2img(engine, image, r.prompt, r.negative_prompt, s, r.strength, seeds, step), extra
    source, source_mask = _inpaint_inputs(r, sources)
    original = fit(source, r.width, r.height, r.resize)
    mask = mask_tensor(fit(source_mask, r.width, r.height, r.resize), r.mask_blur)
    generated = inpaint(engine, to_tensor(original), mask, r.prompt, r.negative_prompt, s, r.strength, seeds, step)
    extra["mask_hash"] = _cached(sources, ("hash", r.mask), lambda: file_hash(r.mask)) if r.mask else None
    return composite(original, generated, mask), extra  # outside the mask: the original pixels


def render(task: str, engine, jobs: list[Job], sources: dict, common: dict, opts: RunFlags,
           console: Progress) -> None:
    """Render the jobs batch by batch; each image is written (or streamed) as soon as it is done."""
    from sdcli.engine import Sampling, img2img_steps

    written = 0
    with console.batch(len(jobs)) as bar:
        try:
            for group in _batches(jobs):
                r = group[0].request
                label = f"{group[0].index}" + (f"-{group[-1].index}" if len(group) > 1 else "") + f"/{len(jobs)}"
                start = time.perf_counter()
                s = Sampling(r.steps, r.cfg_scale, r.sampler, r.schedule, r.clip_skip)
                with bar.image(label, r.steps if task == "txt2img" else img2img_steps(r.steps, r.strength)) as step:
                    images, extra = _render_group(task, engine, r, s, [j.request.seed for j in group], sources, step)
                seconds = (time.perf_counter() - start) / len(group)
                for job, pixels in zip(group, images, strict=True):
                    record = {**{k: getattr(job.request, k) for k in _RERENDER_KEYS[task]}, **common, **extra,
                              "batch_index": job.batch_index, "job": job.key}
                    _write(job, pixels.numpy(), record, opts.overwrite)
                    written += 1
                    bar.advance()
                    if opts.as_json:
                        print(json.dumps({"path": job.path, **record}), flush=True)
                    console.message(f"{'stdout' if job.path == '-' else job.path}  seed {job.request.seed}  "
                                    f"{seconds:.1f} s", force=True)  # the seed is always printed
        except KeyboardInterrupt:
            console.message(f"interrupted after {written} of {len(jobs)} image(s); "
                            "rerun the same command with --resume to continue", force=True)
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
