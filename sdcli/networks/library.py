"""Where extra networks are found: folders given with --lora-dir / --embeddings-dir (or $SDCLI_LORA_DIR,
$SDCLI_EMBEDDINGS_DIR, folders separated as in PATH), searched with their subfolders as A1111 does. Torch-free."""

from __future__ import annotations

import os
from pathlib import Path

from sdcli.errors import SdcliError, shown

MAX_ENTRIES = 100_000  # files and folders looked at under one folder: a search never wanders a whole disk


def folders(given: list[str] | None, env: str) -> list[Path]:
    """The folders to search, the given ones first, then the environment's; each must be a folder."""
    names = [*(given or []), *(p for p in os.environ.get(env, "").split(os.pathsep) if p)]
    out = []
    for name in names:
        path = Path(name).expanduser()
        if not path.is_dir():
            where = f"${env}" if name not in (given or []) else "the option"
            raise SdcliError(f"{shown(name)} (from {where}) is not a folder")
        if path not in out:
            out.append(path)
    return out


def find(name: str, dirs: list[Path], suffixes: tuple[str, ...], what: str, option: str) -> Path:
    """The file a prompt's NAME stands for: a path to a file as given, else NAME + a suffix (or NAME itself when
    it has one) in the folders, at the top first, then in subfolders; else an error saying where it looked."""
    path = Path(name).expanduser()
    if ("/" in name or os.sep in name or path.suffix.lower() in suffixes) and path.is_file():
        return path
    stems = [name] if path.suffix.lower() in suffixes else [name + s for s in suffixes]
    for folder in dirs:
        for stem in stems:
            if (folder / stem).is_file():
                return folder / stem
    for folder in dirs:
        if found := _below(folder, set(stems)):
            return found
    looked = f"for {' or '.join(stems)} in {', '.join(str(d) for d in dirs)} and their subfolders" if dirs else \
        f"in no folder: give {option} DIR"
    raise SdcliError(f"{what} {shown(name)} not found: looked {looked}")


def _below(folder: Path, names: set[str]) -> Path | None:
    seen = 0
    for root, subdirs, files in os.walk(folder):
        seen += len(subdirs) + len(files)
        if seen > MAX_ENTRIES:
            raise SdcliError(f"{folder} holds over {MAX_ENTRIES:,} files and folders: point the option at the folder "
                             "of the files themselves")
        subdirs.sort()
        for f in sorted(files):
            if f in names:
                return Path(root) / f
    return None
