"""The `sdcli` command line. Commands parse options and call the engine; heavy imports (torch,
transformers) happen inside command bodies so `sdcli --help` is instant."""

from __future__ import annotations

import enum
import functools
import inspect
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from sdcli.errors import SdcliError

app = typer.Typer(
    name="sdcli",
    help="Stable Diffusion (latent diffusion) from the command line.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts hold literal [brackets]
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Prediction(str, enum.Enum):
    eps = "eps"
    v = "v"


# Options shared by every command that loads a model. Paths stay strings so that the loader sees
# exactly what was typed (typer would turn "" into ".").
ModelArg = Annotated[
    str, typer.Argument(help="A .safetensors checkpoint (original layout) or a diffusers model folder; for info, "
                             "also a PNG written by sdcli or AUTOMATIC1111.",
                        show_default=False, metavar="MODEL")
]
VaeOpt = Annotated[
    Optional[str],
    typer.Option("--vae", help="Replace the model's VAE with this .safetensors file or folder.", metavar="PATH"),
]
PredictionOpt = Annotated[
    Optional[Prediction],
    typer.Option("--prediction", help="What the UNet predicts; SD 2.x 768 models are 'v' and their files don't say."),
]


# Options of the commands that render images (generate now; img2img and inpaint share them).
PromptArg = Annotated[Optional[str], typer.Argument(
    help="The prompt, with A1111 emphasis: (word:1.3), (word), [word], BREAK. '-' reads prompts from stdin, "
         "one per line.", show_default=False)]
NegativeOpt = Annotated[Optional[str], typer.Option("--negative-prompt", "-n", help="What to steer away from.",
                                                    show_default=False)]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", help="Denoising steps. [default: 20]", show_default=False)]
CfgOpt = Annotated[Optional[float], typer.Option(
    "--cfg-scale", help="Classifier-free guidance scale; 1 turns guidance off. [default: 7.0]", show_default=False)]
SamplerOpt = Annotated[Optional[str], typer.Option(
    "--sampler", help="euler, euler_a, heun, lms, dpm++2m, dpm++2m_sde, ddim or pndm. [default: dpm++2m]",
    show_default=False)]
ScheduleOpt = Annotated[Optional[str], typer.Option(
    "--schedule", help="normal, karras, exponential, sgm_uniform or ddim. [default: the sampler's own: karras for "
                       "dpm++, ddim for ddim/pndm, else normal]", show_default=False)]
SeedOpt = Annotated[Optional[int], typer.Option(
    "--seed", help="Seed of the first image; image i gets seed+i. [default: random, printed and stored]",
    show_default=False)]
WidthOpt = Annotated[Optional[int], typer.Option(
    "--width", "-W", help="Multiple of 8. [default: 512; 768 for SD 2.x v models]", show_default=False)]
HeightOpt = Annotated[Optional[int], typer.Option(
    "--height", "-H", help="Multiple of 8. [default: 512; 768 for SD 2.x v models]", show_default=False)]
NImagesOpt = Annotated[Optional[int], typer.Option("--n-images", help="Images per prompt. [default: 1]",
                                                   show_default=False)]
BatchSizeOpt = Annotated[Optional[int], typer.Option(
    "--batch-size", help="Images rendered together (more memory, faster per image on GPUs). [default: 1]",
    show_default=False)]
ClipSkipOpt = Annotated[Optional[int], typer.Option(
    "--clip-skip", help="2 conditions on the text encoder's penultimate layer (A1111's Clip skip). [default: 1]",
    show_default=False)]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", metavar="PATH", show_default=False,
    help="A .safetensors checkpoint or a diffusers model folder. [default: a preset's or --from-image's model, "
         "else $SDCLI_MODEL, else the built-in demo model]")]
OutputOpt = Annotated[Optional[str], typer.Option(
    "--output", "-o", metavar="PATH", show_default=False,
    help="A .png file, a folder, a template such as 'out/{seed}-{prompt}.png' (fields: {seed} {prompt} {image} {index} "
         "{steps} {sampler} {schedule} {cfg} {width} {height} {model} {date} {time} {batch_index}), or '-' for "
         "stdout (several images follow one another). [default: outputs/{seed}-{prompt}.png]")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing images.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or mps. [default: auto]",
                                                  show_default=False)]
PrecisionOpt = Annotated[Optional[str], typer.Option(
    "--precision", help="auto, fp32, fp16 or bf16; auto is fp16 autocast on CUDA and fp32 elsewhere. "
                        "[default: auto]", show_default=False)]
