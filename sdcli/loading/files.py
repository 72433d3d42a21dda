"""Reading model files: safetensors headers as meta tensors, their tensors memory-mapped, JSON configs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sdcli.errors import ModelLoadError
from sdcli.loading.keymaps import State

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError as e:  # a name too long for the file system, ...
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from None


def pickle_error(path: Path) -> ModelLoadError:
    return ModelLoadError(
        f"{path} is a pickle checkpoint: loading a pickle can run arbitrary code, so sdcli does not load it. "
        f"Use a .safetensors release of the model, or if you trust this file convert it once with "
        f"`sdcli convert {path} {path.with_suffix('.safetensors')}` (reads tensors only)"
    )


def open_safetensors(path: Path) -> State:
    """The file's tensors as meta tensors (names, shapes, dtypes): only the header is read."""
    from safetensors import safe_open

    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise pickle_error(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}  # the header only
            header = {k: (s.get_shape(), s.get_dtype()) for k, s in slices.items()}
    except Exception as e:  # safetensors raises its own error types for every kind of bad header
        if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # a torch zip archive or a raw pickle, renamed
            raise pickle_error(path) from None
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelLoadError(f"{path} is not a model file: it is not a valid .safetensors file ({reason})") from None
    unknown = sorted(k for k, (_, dtype) in header.items() if dtype not in _DTYPES)
    if unknown:
        raise ModelLoadError(f"{path}: tensor {unknown[0]} has dtype {header[unknown[0]][1]}, which sdcli cannot load")
    return {k: torch.empty(shape, dtype=_DTYPES[dtype], device="meta") for k, (shape, dtype) in header.items()}


def read_tensors(path: Path, keys: list[str], device, dtype: torch.dtype, chunk: int = 256 << 20) -> State:
    """Tensors of one file. Those that stay as they are remain views of the memory-mapped file (no
    copy); the others are converted, and the file is reopened every `chunk` converted bytes so that
    each mapping, with the source pages it made resident, is released before the next is opened."""
    from safetensors import safe_open

    cpu = torch.device(device).type == "cpu"
    out, i = {}, 0
    while i < len(keys):
        with safe_open(str(path), framework="pt") as f:
            converted = 0
            while i < len(keys) and converted < chunk:
                t = f.get_tensor(keys[i])
                target = dtype if t.is_floating_point() else t.dtype
                if t.dtype != target or not cpu:
                    converted += t.numel() * t.element_size()
                    t = t.to(device=device, dtype=target)
                out[keys[i]] = t
                i += 1
    return out


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing: the diffusers folder is incomplete") from None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path} cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object: the diffusers folder is damaged")
    return data


def shapes(tensors: State, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """The shapes of the tensors under `prefix`, keyed without it (what the detectors read)."""
    return {k[len(prefix) :]: tuple(v.shape) for k, v in tensors.items() if k.startswith(prefix)}


def examples(keys, n: int = 3) -> str:
    keys = sorted(keys)
    more = f", ... {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
