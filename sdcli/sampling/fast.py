"""The training-free fast modes, as settings: what each one does, its bounds, and DeepCache's refresh schedule.
Torch-free, so the CLI checks them before anything heavy loads; sampling.speedups runs them.

Every mode is off by default, and a mode off is exactly the full render:
- feature caching (DeepCache, horseee/DeepCache): a full UNet pass on the refresh steps; on the steps between,
  only the blocks of the shallowest skip branches run, on the deep features the last full pass left;
- guidance cut-off (diffusers' SDCFGCutoffCallback): no unconditional pass after a fraction of the steps;
- skipping the unconditional pass at low noise on alternate steps (A1111's "negative guidance minimum sigma");
- token merging (ToMe for SD, dbolya/tomesd): self-attention at the highest resolution on merged tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

CACHE_SCHEDULES = ("uniform", "nonuniform")
MAX_TOKEN_MERGING = 0.75  # one token in four (a 2x2 cell's destination) is never merged away


@dataclass(frozen=True)
class FastModes:
    cache_interval: int = 1  # DeepCache: a full UNet pass every N steps, the deep features reused between; 1: off
    cache_branch: int = 0  # the skip branch cached steps keep: input blocks 0..B and the output blocks they feed
    cache_schedule: str = "uniform"  # or "nonuniform": DeepCache's, its full steps crowded near the start
    cfg_cutoff: float = 1.0  # guidance on steps 0..int(F * steps) only, the conditional pass alone after
    skip_uncond_below: float = 0.0  # on odd steps below this noise level (sigma), the conditional pass alone
    token_merging: float = 0.0  # ToMe: the fraction of the highest-resolution tokens merged before self-attention

    @property
    def on(self) -> bool:
        return self != FastModes()


FAST_KEYS = tuple(f.name for f in fields(FastModes))  # also the request keys (batch.Request) that set them


def fast_modes(r) -> FastModes:
    """The modes a request (batch.Request: the fields of FAST_KEYS, None where not given) asks for, or a one-line
    error."""
    from sdcli.errors import SdcliError

    modes = FastModes(**{k: v for k in FAST_KEYS if (v := getattr(r, k)) is not None})
    if problem := _problem(modes):
        raise SdcliError(problem)
    return modes


def _problem(m: FastModes) -> str | None:
    if not 1 <= m.cache_interval <= 1000:
        return f"--cache-interval must be between 1 (off) and 1000, not {m.cache_interval}"
    if not 0 <= m.cache_branch <= 100:
        return f"--cache-branch must be between 0 (the shallowest) and 100, not {m.cache_branch}"
    if m.cache_schedule not in CACHE_SCHEDULES:
        return f"--cache-schedule must be one of {', '.join(CACHE_SCHEDULES)}, not {m.cache_schedule!r}"
    if not 0 <= m.cfg_cutoff <= 1:
        return f"--cfg-cutoff must be between 0 and 1 (the fraction of the steps guided; 1: all), not {m.cfg_cutoff:g}"
    if not 0 <= m.skip_uncond_below <= 1000:
        return f"--skip-uncond-below must be a noise level (sigma) between 0 (off) and 1000, not {m.skip_uncond_below:g}"
    if not 0 <= m.token_merging <= MAX_TOKEN_MERGING:
        return f"--token-merging must be between 0 (off) and {MAX_TOKEN_MERGING}, not {m.token_merging:g}"
    return None


def check_branch(modes: FastModes, input_blocks: int) -> None:
    """The branch against a UNet of `input_blocks` skip branches: at least one deep block must be left to cache."""
    from sdcli.errors import SdcliError

    if modes.cache_branch > input_blocks - 2:
        raise SdcliError(f"--cache-branch {modes.cache_branch}: this model's UNet has {input_blocks} skip branches, "
                         f"so the branch can be 0 to {input_blocks - 2}")


def refresh_steps(steps: int, interval: int, schedule: str = "uniform") -> frozenset[int]:
    """The steps (0-based, of a run of `steps`) that run the full UNet and refresh the cache."""
    if interval <= 1:
        return frozenset(range(steps))
    uniform = frozenset(range(0, steps, interval))
    if schedule == "uniform":
        return uniform
    return _quad_center(steps, len(uniform), center=round(0.3 * steps)) or uniform


def _quad_center(total: int, n: int, center: int, power: float = 1.4) -> frozenset[int] | None:
    """DeepCache's non-uniform refresh (sample_from_quad_center in its pipelines; the paper: 50 steps, centre 15,
    power 1.4): n points spaced evenly between (-centre)^(1/p) and (total - centre)^(1/p), raised to p. The
    negative end's root is complex there (numpy's principal branch), and the points' real parts, truncated, are
    the steps: the schedule DeepCache users get, its full steps denser early. The power drops by 0.02 until n
    distinct steps come out; None where none does."""
    while power > 1:
        start, end = complex(-center) ** (1 / power), complex(total - center) ** (1 / power)
        step = (end - start) / n
        points = [start + k * step for k in range(n)] + [end]  # numpy.linspace(start, end, n + 1)
        found = sorted({int((p ** power).real) for p in points})  # numpy.int32 of a complex: its real part
        steps = {0, *(center + v for v in found[1:-1])}
        if len(steps) == n and all(0 <= s < total for s in steps):
            return frozenset(steps)
        power -= 0.02
    return None

