"""The allocator setting, measured by page faults (not by time)."""

import json
import platform
import subprocess
import sys

import pytest

CHILD = r"""
import json, resource, sys, torch
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    from sdcli.runtime import keep_freed_memory
    assert keep_freed_memory()
def step():  # activations above glibc's largest dynamic mmap threshold (32 MiB), as in a UNet call
    a = torch.ones(12 << 20)
    return float((torch.ones(10 << 20) + a[: 10 << 20])[0])
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_cuts_page_faults():
    faults = {
        mode: json.loads(subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                                        check=True).stdout)
        for mode in ("default", "keep")
    }
    pages_per_step = ((12 << 20) + 2 * (10 << 20)) * 4 // 4096
    assert faults["default"] > 5 * pages_per_step  # glibc unmaps and refaults the buffers every step
    assert faults["keep"] < faults["default"] / 2


def test_the_cli_applies_it(run_cli, monkeypatch):
    import sdcli.runtime

    calls = []
    monkeypatch.setattr(sdcli.runtime, "keep_freed_memory", lambda: calls.append(1) or True)
    code, out, _ = run_cli("--help")
    assert code == 0 and "info" in out and calls == [1]
