"""`sdcli generate`: gather the requests, plan every image, load the model once, render, write atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sdcli import __version__, distributed
from sdcli.batch import MAX_RUN_IMAGES, Request, check_run, check_weights, merge, validate
from sdcli.jobs import Job, check_outputs, done_keys, plan
from sdcli.errors import SdcliError
from sdcli.fileio import write_stdout
from sdcli.networks.run import ignored_tags, network_record, prepare_networks
from sdcli.networks.tags import with_lora_tags
from sdcli.preview import check_preview, preview_path
from sdcli.progress import Progress
from sdcli.prompts_file import load_preset, read_prompts_file, read_stdin

if TYPE_CHECKING:
    from sdcli.tasks import Task


@dataclass(frozen=True)
class RunFlags:
    overwrite: bool = False  # replace existing images
    resume: bool = False  # skip images a previous run of the same batch already wrote
    as_json: bool = False  # one JSON line per image on stdout
    quiet: bool = False  # no progress bars or messages
    preview: int | None = None  # write a live preview every N steps (preview.Previewer)


@dataclass(frozen=True)
class Run:
    """A `generate` run whose requests are checked against the model, before anything is planned."""

    task: Task
    requests: list[Request]  # resolved by the task
    sources: dict  # {path: PIL image} of the input images and masks, and the run's cache (see tasks.base.cached)
    model_path: str
    checkpoint: object  # loading.inspect_model's: the model's config, loaded on demand
    device: object  # torch.device
    precision: str
    settings: dict  # the run's settings (model, vae, vae_tiling, ...)
    record: dict | None  # --from-image's
    from_image: str | None
    opts: RunFlags
    loras: object  # networks.loras.Loras: every LoRA the prompts name, found and checked against the model
    embeddings: object  # networks.embeddings.Embeddings, or None without --embeddings-dir
    refiner: object = None  # --refiner's checkpoint (loading.inspect_model's), or None
    tiny: object = None  # --vae-decoder's models.taesd.TinyAutoencoder, or None
    weights: str = "fp32"  # --weights, decided: "fp32", or "fp16" (stored in half, upcast per layer)

    @property
    def model_name(self) -> str:
        return model_name(self.model_path)


def model_name(path: str) -> str:
    """A model's name in file names and metadata: a file's stem, a folder's name."""
    path = Path(path)
    return path.stem if path.is_file() else path.resolve().name


def gather(task: Task, prompt: str | None, flags: dict, run: dict, preset: str | None, from_file: str | None,
           from_image: str | None, images: list[str] | None = None) -> tuple[list[Request], dict, dict | None]:
    """-> (requests, run settings, the --from-image record) by precedence: defaults < --from-image < --preset
    < flags < a prompts-file line; for the model: -m < preset < the image's model < SDCLI_MODEL."""
    from sdcli.tasks import rerender_keys, takes

    base, run_settings, record = Request(), {}, None
    if from_image:
        from sdcli.metadata import read_png

        record = read_png(from_image)
        base = merge(base, {k: record[k] for k in rerender_keys(task) if record.get(k) is not None}, from_image)
        stored = {"model": record.get("model_path"), "vae": record.get("vae_path"),
                  "vae_decoder": record.get("vae_decoder_path"),
                  "refiner": record.get("refiner_path") if task.refines else None,
                  "prediction": record.get("prediction")}
        run_settings.update(check_run({k: v for k, v in stored.items() if v is not None}, from_image))
    if preset:  # a preset serves every command: what this one does not take is left out
        preset_request, preset_run = load_preset(preset)
        preset_request = {k: v for k, v in preset_request.items() if takes(task, k.replace("-", "_"))}
        base = merge(base, preset_request, f"preset {preset}")
        run_settings.update({k: v for k, v in preset_run.items() if k != "refiner" or task.refines})
    base = merge(base, flags)
    run_settings.update({k: v for k, v in run.items() if v is not None})
    if not run_settings.get("model") and os.environ.get("SDCLI_MODEL"):
        run_settings["model"] = os.environ["SDCLI_MODEL"]
    if record and not run_settings.get("refiner") and base.refiner_switch == record.get("refiner_switch"):
        base = dataclasses.replace(base, refiner_switch=None)  # its refiner is not here (_explain_differences)

    if images and prompt == "-":
        raise SdcliError("--prompt - reads prompts from stdin, which IMAGE arguments leave no room for: give the "
                         "prompt as text, or lines such as 'a cat -i in.png' on stdin")
    if from_file and (prompt is not None or images):
        raise SdcliError(f"give either {'IMAGE arguments' if images else 'a PROMPT'} or --from-file, not both")
    if from_file:
        requests = read_prompts_file(from_file, base, task.needs_prompt)
    elif prompt == "-":
        requests = read_stdin(base, task.needs_prompt)
    elif images:
        requests = [dataclasses.replace(base, image=i, prompt=prompt or base.prompt) for i in images]
    elif prompt is not None:
        requests = [dataclasses.replace(base, prompt=prompt)]
    elif from_image or not task.needs_prompt:
        requests = [base]
    else:
        raise SdcliError("no prompt: give a PROMPT, '-' to read prompts from stdin, --from-file FILE or --from-image "
                         "PNG")
    # validated again: the prompt from argv is not yet checked, and --lora's tags join the prompt
    return [validate(with_lora_tags(r)) for r in requests], run_settings, record


