"""File hashes recorded with images: A1111's "AutoV2" model hash and its LoRA hash (cached, since they read whole
files), and the input images'."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

from sdcli.errors import SdcliError

HASH_BLOCK = 8 << 20
_HEX = re.compile(r"[0-9a-fA-F]{12,}")  # a stored hash: kohya's sshs_model_hash is all 64 digits of a sha256


def file_hash(path: str | Path) -> str:
    """sha256 of a file, first 10 hex digits (stored with the image it was made from)."""
    return sha256_file(path)[:10]


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "sdcli" / "model-hashes.json"


def _load_cache(cache: Path) -> dict:
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable or damaged: start afresh
        return {}
    return data if isinstance(data, dict) else {}


def _save_cache(cache: Path, data: dict) -> None:
    """Replace the cache file atomically; a cache that can't be written is simply not kept."""
    from sdcli.fileio import temp_name

    tmp = temp_name(cache)  # a killed write's leftover is then recognised as one
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, cache)
    except OSError:
        with contextlib.suppress(OSError):  # the folder itself may be what failed
            tmp.unlink()


def sha256_file(path: str | Path, start: int = 0) -> str:
    """The sha256 of a file from byte `start` on, in hex, read block by block."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def model_hash(path) -> str | None:
    """A1111's "AutoV2" hash of a model file (first 10 hex digits of its sha256); None for a folder."""
    if Path(path).is_dir():  # a diffusers folder: A1111 has no hash for it
        return None
    return _cached_sha256(Path(path), "model", "model")[:10]


def lora_hash(path) -> str:
    """A1111's hash of a LoRA in "Lora hashes": kohya's "addnet" hash (the sha256 of a safetensors file's data,
    after its header), first 12 hex digits; the header's own `sshs_model_hash` when it has one that is a hash
    (anything else in it would be written into the image's parameters as the file's hash)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        stored = (f.metadata() or {}).get("sshs_model_hash")
    if isinstance(stored, str) and _HEX.fullmatch(stored.strip()):
        return stored.strip()[:12]
    return _cached_sha256(Path(path), "addnet", "LoRA")[:12]


def _cached_sha256(path: Path, kind: str, what: str) -> str:
    """The sha256 of a file ("model": all of it; "addnet": a safetensors file's data after the header), cached
    by absolute path, size and modification time, since a model takes seconds to hash."""
    try:
        path = path.resolve()
        before = path.stat()
        cache_file = _cache_file()
        cache = _load_cache(cache_file)
        key = str(path) if kind == "model" else f"{kind}:{path}"  # model entries predate the others
        entry = cache.get(key)
        stamp = {"size": before.st_size, "mtime_ns": before.st_mtime_ns}
        if (
            isinstance(entry, dict)
            and {k: entry.get(k) for k in stamp} == stamp
            and isinstance(entry.get("sha256"), str)
            and len(entry["sha256"]) == 64
        ):
            return entry["sha256"]
        start = 0
        if kind == "addnet":
            with open(path, "rb") as f:
                start = 8 + int.from_bytes(f.read(8), "little")
        sha256 = sha256_file(path, start)
        after = path.stat()
    except OSError as e:
        raise SdcliError(f"cannot hash {what} {path}: {e.strerror or e}") from None
    # A file rewritten while we read it gets a hash of neither version: don't cache that.
    if (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns):
        cache[key] = {**stamp, "sha256": sha256}
        _save_cache(cache_file, cache)
    return sha256
