"""The commands that render images: generate, img2img, inpaint and upscale, thin layers over sdcli.render."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from sdcli.cli.options import (AestheticOpt, BatchSizeOpt, CacheBranchOpt, CacheIntervalOpt, CacheScheduleOpt,
                               CfgCutoffOpt, CfgOpt, ClipSkipOpt, CropCoordsOpt, DeviceOpt,
                               EmbeddingsDirOpt, HeightOpt, ImageOpt, JsonOpt, LoraDirOpt, LoraOpt, ModelOpt,
                               NegativeAestheticOpt, NegativeOpt, NImagesOpt, OriginalSizeOpt, OutputOpt, OverwriteOpt,
                               PrecisionOpt, PredictionOpt, PresetOpt, PreviewOpt, PromptArg, QuietOpt, RefinerOpt,
                               RefinerSwitchOpt, ResizeOpt, SamplerOpt, ScheduleOpt, SeedOpt, SkipUncondOpt, StepsOpt,
                               StrengthOpt, TileOpt, TileOverlapOpt, TokenMergingOpt, VaeDecoderOpt, VaeOpt,
                               VaeTilingOpt, WeightsOpt, WidthOpt, shared_options)
from sdcli.sampling.fast import FAST_KEYS


def _render_options(
    prompt: PromptArg = None,
    negative_prompt: NegativeOpt = None,
    steps: StepsOpt = None,
    cfg_scale: CfgOpt = None,
    sampler: SamplerOpt = None,
    schedule: ScheduleOpt = None,
    seed: SeedOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    n_images: NImagesOpt = None,
    batch_size: BatchSizeOpt = None,
    clip_skip: ClipSkipOpt = None,
    original_size: OriginalSizeOpt = None,
    crop_coords: CropCoordsOpt = None,
    cache_interval: CacheIntervalOpt = None,
    cache_branch: CacheBranchOpt = None,
    cache_schedule: CacheScheduleOpt = None,
    cfg_cutoff: CfgCutoffOpt = None,
    skip_uncond_below: SkipUncondOpt = None,
    token_merging: TokenMergingOpt = None,
    lora: LoraOpt = None,
    lora_dir: LoraDirOpt = None,
    embeddings_dir: EmbeddingsDirOpt = None,
    model: ModelOpt = None,
    vae: VaeOpt = None,
    vae_decoder: VaeDecoderOpt = None,
    prediction: PredictionOpt = None,
    output: OutputOpt = None,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    weights: WeightsOpt = None,
    preset: PresetOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    vae_tiling: VaeTilingOpt = False,
    preview: PreviewOpt = None,
    from_file: Annotated[Optional[str], typer.Option(
        "--from-file", metavar="FILE", show_default=False,
        help="Prompts file: one prompt per line, optionally with options ('a cat --seed 5 --steps 30'), "
             "or JSON lines. Under torchrun (torchrun --nproc-per-node N sdcli generate --from-file FILE -o DIR/) "
             "the images are shared out among the processes, named and seeded as in one process.")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Skip images that a previous run of the same batch already wrote.")] = False,
    from_image: Annotated[Optional[str], typer.Option(
        "--from-image", metavar="PNG", show_default=False,
        help="Re-render an image from the parameters stored in it; other flags override them.")] = None,
):
    """The options of every command that renders images: their names, types, help and defaults."""


render_command = shared_options(_render_options, leading=("prompt",))
_FLAG_KEYS = ("negative_prompt", "steps", "cfg_scale", "sampler", "schedule", "seed", "width", "height",
              "n_images", "batch_size", "clip_skip", "output", "lora", "original_size", "crop_coords",
              *FAST_KEYS)


def _render(task: str, o: dict, images: list[str] | None = None, refiner: str | None = None, **task_flags) -> None:
    from sdcli.render import RunFlags, generate as run

    flags = {k: o[k] for k in _FLAG_KEYS if o[k] is not None} | {k: v for k, v in task_flags.items() if v is not None}
    settings = dict(model=o["model"], vae=o["vae"], vae_decoder=o["vae_decoder"], refiner=refiner,
                    prediction=o["prediction"].value if o["prediction"] else None,
                    device=o["device"], precision=o["precision"], weights=o["weights"], vae_tiling=o["vae_tiling"] or None,
                    lora_dir=o["lora_dir"], embeddings_dir=o["embeddings_dir"])
    run(task, o["prompt"], flags, settings, o["preset"], o["from_file"], o["from_image"],
        RunFlags(overwrite=o["overwrite"], resume=o["resume"], as_json=o["as_json"], quiet=o["quiet"],
                 preview=o["preview"]), images)


@render_command
def generate(
    options: dict,
    hires_scale: Annotated[Optional[float], typer.Option(
        "--hires-scale", show_default=False,
        help="Hires fix (A1111's): upscale each image by this much (Lanczos) and re-render it with a tiled "
             "img2img pass, as sdcli upscale does.")] = None,
    hires_strength: Annotated[Optional[float], typer.Option(
        "--hires-strength", show_default=False, help="Strength of that re-render. [default: 0.5]")] = None,
    hires_steps: Annotated[Optional[int], typer.Option(
        "--hires-steps", show_default=False,
        help="Steps the re-render runs (as in A1111: its schedule is steps / strength long). "
             "[default: --steps]")] = None,
    tile: TileOpt = None,
    tile_overlap: TileOverlapOpt = None,
    refiner: RefinerOpt = None,
    refiner_switch: RefinerSwitchOpt = None,
    aesthetic_score: AestheticOpt = None,
    negative_aesthetic_score: NegativeAestheticOpt = None,
):
    """Text to image. The model is loaded once for a whole batch of prompts."""
    _render("txt2img", options, refiner=refiner, hires_scale=hires_scale, hires_strength=hires_strength,
            hires_steps=hires_steps, tile=tile, tile_overlap=tile_overlap, refiner_switch=refiner_switch,
            aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score)


@render_command
def img2img(
    options: dict,
    image: ImageOpt = None,
    strength: StrengthOpt = None,
    resize: ResizeOpt = None,
    refiner: RefinerOpt = None,
    refiner_switch: RefinerSwitchOpt = None,
    aesthetic_score: AestheticOpt = None,
    negative_aesthetic_score: NegativeAestheticOpt = None,
):
    """Image to image: re-render an image guided by a prompt, keeping its composition. An SDXL refiner works
    here alone, or finishes an SDXL base's steps as --refiner."""
    _render("img2img", options, refiner=refiner, image=image, strength=strength, resize=resize,
            refiner_switch=refiner_switch, aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score)


