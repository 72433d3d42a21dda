"""The CLI's option types, each declared once, and `shared_options`, which gives several commands one set of them.

Options default to None, meaning "not given": the command (or a preset, or a resumed run) then decides. Paths
stay strings so that the loader sees exactly what was typed (typer would turn "" into ".")."""

from __future__ import annotations

import enum
import functools
import inspect
from typing import Annotated, Optional

import typer


class Prediction(str, enum.Enum):
    eps = "eps"
    v = "v"


# Options shared by every command that loads a model.
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


# Options of the commands that render images (generate, img2img, inpaint, upscale); --device and --quiet are
# the training commands' too.
PromptArg = Annotated[Optional[str], typer.Argument(
    help="The prompt, with A1111 emphasis: (word:1.3), (word), [word], BREAK, and <lora:NAME:WEIGHT>. '-' reads "
         "prompts from stdin, one per line.", show_default=False)]
NegativeOpt = Annotated[Optional[str], typer.Option("--negative-prompt", "-n", help="What to steer away from.",
                                                    show_default=False)]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", help="Denoising steps. [default: 20]", show_default=False)]
CfgOpt = Annotated[Optional[float], typer.Option(
    "--cfg-scale", help="Classifier-free guidance scale; 1 turns guidance off. [default: 7.0]", show_default=False)]
SamplerOpt = Annotated[Optional[str], typer.Option(
    "--sampler", help="euler, euler_a, heun, lms, dpm++2m, dpm++2m_sde, ddim, pndm or lcm (for LCM models and "
                      "LCM-LoRAs: 4-8 steps, --cfg-scale 1-2). [default: dpm++2m]",
    show_default=False)]
ScheduleOpt = Annotated[Optional[str], typer.Option(
    "--schedule", help="normal, karras, exponential, sgm_uniform, ddim or lcm. [default: the sampler's own: karras "
                       "for dpm++, ddim for ddim/pndm, lcm for lcm, else normal]", show_default=False)]
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
OriginalSizeOpt = Annotated[Optional[str], typer.Option(
    "--original-size", metavar="WxH", show_default=False,
    help="SDXL's size conditioning: the size the image is said to have had before cropping. [default: the size "
         "rendered]")]
CropCoordsOpt = Annotated[Optional[str], typer.Option(
    "--crop-coords", metavar="TOP,LEFT", show_default=False,
    help="SDXL's size conditioning: where the image is said to have been cropped from. [default: 0,0]")]
RefinerOpt = Annotated[Optional[str], typer.Option(
    "--refiner", metavar="PATH", show_default=False,
    help="An SDXL refiner (.safetensors or diffusers folder) that finishes each image of the SDXL base model "
         "after --refiner-switch, on the same latents (A1111's Refiner).")]
RefinerSwitchOpt = Annotated[Optional[float], typer.Option(
    "--refiner-switch", metavar="F", show_default=False,
    help="The fraction of the denoising (of the training timesteps, as diffusers' denoising_end) the base runs "
         "before --refiner takes over. [default: 0.8]")]
AestheticOpt = Annotated[Optional[float], typer.Option(
    "--aesthetic-score", show_default=False,
    help="SDXL refiners: the aesthetic score (0-10) the prompt's conditioning asks for. [default: 6]")]
NegativeAestheticOpt = Annotated[Optional[float], typer.Option(
    "--negative-aesthetic-score", show_default=False,
    help="SDXL refiners: the score of the negative prompt's conditioning. [default: 2.5]")]
# The fast modes (sdcli.sampling.fast): each off by default, and then exactly the full render.
CacheIntervalOpt = Annotated[Optional[int], typer.Option(
    "--cache-interval", metavar="N", show_default=False,
    help="Feature caching (DeepCache): a full UNet pass every N steps; between them only the shallow blocks run, on "
         "the deep features of the last full pass. 1: off. [default: 1]")]
CacheBranchOpt = Annotated[Optional[int], typer.Option(
    "--cache-branch", metavar="B", show_default=False,
    help="The skip branch cached steps keep running: 0, the shallowest, is the fastest; higher keeps more. "
         "[default: 0]")]
CacheScheduleOpt = Annotated[Optional[str], typer.Option(
    "--cache-schedule", show_default=False,
    help="uniform (every N-th step full) or nonuniform (DeepCache's: as many full steps, more of them early). "
         "[default: uniform]")]
