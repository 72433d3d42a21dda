"""Row bands (sdcli.models.bands): the VAE run a band of rows at a time gives the unbanded VAE's values and
diffusers' AutoencoderKL's, at every band boundary; training keeps the plain layers.

Tiny models never reach bands.MIN_BYTES, so the tests lower it to 0 and BAND_BYTES to 1 (8-row bands, the
smallest), which cuts every full-resolution layer into several bands, the last one short.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdcli.models import bands
from sdcli.models.manual_cast import store_half

TOL = 2e-5  # float32 rounding: the statistics and the bands' sums in another order


@pytest.fixture
def always_banded(monkeypatch):
    monkeypatch.setattr(bands, "MIN_BYTES", 0)
    monkeypatch.setattr(bands, "BAND_BYTES", 1)


@pytest.fixture(scope="module")
def vaes():
    """Ours and diffusers' with the same random weights (a 3-level f4 VAE: a 1x1 shortcut where widths change)."""
    import tiny

    from sdcli.loading.detect import vae_from_diffusers
    from sdcli.loading.keymaps import rename_layout, vae_diffusers_name
    from sdcli.models.vae import AutoencoderKL

    ref = tiny.diffusers_vae((32, 64, 64))
    cfg = vae_from_diffusers(ref.config, "vae")
    ours = AutoencoderKL(cfg).eval()
    layout = rename_layout(list(ours.state_dict()), vae_diffusers_name(cfg))
    ours.load_state_dict({k: v.reshape(ours.state_dict()[k].shape)
                          for k, v in layout.from_file(ref.state_dict()).items()}, strict=True)
    return ours, ref


def close(a, b, tol=TOL):
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), f"max abs error {err:.2e}"


def _decode_encode(vae, z, images):
    with torch.inference_mode():
        return vae.decode(z), vae.encode(images).mean


@pytest.mark.parametrize("rows,cols", [(9, 5), (4, 11)])  # 36 and 16 full-resolution rows: 8-row bands + a short one
def test_banded_decode_and_encode_match_unbanded_and_diffusers(vaes, always_banded, monkeypatch, rows, cols):
    import sdcli.models.vae as vae_module

    ours, ref = vaes
    z = torch.randn(1, 4, rows, cols, generator=torch.Generator().manual_seed(rows))
    images = torch.rand(2, 3, 4 * rows, 4 * cols, generator=torch.Generator().manual_seed(cols)) * 2 - 1
    calls = []
    monkeypatch.setattr(vae_module, "conv_rows", lambda *a, **k: calls.append(1) or bands.conv_rows(*a, **k))
    decoded, mean = _decode_encode(ours, z, images)
    assert calls, "the bands were not used"
    with torch.no_grad():
        close(decoded, ref.decode(z).sample)
        close(mean, ref.encode(images).latent_dist.mean)
    monkeypatch.setattr(bands, "MIN_BYTES", 1 << 62)
    calls.clear()
    plain = _decode_encode(ours, z, images)
    assert not calls
    close(decoded, plain[0])
    close(mean, plain[1])


def test_banded_decode_with_fp16_weights_matches_unbanded(vaes, always_banded, monkeypatch):
    import copy

    half = store_half(copy.deepcopy(vaes[0]))
    z = torch.randn(1, 4, 9, 7, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        banded = half.decode(z)
        monkeypatch.setattr(bands, "MIN_BYTES", 1 << 62)
        close(banded, half.decode(z))


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("into", [False, True])
def test_conv_rows_is_the_convolution(always_banded, kernel, into):
    """Against F.conv2d over the whole tensor: the halo at each band edge, zero padding at the image's edges,
    the residual, and writing over the input (whose rows the next band still reads)."""
    g = torch.Generator().manual_seed(kernel)
    conv = nn.Conv2d(16, 16, kernel, padding=kernel // 2)
    x = torch.randn(2, 16, 27, 6, generator=g)
    skip = torch.randn(2, 16, 27, 6, generator=g)
    want = F.conv2d(torch.tanh(x), conv.weight, conv.bias, padding=kernel // 2) + skip
    source = x.clone()
    with torch.no_grad():
        got = bands.conv_rows(conv, lambda a, e: torch.tanh(source[:, :, a:e]), 27, 6, 16,
                              residual=lambda a, e: skip[:, :, a:e], into=source if into else None)
    close(got, want, 1e-6)
    assert (got.data_ptr() == source.data_ptr()) == into


def test_training_keeps_the_plain_layers(vaes, always_banded):
    """Bands write into one output tensor, which autograd cannot follow: with gradients on, the VAE runs
    unbanded, and its gradients flow."""
    import copy

    vae = copy.deepcopy(vaes[0]).train()
    z = torch.randn(1, 4, 9, 5, requires_grad=True)
    vae.decode(z).square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is not None for p in vae.decoder.parameters())


def test_attention_a_block_of_queries_at_a_time(always_banded):
    """With 1-byte bands every query is its own block: the same values as one call over all of them."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 1, 45, 16, generator=g) for _ in range(3))
    with torch.no_grad():
        close(bands.attention(q, k, v), F.scaled_dot_product_attention(q, k, v), 1e-6)


def test_moments_are_the_groups_variance_and_mean(always_banded):
    """One row per band, merged: against float64 var_mean, on activations far from zero (mean 30, std 0.5),
    where a one-pass sum of squares would lose most digits."""
    x = torch.randn(2, 8, 13, 5, generator=torch.Generator().manual_seed(3)) * 0.5 + 30
    var, mean = bands.moments(x, 4)
    want_var, want_mean = torch.var_mean(x.double().reshape(2, 4, -1), dim=-1, correction=0)
    assert torch.allclose(mean, want_mean, rtol=1e-7) and torch.allclose(var, want_var, rtol=1e-4)
