"""Hostile leftovers and modes (issue 15, defects 13 and 14): temporary files of killed saves are removed on
start and resume (only ours, only of dead processes), and every file sdcli writes gets the umask's mode."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdcli.fileio import QUIET_SECONDS, atomic_path, new_file_mode, remove_stale_temps, temp_name
from test_training import FAST, make_data


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped), so no process of that id runs now."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with contextlib.suppress(ProcessLookupError):
        os.kill(child.pid, 0)
        pytest.skip("the dead child's process id was reused at once")
    return child.pid


def leftovers(folder: Path, pid: int) -> dict[str, bool]:
    """Files a killed save would leave in `folder` (process `pid`) and others that must stay: {name: stale}."""
    folder.mkdir(parents=True, exist_ok=True)
    live = os.getpid()
    names = {
        f".sdcli-{pid}-0123abcd.tmp": True,  # what temp_name gives
        f".step-0000005.pt.{pid}-89abcdef.tmp": True,  # what checkpoints were written to before it
        f".sdcli-{live}-0123abcd.tmp": False,  # a live process is still writing it
        f".step-0000005.pt.{live}-89abcdef.tmp": False,
        f".sdcli-{pid}-0123abcd.tmp.bak": False,  # look-alikes: not our exact naming
        f"sdcli-{pid}-0123abcd.tmp": False,
        f".sdcli-{pid}-0123ABCD.tmp": False,
        f".sdcli-{pid}-0123abc.tmp": False,
        f".sdcli-x{pid}-0123abcd.tmp": False,
        f".model.safetensors.{pid}-0123abcd.tmp": False,
    }
    for name in names:
        (folder / name).write_bytes(b"x" * 1000)
        quiet(folder / name)
    return names


def quiet(path: Path) -> None:
    """Date a file back past QUIET_SECONDS: a killed write's, not one still being written."""
    then = time.time() - QUIET_SECONDS - 5
    os.utime(path, (then, then))


def remaining(folder: Path, names: dict[str, bool]) -> set[str]:
    return {name for name in names if (folder / name).exists()}


def kept(names: dict[str, bool]) -> set[str]:
    return {name for name, stale in names.items() if not stale}


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield 0o666 & ~mask
    finally:
        os.umask(old)


def modes(folder: Path) -> dict[str, int]:
    """{file: permission bits} for every file under `folder`."""
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


# --- stale temporary files -----------------------------------------------------------------------------


def test_remove_stale_temps_takes_only_dead_processes_files_of_our_naming(tmp_path):
    pid = dead_pid()
    names = leftovers(tmp_path, pid)
    (tmp_path / f".sdcli-{pid}-00000000.tmp").mkdir()  # a folder so named: not a file we wrote
    (tmp_path / f".sdcli-{pid}-11111111.tmp").symlink_to(tmp_path / f"sdcli-{pid}-0123abcd.tmp")
    leftovers(tmp_path / "below", pid)  # not recursive
    assert remove_stale_temps(tmp_path) == (2, 2000)
    assert remaining(tmp_path, names) == kept(names)
    assert (tmp_path / f".sdcli-{pid}-00000000.tmp").is_dir() and (tmp_path / f".sdcli-{pid}-11111111.tmp").is_symlink()
    assert len(list((tmp_path / "below").iterdir())) == len(names)
    assert remove_stale_temps(tmp_path / "missing") == (0, 0)
    assert remove_stale_temps(tmp_path / f"sdcli-{pid}-0123abcd.tmp") == (0, 0)  # a file, not a folder


def test_temp_names_are_what_remove_stale_temps_matches(tmp_path):
    """The one naming every writer uses is recognised (here as a live process's file: kept)."""
    name = temp_name(tmp_path / ("x" * 255))
    assert name.parent == tmp_path and len(name.name) < 40
    name.write_bytes(b"")
    assert remove_stale_temps(tmp_path) == (0, 0) and name.exists()
    dead = name.with_name(name.name.replace(f"-{os.getpid()}-", f"-{dead_pid()}-"))
    name.rename(dead)
    assert remove_stale_temps(tmp_path) == (0, 0) and dead.exists()  # still changing: perhaps another machine's
    quiet(dead)
    assert remove_stale_temps(tmp_path) == (1, 0) and not dead.exists()


