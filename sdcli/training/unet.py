"""train-unet: the text-conditioned denoiser in the VAE's latent space (and optionally the text encoder).

    t ~ U{0..T-1},  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,  loss = w(t) * |UNet(x_t, t, text) - target|^2

with target eps or v, w the Min-SNR weight (or 1), and captions dropped now and then for guidance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from sdcli.errors import SdcliError
from sdcli.training import common
from sdcli.training.config import DiffusionObjective, TrainConfig
from sdcli.training.data import Dataset, example_at, generator, load_image
from sdcli.training.losses import diffusion_target, snr_weights


class DenoiserNet(nn.Module):
    """The trained modules (the UNet, and the text encoder when it is trained) and the loss they give."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None):
        super().__init__()
        self.unet = unet
        if text_encoder is not None:
            self.text_encoder = text_encoder

    def forward(self, x_t, t, ids, context, target, weights) -> torch.Tensor:
        if context is None:
            context = self.text_encoder(ids)
        pred = self.unet(x_t, t, context).float()
        return (weights * ((pred - target.float()) ** 2).mean(dim=(1, 2, 3))).mean()


def zero_init(unet: nn.Module) -> None:
    """LDM starts every residual branch and the output at zero, so a new UNet begins as a near-identity
    stack and predicts 0."""
    for name, module in unet.named_modules():
        if name.endswith(("out_layers.3", "proj_out")) or name == "out.2":
            nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def dropped_captions(captions: list[str], gens: list[torch.Generator], p: float) -> list[str]:
    """Each caption replaced by "" with probability p (one draw from each sample's generator)."""
    return ["" if torch.rand(1, generator=g).item() < p else c for c, g in zip(captions, gens, strict=True)]


def sample_noise(g: torch.Generator, shape: tuple[int, ...], offset: float) -> torch.Tensor:
    """N(0, I) noise [C, h, w]; with an offset, plus offset * N(0, 1) per channel (the "noise offset" that lets
    a model learn very dark and very bright images)."""
    eps = torch.randn(shape, generator=g)
    if offset:
        eps = eps + offset * torch.randn((shape[0], 1, 1), generator=g)
    return eps


