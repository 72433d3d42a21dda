"""The sampler callback gets k-diffusion's dict once per step: i, sigma, sigma_hat, x and the model's denoised."""

import pytest
import torch

from sdcli.sampling import SAMPLERS, SCHEDULES, DiscreteSigmas
from sdcli.config import NoiseSchedule


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_gets_each_steps_state_and_the_denoisers_prediction(name):
    sampler = SAMPLERS[name]
    sigmas = SCHEDULES[sampler.schedule](DiscreteSigmas(NoiseSchedule()), 6)
    calls = []  # (x, sigma, returned) for every model call

    def stub(x, sigma, scale):
        out = x * scale / (1 + sigma[:, None, None, None] ** 2)  # a new tensor each call, not x
        calls.append((x, sigma, out))
        return out

    g = torch.Generator().manual_seed(0)
    steps = []
    sampler.fn(stub, torch.randn(2, 4, 8, 8, generator=g), sigmas, {"scale": 0.7}, steps.append,
               lambda sigma, sigma_next: torch.randn(2, 4, 8, 8, generator=g))

    assert [d["i"] for d in steps] == list(range(len(sigmas) - 1))
    for i, d in enumerate(steps):
        assert set(d) == {"i", "sigma", "sigma_hat", "x", "denoised"}
        assert float(d["sigma"]) == float(d["sigma_hat"]) == float(sigmas[i])
        # denoised is what the model returned for this very x at this step's level (LCM's: the consistency
        # function's, which on its own grid differs from the model's x0 by its boundary condition, c_skip < 1e-5)
        if name == "lcm":
            (x, sigma, out), = [c for c in calls if c[0] is d["x"]]
            torch.testing.assert_close(d["denoised"], out, rtol=1e-4, atol=1e-5)
        else:
            (x, sigma, out), = [c for c in calls if c[2] is d["denoised"]]
        assert x is d["x"] and torch.all(sigma == float(sigmas[i]))
    assert steps[0]["x"] is calls[0][0]  # the starting latents, before any step
