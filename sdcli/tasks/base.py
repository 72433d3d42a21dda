"""The task protocol: what one rendering command does between the shared run (sdcli.render) and the engine."""

from __future__ import annotations

import dataclasses

from sdcli.batch import MAX_SIZE, Request, tiling
from sdcli.output_names import NAME
from sdcli.errors import SdcliError, shown

MODEL_KINDS = {"txt2img": "a text-to-image", "inpainting": "an inpainting", "upscale-x4": "an x4 upscaler",
               "refiner": "an SDXL refiner"}


def scaled(width: int, height: int, scale: float, multiple: int = 8) -> tuple[int, int]:
    """width x height times `scale`, rounded to multiples of `multiple`, or an error above MAX_SIZE."""
    w, h = (max(multiple, round(v * scale / multiple) * multiple) for v in (width, height))
    return within(w, h, f"{width}x{height} scaled by {scale:g}", "lower the scale")


def within(width: int, height: int, what: str, fix: str) -> tuple[int, int]:
    """(width, height), or an error when `what` (where the size comes from) is over MAX_SIZE a side."""
    if max(width, height) > MAX_SIZE:
        raise SdcliError(f"{what} is {width}x{height}, over {MAX_SIZE} px a side: {fix}")
    return width, height


def a_model(cfg) -> str:
    """'an SDXL refiner model', 'a x4 upscaler model': what a model is, for messages."""
    return f"a{'n' if cfg.variant[0] in 'S' else ''} {cfg.variant} model"


def cached(sources: dict, key: tuple, make):
    """`sources` ({path: PIL image} of the run's inputs) doubles as the run's cache of what they give (hashes,
    fitted tensors): the same tensor for every batch of a request, so the engine encodes an image once."""
    if key not in sources:
        sources[key] = make()
    return sources[key]


class Task:
    """One rendering command. Subclasses set the attributes and `render`; the methods here are the defaults.

    The run (sdcli.render) calls, in order: load for every request (its files read and checked), then, once
    the model is known, check_model, adopt_record (--from-image) and resolve, size while planning, then
    steps_run and render for every batch."""

    name: str  # the registry's key (sdcli.tasks.TASKS)
    command: str  # the CLI command that runs it
    keys: tuple[str, ...] = ()  # the request keys that only some tasks take which this one takes
    models: tuple[str, ...] = ("txt2img",)  # the model kinds (cfg.task) it renders with
    output_name: str = NAME  # the file name template in an output folder
    needs_prompt: bool = True
    refines: bool = False  # whether a --refiner may finish its images
    image_hint: str | None = None  # how to give the input image, for the tasks that need one
    default_strength: float | None = None  # for the tasks that start from an image's latents

    def check_model(self, cfg, model_path: str) -> None:
        if cfg.task not in self.models:
            wanted = " or ".join(MODEL_KINDS[t] for t in self.models)
            hint = " (it finishes a base model's images: give it as --refiner, or use it with img2img)" \
                if cfg.task == "refiner" else ""
            raise SdcliError(f"{model_path} is {a_model(cfg)}{hint}; {self.command} needs {wanted} model")

    def adopt_record(self, requests: list[Request], record: dict, flags: dict, cfg) -> list[Request]:
        """--from-image: the requests built on the image's record, once the model is known."""
        return requests

    def resolve(self, r: Request, cfg, refined: bool = False) -> Request:
        """The task's defaults that depend on the model, and the checks that need it. `refined`: a --refiner
        finishes the images."""
        from sdcli.sampling import SAMPLERS, check_steps
        from sdcli.sampling.fast import check_branch, fast_modes

        r = self.defaults(r, cfg)
        for steps, asked in self.schedules(r):  # refused before the first image, not after it
            check_steps(r.schedule or SAMPLERS[r.sampler].schedule, steps, cfg.schedule.num_train_timesteps, asked)
        if (r.original_size or r.crop_coords) and "original_width" not in cfg.kind.added:
            raise SdcliError(f"--original-size and --crop-coords condition SDXL models; this is a {cfg.variant} "
                             "model: leave them out")
        scores = r.aesthetic_score is not None or r.negative_aesthetic_score is not None
        if scores and "aesthetic_score" not in cfg.kind.added and not refined:
            raise SdcliError(f"--aesthetic-score and --negative-aesthetic-score condition SDXL refiners; this is a "
                             f"{cfg.variant} model: leave them out, or give a refiner with --refiner")
        if r.refiner_switch is not None and not refined:
            raise SdcliError("--refiner-switch says when --refiner takes over: give --refiner MODEL too")
        if refined and r.refiner_switch is None:
            r = dataclasses.replace(r, refiner_switch=REFINER_SWITCH)
        check_branch(fast_modes(r), cfg.unet.input_blocks)
        if r.clip_skip + cfg.text.skip_last_layers > cfg.text.layers:
            raise SdcliError(f"--clip-skip {r.clip_skip} is more than this model's text encoder has layers "
                             f"({cfg.text.layers - cfg.text.skip_last_layers} usable)")
        return r

    def defaults(self, r: Request, cfg) -> Request:
        return r

    def schedules(self, r: Request) -> list[tuple[int, str]]:
        """The schedules (length, the options that ask for it) the request's images run over."""
        return [(r.steps, "--steps")]

    def check(self, r: Request) -> None:
        """What a request of this task must give, before its files are read."""
        if self.image_hint and r.image is None:
            raise SdcliError(f"{self.name} needs an input image: {self.image_hint} (or --image on each "
                             "prompts-file line)")

    def load(self, r: Request, sources: dict) -> None:
        """Read the request's input files into `sources` ({path: PIL image}), so that a bad file stops the run
        before it starts."""
        from sdcli.images import load_image

        self.check(r)
        for path in (r.image, r.mask):
            if path is not None and path not in sources:
                sources[path] = load_image(path)

    def size(self, r: Request, sources: dict, native: int) -> tuple[int, int]:
        """The size the model renders at, for what -W/-H leave open."""
        raise NotImplementedError

    def steps_run(self, r: Request, cfg) -> int:
        """UNet steps one image takes (the progress bar's length, recorded with the image)."""
        from sdcli.engine import img2img_steps

        return img2img_steps(r.steps, r.strength)

    def render(self, engine, r: Request, s, seeds: list[int], sources: dict, callback):
        """One batch of one request -> (uint8 images [B, H, W, 3], the task's own record fields)."""
        raise NotImplementedError

    # shared pieces of the tasks that start from an image
    def input_record(self, r: Request, cfg, sources: dict) -> dict:
        from sdcli.hashing import file_hash

        return {"steps_run": self.steps_run(r, cfg),
                "image_hash": cached(sources, ("hash", r.image), lambda: file_hash(r.image))}

    def with_strength(self, r: Request) -> Request:
        from sdcli.engine import img2img_steps

        r = dataclasses.replace(r, strength=r.strength or self.default_strength)
        if img2img_steps(r.steps, r.strength) < 1:
            raise SdcliError(f"--strength {r.strength:g} of {r.steps} steps runs no step: raise --strength or "
                             "--steps")
        return r


