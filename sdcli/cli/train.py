"""The training commands, train-vae and train-unet, which share their data, loop and checkpoint options.

Options default to None, meaning "not given": a new run takes the config's default, a resumed run keeps
its own value (see training.common.configure)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from sdcli.cli.options import (AccumOpt, ArchOpt, BatchOpt, ChannelsOpt, ClipOpt, DataArg, DeviceOpt, EmaOpt, FlipOpt,
                               InitOpt, KeepOpt, LayersOpt, LrOpt, MaxStepsOpt, MixedPrecisionOpt, OutOpt, QuietOpt,
                               RandomCropOpt, ResolutionOpt, ResumeOpt, SaveEveryOpt, StrictOpt, TrainSeedOpt,
                               ValidateEveryOpt, WarmupOpt, WeightDecayOpt, shared_options)


def _train_options(
    data: DataArg, out: OutOpt, resume: ResumeOpt = False,
    resolution: ResolutionOpt = None, random_crop: RandomCropOpt = None, flip: FlipOpt = None,
    strict: StrictOpt = None, batch_size: BatchOpt = None, grad_accum: AccumOpt = None, lr: LrOpt = None,
    warmup_steps: WarmupOpt = None, weight_decay: WeightDecayOpt = None, max_grad_norm: ClipOpt = None,
    ema_decay: EmaOpt = None, mixed_precision: MixedPrecisionOpt = None, max_steps: MaxStepsOpt = None,
    seed: TrainSeedOpt = None, save_every: SaveEveryOpt = None, keep: KeepOpt = None,
    validate_every: ValidateEveryOpt = None, device: DeviceOpt = None, quiet: QuietOpt = False,
):
    """The options of both training commands: data, --out and --resume before each command's own, the rest after."""


train_command = shared_options(_train_options, leading=("data", "out", "resume"))
_RUN_KEYS = ("data", "out", "resume", "device", "quiet")  # the other shared options are TrainConfig's fields


def _run_options(o: dict) -> dict:
    """The shared options as keyword arguments of the trainers' run()."""
    train = {k: v for k, v in o.items() if k not in _RUN_KEYS} | {"mixed_precision": o["mixed_precision"] or "auto"}
    return dict(data_dir=o["data"], out=o["out"], train=train, resume=o["resume"], device_name=o["device"] or "auto",
                quiet=o["quiet"])


@train_command
def train_vae(
    options: dict,
    init: Annotated[Optional[str], typer.Option(
        "--init", metavar="MODEL_OR_VAE", show_default=False,
        help="Fine-tune this VAE: a VAE file or folder, or a full model's VAE.")] = None,
    decoder_only: Annotated[Optional[bool], typer.Option(
        "--decoder-only", show_default=False, help="With --init: train the decoder only; the latents stay the same."
    )] = None,
    arch: ArchOpt = None, channels: ChannelsOpt = None,
    downsample: Annotated[Optional[int], typer.Option("--downsample", show_default=False,
                                                      help="4, 8 or 16: image pixels per latent pixel.")] = None,
    latent_channels: Annotated[Optional[int], typer.Option("--latent-channels", show_default=False)] = None,
    layers_per_block: LayersOpt = None,
    kl_weight: Annotated[Optional[float], typer.Option("--kl-weight", show_default=False,
                                                       help="[default: 1e-6]")] = None,
    perceptual_weights: Annotated[Optional[str], typer.Option(
        "--perceptual-weights", metavar="VGG16.safetensors", show_default=False,
        help="VGG16 weights (torchvision names; LPIPS lin layers too if present) for the perceptual term; none can "
             "be downloaded, so without them the term is off.")] = None,
    perceptual_weight: Annotated[Optional[float], typer.Option("--perceptual-weight", show_default=False,
                                                               help="[default: 1.0]")] = None,
    disc_start: Annotated[Optional[int], typer.Option(
        "--disc-start", show_default=False, help="Step at which the PatchGAN discriminator starts. [default: 5000]")] = None,
    disc_weight: Annotated[Optional[float], typer.Option(
        "--disc-weight", show_default=False,
        help="Times the adaptive weight of the adversarial term; 0 turns the discriminator off. [default: 0.5]")] = None,
    disc_layers: Annotated[Optional[int], typer.Option("--disc-layers", show_default=False,
                                                       help="[default: 3]")] = None,
    validation_images: Annotated[Optional[int], typer.Option(
        "--validation-images", show_default=False,
        help="Images held out; their reconstructions are the validation grid. [default: 4]")] = None,
):
    """Train a KL autoencoder (LDM): L1, optional perceptual term, KL, and a PatchGAN with adaptive weight."""
    from sdcli.training import vae

    vae.run(
        **_run_options(options),
        objective=dict(kl_weight=kl_weight, perceptual_weights=perceptual_weights,
                       perceptual_weight=perceptual_weight, disc_start=disc_start, disc_weight=disc_weight,
                       disc_layers=disc_layers, decoder_only=decoder_only, validation_images=validation_images),
        arch=dict(preset=arch, channels=channels, downsample=downsample, latent_channels=latent_channels,
                  layers_per_block=layers_per_block),
        init=init,
    )