CfgCutoffOpt = Annotated[Optional[float], typer.Option(
    "--cfg-cutoff", metavar="F", show_default=False,
    help="Guide only the first fraction F of the steps, then run the conditional pass alone (diffusers' "
         "SDCFGCutoffCallback). 1: off. [default: 1]")]
SkipUncondOpt = Annotated[Optional[float], typer.Option(
    "--skip-uncond-below", metavar="SIGMA", show_default=False,
    help="On alternate steps below this noise level, skip the unconditional pass (A1111's NGMS, 'negative guidance "
         "minimum sigma'; below 0.8 keeps quality). 0: off. [default: 0]")]
TokenMergingOpt = Annotated[Optional[float], typer.Option(
    "--token-merging", metavar="R", show_default=False,
    help="Token merging (ToMe for SD): merge this fraction of the highest-resolution tokens before self-attention, "
         "up to 0.75. 0: off. [default: 0]")]
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
WeightsOpt = Annotated[Optional[str], typer.Option(
    "--weights", help="auto, fp32 or fp16: fp16 keeps the weights in half the memory and upcasts each layer as it "
                      "runs (the arithmetic stays fp32 on the CPU); auto is fp16 on a CPU whose free RAM would not "
                      "hold the fp32 model. [default: auto]", show_default=False)]
PresetOpt = Annotated[Optional[str], typer.Option(
    "--preset", metavar="NAME|FILE", help="Settings from presets/NAME.yaml or a YAML file; flags override them.",
    show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON line per image on stdout (path, seed, settings).")]
VaeTilingOpt = Annotated[bool, typer.Option(
    "--vae-tiling", help="Encode and decode with the VAE in overlapping tiles (bounded memory for large images); "
                         "automatic above a 128x128 latent (1024x1024 px on SD and SDXL).")]
VaeDecoderOpt = Annotated[Optional[str], typer.Option(
    "--vae-decoder", metavar="PATH", show_default=False,
    help="Decode (and, when the file has its encoder, encode) with this tiny autoencoder, TAESD: a taesd_decoder"
         ".safetensors (taesdxl_ for SDXL) or a diffusers AutoencoderTiny folder. Fast, slightly softer images.")]
PreviewOpt = Annotated[Optional[int], typer.Option(
    "--preview", metavar="EVERY", show_default=False,
    help="Write a live preview of each image every EVERY steps to OUTPUT.preview.png (with --vae-decoder's TAESD, "
         "else a cheap latent-to-colour map); removed once the image is written.")]
LoraOpt = Annotated[Optional[list[str]], typer.Option(
    "--lora", metavar="FILE[:WEIGHT]", show_default=False,
    help="Apply a LoRA (kohya, diffusers/PEFT, LyCORIS LoHa/LoKr): a .safetensors file or a name in --lora-dir, with "
         "an optional weight (default 1) or TE_WEIGHT:UNET_WEIGHT. Repeatable. The same as <lora:NAME:WEIGHT> in "
         "the prompt, where it is recorded.")]
LoraDirOpt = Annotated[Optional[list[str]], typer.Option(
    "--lora-dir", metavar="DIR", show_default=False,
    help="Where <lora:NAME> finds NAME.safetensors (subfolders too). Repeatable; also $SDCLI_LORA_DIR.")]
EmbeddingsDirOpt = Annotated[Optional[list[str]], typer.Option(
    "--embeddings-dir", metavar="DIR", show_default=False,
    help="Textual-inversion embeddings: a prompt word equal to a file's name (or embedding:NAME) becomes its "
         "vectors. Repeatable; also $SDCLI_EMBEDDINGS_DIR.")]
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


# Options of the training commands (train-vae, train-unet).
DataArg = Annotated[str, typer.Argument(
    help="A folder of images with same-name .txt captions, or with a metadata.jsonl of {\"file_name\", \"text\"} "
         "lines.", show_default=False, metavar="DATA")]
OutOpt = Annotated[str, typer.Option(
    "--out", metavar="DIR", show_default=False,
    help="The run's folder: the trained model, checkpoints/, samples/ and metrics.jsonl.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its latest checkpoint.")]
ResolutionOpt = Annotated[Optional[int], typer.Option(
    "--resolution", show_default=False,
    help="Images are resized and cropped to this square size. [default: 256; train-unet --init: the model's "
         "trained size]")]
RandomCropOpt = Annotated[Optional[bool], typer.Option(
    "--random-crop/--center-crop", show_default=False, help="Where to crop. [default: center]")]
FlipOpt = Annotated[Optional[bool], typer.Option(
    "--flip/--no-flip", show_default=False,
    help="Random horizontal flips. Off by default: a flip changes what 'left' means. [default: no-flip]")]
StrictOpt = Annotated[Optional[bool], typer.Option(
    "--strict/--no-strict", show_default=False,
    help="Fail on an unreadable image or empty caption instead of skipping it. [default: no-strict]")]
BatchOpt = Annotated[Optional[int], typer.Option(
    "--batch-size", show_default=False, help="Images per process and micro-batch. [default: 8]")]
AccumOpt = Annotated[Optional[int], typer.Option(
    "--grad-accum", show_default=False, help="Micro-batches per optimizer step. [default: 1]")]
LrOpt = Annotated[Optional[float], typer.Option(
    "--lr", show_default=False, help="Peak AdamW learning rate, after the warm-up; cosine decay to 0. [default: 1e-4]")]
WarmupOpt = Annotated[Optional[int], typer.Option("--warmup-steps", show_default=False, help="[default: 100]")]
WeightDecayOpt = Annotated[Optional[float], typer.Option("--weight-decay", show_default=False,
                                                         help="AdamW weight decay. [default: 0.01]")]
ClipOpt = Annotated[Optional[float], typer.Option(
    "--max-grad-norm", show_default=False, help="Gradient clipping; 0 turns it off. [default: 1.0]")]
EmaOpt = Annotated[Optional[float], typer.Option(
    "--ema-decay", show_default=False,
    help="EMA of the weights, which the saved model holds; 0 turns it off. [default: 0.9999]")]
MixedPrecisionOpt = Annotated[Optional[str], typer.Option(
    "--mixed-precision", show_default=False,
    help="auto, no, bf16 or fp16 (with a gradient scaler); CUDA only. auto: bf16 where supported, else fp16, on "
         "CUDA; no elsewhere. [default: auto]")]
MaxStepsOpt = Annotated[Optional[int], typer.Option("--max-steps", show_default=False,
                                                    help="Optimizer steps. [default: 1000]")]
TrainSeedOpt = Annotated[Optional[int], typer.Option(
    "--seed", show_default=False, help="Weights, data order, crops, noise and timesteps. [default: 0]")]
SaveEveryOpt = Annotated[Optional[int], typer.Option(
    "--save-every", show_default=False, help="Steps between checkpoints and model saves. [default: 500]")]
KeepOpt = Annotated[Optional[int], typer.Option("--keep", show_default=False,
                                                help="Checkpoints kept. [default: 3]")]
ValidateEveryOpt = Annotated[Optional[int], typer.Option(
    "--validate-every", show_default=False, help="Steps between validation grids. [default: --save-every]")]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", show_default=False,
                                                help="Architecture preset: tiny, small or sd15 (sd for the VAE).")]
