"""Writing files so that no partial file is ever left behind.

Every file sdcli writes goes to a temporary name beside it (temp_name), gets the mode a new file has under
the user's umask, and is renamed onto its name (atomic_path). A process killed before the rename leaves the
temporary file; remove_stale_temps deletes those of processes no longer running.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from sdcli.errors import SdcliError

# What temp_name makes, and what checkpoints were written to before it (.step-0000100.pt.PID-xxxxxxxx.tmp):
# the process id in group 1 or 2. Nothing else is ever removed as a temporary file.
_TEMP_NAME = re.compile(r"\.sdcli-(\d{1,10})-[0-9a-f]{8}\.tmp|\.step-\d{7,}\.pt\.(\d{1,10})-[0-9a-f]{8}\.tmp")


QUIET_SECONDS = 60  # a temp file unchanged this long, of a process not running here, is no one's write


def temp_name(dst: Path) -> Path:
    """Where `dst` is written before it is renamed onto it: beside it (one file system), hidden, short (any
    legal dst works), naming this process so that remove_stale_temps can tell a dead writer's file."""
    return Path(dst).with_name(f".sdcli-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def remove_stale_temps(folder: Path) -> tuple[int, int]:
    """Delete the temporary files in `folder` (not below it) whose process is no longer running and which have
    not changed for QUIET_SECONDS: writes killed before their rename. Other names, live processes' files, files
    still growing (a process of that id on another machine sharing the folder) and anything but plain files are
    left alone; a file that cannot be examined or removed is skipped. Returns (files removed, bytes freed)."""
    removed = freed = 0
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0, 0
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        if match is None or not _is_dead(int(match.group(1) or match.group(2))):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode) or now - info.st_mtime < QUIET_SECONDS:
                continue
            os.unlink(entry.path)
        except OSError:
            continue
        removed, freed = removed + 1, freed + info.st_size
    return removed, freed


def clean_stale_temps(folders: Iterable[Path], where: Path) -> str | None:
    """remove_stale_temps in each folder (`where` and folders in it); a line saying what was removed, or None
    when nothing was."""
    removed = freed = 0
    for folder in folders:
        n, size = remove_stale_temps(folder)
        removed, freed = removed + n, freed + size
    if not removed:
        return None
    return (f"removed {removed} temporary file{'s' if removed > 1 else ''} that stopped sdcli processes left in "
            f"{where} ({freed / 1e6:.1f} MB freed)")


def _is_dead(pid: int) -> bool:
    """Whether no process `pid` runs on this machine (a process of another user counts as running)."""
    if os.name != "posix" or pid <= 0:  # Windows' os.kill terminates; 0 and below name process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # PermissionError: it runs, as another user
        return False
    return False


def new_file_mode() -> int:
    """The mode open() gives a new file: 0666 less the umask (read from /proc where it can be, as changing
    the umask to read it is seen by every thread)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    umask = os.umask(0o077)  # set back at once; a file another thread makes meanwhile is only more private
    os.umask(umask)
    return 0o666 & ~umask


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
    probe = temp_name(existing / "probe")
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as e:
        raise SdcliError(f"cannot write into {folder}: {e.strerror or e}") from None


@contextlib.contextmanager
def atomic_path(dst: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `dst`; give the file written there the umask's mode and rename it onto
    `dst` (with `overwrite`, in one step: a reader sees the old file or the new one) only if the block
    succeeds."""
    dst = Path(dst)
    check_output(dst, overwrite)
    tmp = temp_name(dst)
    try:
        yield tmp
        with contextlib.suppress(OSError):  # a file system without modes; a missing tmp fails just below
            os.chmod(tmp, new_file_mode())  # whatever the writer chose (safetensors: 0600)
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


def write_stdout(data: bytes | str) -> None:
    """Write (and flush) data to stdout, or a one-line error when stdout cannot take it (a full disk, a closed
    pipe); stdout is then pointed at /dev/null so that the interpreter's own flush at exit stays quiet."""
    import sys

    if sys.stdout is None:  # started with stdout closed (`>&-`)
        if data:
            raise SdcliError("cannot write to stdout: it is closed")
        return
    try:
        if isinstance(data, str):
            sys.stdout.write(data)
            sys.stdout.flush()
        else:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
    except (OSError, ValueError) as e:  # ValueError: stdout already closed
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        reason = "the reader closed it" if isinstance(e, BrokenPipeError) else getattr(e, "strerror", None) or e
        raise SdcliError(f"cannot write to stdout: {reason}") from None