def generate(task: str, prompt: str | None, flags: dict, run: dict, preset: str | None, from_file: str | None,
             from_image: str | None, opts: RunFlags, images: list[str] | None = None) -> None:
    """`task`: txt2img, img2img, inpaint or upscale (`images`: its input files). Everything that can be wrong
    with the input is found before the model loads or a file is written.

    Under torchrun every process plans the whole run the same way (the same names, seeds and checks; rank 0's
    clock and random seeds), then renders its share of the batches (see _share)."""
    from sdcli.tasks import TASKS

    task = TASKS[task]  # the name, from here on the task itself
    processes = distributed.world()[1]
    if processes > 1 and prompt == "-" and not from_file:  # each process would read a part of it
        raise SdcliError(f"reading prompts from stdin does not work under torchrun ({processes} processes): "
                         "put them in a file and pass --from-file FILE")
    requests, settings, record = gather(task, prompt, flags, run, preset, from_file, from_image, images)
    if processes > 1 and any(r.output == "-" for r in requests):
        raise SdcliError(f"writing images to stdout does not work under torchrun ({processes} processes): "
                         "give an output folder")
    if opts.as_json and any(r.output == "-" for r in requests):
        raise SdcliError("--json and -o - would both write to stdout: choose one")
    if (total := sum(r.n_images for r in requests)) > MAX_RUN_IMAGES:
        raise SdcliError(f"the run asks for {total:,} images, more than the {MAX_RUN_IMAGES:,} a run renders: "
                         "split the prompts or lower --n-images")
    if opts.preview is not None:
        check_preview(opts.preview, requests)
    check_weights(settings.get("weights"))
    sources = _load_inputs(task, requests)
    # everything above reads only the user's input; the model (and torch) come from here on
    from sdcli.engine import pick_device, pick_precision
    from sdcli.loading import inspect_model
    from sdcli.loading.taesd import for_run as tiny_for_run, split_vae
    from sdcli.models.manual_cast import fp32_bytes, pick_weights

    model_path = settings.get("model") or demo_model()
    device = distributed.device_for_rank(pick_device(settings.get("device") or "auto"))
    precision = pick_precision(settings.get("precision") or "auto", device)
    settings = split_vae(settings)
    checkpoint = inspect_model(model_path, vae=settings.get("vae"), prediction=settings.get("prediction"))
    cfg = checkpoint.config
    task.check_model(cfg, model_path)
    tiny, note = tiny_for_run(settings, cfg, device, half=precision == "fp16")
    refiner = _refiner(task, settings.get("refiner"), cfg, model_path)
    asked, needed = settings.get("weights") or "auto", fp32_bytes(checkpoint, refiner)
    weights = pick_weights(asked, needed, device)
    notes = [note] if note else []
    if asked == "auto" and weights == "fp16":
        notes.append(f"the fp32 model needs about {needed / 2**30:.1f} GiB and less RAM is free: its weights are "
                     "kept in fp16 and upcast per layer (--weights fp32 to keep them in fp32)")
    if record:
        requests = task.adopt_record(requests, record, flags, cfg)
    requests = [task.resolve(r, cfg, refined=refiner is not None) for r in requests]
    loras, embeddings = prepare_networks(requests, settings, checkpoint)

    owned = not distributed.initialized()  # leave a process group made by someone else (a training run) alone
    distributed.init(device.type)
    try:
        _plan_and_render(Run(task, requests, sources, model_path, checkpoint, device, precision, settings, record,
                             from_image, opts, loras, embeddings, refiner, tiny, weights), notes)
    finally:
        if owned:
            distributed.cleanup()


