"""Writing files so that no partial file is ever left behind."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator

from sdcli.errors import SdcliError


def check_output(dst: Path, overwrite: bool = False) -> None:
    """Refuse an output path before any work is done for it."""
    dst = Path(dst)
    try:
        if dst.is_dir():
            raise SdcliError(f"cannot write {dst}: it is a folder; give a file name")
        if (dst.exists() or dst.is_symlink()) and not overwrite:
            raise SdcliError(f"{dst} already exists: choose another output or pass --overwrite")
        if not dst.parent.is_dir():
            raise SdcliError(f"cannot write {dst}: folder {dst.parent} does not exist")
    except OSError as e:  # a name too long for the file system, ...
        raise SdcliError(f"cannot write {dst}: {e.strerror or e}") from None


def probe_folder(folder: Path) -> None:
    """Check that files can be created in `folder`, or in its nearest existing ancestor if it is yet to be
    made, by creating one (permissions alone don't tell: read-only mounts, /proc, root)."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SdcliError(f"cannot write into {folder}: {existing} is not a folder")
    probe = existing / f".sdcli-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as e:
        raise SdcliError(f"cannot write into {folder}: {e.strerror or e}") from None


@contextlib.contextmanager
def atomic_path(dst: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `dst`; rename it onto `dst` only if the block succeeds."""
    dst = Path(dst)
    check_output(dst, overwrite)
    tmp = dst.with_name(f".sdcli-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")  # short: any legal dst works
    try:
        yield tmp
        if overwrite:
            os.replace(tmp, dst)
        else:
            _rename_no_clobber(tmp, dst)
    except FileExistsError:
        raise SdcliError(f"{dst} appeared while it was being written: choose another output or pass --overwrite") \
            from None
    except OSError as e:
        raise SdcliError(f"cannot write {dst}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _rename_no_clobber(tmp: Path, dst: Path) -> None:
    """Move tmp to dst, failing if dst exists by then (a hard link cannot replace a file, os.replace can)."""
    try:
        os.link(tmp, dst)
    except FileExistsError:
        raise
    except OSError:  # file systems without hard links: the existence check before writing has to do
        os.replace(tmp, dst)
