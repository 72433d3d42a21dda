"""Writing files so that no partial file is ever left behind."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from sdcli.errors import SdcliError


@contextlib.contextmanager
def atomic_path(dst: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `dst`; rename it onto `dst` only if the block succeeds."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise SdcliError(f"{dst} already exists: choose another output or pass --overwrite")
    if not dst.parent.is_dir():
        raise SdcliError(f"cannot write {dst}: folder {dst.parent} does not exist")
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