ChannelsOpt = Annotated[Optional[str], typer.Option(
    "--channels", show_default=False, help="Widths per level, e.g. 64,128,256 (multiples of 32).")]
LayersOpt = Annotated[Optional[int], typer.Option("--layers-per-block", show_default=False,
                                                  help="Resnet blocks per level.")]
InitOpt = Annotated[Optional[str], typer.Option(
    "--init", metavar="MODEL", show_default=False, help="Fine-tune this model instead of training a new one.")]


def shared_options(template, *, leading: tuple[str, ...] = ()):
    """A decorator that gives a command the options of `template` (a function whose parameters declare them)
    around its own, so that they are defined once: the `leading` ones before the command's own, the rest after.
    The command is called as fn(options, **own), `options` holding every shared option by name. A command may
    declare its own option of a shared name in place of the shared one (upscale's prompt is an option), and
    leave out shared options that make no sense for it (`without`; they reach it as None)."""
    shared = inspect.signature(template, eval_str=True).parameters

    def decorate(fn=None, *, without: tuple[str, ...] = ()):
        if fn is None:
            return functools.partial(decorate, without=without)
        own = list(inspect.signature(fn, eval_str=True).parameters.values())[1:]
        first = [shared[name] for name in leading if not any(p.name == name for p in own)]
        params = [*first, *own, *(p for name, p in shared.items() if name not in (*leading, *without))]

        @functools.wraps(fn)
        def command(**kwargs):
            return fn({name: kwargs.pop(name, None) for name in shared}, **kwargs)

        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate
