"""Running sdcli as a user would, in a subprocess under a memory and time limit, and checking how it refused."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Result:
    rc: int
    out: bytes
    err: str
    seconds: float


def run_sdcli(*args, mem_gb: float = 3, timeout: float = 120, stdin: bytes | None = None, cwd=None,
              env: dict | None = None, stdout=subprocess.PIPE, code: str = "") -> Result:
    """`sdcli ARGS` in a fresh interpreter whose address space is capped at `mem_gb` GiB (RLIMIT_AS), killed
    after `timeout` s. Arguments may be bytes (argv holding bytes that are not UTF-8); `stdout` may be a file
    (/dev/full); `code` runs after main() has exited, its output appended to stdout."""
    limit = int(mem_gb * (1 << 30))

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    script = "from sdcli.cli import main\ntry:\n    main()\nfinally:\n    " + (code or "pass")
    argv = [sys.executable, "-c", script,
            *(a if isinstance(a, bytes) else str(a) for a in args)]
    start = time.perf_counter()
    done = subprocess.run(argv, input=stdin if stdin is not None else b"", stdout=stdout, stderr=subprocess.PIPE,
                          timeout=timeout, preexec_fn=cap, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return Result(done.returncode, done.stdout or b"", done.stderr.decode("utf-8", "replace"),
                  time.perf_counter() - start)


def assert_refused(result: Result, *needles: str, folder: Path | None = None, before: set | None = None) -> str:
    """Exit code 2, exactly one line on stderr, `sdcli: error: ...` naming every needle, no traceback, nothing
    on stdout; and, given `folder` and `before` (its files beforehand), nothing written there. -> the line."""
    lines = result.err.strip().splitlines()
    assert result.rc == 2, (result.rc, result.err[-2000:])
    assert "Traceback" not in result.err, result.err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("sdcli: error: "), result.err[-2000:]
    assert result.out == b"", result.out[:200]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    if folder is not None:
        assert files(folder) == (before or set()), "files were written or removed"
    return lines[0]


def files(folder: Path) -> set[str]:
    """Every file under `folder` (hidden temp files included), relative to it."""
    return {str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file() or p.is_symlink()}
