"""Converting a pickle checkpoint to safetensors without running code from it."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from sdcli.errors import SdcliError, printable
from sdcli.fileio import atomic_path, check_output
from sdcli.loading.files import converted_name, open_safetensors, pickle_refusal


def pickle_to_safetensors(src: Path, dst: Path, overwrite: bool = False) -> int:
    """Read only tensors (torch.load(weights_only=True)) and write them to `dst`; returns the count."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise SdcliError(f"checkpoint not found: {src}")
    if _same_file(src, dst):
        raise SdcliError(f"{dst} is the checkpoint being converted: write to another file, e.g. {converted_name(src)}")
    if dst.suffix != ".safetensors":
        raise SdcliError(f"the output must end in .safetensors, not {dst.name}")
    check_output(dst, overwrite)  # before the (possibly long) read
    if src.suffix == ".safetensors" and _is_safetensors(src):  # before torch: its header may read as pickle opcodes
        raise SdcliError(f"{src} is a safetensors file already: sdcli loads it as it is")
    try:
        # a file object, not the path: torch.load reads a path named .safetensors as safetensors, which a pickle
        # under that name is not
        with open(src, "rb") as f, warnings.catch_warnings():  # torch warns about pickle protocols
            warnings.simplefilter("ignore")
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types: disallowed objects, truncated archives, not a pickle
        if refused := pickle_refusal(e):
            raise SdcliError(f"{src} was not loaded: {refused}; get a .safetensors release of this model") from None
        raise SdcliError(printable(f"{src} cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})")[:300]) \
            from None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # Lightning nests the weights
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise SdcliError(f"{src} does not hold a dict of tensors")
    tensors, seen = {}, set()
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            if not isinstance(k, str) or v.layout != torch.strided or v.is_meta:
                raise SdcliError(f"{src} holds a tensor safetensors cannot store ({k!r}: {v.layout}, {v.device}); "
                                 "it is not a model checkpoint sdcli can convert")
            ptr = v.untyped_storage().data_ptr()
            # safetensors refuses tensors that share memory: copy the second and later ones
            tensors[k] = v.contiguous().clone() if ptr in seen else v.contiguous()
            seen.add(ptr)
    if not tensors:
        raise SdcliError(f"{src} holds no tensors")
    with atomic_path(dst, overwrite) as tmp:
        try:
            save_file(tensors, str(tmp))
        except SafetensorError as e:  # safetensors reports its I/O failures this way
            raise OSError(str(e)) from None
    return len(tensors)


def _same_file(src: Path, dst: Path) -> bool:
    """The same path once resolved (symlinks, ..), or the same file under another name (a hard link)."""
    try:
        return src.resolve() == dst.resolve() or (dst.exists() and os.path.samefile(src, dst))
    except OSError:  # dst unreadable or its name too long: check_output says why
        return False


def _is_safetensors(path: Path) -> bool:
    try:
        open_safetensors(path)  # its header only, bounded
        return True
    except SdcliError:
        return False