def test_training_start_and_resume_remove_stale_temps(tmp_path, run_cli):
    """A new run in a folder with leftovers, then a resume with leftovers in every folder the trainers write;
    the trainers' files get the umask's mode whatever library wrote them."""
    data, out, pid = make_data(tmp_path / "data", n=4), tmp_path / "out", dead_pid()
    names = leftovers(out, pid)
    with umask(0o022) as mode:
        code, _, err = run_cli("train-vae", data, "--out", out, "--arch", "tiny", *FAST, "--max-steps", 1,
                               "--batch-size", 2, "--validation-images", 1)
    assert code == 0, err
    assert f"removed 2 temporary files that stopped sdcli processes left in {out} (0.0 MB freed)" in err
    assert remaining(out, names) == kept(names)
    written = modes(out)
    assert {"checkpoints/step-0000001.pt", "vae/diffusion_pytorch_model.safetensors", "vae/config.json",
            "metrics.jsonl", "samples/step-0000001.png"} <= set(written)
    assert all(m == mode for name, m in written.items() if name not in names), written

    everywhere = {folder: leftovers(out / folder, pid) for folder in ("", "checkpoints", "vae", "samples")}
    with umask(0o077) as mode:
        code, _, err = run_cli("train-vae", data, "--out", out, "--resume", "--max-steps", 2, *FAST[-3:])
    assert code == 0, err
    assert "removed 8 temporary files" in err and "(0.0 MB freed)" in err
    for folder, names in everywhere.items():
        assert remaining(out / folder, names) == kept(names), folder
    assert modes(out)["checkpoints/step-0000002.pt"] == mode == 0o600
    assert modes(out)["samples/step-0000002.png"] == mode and modes(out)["metrics.jsonl"] == mode  # rewritten


def test_a_refused_train_unet_start_still_removes_stale_temps(tmp_path, run_cli):
    out = tmp_path / "out"
    names = leftovers(out / "checkpoints", dead_pid())
    code, _, err = run_cli("train-unet", tmp_path, "--out", out, "--resume", "--device", "cpu")
    assert code == 2 and "nothing to resume" in err and "removed 2 temporary files" in err
    assert remaining(out / "checkpoints", names) == kept(names)


def test_a_run_stopped_before_its_first_checkpoint_is_refused_plainly(tmp_path, run_cli):
    """Killed in its first save: neither --resume nor a new run can use it, and each says so."""
    out = tmp_path / "out"
    (out / "vae").mkdir(parents=True)
    (out / "checkpoints").mkdir()
    for extra in ((), ("--resume",)):
        code, _, err = run_cli("train-vae", tmp_path, "--out", out, "--device", "cpu", *extra)
        assert code == 2 and "holds a model but no checkpoints/step-*.pt" in err and "choose another --out" in err
        assert "pass --resume" not in err and "drop --resume" not in err


# --- modes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=["022", "077"])
def test_atomic_path_gives_the_umask_mode_whatever_the_writer_chose(tmp_path, mask):
    with umask(mask) as mode:
        assert new_file_mode() == mode
        for i, chosen in enumerate((0o600, 0o777, 0o400)):
            with atomic_path(tmp_path / f"f{i}") as tmp:
                os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, chosen))
                os.chmod(tmp, chosen)  # beyond the umask too
            assert stat.S_IMODE((tmp_path / f"f{i}").stat().st_mode) == mode
        with atomic_path(tmp_path / "f0", overwrite=True) as tmp:
            tmp.write_bytes(b"again")
        assert stat.S_IMODE((tmp_path / "f0").stat().st_mode) == mode


def test_the_umask_is_read_without_proc_too(monkeypatch):
    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/self/status")

    monkeypatch.setattr("sdcli.fileio.open", no_proc, raising=False)
    with umask(0o027) as mode:
        assert new_file_mode() == mode
        assert os.umask(0o027) == 0o027  # and left as it was


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=["022", "077"])
def test_exported_and_generated_files_get_the_umask_mode(tiny, tmp_path, run_cli, mask):
    with umask(mask) as mode:
        for dst in (tmp_path / "one.safetensors", tmp_path / "folder"):
            code, _, err = run_cli("export", tiny("sd1").folder, dst)
            assert code == 0, err
        code, _, err = run_cli("generate", "a red circle", "-W", 64, "-H", 64, "--steps", 2, "-o",
                               tmp_path / "image.png")
        assert code == 0, err
    written = modes(tmp_path)
    assert {"one.safetensors", "image.png", "folder/model_index.json", "folder/unet/config.json",
            "folder/unet/diffusion_pytorch_model.safetensors", "folder/text_encoder/model.safetensors",
            "folder/tokenizer/vocab.json"} <= set(written)
    assert set(written.values()) == {mode}, written