@dataclass
class UNetTask:
    model: nn.Module  # StableDiffusion: the trained parts in `net`, the frozen ones used as they are
    cfg: TrainConfig
    objective: DiffusionObjective
    data: Dataset
    device: torch.device
    sources: dict = field(default_factory=dict)  # the options that made the model (see common.check_sources)

    def __post_init__(self):
        m, obj = self.model, self.objective
        common.make_trainable(m.unet)
        if obj.train_text_encoder:
            common.make_trainable(m.text_encoder)
        self.net = DenoiserNet(m.unet, m.text_encoder if obj.train_text_encoder else None)
        self.disc = None
        m.to(self.device)
        from sdcli.sampling.schedules import alphas_cumprod

        self.abar = alphas_cumprod(m.cfg.schedule).float()
        if obj.max_timestep > len(self.abar):
            raise SdcliError(f"--max-timestep {obj.max_timestep}: this model has {len(self.abar)} timesteps")
        self.cache = self._encode_all() if obj.cache_latents else None

    # --- one micro-batch ---------------------------------------------------------------------------------

    def loss(self, net, step: int, positions: list[int]):
        m, obj, cfg = self.model, self.objective, self.cfg
        gens = [generator(cfg.seed, "sample", p) for p in positions]
        indices = [example_at(len(self.data), cfg.seed, p) for p in positions]
        examples = [self.data.examples[i] for i in indices]
        # per sample, in a fixed order: caption dropout, crop and flip, posterior noise, timestep, noise
        captions = dropped_captions([ex.caption for ex in examples], gens, obj.caption_dropout)
        x0 = self._latents(indices, gens) * m.cfg.latent_scale  # [B, C, h, w]
        t = torch.cat([torch.randint(obj.min_timestep, obj.max_timestep, (1,), generator=g) for g in gens])
        eps = torch.stack([sample_noise(g, tuple(x0.shape[1:]), obj.noise_offset) for g in gens])
        x0, t, eps = x0.to(self.device), t.to(self.device), eps.to(self.device)
        abar = self.abar.to(self.device)[t][:, None, None, None]
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        target = diffusion_target(x0, eps, abar, obj.prediction)
        weights = snr_weights(abar.flatten(), obj.snr_gamma, obj.prediction)
        ids = self._tokens(captions)
        context = None
        if not obj.train_text_encoder:
            with torch.no_grad():
                context = m.text_encoder(ids)
        return net(x_t, t, ids, context, target, weights), None, {}

    def _tokens(self, captions: list[str]) -> torch.Tensor:
        tok = self.model.tokenizer
        ids = tok(captions, padding="max_length", max_length=self.model.cfg.text.max_positions, truncation=True,
                  return_tensors="pt").input_ids
        return ids.to(self.device)

    def _latents(self, indices: list[int], gens) -> torch.Tensor:
        """Unscaled latent samples [B, C, h, w] on the CPU: cached posteriors, or images through the VAE."""
        cfg = self.cfg
        if self.cache is not None:
            rows = []
            for i, g in zip(indices, gens, strict=True):
                flipped = torch.rand(3, generator=g)[2].item() < 0.5 and cfg.flip  # the draws load_image makes
                mean, std = self.cache[int(flipped)][i]
                rows.append(mean + std * torch.randn(mean.shape, generator=g))
            return torch.stack(rows)
        images = torch.stack([load_image(self.data.examples[i].path, cfg.resolution, g, cfg.random_crop, cfg.flip)[0]
                              for i, g in zip(indices, gens, strict=True)])
        with torch.no_grad():
            posterior = self.model.vae.encode(images.to(self.device))
        mean, std = posterior.mean.float().cpu(), posterior.std.float().cpu()
        return torch.stack([mu + s * torch.randn(mu.shape, generator=g) for mu, s, g in zip(mean, std, gens,
                                                                                            strict=True)])

    def _encode_all(self) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """--cache-latents: every image's posterior (mean, std), unflipped and (with --flip) flipped."""
        if self.cfg.random_crop:
            raise SdcliError("--cache-latents encodes each image once, so it cannot be combined with --random-crop")
        out = []
        for flipped in (False, True) if self.cfg.flip else (False,):
            rows = []
            for i in range(0, len(self.data), 16):
                images = torch.stack([load_image(ex.path, self.cfg.resolution)[0] for ex in self.data.examples[i:i + 16]])
                if flipped:
                    images = images.flip(-1)
                with torch.no_grad():
                    posterior = self.model.vae.encode(images.to(self.device))
                rows += list(zip(posterior.mean.float().cpu(), posterior.std.float().cpu(), strict=True))
            out.append(rows)
        return out

    # --- output ----------------------------------------------------------------------------------------

    def save_model(self, out: Path, step: int) -> None:
        from sdcli.loading.save import save_diffusers

        trained = ("unet", "text_encoder") if self.objective.train_text_encoder else ("unet",)
        save_diffusers(self.model, out, components=trained)

    def validate(self, out: Path, step: int) -> dict[str, float]:
        """A row of images for the validation prompts (or the first captions), one seed each."""
        from sdcli.engine import Engine, Sampling
        from sdcli.tasks.txt2img import txt2img

        obj = self.objective
        prompts = list(obj.validation_prompts) or [ex.caption for ex in self.data.examples[:4]]
        engine = Engine(self.model, self.device)
        s = Sampling(obj.validation_steps, obj.validation_cfg, "dpm++2m", "karras")
        self.model.eval()
        try:
            images = torch.cat([txt2img(engine, p, s, [self.cfg.seed + i], width=self.cfg.resolution,
                                        height=self.cfg.resolution) for i, p in enumerate(prompts)])
        finally:
            self.net.train()
        common.save_grid(images, out / "samples" / f"step-{step:07d}.png", columns=min(len(prompts), 8))
        return {}

    def state(self) -> dict:
        return {"kind": "unet", "train": asdict(self.cfg), "objective": asdict(self.objective), "sources": self.sources,
                "model": asdict(self.model.cfg)}


