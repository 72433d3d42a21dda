"""The conditioning record (batched part by part for guidance, given to the UNet by keyword) and the task registry."""

import torch

from sdcli.batch import REQUEST_KEYS
from sdcli.conditioning import Conditioning
from sdcli.models.unet import Residuals
from sdcli.config import NoiseSchedule
from sdcli.sampling import CFGDenoiser, Denoiser, DiscreteSigmas
from sdcli.tasks import SPECIFIC, TASKS, rerender_keys


def test_cat_and_expand_go_part_by_part():
    a = Conditioning(torch.randn(1, 77, 8), pooled=torch.randn(1, 4),
                     control=Residuals((torch.randn(1, 2, 4, 4), None), torch.randn(1, 2, 2, 2)))
    b = Conditioning(torch.randn(1, 77, 8), pooled=torch.randn(1, 4),
                     control=Residuals((torch.randn(1, 2, 4, 4), None), torch.randn(1, 2, 2, 2)))
    both = Conditioning.cat([a, b])
    assert torch.equal(both.context, torch.cat([a.context, b.context])) and both.y is None and both.concat is None
    assert torch.equal(both.pooled, torch.cat([a.pooled, b.pooled]))
    assert torch.equal(both.control.input[0], torch.cat([a.control.input[0], b.control.input[0]]))
    assert both.control.input[1] is None
    assert torch.equal(both.control.middle, torch.cat([a.control.middle, b.control.middle]))
    wide = a.with_parts(class_labels=torch.tensor([5, 6, 7])).expand(3)
    assert wide.context.shape == (3, 77, 8) and torch.equal(wide.context[2], a.context[0])
    assert torch.equal(wide.class_labels, torch.tensor([5, 6, 7]))  # already per image: left as it is
    assert wide.control.middle.shape == (3, 2, 2, 2) and wide.control.input[1] is None


def test_guidance_doubles_the_image_parts_and_puts_uncond_first():
    """A closed-form stand-in for the UNet-backed denoiser: what it sees, and the guided mix of its outputs."""
    seen = []

    def denoiser(x, sigma, cond):
        seen.append(cond)
        return x + cond.context.mean(dim=(1, 2))[:, None, None, None] + cond.concat.sum(dim=1, keepdim=True)

    x, sigma, concat = torch.randn(2, 4, 8, 8), torch.tensor([2.0, 2.0]), torch.randn(2, 5, 8, 8)
    cond = Conditioning(torch.randn(1, 77, 8), concat=concat, class_labels=torch.tensor([20, 20])).expand(2)
    for length in (77, 154):  # equal lengths: one batch of 2B; unequal: two passes, uncond first
        seen.clear()
        uncond = Conditioning(torch.randn(1, length, 8)).expand(2)
        got = CFGDenoiser(denoiser)(x, sigma, cond, uncond, cond_scale=7.0)
        paired = uncond.with_image_parts(cond)
        d_u, d_c = denoiser(x, sigma, paired), denoiser(x, sigma, cond)
        assert torch.allclose(got, d_u + (d_c - d_u) * 7.0, atol=1e-5)
        if length == 77:
            assert torch.equal(seen[0].context, torch.cat([uncond.context, cond.context]))
            assert torch.equal(seen[0].concat, torch.cat([concat, concat]))
            assert torch.equal(seen[0].class_labels, torch.tensor([20, 20, 20, 20]))
        else:
            assert seen[0].context is uncond.context and seen[1] is cond and seen[0].concat is concat


def test_the_unet_gets_the_parts_by_keyword_and_concat_in_its_input():
    calls = []

    def unet(inp, t, **kwargs):
        calls.append((inp.shape, sorted(kwargs)))
        return inp[:, :4]

    denoiser = Denoiser(unet, DiscreteSigmas(NoiseSchedule()), "eps")
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([1.0])
    denoiser(x, sigma, Conditioning(torch.randn(1, 77, 8)))
    denoiser(x, sigma, Conditioning(torch.randn(1, 77, 8), concat=torch.randn(1, 3, 8, 8),
                                    class_labels=torch.tensor([20])))
    assert calls == [((1, 4, 8, 8), ["context"]), ((1, 7, 8, 8), ["class_labels", "context"])]


def test_the_registry_names_every_task_once():
    assert list(TASKS) == ["txt2img", "img2img", "inpaint", "upscale"]
    assert [t.command for t in TASKS.values()] == ["generate", "img2img", "inpaint", "upscale"]
    assert SPECIFIC <= set(REQUEST_KEYS)
    for task in TASKS.values():
        keys = rerender_keys(task)
        assert set(task.keys) <= set(keys) and "output" not in keys
        assert not (SPECIFIC - set(task.keys)) & set(keys)