PresetOpt = Annotated[Optional[str], typer.Option(
    "--preset", metavar="NAME|FILE", help="Settings from presets/NAME.yaml or a YAML file; flags override them.",
    show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON line per image on stdout (path, seed, settings).")]
VaeTilingOpt = Annotated[bool, typer.Option(
    "--vae-tiling", help="Encode and decode with the VAE in overlapping tiles (bounded memory for large images); "
                         "automatic above 768x768 px on SD models.")]
QuietOpt = Annotated[bool, typer.Option(
    "--quiet", "-q", help="No progress bars or notes; each image's path and seed are still printed on stderr.")]


ImageOpt = Annotated[Optional[str], typer.Option(
    "--image", "-i", metavar="PATH", show_default=False,
    help="The input image (PNG, JPEG, WebP...). Its size, down to multiples of 8, unless -W/-H.")]
StrengthOpt = Annotated[Optional[float], typer.Option(
    "--strength", show_default=False,
    help="How much to change the image, in (0, 1]: noise it to that level and run the last int(steps * strength) "
         "steps; 1 starts from pure noise. [default: 0.75 for img2img, 1 for inpaint]")]
ResizeOpt = Annotated[Optional[str], typer.Option(
    "--resize", show_default=False,
    help="When the image is not -W x -H: stretch, crop (fill and cut) or fit (fit inside, extend the edges). "
         "[default: stretch]")]


TileOpt = Annotated[Optional[int], typer.Option(
    "--tile", metavar="PX", show_default=False,
    help="Upscales are denoised in overlapping tiles of at most this many output pixels a side, so memory "
         "stays bounded at any size; multiple of 8. [default: 1024]")]
TileOverlapOpt = Annotated[Optional[int], typer.Option(
    "--tile-overlap", metavar="PX", show_default=False,
    help="Pixels that neighbouring tiles share; their predictions are blended across them at every step. "
         "[default: 128]")]


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
    model: ModelOpt = None,
    vae: VaeOpt = None,
    prediction: PredictionOpt = None,
    output: OutputOpt = None,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    preset: PresetOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    vae_tiling: VaeTilingOpt = False,
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


_RENDER_PARAMS = inspect.signature(_render_options, eval_str=True).parameters
_FLAG_KEYS = ("negative_prompt", "steps", "cfg_scale", "sampler", "schedule", "seed", "width", "height",
              "n_images", "batch_size", "clip_skip", "output")


def render_command(fn=None, *, without: tuple[str, ...] = ()):
    """Give a command generate's options after its own (fn(options, **own)), so they are defined once. A
    command may declare its own `prompt` (upscale's is an option) in place of the shared argument, and leave
    out shared options that make no sense for it (`without`; they reach it as None)."""
    if fn is None:
        return functools.partial(render_command, without=without)
    own = list(inspect.signature(fn, eval_str=True).parameters.values())[1:]
    first = [] if any(p.name == "prompt" for p in own) else [_RENDER_PARAMS["prompt"]]
    params = [*first, *own, *(p for name, p in _RENDER_PARAMS.items() if name not in ("prompt", *without))]

    @functools.wraps(fn)
    def command(**kwargs):
        return fn({name: kwargs.pop(name, None) for name in _RENDER_PARAMS}, **kwargs)

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def _render(task: str, o: dict, images: list[str] | None = None, **task_flags) -> None:
    from sdcli.render import RunFlags, generate as run

    flags = {k: o[k] for k in _FLAG_KEYS if o[k] is not None} | {k: v for k, v in task_flags.items() if v is not None}
    settings = dict(model=o["model"], vae=o["vae"], prediction=o["prediction"].value if o["prediction"] else None,
                    device=o["device"], precision=o["precision"], vae_tiling=o["vae_tiling"] or None)
    run(task, o["prompt"], flags, settings, o["preset"], o["from_file"], o["from_image"],
        RunFlags(overwrite=o["overwrite"], resume=o["resume"], as_json=o["as_json"], quiet=o["quiet"]), images)


@app.command()
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
):
    """Text to image. The model is loaded once for a whole batch of prompts."""
    _render("txt2img", options, hires_scale=hires_scale, hires_strength=hires_strength, hires_steps=hires_steps,
            tile=tile, tile_overlap=tile_overlap)


@app.command()
@render_command
def img2img(
    options: dict,
    image: ImageOpt = None,
    strength: StrengthOpt = None,
    resize: ResizeOpt = None,
):
    """Image to image: re-render an image guided by a prompt, keeping its composition."""
    _render("img2img", options, image=image, strength=strength, resize=resize)


@app.command()
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


@app.command()
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


@app.command()
def info(
    model: ModelArg,
    vae: VaeOpt = None,
    prediction: PredictionOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
):
    """Show a model's format, variant, prediction type, parameter counts and dtypes (reads headers only),
    or the generation parameters stored in a PNG."""
    if _is_png(model):
        from sdcli.metadata import read_parameters_text, read_png

        if vae or prediction:
            raise SdcliError("--vae and --prediction apply to models, not to images")
        print(json.dumps(read_png(model)) if as_json else read_parameters_text(model))
        return
    from sdcli.loading import inspect_model

    summary = inspect_model(model, vae=vae, prediction=prediction.value if prediction else None).summary()
    if as_json:
        print(json.dumps(summary))
        return
    text = summary["text_encoder"]
    fmt = {"single-file": "single-file safetensors (original LDM layout)", "diffusers": "diffusers folder"}
    rows = [
        ("format", fmt[summary["format"]]),
        ("variant", summary["variant"]),
        ("prediction", f"{summary['prediction']} ({summary['prediction_source']})"),
        ("latents", f"{summary['latent_channels']} channels at 1/{summary['vae_factor']} size, "
                    f"scale {summary['latent_scale']}"),
        ("text", f"{'OpenCLIP' if text['layout'] == 'openclip' else 'CLIP'}, {text['layers']} layers, "
                 f"width {text['width']}, conditioning on the "
                 f"{'penultimate' if text['skip_last_layers'] else 'last'} layer"),
    ]
    rows.append(("tokenizer", summary["tokenizer"]))
    if summary["vae_file"]:
        rows.append(("vae file", summary["vae_file"]))
    for name, comp in summary["components"].items():
        rows.append((name.replace("_", " "), f"{comp['parameters'] / 1e6:,.2f}M parameters, {'/'.join(comp['dtypes'])}"))
    print(summary["path"])
    for key, value in rows:
        print(f"  {key:<13} {value}")


def _is_png(path: str) -> bool:
    """An image to read parameters from (other image types get a clear error from the PNG reader)."""
    from sdcli.metadata import has_png_signature

    return path.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")) or has_png_signature(path)


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="A pickle checkpoint (.ckpt, .pt, .bin, .pth).", show_default=False)],
    dst: Annotated[Path, typer.Argument(help="The .safetensors file to write.", show_default=False)],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace DST if it exists.")] = False,
):
    """Convert a trusted pickle checkpoint to .safetensors, loading tensors only (weights_only=True)."""
    from sdcli.loading.convert import pickle_to_safetensors

    n = pickle_to_safetensors(src, dst, overwrite)
    print(f"wrote {n} tensors to {dst}", file=sys.stderr)


