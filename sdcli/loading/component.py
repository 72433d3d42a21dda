"""The component loader: a file's tensors checked against a module built on the meta device, read, patched
and assigned to it. Used for each part of a model, for a VAE on its own, and for any module to come."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from sdcli.loading.check import check_tensors, fit
from sdcli.loading.files import read_tensors
from sdcli.loading.keymaps import Layout, State
from sdcli.loading.patch import Patch, patched


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Modules built inside are on the meta device, their parameters left uninitialised (the file's tensors
    are assigned to them): on the meta device torch runs init.normal_ through its compiled references, whose
    first call imports torch._dynamo, 1.6 s of every start-up."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "constant_", "trunc_normal_",
             "xavier_uniform_")
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        with torch.device("meta"):
            yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


@dataclass
class Part:
    """One component's tensors as the file names them, and how those names map to our modules."""

    tensors: State  # the file's names, shapes and dtypes, as meta tensors: no data is read until load
    source: str  # the file, for messages
    layout: Callable[[list[str]], Layout]  # our module's keys -> Layout
    files: dict[str, Path]  # the file that holds each tensor

    def materialize(self, device, dtype: torch.dtype) -> State:
        """The tensors on `device`, floating point ones in `dtype`."""
        by_file: dict[Path, list[str]] = {}
        for k in self.tensors:
            by_file.setdefault(self.files[k], []).append(k)
        out: State = {}
        for path, keys in by_file.items():
            out.update(read_tensors(path, keys, device, dtype))
        return out

    @property
    def parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    @property
    def dtypes(self) -> list[str]:
        return sorted({str(t.dtype).removeprefix("torch.") for t in self.tensors.values()})


def check_component(module: nn.Module, part: Part, variant: str, what: str) -> None:
    """Strictly compare the part's tensors with the (meta) module's: names, shapes, kinds."""
    expected = module.state_dict()
    check_tensors(part.tensors, part.layout(list(expected)).to_file(expected), part.source, variant, what)


def load_component(module: nn.Module, part: Part, device, dtype: torch.dtype, *, variant: str, what: str,
                   checked: bool = False, patch: Patch | None = None) -> nn.Module:
    """Fill a module built on the meta device with the part's tensors: checked (unless `checked` says it was),
    read (memory-mapped where they keep their dtype), patched (`patch` keyed by the module's own names) and
    assigned, so that no weight is copied that need not be."""
    if not checked:
        check_component(module, part, variant, what)
    expected = module.state_dict()
    ours = part.layout(list(expected)).from_file(part.materialize(device, dtype))
    state = {k: fit(v, expected[k]) for k, v in ours.items()}
    if patch:
        state |= patched(state, patch)
    module.load_state_dict(state, strict=True, assign=True)
    return module
