"""Token merging (models.tome) against tomesd applied to the same diffusers UNet; off, and after the run, the UNet
bit for bit as without it; the random destinations reproducible from the seed."""

import pytest
import tomesd  # the reference (in the test extra)
import torch

from sdcli.loading import load_model
from sdcli.models.tome import token_merging

TOL = 1e-4


@pytest.fixture(scope="module")
def models(tiny):
    ref = tiny("sd1")
    return load_model(ref.single_file).unet, ref.unet


def inputs(unet, size=(16, 16), batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, unet.cfg.in_channels, *size, generator=g)
    context = torch.randn(batch, 77, unet.cfg.context_dim, generator=g)
    return x, torch.tensor([3.0, 917.0])[:batch], context


def with_tomesd(ref, x, t, context, calls=1, seed=None, **args):
    """tomesd's output for `calls` forwards in a row; its generator forks the global one at the first merge,
    so with use_rand the global generator is seeded (in a fork) as ours is."""
    tomesd.apply_patch(ref, **args)
    try:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            # the sample positional: tomesd's size hook reads it
            return [ref(x, t, encoder_hidden_states=context).sample for _ in range(calls)]
    finally:
        tomesd.remove_patch(ref)


@torch.no_grad()
@pytest.mark.parametrize("max_downsample", [1, 2])
@pytest.mark.parametrize("size", [(16, 16), (13, 11)])
@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_matches_tomesd(models, ratio, size, max_downsample):
    unet, ref = models
    x, t, context = inputs(unet, size)
    (want,) = with_tomesd(ref, x, t, context, ratio=ratio, max_downsample=max_downsample, use_rand=False)
    with token_merging(unet, ratio, max_downsample=max_downsample, use_rand=False):
        got = unet(x, t, context)
    err = (got - want).abs().max().item()
    assert err <= TOL, f"max abs error {err:.2e}"
    full = unet(x, t, context)
    assert (got - full).abs().max() > 100 * TOL  # merging did change the output


@torch.no_grad()
def test_random_destinations_match_tomesd_and_follow_the_seed(models):
    unet, ref = models
    x, t, context = inputs(unet)
    want = with_tomesd(ref, x, t, context, calls=2, seed=7, ratio=0.5, max_downsample=2, use_rand=True)
    with token_merging(unet, 0.5, max_downsample=2, seed=7):
        got = [unet(x, t, context) for _ in range(2)]  # the second call draws on where the first left off
    for g, w in zip(got, want, strict=True):
        err = (g - w).abs().max().item()
        assert err <= TOL, f"max abs error {err:.2e}"
    assert (got[0] - got[1]).abs().max() > 100 * TOL
    with token_merging(unet, 0.5, max_downsample=2, seed=7):  # a new run starts the seed's draws again
        assert torch.equal(unet(x, t, context), got[0])
    with token_merging(unet, 0.5, max_downsample=2, seed=8):
        assert (unet(x, t, context) - got[0]).abs().max() > 100 * TOL
    with token_merging(unet, 0.5, max_downsample=2, use_rand=False):
        assert (unet(x, t, context) - got[0]).abs().max() > 100 * TOL


@torch.no_grad()
def test_an_odd_batch_takes_the_fixed_destinations(models):
    unet, _ = models
    x, t, context = inputs(unet, batch=1)
    with token_merging(unet, 0.5, seed=3):
        got = unet(x, t, context)
    with token_merging(unet, 0.5, use_rand=False):
        assert torch.equal(unet(x, t, context), got)


@torch.no_grad()
def test_off_and_after_the_run_the_unet_is_as_without_it(models):
    unet, _ = models
    x, t, context = inputs(unet, (13, 11))
    full = unet(x, t, context)
    with token_merging(unet, 0.0):
        assert torch.equal(unet(x, t, context), full)
    with token_merging(unet, 0.5):
        assert not torch.equal(unet(x, t, context), full)
    assert torch.equal(unet(x, t, context), full)
    with pytest.raises(KeyError), token_merging(unet, 0.5):
        unet(x, t, context)
        raise KeyError("inside the run")
    assert torch.equal(unet(x, t, context), full)
    assert all(getattr(m, "token_merging", None) is None for m in unet.modules())


def test_a_run_inside_a_run_and_a_bad_ratio_are_refused(models):
    unet, _ = models
    with token_merging(unet, 0.5):
        with pytest.raises(RuntimeError, match="already on"), token_merging(unet, 0.3):
            pass
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="ratio"), token_merging(unet, bad):
            pass
    assert all(getattr(m, "token_merging", None) is None for m in unet.modules())
