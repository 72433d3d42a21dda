"""The strict check: a component's tensors against the module they are to fill, every name, shape and kind."""

from __future__ import annotations

import torch

from sdcli.errors import ModelLoadError
from sdcli.loading.files import examples
from sdcli.loading.keymaps import State


def _squeeze(shape) -> tuple[int, ...]:
    shape = tuple(shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _same_shape(a, b) -> bool:
    """Equal, or a Linear weight [C, C] against a 1x1 conv [C, C, 1, 1] (diffusers vs LDM VAE attention)."""
    return tuple(a) == tuple(b) or _squeeze(a) == _squeeze(b)


def check_tensors(found: State, expected: State, source: str, variant: str, what: str) -> None:
    """Raise a ModelLoadError listing what is missing, unexpected, of the wrong shape or of the wrong kind."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [k for k in expected if k in found and not _same_shape(found[k].shape, expected[k].shape)]
    kind = [k for k in expected if k in found and found[k].is_floating_point() != expected[k].is_floating_point()]
    if not (missing or unexpected or wrong or kind):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({examples(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({examples(unexpected)})")
    if wrong:
        shown = ", ".join(
            f"{k} is {list(found[k].shape)}, expected {list(expected[k].shape)}" for k in sorted(wrong)[:3]
        )
        problems.append(f"{len(wrong)} with the wrong shape ({shown})")
    if kind:
        shown = ", ".join(f"{k} is {str(found[k].dtype).removeprefix('torch.')}" for k in sorted(kind)[:3])
        problems.append(f"{len(kind)} of the wrong kind, integer for float ({shown})")
    raise ModelLoadError(
        f"{source}: the {what.replace('_', ' ')} does not match the {variant} architecture detected from it: "
        + "; ".join(problems)
        + ". The file is damaged, incomplete or of an unsupported kind"
    )


def fit(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(like.shape) if t.shape != like.shape else t  # Linear <-> 1x1 conv; a view