def _refiner(task: Task, path: str | None, cfg, model_path: str):
    """--refiner's checkpoint (inspect_model's), checked against the base model, or None without one."""
    if path is None:
        return None
    from sdcli.loading import inspect_model
    from sdcli.tasks.base import a_model

    if not task.refines:
        raise SdcliError(f"--refiner finishes the images of generate and img2img, not of {task.command}: leave it out")
    refiner = inspect_model(path)
    if refiner.config.task != "refiner":
        raise SdcliError(f"--refiner {path} is {a_model(refiner.config)}, not an SDXL refiner: give the refiner "
                         "(e.g. sd_xl_refiner_1.0.safetensors), or pass this model as --model")
    if cfg.task == "refiner" or "original_width" not in cfg.kind.added:
        raise SdcliError(f"--refiner finishes an SDXL base model's images; {model_path} is {a_model(cfg)}: give "
                         "an SDXL base as --model, or leave --refiner out")
    return refiner


def _load_inputs(task: Task, requests: list[Request]) -> dict:
    """-> {path: PIL image} of every input image and mask, read now so that a bad file stops the run before it
    starts."""
    from sdcli.tasks import check_keys

    sources: dict = {}
    for r in requests:
        check_keys(task, r)
        task.load(r, sources)
    return sources


def _plan_and_render(run: Run, notes: list[str] = ()) -> None:
    """generate, once the requests are checked: plan every image, check the outputs, load the model, render."""
    from sdcli.engine import Engine
    from sdcli.models.manual_cast import STORAGE

    cfg = run.checkpoint.config
    rank, processes, _ = distributed.world()
    now = draw = None
    if processes > 1:  # every process plans the run; rank 0's clock ({date}, {time}) and random seeds serve all
        import datetime
        import random
        import secrets

        now, entropy = distributed.broadcast((datetime.datetime.now(), secrets.randbits(128)))
        draw = random.Random(entropy).randrange  # randrange(n): below n, like secrets.randbelow
    jobs = plan(run.requests, run.model_name, lambda r: run.task.size(r, run.sources, cfg.native_size), now=now,
                name=run.task.output_name, draw=draw)
    console = Progress(quiet=run.opts.quiet)
    if processes > 1 and os.environ.get("LOCAL_WORLD_SIZE") != "1":
        console.live = False  # bars of processes sharing a terminal would overwrite each other's lines
    if run.opts.resume:  # under torchrun: what any process finds (their folders may not be shared)
        done = done_keys(jobs) if processes == 1 else set().union(*distributed.all_gather(done_keys(jobs)))
        if any(j.key in done for j in jobs) and rank == 0:
            console.message(f"--resume: {sum(j.key in done for j in jobs)} image(s) already written, "
                            f"{sum(j.key not in done for j in jobs)} to go")
        jobs = [j for j in jobs if j.key not in done]
    check_outputs(jobs, run.opts.overwrite)
    if not jobs:
        return
    if processes == 1:  # a killed run's half-written images (under torchrun, the process ids are other hosts')
        from sdcli.fileio import clean_stale_temps

        for folder in sorted({Path(j.path).parent for j in jobs if j.path != "-"}):
            if note := clean_stale_temps([folder], folder):
                console.message(note)
    distributed.barrier()  # every process has checked the outputs (and read --resume's) before any is written
    total = len(jobs)
    jobs = _share(jobs, rank, processes)
    if not jobs:  # fewer batches than processes
        return

    from sdcli.hashing import model_hash

    if not run.settings.get("model") and rank == 0:  # said once every check has passed: errors stay one line
        console.message("using the built-in demo model (64x64 coloured shapes, e.g. \"a large red circle on a blue "
                        "background in the top left\"); for real images pass --model/-m FILE.safetensors|FOLDER or "
                        "set SDCLI_MODEL")
    for note in run.checkpoint.notes if rank == 0 else ():  # what the model's files left unsaid, sdcli assumed
        console.message(f"note: {run.model_path}: {note}")
    for note in notes if rank == 0 else ():  # the run's choices made for the user (--vae-decoder, --weights)
        console.message(f"note: {note}")
    if (ignored := ignored_tags(run.requests)) and rank == 0:
        console.message(f"note: sdcli does not load {', '.join(ignored)} (only <lora:...> extra networks): "
                        "left out of the prompt")
    storage = STORAGE[run.weights]
    refiner = run.refiner and Engine(run.refiner.load(run.device, storage=storage), run.device, run.precision,
                                     vae_tiling=run.settings.get("vae_tiling"), embeddings=run.embeddings,
                                     tiny=run.tiny)
    engine = Engine(run.checkpoint.load(run.device, storage=storage), run.device, run.precision,
                    vae_tiling=run.settings.get("vae_tiling"), loras=run.loras, embeddings=run.embeddings,
                    refiner=refiner, tiny=run.tiny)
    vae, tiny = run.settings.get("vae"), run.settings.get("vae_decoder")
    digest = model_hash(run.model_path)
    if run.record and rank == 0:
        _explain_differences(run.record, run.from_image, digest, engine, console)
    common = dict(model=run.model_name, model_path=str(Path(run.model_path).resolve()), model_hash=digest,
                  vae=Path(vae).name if vae else None, vae_path=str(Path(vae).resolve()) if vae else None,
                  vae_decoder=Path(tiny).name if tiny else None,
                  vae_decoder_path=str(Path(tiny).resolve()) if tiny else None,
                  prediction=cfg.prediction, precision=run.precision, weights=run.weights, version=f"sdcli {__version__}")
    if run.refiner:
        path = run.settings["refiner"]
        common.update(refiner=model_name(path), refiner_path=str(Path(path).resolve()), refiner_hash=model_hash(path))
    render(run, engine, jobs, common, console, total=total)


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


