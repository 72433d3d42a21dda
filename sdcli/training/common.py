"""What both trainers do around the loop: the run's start and end (Session), its folder, device and resume, grids."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sdcli import distributed
from sdcli.errors import SdcliError
from sdcli.progress import Progress
from sdcli.training import checkpoint, loop
from sdcli.training.config import RESUMABLE_CHANGES, TrainConfig, from_dict
from sdcli.training.data import Dataset, scan

# What makes a folder a training run's output (a plain folder of other files may be reused).
_RUN_FILES = ("checkpoints", "model_index.json", "vae", "metrics.jsonl")


@dataclass(frozen=True)
class Session:
    """A training run as both trainers set it up and end it: its folder, this process's device, the checkpoint
    it resumes (None: a new run), its messages, and the options given that make its model (see check_sources)."""

    out: Path
    device: torch.device
    state: dict | None
    progress: Progress
    given: dict[str, object] = field(default_factory=dict)

    @property
    def sources(self) -> dict[str, object]:
        """The options that made the run's model, stored in checkpoints for check_sources: the resumed run's,
        or those given to a new run."""
        if self.state is not None:
            return self.state["config"].get("sources", {})
        return {k: v for k, v in self.given.items() if v is not None}

    def config(self, options: dict) -> TrainConfig:
        """The run's TrainConfig from the options given (--mixed-precision auto resolved for the device)."""
        options["mixed_precision"] = mixed_precision(options.get("mixed_precision"), self.device)
        return configure(TrainConfig, options, self.state, "train")

    def load_data(self, data_dir: str, captions: bool, strict: bool) -> Dataset:
        """The data set, with a note of what was skipped."""
        data = scan(data_dir, captions=captions, strict=strict)
        if data.report():
            self.progress.message(data.report(), force=True)
        return data

    def train(self, task: loop.Task, cfg: TrainConfig, what: str, done: str,
              save_frozen: Callable[[], None] | None = None) -> Path:
        """Make the output folder, write the parts that are not trained (save_frozen, once, in a new run: a
        resume reads them back), say what is trained, run the loop (the process group is left at the end),
        then say where the result is."""
        create(self.out)
        if save_frozen is not None:
            if self.state is None and distributed.is_main():
                save_frozen()
            distributed.barrier()
        self.progress.message(f"{what}, from step {self.state['step'] if self.state else 0}")
        try:
            loop.train(task, cfg, self.out, self.device, self.state, self.progress)
        finally:
            distributed.cleanup()
        self.progress.message(f"done: {done}", force=True)
        return self.out


def start(kind: str, out: str | Path, resume: bool, device_name: str, given: dict[str, object],
          quiet: bool) -> Session:
    """Check the output folder (made later by create()), join the other processes under torchrun, pick this
    process's device, and read the checkpoint to resume from: a train-`kind` run's, made from the same
    `given` options (check_sources)."""
    from sdcli.engine import pick_device
    from sdcli.fileio import probe_folder

    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise SdcliError(f"--out {out} is a file: give a folder for the trained model")
    device = distributed.device_for_rank(pick_device(device_name))
    distributed.init(device.type)
    progress = Progress(quiet or not distributed.is_main())
    if distributed.is_main():
        _remove_stale_temps(out, progress)
    state = None
    found = checkpoint.existing(out)
    started = any((out / name).exists() for name in _RUN_FILES)
    if started and not found:  # a model, or a run stopped before its first checkpoint: resumable by neither
        what = f"nothing to resume in {out}: it" if resume else f"{out} already"
        raise SdcliError(f"{what} holds a model but no {checkpoint.FOLDER}/step-*.pt (a run stopped before its "
                         "first checkpoint?): choose another --out")
    if resume:
        if not found:
            raise SdcliError(f"nothing to resume in {out}: it has no {checkpoint.FOLDER}/step-*.pt; "
                             "drop --resume to start a new run")
        state = checkpoint.load(found[-1][1])
    elif started:
        raise SdcliError(f"{out} already holds a training run: pass --resume to continue it, or choose another --out")
    else:
        probe_folder(out)
    if state is not None:
        if state["config"].get("kind") != kind:
            raise SdcliError(f"{out} holds a train-{state['config'].get('kind')} run, not a train-{kind} one")
        check_sources(state, given)
    return Session(out, device, state, progress, given)


def _remove_stale_temps(out: Path, progress: Progress) -> None:
    """Delete what saves killed before their rename left in the run's folder and the folders in it (the
    trainers write no deeper): at full size, gigabytes."""
    from sdcli.fileio import clean_stale_temps

    folders = [out]
    with contextlib.suppress(OSError):  # no folder yet, or one that can't be listed: nothing to clean there
        folders += [p for p in out.iterdir() if p.is_dir()]
    note = clean_stale_temps(folders, out)
    if note:
        progress.message(note, force=True)


def create(out: Path) -> None:
    """Make the output folder, once the data and the model are known to be good (a failed start leaves none)."""
    if distributed.is_main():
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SdcliError(f"cannot create {out}: {e.strerror or e}") from None
    distributed.barrier()


def configure(cls, given: dict, state: dict | None, key: str):
    """A config from the options given (the rest default); when resuming, the run's stored config with the
    changes a resume allows. Giving any other option a different value is refused."""
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None}
    if state is None:
        return cls(**given)
    stored = from_dict(cls, state["config"][key])
    for name, value in given.items():
        if name not in RESUMABLE_CHANGES and getattr(stored, name) != value:
            raise SdcliError(f"--{name.replace('_', '-')} {value} differs from the resumed run's "
                             f"{getattr(stored, name)}: a resumed run keeps its settings; drop the option or start "
                             "a new --out")
    return replace(stored, **given)


def mixed_precision(name: str | None, device: torch.device) -> str | None:
    """auto: bf16 where the GPU has it, else fp16 with a gradient scaler, on CUDA; no elsewhere."""
    if name != "auto":
        return name
    if device.type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def check_sources(state: dict, given: dict[str, object]) -> None:
    """The options that made the run's model ({flag: value}: --init, --vae, --arch, ...) may be given again
    on resume (the same command plus --resume), but not changed: the run continues its own model."""
    stored = state["config"].get("sources", {})
    for flag, value in given.items():
        if value is not None and stored.get(flag) != value:
            raise SdcliError(f"--{flag} {value} differs from the resumed run's {stored.get(flag)}: a resumed run "
                             "continues its own model; drop the option or start a new --out")


def flags(options: dict, names: dict[str, str]) -> dict[str, object]:
    """{option: value} -> {flag name: value}: `names` renames, other options are spelled with dashes."""
    return {names.get(k, k.replace("_", "-")): v for k, v in options.items()}


def make_trainable(module: nn.Module) -> nn.Module:
    """Own copies of the weights (loaded ones are views of a read-only file mapping), gradients on."""
    for p in module.parameters():
        p.data = p.data.clone()
    return module.requires_grad_(True).train()


def save_grid(images: torch.Tensor, path: Path, columns: int) -> None:
    """uint8 [N, H, W, 3] -> one PNG, `columns` images a row, written atomically."""
    from PIL import Image

    from sdcli.fileio import atomic_path

    n, h, w, _ = images.shape
    rows = (n + columns - 1) // columns
    grid = torch.zeros(rows * h, columns * w, 3, dtype=torch.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, overwrite=True) as tmp:
        Image.fromarray(grid.numpy()).save(tmp, format="PNG")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] on the CPU."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
