"""Training checkpoints: one dict (weights, EMA, optimizer, step, config, RNG state) per file, written
atomically (sdcli.fileio.atomic_path: a temporary file, then a rename), the last K kept."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sdcli.errors import SdcliError
from sdcli.fileio import atomic_path

FOLDER = "checkpoints"
_NAME = re.compile(r"^step-(\d+)\.pt$")


def path_for(out: Path, step: int) -> Path:
    return Path(out) / FOLDER / f"step-{step:07d}.pt"


def existing(out: Path) -> list[tuple[int, Path]]:
    """(step, path) of the run's checkpoints, oldest first."""
    folder = Path(out) / FOLDER
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save(out: Path, step: int, state: dict, keep: int) -> Path:
    """Write `state` as the checkpoint of `step`, then delete all but the newest `keep`."""
    dst = path_for(out, step)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst, overwrite=True) as tmp:  # a reader sees the old file or the new one, never half of one
        try:
            torch.save(state, tmp)
        except RuntimeError as e:  # torch's writer reports a failed write (a full disk) this way
            raise OSError(f"the write failed (is the disk full?): {e}"[:200]) from None
    for _, old in existing(out)[:-keep]:
        old.unlink(missing_ok=True)
    return dst


def load(path: Path) -> dict:
    """A checkpoint's dict, read with weights_only=True (tensors and plain Python values only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged archives
        raise SdcliError(f"{path} cannot be read as an sdcli checkpoint ({type(e).__name__}); delete it to resume "
                         "from the one before") from None
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise SdcliError(f"{path} is not an sdcli training checkpoint")
    return state


def latest(out: Path) -> dict | None:
    found = existing(out)
    return load(found[-1][1]) if found else None