def render(run: Run, engine, jobs: list[Job], common: dict, console: Progress, total: int | None = None) -> None:
    """Render the jobs batch by batch; each image is written (or streamed) as soon as it is done. `total`: the
    run's images, when `jobs` is this process's share of them (under torchrun)."""
    from sdcli.engine import Sampling
    from sdcli.preview import previewing
    from sdcli.sampling.fast import fast_modes
    from sdcli.tasks import rerender_keys
    from sdcli.tasks.base import sdxl_sampling

    task, opts, keys = run.task, run.opts, rerender_keys(run.task)
    total = len(jobs) if total is None else total
    written = 0
    with console.batch(len(jobs)) as bar:
        try:
            for group in _batches(jobs):
                r = group[0].request
                label = f"{group[0].index}" + (f"-{group[-1].index}" if len(group) > 1 else "") + f"/{total}"
                start = time.perf_counter()
                s = Sampling(r.steps, r.cfg_scale, r.sampler, r.schedule, r.clip_skip, fast=fast_modes(r),
                             **sdxl_sampling(r))
                with bar.image(label, task.steps_run(r, engine.cfg), preview=preview_path(opts.preview, group[0].path)) \
                        as step, previewing(opts.preview, group[0].path, engine, step) as step:
                    images, extra = task.render(engine, r, s, [j.request.seed for j in group], run.sources, step)
                seconds = (time.perf_counter() - start) / len(group)
                extra = {**network_record(engine, r), **extra}
                for job, pixels in zip(group, images, strict=True):
                    record = {**{k: getattr(job.request, k) for k in keys}, **common, **extra,
                              "batch_index": job.batch_index, "job": job.key}
                    _write(job, pixels.numpy(), record, opts.overwrite)
                    written += 1
                    bar.advance()
                    if opts.as_json:
                        write_stdout(json.dumps({"path": job.path, **record, "seconds": round(seconds, 3)}) + "\n")
                    console.message(f"{'stdout' if job.path == '-' else job.path}  seed {job.request.seed}  "
                                    f"{seconds:.1f} s", force=True)  # the seed is always printed
        except KeyboardInterrupt:
            if total == len(jobs):
                console.message(f"interrupted after {written} of {len(jobs)} image(s); "
                                "rerun the same command with --resume to continue", force=True)
            elif distributed.is_main():  # the others' counts are theirs
                console.message("interrupted; rerun the same command with --resume to continue", force=True)
            raise


def _explain_differences(record: dict, source: str, digest: str | None, engine, console: Progress) -> None:
    """--from-image: say what will not be the same as in the source image."""
    from sdcli.networks.tags import LoraUse

    if record.get("extra"):  # A1111 settings we have no counterpart for (hires fix, variation seeds, ...)
        console.message(f"note: {source}: not reproduced: {', '.join(record['extra'])}", force=True)
    if record.get("refiner") and engine.refiner is None:
        console.message(f"note: {source} was finished by the refiner {record['refiner']}: give --refiner to do the "
                        "same", force=True)
    if record.get("model_hash") and digest and record["model_hash"] != digest:
        console.message(f"note: {source} was made with model {record.get('model', '?')} (hash "
                        f"{record['model_hash']}); this model's hash is {digest}", force=True)
    for name, stored in (record.get("lora_hashes") or {}).items():
        lora = engine.loras.files.get(name)
        if lora is not None and (now := engine.loras.hashes([LoraUse(name)])[name]) != stored:
            console.message(f"note: {source} was made with a LoRA {name} of hash {stored}; this one's is {now}",
                            force=True)


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
        write_stdout(data)
        return
    path = Path(job.path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SdcliError(f"cannot create folder {path.parent}: {e.strerror or e}") from None
    with atomic_path(path, overwrite) as tmp:
        tmp.write_bytes(data)