REFINER_SWITCH = 0.8  # A1111's "Refiner switch at": filled in (so recorded) when a refiner is given
REFINER_KEYS = ("refiner_switch", "aesthetic_score", "negative_aesthetic_score")  # generate's and img2img's


def sdxl_sampling(r: Request) -> dict:
    """The request's SDXL settings as engine.Sampling's fields, defaults filled in, or a one-line error:
    --original-size WxH and --crop-coords TOP,LEFT -> original_size (width, height) or None, crop (top, left);
    --refiner-switch, --aesthetic-score and --negative-aesthetic-score where given (engine.Sampling has the
    defaults; resolve fills in the switch when a refiner is given, so images record it)."""
    def numbers(text: str | None, sep: str, option: str, example: str) -> tuple[int, int] | None:
        if text is None:
            return None
        parts = text.lower().split(sep)
        if len(parts) != 2 or not all(p.strip().isdigit() and len(p.strip()) <= 5 for p in parts):
            raise SdcliError(f"{option} must be two whole numbers as {example}, not {shown(text)}")
        a, b = (int(p) for p in parts)
        if max(a, b) > MAX_SIZE or (sep == "x" and min(a, b) < 8):
            raise SdcliError(f"{option} {shown(text)}: each number must be {'8' if sep == 'x' else '0'} to "
                             f"{MAX_SIZE} px")
        return a, b

    if r.refiner_switch is not None and not 0 < r.refiner_switch <= 1:
        raise SdcliError(f"--refiner-switch must be above 0 and at most 1 (the fraction of the denoising the base "
                         f"model runs), not {shown(r.refiner_switch)}")
    for name in ("aesthetic_score", "negative_aesthetic_score"):
        if (value := getattr(r, name)) is not None and not 0 <= value <= 10:
            raise SdcliError(f"--{name.replace('_', '-')} must be between 0 and 10 (the scale of the LAION "
                             f"aesthetic scores the refiner was trained on), not {shown(value)}")
    given = dict(refiner_switch=r.refiner_switch, aesthetic_score=r.aesthetic_score,
                 negative_aesthetic_score=r.negative_aesthetic_score)  # None: Sampling's defaults
    return dict(original_size=numbers(r.original_size, "x", "--original-size", "1024x1024"),
                crop=numbers(r.crop_coords, ",", "--crop-coords", "0,0") or (0, 0),
                **{k: v for k, v in given.items() if v is not None})


def with_tiles(r: Request) -> Request:
    """Tiled denoising (upscales, the hires fix): the tile size and overlap, defaults filled in."""
    tile, overlap = tiling(r)
    return dataclasses.replace(r, tile=tile, tile_overlap=overlap)