def new_model(init: str | None, vae: str | None, prediction: str | None, unet_cfg, text_cfg):
    """The model to train: --init's (with --vae's VAE if given), or a new UNet (and a new text encoder when
    text_cfg is given) around --vae's VAE. -> (model, whether the text encoder is new)."""
    from sdcli.config import ModelConfig
    from sdcli.loading import load_model, load_vae
    from sdcli.models import StableDiffusion
    from sdcli.models.text import clip_tokenizer

    if init is not None:
        model = load_model(init, vae=vae)
        if prediction is not None:
            model.cfg = replace(model.cfg, prediction=prediction)
        return model, False
    if vae is None:
        raise SdcliError("a new UNet needs a VAE: pass --vae (a train-vae output folder, a VAE file, or any model), "
                         "or fine-tune a model with --init")
    vae_module, scale = load_vae(vae)
    unet_cfg = replace(unet_cfg, in_channels=vae_module.cfg.embed_dim, out_channels=vae_module.cfg.embed_dim,
                       context_dim=text_cfg.width)
    cfg = ModelConfig(unet=unet_cfg, vae=vae_module.cfg, text=text_cfg, prediction=prediction or "eps",
                      latent_scale=scale)
    try:
        model = StableDiffusion(cfg, tokenizer=clip_tokenizer(text_cfg.pad_token))
    except ValueError as e:  # GroupNorm or heads that do not divide a width
        raise SdcliError(f"this UNet cannot be built: {e}") from None
    model.first_stage_model = vae_module
    zero_init(model.unet)
    return model.eval().requires_grad_(False), True


def resumed_model(out: Path):
    from sdcli.loading import load_model

    return load_model(out)


def run(data_dir: str, out: str, train: dict, objective: dict, arch: dict, text_arch: dict, init: str | None,
        vae: str | None, resume: bool, device_name: str, quiet: bool, beta_end: float | None = None) -> Path:
    """sdcli train-unet: fine-tune --init's model, or train a new UNet (arch: preset and flags) around --vae's
    VAE with a new text encoder (text_arch), or continue the run in --out."""
    from sdcli.loading.save import save_diffusers
    from sdcli.training.config import text_config, unet_config

    new_model_flags = {**common.flags(arch, {"preset": "arch"}),
                       **common.flags(text_arch, {"preset": "text-encoder-config", "width": "text-width",
                                                  "layers": "text-layers"})}
    session = common.start("unet", out, resume, device_name,
                           {"init": init, "vae": vae, "beta-end": beta_end, **new_model_flags}, quiet)
    state, progress = session.state, session.progress
    if state is None and init is not None:
        given = [k for k, v in new_model_flags.items() if v is not None]
        if given:
            raise SdcliError(f"--{given[0]} describes a new model; --init fine-tunes a model whose architecture is "
                             "given: drop one of them")
    cfg = session.config(train)
    torch.manual_seed(cfg.seed)  # the same new weights in every run and every process
    new_text = False
    if state is not None:
        model = resumed_model(session.out)
    else:
        text_cfg = text_config(**{k: v for k, v in text_arch.items() if v is not None}) if init is None else None
        unet_cfg = unet_config(**{k: v for k, v in arch.items() if v is not None}) if init is None else None
        model, new_text = new_model(init, vae, objective.get("prediction"), unet_cfg, text_cfg)
        if beta_end is not None:
            try:
                model.cfg = replace(model.cfg, schedule=replace(model.cfg.schedule, beta_end=beta_end))
            except ValueError as e:
                raise SdcliError(f"--beta-end {beta_end}: {e}") from None
        if init is None:  # a new model renders at the size it learnt by default
            model.cfg = replace(model.cfg, resolution=cfg.resolution)
        elif train.get("resolution") is None:  # and a fine-tune goes on at that size
            cfg = replace(cfg, resolution=model.cfg.native_size)
        if new_text and not objective.get("train_text_encoder"):
            progress.message("note: the new text encoder is trained with the UNet (--train-text-encoder)", force=True)
            objective["train_text_encoder"] = True
        if objective.get("prediction") is None:
            objective["prediction"] = model.cfg.prediction
    obj = common.configure(DiffusionObjective, objective, state, "objective")
    f = model.cfg.vae.downsample_factor
    if cfg.resolution % (8 * f):
        raise SdcliError(f"--resolution {cfg.resolution} must be a multiple of {8 * f} for this model "
                         f"(its VAE shrinks images {f}x)")
    data = session.load_data(data_dir, captions=True, strict=cfg.strict)
    task = UNetTask(model, cfg, obj, data, session.device, session.sources)
    trained = sum(p.numel() for p in task.net.parameters() if p.requires_grad)
    what = (f"training {'the UNet and text encoder' if obj.train_text_encoder else 'the UNet'} "
            f"({trained / 1e6:.2f}M parameters, {obj.prediction}-prediction) on {len(data)} images")
    # the frozen parts are written once, up front: a resume reads them from the run's folder
    return session.train(task, cfg, what, done=f"the model is {session.out}; try sdcli generate --model "
                         f"{session.out} \"a prompt\"", save_frozen=lambda: save_diffusers(model, session.out))
