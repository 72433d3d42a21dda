"""train-vae: the KL autoencoder as LDM trains it.

    loss = sum|x - x'| (+ perceptual) / B  +  kl_weight * KL / B  [+ d_weight * -mean D(x')]   (autoencoder)
    loss_D = hinge(D(x), D(x'))                                                                  (discriminator)

The adversarial terms start at --disc-start; d_weight balances the reconstruction and adversarial gradient
norms at the decoder's last layer. The discriminator is trained beside the autoencoder, on detached
reconstructions, with its own optimizer; it is not under DDP (its gradients are averaged by hand) because
the autoencoder's adversarial term runs it with its weights frozen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from sdcli.errors import SdcliError
from sdcli.training import common
from sdcli.training.config import TrainConfig, VAEObjective
from sdcli.training.data import Dataset, example_at, generator, holdout, load_image
from sdcli.training.losses import NLayerDiscriminator, adaptive_weight, hinge_d_loss, load_vgg16
from sdcli.models.vae import DiagonalGaussian


class AutoencoderNet(nn.Module):
    """The trained autoencoder: image -> posterior sample (with the given noise) -> reconstruction."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor):
        posterior = self.vae.encode(x)
        return self.vae.decode(posterior.mean + posterior.std * eps), posterior.mean, posterior.logvar