@train_command
def train_unet(
    options: dict,
    init: InitOpt = None,
    vae: Annotated[Optional[str], typer.Option(
        "--vae", metavar="PATH", show_default=False,
        help="The VAE: a train-vae folder, a VAE file, or a model. Needed for a new UNet; replaces --init's.")] = None,
    arch: ArchOpt = None, channels: ChannelsOpt = None, layers_per_block: LayersOpt = None,
    attention_levels: Annotated[Optional[str], typer.Option(
        "--attention-levels", show_default=False,
        help="One 0 or 1 per level: where the UNet attends to the text. [default: all levels but the last]")] = None,
    heads: Annotated[Optional[int], typer.Option("--heads", show_default=False,
                                                 help="Attention heads. [default: 8]")] = None,
    text_encoder_config: Annotated[Optional[str], typer.Option(
        "--text-encoder-config", show_default=False,
        help="A new CLIP text encoder (real CLIP vocabulary): tiny, small or sd15. [default: small]")] = None,
    text_width: Annotated[Optional[int], typer.Option("--text-width", show_default=False,
                                                      help="New text encoder width (multiple of 64).")] = None,
    text_layers: Annotated[Optional[int], typer.Option("--text-layers", show_default=False)] = None,
    train_text_encoder: Annotated[Optional[bool], typer.Option(
        "--train-text-encoder", show_default=False, help="Train the text encoder too (a new one always is).")] = None,
    prediction: Annotated[Optional[str], typer.Option(
        "--prediction", show_default=False, help="eps or v. [default: the model's own; eps for a new one]")] = None,
    beta_end: Annotated[Optional[float], typer.Option(
        "--beta-end", show_default=False,
        help="The noise schedule's last beta, which sets how much of the image is left at the last timestep: "
             "SD's 0.012 leaves 0.47% of its variance, 0.02 leaves 0.023%. [default: the model's own; 0.012 for a "
             "new one]")] = None,
    min_timestep: Annotated[Optional[int], typer.Option(
        "--min-timestep", show_default=False,
        help="Train on timesteps from this one up only (high ones: the layout). [default: 0]")] = None,
    max_timestep: Annotated[Optional[int], typer.Option(
        "--max-timestep", show_default=False, help="Train on timesteps below this one only. [default: 1000]")] = None,
    snr_gamma: Annotated[Optional[float], typer.Option(
        "--snr-gamma", show_default=False, help="Min-SNR loss weighting (5 is usual); 0 is off. [default: 0]")] = None,
    noise_offset: Annotated[Optional[float], typer.Option("--noise-offset", show_default=False,
                                                          help="[default: 0]")] = None,
    caption_dropout: Annotated[Optional[float], typer.Option(
        "--caption-dropout", show_default=False,
        help="How often a caption is replaced by '', so classifier-free guidance works. [default: 0.1]")] = None,
    cache_latents: Annotated[Optional[bool], typer.Option(
        "--cache-latents", show_default=False, help="Encode the data set with the VAE once, up front.")] = None,
    validation_prompts: Annotated[Optional[list[str]], typer.Option(
        "--validation-prompts", show_default=False,
        help="A prompt (repeat the option for more) or a text file of prompts. [default: the first captions]")] = None,
    validation_steps: Annotated[Optional[int], typer.Option("--validation-steps", show_default=False,
                                                            help="[default: 20]")] = None,
    validation_cfg: Annotated[Optional[float], typer.Option("--validation-cfg", show_default=False,
                                                            help="[default: 5]")] = None,
):
    """Train the text-conditioned denoiser: fine-tune a model (--init) or a new UNet on a VAE (--vae)."""
    from sdcli.training import unet

    unet.run(
        **_run_options(options),
        objective=dict(prediction=prediction, snr_gamma=snr_gamma, noise_offset=noise_offset,
                       min_timestep=min_timestep, max_timestep=max_timestep,
                       caption_dropout=caption_dropout, train_text_encoder=train_text_encoder,
                       cache_latents=cache_latents, validation_prompts=_prompts(validation_prompts),
                       validation_steps=validation_steps, validation_cfg=validation_cfg),
        arch=dict(preset=arch, channels=channels, layers_per_block=layers_per_block,
                  attention_levels=attention_levels, heads=heads),
        text_arch=dict(preset=text_encoder_config, width=text_width, layers=text_layers),
        init=init, vae=vae, beta_end=beta_end,
    )


def _prompts(values: list[str] | None) -> tuple[str, ...] | None:
    """Each value is a prompt, or a text file of prompts (one a line)."""
    from pathlib import Path

    if not values:
        return None
    prompts: list[str] = []
    for value in values:
        path = Path(value).expanduser()
        if path.suffix.lower() == ".txt" or path.is_file():
            try:
                prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError) as e:
                from sdcli.errors import SdcliError

                raise SdcliError(f"cannot read validation prompts {path}: {e}") from None
        else:
            prompts.append(value)
    return tuple(prompts)