def _optional_values(args: list[str]) -> list[str]:
    """Give an option of batch.OPTIONAL_VALUES its value where no number follows it (typer has no options
    with optional values)."""
    from sdcli.batch import OPTIONAL_VALUES

    out = []
    for i, arg in enumerate(args):
        out.append(arg)
        key = arg.removeprefix("--").replace("-", "_")
        if arg.startswith("--") and key in OPTIONAL_VALUES and not (i + 1 < len(args) and args[i + 1].isdigit()):
            out.append(OPTIONAL_VALUES[key])
    return out


def main() -> None:
    """Console entry point: every mistake of the user's is one line on stderr and exit code 2."""
    from sdcli.runtime import keep_freed_memory

    keep_freed_memory()  # before any model runs: see sdcli.runtime
    args = _optional_values(sys.argv[1:]) or ["--help"]  # a bare `sdcli` shows the help
    try:
        code = app(args, prog_name="sdcli", standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort):
        print("sdcli: interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as e:  # unknown option or command, bad value, missing argument
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx else ""
        message = (e.format_message() if hasattr(e, "format_message") else str(e)).replace("Value error, ", "")
        print(f"sdcli: error: {' '.join(message.split())}{hint}", file=sys.stderr)  # one line, always
        sys.exit(getattr(e, "exit_code", 2))
    except SdcliError as e:
        print(f"sdcli: error: {str(e).replace(chr(10), ' ')}", file=sys.stderr)  # one line, even for odd paths
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


from sdcli import cli_train  # noqa: E402,F401  (registers train-vae, train-unet and export on the app)
