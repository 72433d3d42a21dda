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
        if dst.exists() and not overwrite:
            raise SdcliError(f"{dst} already exists: choose another output or pass --overwrite")
        if not dst.parent.is_dir():
            raise SdcliError(f"cannot write {dst}: folder {dst.parent} does not exist")
    except OSError as e:  # a name too long for the file system, ...
        raise SdcliError(f"cannot write {dst}: {e.strerror or e}") from None


@contextlib.contextmanager
def atomic_path(dst: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `dst`; rename it onto `dst` only if the block succeeds."""
    dst = Path(dst)
    check_output(dst, overwrite)
    tmp = dst.with_name(f".sdcli-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")  # short: any legal dst works
    try:
        yield tmp
        os.replace(tmp, dst)
    except OSError as e:
        raise SdcliError(f"cannot write {dst}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
