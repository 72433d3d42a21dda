"""The UNet's forward in stages: ControlNet residuals against diffusers' UNet, feature caching (replayed blocks
give the same output and are not computed), and the defaults bit for bit the one-loop forward."""

import pytest
import torch

from sdcli.loading import load_model
from sdcli.models.unet import FeatureCache, Residuals, timestep_embedding

TOL = 1e-4


def inputs(unet, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, unet.cfg.in_channels, 16, 16, generator=g)
    context = torch.randn(2, 77, unet.cfg.context_dim, generator=g)
    labels = torch.tensor([20, 350]) if kind == "x4" else None
    return x, torch.tensor([3.0, 917.0]), context, labels


def one_loop(unet, x, t, context, labels):
    """The forward as it was before the stages: one loop over the blocks."""
    emb = unet.time_embed(timestep_embedding(t, unet.cfg.model_channels).to(x.dtype))
    if unet.cfg.num_classes:
        emb = emb + unet.label_emb(labels)
    skips, h = [], x
    for block in unet.input_blocks:
        h = block(h, emb, context)
        skips.append(h)
    h = unet.middle_block(h, emb, context)
    for block in unet.output_blocks:
        h = block(torch.cat([h, skips.pop()], dim=1), emb, context, skips[-1].shape[-2:] if skips else None)
    return unet.out(h)


@pytest.fixture(scope="module", params=["sd1", "x4"])
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def models(tiny, kind):
    ref = tiny(kind)
    return load_model(ref.single_file).unet, ref.unet


@torch.no_grad()
def test_defaults_and_stages_run_alone_are_the_one_loop_forward_bit_for_bit(models, kind):
    unet, _ = models
    x, t, context, labels = inputs(unet, kind)
    want = one_loop(unet, x, t, context, labels)
    assert torch.equal(unet(x, t, context, labels), want)
    assert torch.equal(unet(x, t, context, class_labels=labels, control=None, cache=None), want)
    emb = unet.embed(t, labels, x.dtype)
    h, skips = unet.encode(x, emb, context)
    h = unet.middle(h, emb, context)
    assert torch.equal(unet.out(unet.decode(h, skips, emb, context)), want)
    assert len(skips) == len(unet.input_blocks)  # decode leaves the caller's list as it was


@torch.no_grad()
def test_control_residuals_match_diffusers(models, kind):
    unet, ref = models
    x, t, context, labels = inputs(unet, kind)
    emb = unet.embed(t, labels, x.dtype)
    h, skips = unet.encode(x, emb, context)
    g = torch.Generator().manual_seed(1)
    residuals = [torch.randn(s.shape, generator=g) * 0.5 for s in skips]
    residuals[2] = None  # a block without a residual
    middle = torch.randn(h.shape, generator=g) * 0.5
    control = Residuals(tuple(residuals), middle)

    got = unet(x, t, context, labels, control=control)
    want = ref(x, t, encoder_hidden_states=context, class_labels=labels,
               down_block_additional_residuals=tuple(torch.zeros_like(s) if r is None else r
                                                     for r, s in zip(residuals, skips)),
               mid_block_additional_residual=middle).sample
    err = (got - want).abs().max().item()
    assert err <= TOL, f"max abs error {err:.2e}"
    assert (got - unet(x, t, context, labels)).abs().max() > 0.05  # the residuals did change the output
    middle_only = unet(x, t, context, labels, control=Residuals((None,) * len(skips), middle))
    want = ref(x, t, encoder_hidden_states=context, class_labels=labels,
               down_block_additional_residuals=tuple(map(torch.zeros_like, skips)),
               mid_block_additional_residual=middle).sample
    assert (middle_only - want).abs().max().item() <= TOL


def test_control_residuals_of_the_wrong_length_are_refused(models, kind):
    unet, _ = models
    x, t, context, labels = inputs(unet, kind)
    n = len(unet.input_blocks)
    with pytest.raises(ValueError, match=f"control residuals: {n - 1} for the input blocks, but this UNet has {n}"):
        unet(x, t, context, labels, control=Residuals((None,) * (n - 1), None))


class Counting(FeatureCache):
    """FeatureCache, counting the blocks it computes."""

    def __init__(self):
        super().__init__()
        self.computed = []

    def run(self, name, fn, *args):
        return super().run(name, lambda *a: (self.computed.append(name), fn(*a))[1], *args)


@torch.no_grad()
def test_a_cache_replays_recorded_blocks_without_computing_them(models, kind):
    unet, _ = models
    x, t, context, labels = inputs(unet, kind)
    full = unet(x, t, context, labels)
    n_in, n_out = len(unet.input_blocks), len(unet.output_blocks)
    every = [f"input_blocks.{i}" for i in range(n_in)] + ["middle_block"] + [
        f"output_blocks.{i}" for i in range(n_out)]

    cache = Counting()
    assert torch.equal(unet(x, t, context, labels, cache=cache), full)  # recording: every block computed once
    assert cache.computed == every

    # DeepCache: the deep part (input blocks past the first two, the middle, the output blocks before the last
    # two) replayed; the same inputs give exactly the full forward's output
    deep = set(every[2:-2])
    cache.replay, cache.computed = frozenset(deep), []
    calls = []
    hook = unet.middle_block.register_forward_hook(lambda *a: calls.append(1))
    try:
        assert torch.equal(unet(x, t, context, labels, cache=cache), full)
    finally:
        hook.remove()
    assert cache.computed == [n for n in every if n not in deep] and not calls

    # new inputs: the shallow blocks see them, the deep ones are still the recorded step's
    x2, t2, context2, _ = inputs(unet, kind, seed=5)
    cached = unet(x2, t2, context2, labels, cache=cache)
    assert not torch.equal(cached, full) and not torch.equal(cached, unet(x2, t2, context2, labels))
