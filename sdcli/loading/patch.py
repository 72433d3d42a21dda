"""Weight patches (a LoRA's deltas, ...): applied to a model's named weights and taken off again bit for bit.

A patch maps weight names (the model's state-dict keys: the original single-file keys) to a change: a
delta tensor added to the weight, or a function of the weight giving its new value.

    patcher = Patcher(model)
    patcher.apply({"model.diffusion_model.out.2.weight": delta})  # between prompts-file lines
    ...
    patcher.restore()  # every weight is again the very tensor it was

Weights are never changed in place: loaded weights may be views of a read-only memory-mapped file. A patched
weight is a new tensor; the original tensor is kept as the backup and put back by restore (ComfyUI's
ModelPatcher). The load-time patch step (`load_model(..., patch=...)`) applies `patched` to the tensors read
before they are assigned, with no backup.
"""

from __future__ import annotations

from typing import Callable, Mapping, Union

import torch
from torch import nn

from sdcli.errors import ModelLoadError
from sdcli.loading.files import examples

Change = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]  # a delta to add, or W -> new W
Patch = Mapping[str, Change]


def check_patch(weights: Mapping[str, torch.Tensor], patch: Patch) -> None:
    """Every name is a floating-point weight and every delta has its weight's shape (meta weights will do)."""
    missing = [k for k in patch if k not in weights]
    if missing:
        raise ModelLoadError(f"the patch changes {len(missing)} weights the model does not have ({examples(missing)})")
    for name, change in patch.items():
        w = weights[name]
        if not w.is_floating_point():
            raise ModelLoadError(f"the patch changes {name}, which holds {str(w.dtype).removeprefix('torch.')} "
                                 "values, not weights")
        if not callable(change) and tuple(change.shape) != tuple(w.shape):
            raise ModelLoadError(f"the patch's delta for {name} is {list(change.shape)}, but the weight is "
                                 f"{list(w.shape)}")


def patched(weights: Mapping[str, torch.Tensor], patch: Patch) -> dict[str, torch.Tensor]:
    """The patched weights as new tensors, in each weight's dtype and on its device: W + delta (summed in
    float32 for half-precision weights) or fn(W). The weights themselves are left as they are."""
    check_patch(weights, patch)
    out = {}
    with torch.no_grad():
        for name, change in patch.items():
            w = weights[name].detach()
            if callable(change):
                new = change(w)
                if not isinstance(new, torch.Tensor) or new.shape != w.shape:
                    shape = list(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                    raise ModelLoadError(f"the patch's function for {name} gave {shape}, but the weight is "
                                         f"{list(w.shape)}")
            else:
                wide = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
                new = w.to(wide) + change.to(w.device, wide)
            out[name] = new.to(w.device, w.dtype)
    return out


class Patcher:
    """Patches on a loaded model, taken off again exactly: backup and restore."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.backup: dict[str, torch.Tensor] = {}  # name -> the original tensor object (Parameter or buffer)

    def apply(self, patch: Patch) -> None:
        """Patch the model's current weights (on top of earlier patches until restore). Every change is checked
        and computed before any weight is replaced: a bad patch leaves the model as it was."""
        current = self.model.state_dict(keep_vars=True)
        for name, tensor in patched(current, patch).items():
            self.backup.setdefault(name, current[name])
            _put(self.model, name, tensor)

    def restore(self) -> None:
        """Put every original weight back; nothing to do when nothing is patched."""
        for name, tensor in self.backup.items():
            _put(self.model, name, tensor)
        self.backup.clear()

    @property
    def patched(self) -> bool:
        return bool(self.backup)


def _put(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Make `tensor` the model's weight `name`, as a Parameter where a Parameter was (the old one is not touched)."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    old = module._parameters.get(leaf)
    if old is not None:
        module._parameters[leaf] = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(
            tensor, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = tensor