@dataclass
class VAETask:
    vae: nn.Module
    latent_scale: float  # written with the weights; re-estimated as 1 / std of the latents at every save but
    # with --decoder-only, whose frozen encoder keeps its latent space
    cfg: TrainConfig
    objective: VAEObjective
    data: Dataset
    device: torch.device
    sources: dict = field(default_factory=dict)  # the options that made the model (see common.check_sources)

    def __post_init__(self):
        obj = self.objective
        common.make_trainable(self.vae)
        if obj.decoder_only:  # the latent space stays as it is: encoder and quant_conv frozen
            self.vae.encoder.requires_grad_(False)
            self.vae.quant_conv.requires_grad_(False)
        self.net = AutoencoderNet(self.vae)
        self.disc = NLayerDiscriminator(self.vae.cfg.out_channels, layers=obj.disc_layers) if obj.disc_weight else None
        self.perceptual = load_vgg16(obj.perceptual_weights).to(self.device) if obj.perceptual_weights else None
        n = len(self.data)
        if obj.validation_images >= n:
            raise SdcliError(f"{n} usable image(s) cannot spare {obj.validation_images} for validation: "
                             "pass a smaller --validation-images (0 turns it off)")
        train, held = holdout(n, self.cfg.seed, obj.validation_images)
        self.train_examples = [self.data.examples[i] for i in train]
        self.held_out = [self.data.examples[i] for i in held]
        f = self.vae.cfg.downsample_factor
        if self.cfg.resolution % f:
            raise SdcliError(f"--resolution {self.cfg.resolution} is not a multiple of the VAE's factor {f}")
        self.latent_shape = (self.vae.cfg.embed_dim, self.cfg.resolution // f, self.cfg.resolution // f)

    def loss(self, net, step: int, positions: list[int]):
        cfg, obj = self.cfg, self.objective
        gens = [generator(cfg.seed, "sample", p) for p in positions]
        images = [load_image(self.train_examples[example_at(len(self.train_examples), cfg.seed, p)].path,
                             cfg.resolution, g, cfg.random_crop, cfg.flip)[0] for p, g in zip(positions, gens,
                                                                                              strict=True)]
        x = torch.stack(images).to(self.device)
        eps = torch.stack([torch.randn(self.latent_shape, generator=g) for g in gens]).to(self.device)
        recon, mean, logvar = net(x, eps)
        recon = recon.float()
        b = x.shape[0]
        rec = (x - recon).abs()
        logs = {"l1": rec.mean().item()}
        if self.perceptual is not None:
            p = self.perceptual(x, recon)
            rec = rec + obj.perceptual_weight * p[:, None, None, None]
            logs["perceptual"] = p.mean().item()
        nll = rec.sum() / b
        kl = DiagonalGaussian(mean.float(), logvar.float()).kl().sum() / b
        loss = nll + obj.kl_weight * kl
        logs["kl"] = kl.item()
        if self.disc is None or step < obj.disc_start:
            return loss, None, logs
        self.disc.requires_grad_(False)  # the autoencoder's adversarial term must not train the discriminator
        g_loss = -self.disc(recon).mean()
        self.disc.requires_grad_(True)
        d_weight = adaptive_weight(nll, g_loss, self.vae.decoder.conv_out.weight) * obj.disc_weight
        d_loss = hinge_d_loss(self.disc(x), self.disc(recon.detach()))
        logs.update(g_loss=g_loss.item(), d_weight=d_weight.item(), d_loss=d_loss.item())
        return loss + d_weight * g_loss, d_loss, logs

    def _posterior_means(self, examples) -> torch.Tensor:
        with torch.no_grad():
            images = torch.stack([load_image(ex.path, self.cfg.resolution)[0] for ex in examples])
            return self.vae.encode(images.to(self.device)).mean.float()

    def save_model(self, out: Path, step: int) -> None:
        from sdcli.loading.save import save_vae

        if not self.objective.decoder_only:  # a frozen encoder keeps its latent space, scale included
            # LDM's latent scale: 1 / std of the latents, so the UNet sees unit variance
            sample = self.held_out + self.train_examples[:16]
            self.vae.eval()
            try:
                self.latent_scale = round(1.0 / self._posterior_means(sample).std().item(), 5)
            finally:
                self.vae.train()
        save_vae(self.vae, self.latent_scale, out)

    def validate(self, out: Path, step: int) -> dict[str, float]:
        """Originals over their reconstructions (posterior means), for the held-out images."""
        if not self.held_out:
            return {}
        self.vae.eval()
        try:
            with torch.no_grad():
                x = torch.stack([load_image(ex.path, self.cfg.resolution)[0] for ex in self.held_out]).to(self.device)
                recon = self.vae.decode(self.vae.encode(x).mean).float().clamp(-1, 1)
        finally:
            self.vae.train()
        common.save_grid(torch.cat([common.to_uint8(x), common.to_uint8(recon)]),
                         out / "samples" / f"step-{step:07d}.png", columns=len(self.held_out))
        mse = ((x - recon) / 2).pow(2).mean().item()  # on [0, 1] pixels
        return {"l1": (x - recon).abs().mean().item(), "psnr": -10 * torch.log10(torch.tensor(max(mse, 1e-10))).item()}

    def state(self) -> dict:
        return {"kind": "vae", "train": asdict(self.cfg), "objective": asdict(self.objective), "sources": self.sources,
                "vae": asdict(self.vae.cfg)}


def run(data_dir: str, out: str, train: dict, objective: dict, arch: dict, init: str | None, resume: bool,
        device_name: str, quiet: bool) -> Path:
    """sdcli train-vae: a new autoencoder (arch: preset and flags), --init's, or the resumed run's."""
    from sdcli.loading import load_vae
    from sdcli.models.vae import AutoencoderKL
    from sdcli.training.config import vae_config

    new_vae_flags = common.flags(arch, {"preset": "arch"})
    session = common.start("vae", out, resume, device_name, {"init": init, **new_vae_flags}, quiet)
    state = session.state
    cfg = session.config(train)
    obj = common.configure(VAEObjective, objective, state, "objective")
    data = session.load_data(data_dir, captions=False, strict=cfg.strict)
    torch.manual_seed(cfg.seed)  # the same new weights in every run and every process
    if state is not None:
        vae, scale = load_vae(session.out)
    elif init is not None:
        given = [k for k, v in new_vae_flags.items() if v is not None]
        if given:
            raise SdcliError(f"--{given[0]} describes a new VAE; --init fine-tunes one whose architecture is given: "
                             "drop one of them")
        vae, scale = load_vae(init)
    else:
        try:
            vae, scale = AutoencoderKL(vae_config(**{k: v for k, v in arch.items() if v is not None})), 0.18215
        except ValueError as e:
            raise SdcliError(f"this VAE cannot be built: {e}") from None
    if obj.decoder_only and state is None and init is None:
        raise SdcliError("--decoder-only fine-tunes the decoder of an existing VAE: give it with --init")
    task = VAETask(vae, scale, cfg, obj, data, session.device, session.sources)
    what = (f"training a VAE ({sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters, "
            f"{vae.cfg.downsample_factor}x, {vae.cfg.embed_dim} latent channels) on {len(task.train_examples)} "
            f"images, {len(task.held_out)} held out")
    return session.train(task, cfg, what, done=f"the VAE is in {session.out / 'vae'}; use it with --vae {session.out}")
