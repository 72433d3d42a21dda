"""Process-wide settings for running models, applied by the CLI (a library should not change them
behind its caller's back)."""

from __future__ import annotations

import ctypes
import functools
import os


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process instead of returning it to the kernel.

    By default every large free() goes back to the OS, so each UNet call page-faults its activations
    into fresh zeroed pages again: measured on SD 1.5 at 256 px, 5.8 million faults and 13 s of kernel
    time over 8 calls, 26% of the wall time. Peak memory is unchanged. Returns whether it applied
    (only with glibc: not on macOS, Windows or musl).
    """
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        mallopt = ctypes.CDLL(None).mallopt  # glibc is already loaded into the process
    except (AttributeError, OSError, ValueError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))
