"""Where extra networks are found: folders given with --lora-dir / --embeddings-dir (or $SDCLI_LORA_DIR,
$SDCLI_EMBEDDINGS_DIR, folders separated as in PATH), searched with their subfolders as A1111 does (symlinked
ones too). Torch-free."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterator

from sdcli.errors import SdcliError, printable, shown

MAX_ENTRIES = 100_000  # files and folders looked at in one search: a search never wanders a whole disk
MAX_DEPTH = 16  # subfolder levels
MAX_ALIAS_FILES = 1_000  # files whose header a lookup by ss_output_name reads
MAX_ALIAS_HEADER = 8 << 20  # bytes of one such header (a LoRA's, training metadata and all: 10 kB to 1 MB)


def folders(given: list[str] | None, env: str, option: str) -> list[Path]:
    """The folders to search, the given ones first, then the environment's. A given one must be a folder; a
    stale entry of the environment is skipped with a note, as PATH's are."""
    out: list[Path] = []
    for name, where in [*((n, option) for n in given or []),
                        *((p, f"${env}") for p in os.environ.get(env, "").split(os.pathsep) if p)]:
        path = Path(name).expanduser()
        if not path.is_dir():
            if where == option:
                raise SdcliError(f"{shown(name, 300)} (from {option}) is not a folder: give an existing folder")
            print(f"note: {shown(name, 300)} (from {where}) is not a folder: skipped", file=sys.stderr)
        elif path not in out:
            out.append(path)
    return out


def walk(dirs: list[Path], what: str, option: str) -> Iterator[tuple[Path, list[str]]]:
    """(folder, the names of its files, sorted) for each folder and its subfolders, depth first, a folder's own
    files before its subfolders'. Symlinked folders are followed, each real folder once (a loop is not a hang);
    at most MAX_ENTRIES entries in all, MAX_DEPTH levels down. `what`, `option`: for the errors."""
    seen: set[tuple[int, int]] = set()
    budget = [MAX_ENTRIES]
    for top in dirs:
        yield from _walk(top, 0, seen, budget, (what, option))


def _walk(folder: Path, depth: int, seen: set, budget: list[int], names: tuple[str, str]):
    try:
        st = folder.stat()
        if (st.st_dev, st.st_ino) in seen:
            return
        seen.add((st.st_dev, st.st_ino))
        files, subdirs = _entries(folder, budget, names)
    except OSError as e:
        if depth:  # a subfolder that cannot be read holds nothing to find, as for A1111 (os.walk)
            return
        raise SdcliError(f"cannot read the {names[0]} folder {printable(str(folder))}: {e.strerror or e}") from None
    yield folder, files
    if depth < MAX_DEPTH:
        for name in subdirs:
            yield from _walk(folder / name, depth + 1, seen, budget, names)


def _entries(folder: Path, budget: list[int], names: tuple[str, str]) -> tuple[list[str], list[str]]:
    files, subdirs = [], []
    with os.scandir(folder) as it:
        for entry in it:
            budget[0] -= 1
            if budget[0] < 0:
                raise SdcliError(f"the {names[0]} folders hold over {MAX_ENTRIES:,} files and folders (at "
                                 f"{printable(str(folder))}): point {names[1]} at the folder of the files themselves")
            try:
                if entry.is_dir():  # a symlink's target
                    subdirs.append(entry.name)
                elif entry.is_file():
                    files.append(entry.name)
            except OSError:  # a broken entry: nothing to find
                continue
    return sorted(files), sorted(subdirs)


def find(name: str, dirs: list[Path], suffixes: tuple[str, ...], what: str, option: str,
         alias: str | None = None) -> Path:
    """The file a prompt's NAME stands for: a path to a file as given, else NAME + a suffix (or NAME itself when
    it has one) in the folders, at the top first, then in subfolders. A path that is no file falls back to its
    file's name there (a PNG's tag from a run in another folder). Then, with `alias` (a key of a safetensors
    header's __metadata__, kohya's ss_output_name), the one file whose header gives NAME under that key.
    Else an error saying where it looked."""
    path = Path(name).expanduser()
    is_path = "/" in name or os.sep in name
    if (is_path or path.suffix.lower() in suffixes) and path.is_file():
        return path
    wanted = _file_names(name, suffixes)
    bare = _file_names(path.name, suffixes) if is_path and path.name else wanted  # the file's own name
    found, headers = _in_folders(dirs, wanted, bare, (what, option), alias is not None)
    stem = os.path.splitext(bare[0])[0]
    if found is None and alias:
        found = _by_alias(stem, headers, alias, what)
    if found is not None:
        return found
    if not dirs:
        raise SdcliError(f"{what} {shown(name)} not found: looked in no folder: give {option} DIR")
    read = f" (read in the first {MAX_ALIAS_FILES:,} .safetensors files only)" if len(headers) > MAX_ALIAS_FILES else ""
    by_alias = f", and for a file whose {alias}{read} is {shown(stem)}" if alias else ""
    raise SdcliError(f"{what} {shown(name)} not found: looked for {' or '.join(dict.fromkeys(wanted + bare))} in "
                     f"{', '.join(map(str, dirs))} and their subfolders{by_alias}: check the name, or give its "
                     f"folder with {option}")


def _in_folders(dirs: list[Path], wanted: list[str], bare: list[str], names: tuple[str, str],
                headers: bool) -> tuple[Path | None, list[Path]]:
    """-> (the file found, else None; with `headers`, the .safetensors files seen). The path within a folder
    first, then the file's own name, at the top of the folders, then in their subfolders."""
    for n in dict.fromkeys(wanted + bare):
        for folder in dirs:
            if (folder / n).is_file():
                return folder / n, []
    seen: list[Path] = []
    for folder, files in walk(dirs, *names):
        for f in files:
            if f in bare:
                return folder / f, []
            if headers and f.lower().endswith(".safetensors"):
                seen.append(folder / f)
    return None, seen


def _file_names(name: str, suffixes: tuple[str, ...]) -> list[str]:
    return [name] if Path(name).suffix.lower() in suffixes else [name + s for s in suffixes]


def _by_alias(value: str, files: list[Path], key: str, what: str) -> Path | None:
    """The one file of `files` (the first MAX_ALIAS_FILES) whose header's __metadata__[key] is `value`."""
    same: dict[str, Path] = {}  # real path -> the file as found: a file linked twice is one
    for f in files[:MAX_ALIAS_FILES]:
        if header_metadata(f).get(key) == value:
            same.setdefault(os.path.realpath(f), f)
    found = list(same.values())
    if len(found) > 1:
        raise SdcliError(f"{what} {shown(value)} is the {key} of {len(found)} files, {found[0]} and {found[1]}: "
                         "name the file instead (its file name, without .safetensors)")
    return found[0] if found else None


def header_metadata(path: Path) -> dict:
    """A safetensors file's __metadata__ (text to text), read from its header alone, torch-free; {} for a file
    that is not safetensors, whose header is over MAX_ALIAS_HEADER bytes or has no metadata."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            raw = f.read(size) if size <= MAX_ALIAS_HEADER else b""
    except OSError:
        return {}
    if b"__metadata__" not in raw:  # most headers: nothing to parse
        return {}
    try:
        meta = json.loads(raw).get("__metadata__")
    except (ValueError, RecursionError, AttributeError):  # not JSON, nested too deep, not an object
        return {}
    return {k: v for k, v in meta.items() if isinstance(v, str)} if isinstance(meta, dict) else {}
