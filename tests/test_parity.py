"""Our UNet, VAE and text encoder against diffusers / transformers on the same random weights (fp32)."""

import pytest
import torch
from torch import nn

from sdcli.loading import load_model

TOL = 1e-4
KINDS = ["sd1", "sd2", "inpaint", "x4"]


def close(a, b, tol=TOL):
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= tol, f"max abs error {err:.2e} > {tol:.0e}"


@pytest.fixture(scope="module", params=KINDS)
def kind(request):
    return request.param


@pytest.mark.parametrize("fmt", ["single-file", "diffusers"])
def test_unet_text_and_vae_match_the_references(tiny, kind, fmt):
    ref = tiny(kind)
    model = load_model(ref.single_file if fmt == "single-file" else ref.folder)
    assert model.cfg.unet.in_channels == {"inpaint": 9, "x4": 7}.get(kind, 4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    x = torch.randn(2, model.cfg.unet.in_channels, 16, 16, generator=g)
    t = torch.tensor([3.0, 917.0])
    labels = torch.tensor([20, 350]) if kind == "x4" else None
    images = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    latents = torch.randn(2, 4, 32 // model.cfg.vae.downsample_factor, 32 // model.cfg.vae.downsample_factor,
                          generator=g)
    with torch.no_grad():
        context = ref.text_encoder(ids).last_hidden_state
        close(model.text_encoder(ids), context)

        expected = ref.unet(x, t, encoder_hidden_states=context, class_labels=labels).sample
        assert expected.abs().mean() > 0.05  # the comparison is not between two near-zero tensors
        close(model.unet(x, t, context, labels), expected)

        close(model.vae.encode(images).mean, ref.vae.encode(images).latent_dist.mean)
        close(model.vae.encode(images).logvar, ref.vae.encode(images).latent_dist.logvar)
        close(model.vae.decode(latents), ref.vae.decode(latents).sample)


def test_single_files_are_read_by_diffusers_into_the_same_weights(tiny, kind):
    """The fixture's single files are a genuine original layout: diffusers' own converter agrees."""
    import diffusers

    pipeline = {"inpaint": diffusers.StableDiffusionInpaintPipeline,
                "x4": diffusers.StableDiffusionUpscalePipeline}.get(kind, diffusers.StableDiffusionPipeline)
    ref = tiny(kind)
    pipe = pipeline.from_single_file(str(ref.single_file), config=str(ref.folder), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        got, want = getattr(pipe, name).state_dict(), getattr(ref, name).state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), (kind, name)


@pytest.mark.parametrize("widths", [(32, 64, 64), (32, 32, 64, 64), (32, 32, 64, 64, 64)], ids=["f4", "f8", "f16"])
def test_vae_downsampling_factors_4_8_16(widths):
    import tiny as builder

    from sdcli.loading.detect import vae_from_diffusers
    from sdcli.loading.keymaps import rename_layout, vae_diffusers_name
    from sdcli.models.vae import AutoencoderKL

    ref = builder.diffusers_vae(widths)
    cfg = vae_from_diffusers(ref.config, "vae")
    assert cfg.downsample_factor == 2 ** (len(widths) - 1)
    ours = AutoencoderKL(cfg).eval()
    layout = rename_layout(list(ours.state_dict()), vae_diffusers_name(cfg))
    state = {k: v.reshape(ours.state_dict()[k].shape) for k, v in layout.from_file(ref.state_dict()).items()}
    ours.load_state_dict(state, strict=True)
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        posterior = ours.encode(images)
        assert posterior.mean.shape[-1] == 64 // cfg.downsample_factor
        close(posterior.mean, ref.encode(images).latent_dist.mean)
        close(ours.decode(posterior.mean), ref.decode(posterior.mean).sample)


class OpenClipBlock(nn.Module):
    """OpenCLIP's residual attention block, written independently with torch's fused MultiheadAttention."""

    def __init__(self, width, heads, mlp):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(mlp, width))

    def forward(self, x, mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


def test_openclip_text_encoder_maps_onto_clip_text_model():
    """SD 2.x: fused in_proj split into q, k, v; gelu; the penultimate layer, then ln_final."""
    from sdcli.loading.detect import openclip_text_from_shapes
    from sdcli.loading.keymaps import openclip_layout
    from sdcli.models.text import TextEncoder

    torch.manual_seed(0)
    width, heads, layers, vocab = 128, 2, 3, 1000
    blocks = nn.ModuleList(OpenClipBlock(width, heads, 4 * width) for _ in range(layers))
    token_embedding = nn.Embedding(vocab, width)
    positional = torch.randn(77, width) * 0.1
    ln_final = nn.LayerNorm(width)
    for p in [*blocks.parameters(), *ln_final.parameters()]:
        p.data.normal_(0, 0.05).add_(1.0 if p.ndim == 1 and p.shape[0] == width else 0.0)
    state = {"token_embedding.weight": token_embedding.weight, "positional_embedding": positional,
             "ln_final.weight": ln_final.weight, "ln_final.bias": ln_final.bias,
             "text_projection": torch.randn(width, 64), "logit_scale": torch.tensor(4.6)}
    for i, b in enumerate(blocks):
        state.update({f"transformer.resblocks.{i}.{k}": v for k, v in b.state_dict().items()})

    cfg = openclip_text_from_shapes({k: tuple(v.shape) for k, v in state.items()})
    assert (cfg.layers, cfg.heads, cfg.activation, cfg.skip_last_layers) == (3, 2, "gelu", 1)
    encoder = TextEncoder(cfg).eval()
    layout = openclip_layout(list(encoder.state_dict()), "")
    assert set(layout.to_file(encoder.state_dict())) == set(state)
    encoder.load_state_dict(layout.from_file(state), strict=True)

    ids = torch.randint(0, vocab, (2, 77))
    mask = torch.full((77, 77), float("-inf")).triu(1)
    with torch.no_grad():
        x = token_embedding(ids) + positional
        for b in blocks[:-1]:  # SD 2.x: the penultimate layer
            x = b(x, mask)
        expected = ln_final(x)
        close(encoder(ids), expected)
        # clip skip 2 goes one layer further back
        close(encoder(ids, clip_skip=2), ln_final(blocks[0](token_embedding(ids) + positional, mask)))
