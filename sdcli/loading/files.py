"""Reading model files: safetensors headers as meta tensors, their tensors memory-mapped, JSON configs."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sdcli.errors import ModelLoadError, printable, shown
from sdcli.loading.keymaps import State

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
# Bounds on what a model file's header may hold, checked before it is parsed
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit (a release's header is about 200 kB)
MAX_TENSORS = 100_000  # releases hold 1,100-2,600 tensors (EMA copies included)
MAX_RANK = 8  # dimensions of one tensor: releases' have 1-4
MAX_JSON_BYTES = 64 << 20  # a config or shard index (releases': a few kB)

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


def converted_name(path: Path) -> Path:
    """Where `sdcli convert` should write a pickle's tensors: beside it, never the pickle itself (a pickle
    named .safetensors gets .converted.safetensors)."""
    return path.with_suffix(".converted.safetensors" if path.suffix.lower() == ".safetensors" else ".safetensors")


def pickle_error(path: Path) -> ModelLoadError:
    return ModelLoadError(
        f"{path} is a pickle checkpoint: loading a pickle can run arbitrary code, so sdcli does not load it. "
        f"Use a .safetensors release of the model, or if you trust this file convert it once with "
        f"`sdcli convert {path} {converted_name(path)}` (reads tensors only)"
    )


def pickle_refusal(e: Exception) -> str | None:
    """Why torch.load(weights_only=True) refused a pickle, in a few words, or None when it was not refused (a
    damaged or non-PyTorch file)."""
    import re

    if found := re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e)):
        return f"it holds more than tensors (it would call {found.group(1)})"
    if found := re.search(r"WeightsUnpickler error: \s*(.+)", str(e)):
        return f"reading tensors only refused it ({printable(found.group(1).strip())[:150]})"
    return None


def open_safetensors(path: Path) -> State:
    """The file's tensors as meta tensors (names, shapes, dtypes): only the header is read, and only once its
    size and tensor count are known to be bounded."""
    from safetensors import safe_open

    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise pickle_error(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = int.from_bytes(head, "little")
            header = f.read(size) if len(head) == 8 and size <= MAX_HEADER_BYTES else b""
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from None
    problem = None
    if len(head) < 8:
        problem = "no header"
    elif size > MAX_HEADER_BYTES:  # or a negative length: the 8 bytes are unsigned
        problem = f"a header of {size:,} bytes, over safetensors' {MAX_HEADER_BYTES:,}"
    elif (count := header.count(b'"data_offsets"')) > MAX_TENSORS:  # every tensor's entry has one; cheap to count
        raise ModelLoadError(f"{path}: its header lists {count:,} tensors, more than a model sdcli loads holds "
                             f"(at most {MAX_TENSORS:,}): not a model file")
    else:
        try:
            with safe_open(str(path), framework="pt") as f:
                slices = {k: f.get_slice(k) for k in f.keys()}  # the header only
                header_of = {k: (s.get_shape(), s.get_dtype()) for k, s in slices.items()}
        except Exception as e:  # safetensors raises its own error types for every kind of bad header
            problem = printable(str(e).splitlines()[0]) if str(e) else type(e).__name__
    if problem:
        if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # a torch zip archive or a raw pickle, renamed
            raise pickle_error(path) from None
        raise ModelLoadError(f"{path} is not a model file: it is not a valid .safetensors file ({problem})")
    _check_header(path, header, header_of)
    return {k: torch.empty(shape, dtype=_DTYPES[dtype], device="meta") for k, (shape, dtype) in header_of.items()}


def _check_header(path: Path, raw: bytes, header: dict) -> None:
    """What safetensors accepts but no model file has: a name given twice (which one counts is up to the
    reader), too many dimensions, dtypes sdcli does not load."""
    try:
        json.loads(raw, object_pairs_hook=_unique)
    except _Duplicate as e:
        raise ModelLoadError(f"{path} is not a model file: its header names {shown(e.args[0])} twice") from None
    except (ValueError, RecursionError):  # JSON that safetensors' parser took and Python's does not
        raise ModelLoadError(f"{path} is not a model file: its header is not plain JSON") from None
    for k, (shape, dtype) in header.items():
        if len(shape) > MAX_RANK:
            raise ModelLoadError(f"{path}: tensor {shown(k)} has {len(shape)} dimensions, more than any model's "
                                 f"({MAX_RANK}): not a model file")
        if dtype not in _DTYPES:
            raise ModelLoadError(f"{path}: tensor {shown(k)} has dtype {shown(dtype)}, which sdcli cannot load")


class _Duplicate(Exception):
    pass


def _unique(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


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
    """A JSON object from a model folder (a config, a shard index), of bounded size."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:
            raise ModelLoadError(f"{path} is over {MAX_JSON_BYTES >> 20} MiB: not a config of a model sdcli loads")
        data = json.loads(data)
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing: the diffusers folder is incomplete") from None
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested too deep for the parser
        reason = "nested too deeply" if isinstance(e, RecursionError) else printable(str(e))
        raise ModelLoadError(f"{path} cannot be read as JSON ({reason})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object: the diffusers folder is damaged")
    return data


def shapes(tensors: State, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """The shapes of the tensors under `prefix`, keyed without it (what the detectors read)."""
    return {k[len(prefix) :]: tuple(v.shape) for k, v in tensors.items() if k.startswith(prefix)}


def examples(keys, n: int = 3) -> str:
    """A few of the keys (tensor names from a file, escaped) for a message."""
    keys = sorted(keys)
    more = f", ... {len(keys) - n} more" if len(keys) > n else ""
    return printable(", ".join(keys[:n])) + more