@render_command
def inpaint(
    options: dict,
    image: ImageOpt = None,
    mask: Annotated[Optional[str], typer.Option(
        "--mask", metavar="PATH", show_default=False,
        help="Same size as the image; white = repaint, black = keep.")] = None,
    invert_mask: Annotated[Optional[bool], typer.Option(
        "--invert-mask", help="Repaint the black part instead.", show_default=False)] = None,
    mask_blur: Annotated[Optional[int], typer.Option(
        "--mask-blur", metavar="PX", show_default=False,
        help="Blur radius of the mask's edge where the result is blended back. [default: 4]")] = None,
    strength: StrengthOpt = None,
    resize: ResizeOpt = None,
    crop_to_mask: Annotated[Optional[int], typer.Option(
        "--crop-to-mask", metavar="[PADDING]", show_default=False,
        help="Render only the mask's box, grown by PADDING px (default 32), at -W x -H (default: the box's shape "
             "with its longer side at the model's native size), and paste it back: more detail for small masks "
             "(A1111's 'only masked').")] = None,
    extend: Annotated[Optional[str], typer.Option(
        "--extend", metavar="SIDES", show_default=False,
        help="Outpaint: grow the canvas by 'left=128,top=64,right=0,bottom=0' pixels (multiples of 8) and paint "
             "the new border; --mask is then optional.")] = None,
):
    """Repaint the masked part of an image. 9-channel inpainting models see the mask; with ordinary models
    the rest is held to the original at every step. Pixels outside the (blurred) mask stay unchanged."""
    _render("inpaint", options, image=image, mask=mask, invert_mask=invert_mask, mask_blur=mask_blur,
            strength=strength, resize=resize, extend=extend, crop_to_mask=crop_to_mask)


@render_command(without=("width", "height"))  # the size is the input's times --scale
def upscale(
    options: dict,
    images: Annotated[Optional[list[str]], typer.Argument(
        help="Images to upscale (PNG, JPEG, WebP...).", show_default=False, metavar="IMAGE")] = None,
    prompt: Annotated[Optional[str], typer.Option(
        "--prompt", "-p", show_default=False, help="What the image shows; guides the new detail.")] = None,
    scale: Annotated[Optional[float], typer.Option(
        "--scale", show_default=False,
        help="Upscale factor, at least 1. [default: 4 with x4 upscaler models (other factors are Lanczos-resized "
             "from their x4), else 2]")] = None,
    strength: Annotated[Optional[float], typer.Option(
        "--strength", show_default=False,
        help="Ordinary models: how much the img2img pass over the Lanczos upscale may change, in (0, 1]. "
             "[default: 0.3]")] = None,
    noise_level: Annotated[Optional[int], typer.Option(
        "--noise-level", show_default=False,
        help="x4 upscaler models: noise added to the input before it conditions the model, 0-350; higher "
             "invents more detail and keeps less of the input's. [default: 20]")] = None,
    tile: TileOpt = None,
    tile_overlap: TileOverlapOpt = None,
):
    """Upscale images. x4 upscaler models (stable-diffusion-x4-upscaler) denoise at 4x, conditioned on the input;
    any other model upscales with Lanczos and re-renders at low strength. Both work in tiles (bounded memory)."""
    _render("upscale", options, images=images, scale=scale, strength=strength, noise_level=noise_level, tile=tile,
            tile_overlap=tile_overlap)
