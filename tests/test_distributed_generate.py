"""`sdcli generate --from-file` under torchrun: each process renders its share of the batches, and the run writes
what a single process writes (the same names, seeds, pixels and metadata), each image once."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdcli.batch import Request
from sdcli.jobs import plan
from sdcli.distributed import shard, world
from sdcli.render import _batches, _share

ARGS = ["-W", "64", "-H", "64", "--steps", "2"]
PROMPTS = """\
a red cube --seed 1 --n-images 2
# batches of two, the last one short: each must stay whole (batch-mates change the pixels)
a blue sphere on grass --seed 7 --n-images 3 --batch-size 2
a green cone --seed 11 --n-images 2 --sampler euler_a
"""
RANDOM = "a yellow torus --n-images 2 -o random/\n"  # rank 0's seeds serve every process


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                          "MASTER_ADDR", "MASTER_PORT")}
    return {**e, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def sdcli(cwd: Path, *args, processes: int = 0) -> subprocess.CompletedProcess:
    """sdcli in a subprocess, under torchrun with `processes` processes (0: without torchrun)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--standalone",
              "--monitor-interval", "0.2", "-m", "sdcli"] if processes else [sys.executable, "-m", "sdcli"]
    return subprocess.run([*launch, *map(str, args)], cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=300)


def pngs(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.glob("*.png")}


@pytest.mark.slow
def test_torchrun_writes_what_one_process_writes(tiny, tmp_path):
    model = tiny("sd1").single_file
    (tmp_path / "prompts.txt").write_text(PROMPTS + RANDOM, encoding="utf-8")
    runs = {}
    for name, processes in (("torchrun", 2), ("single", 0)):
        cwd = tmp_path / name
        cwd.mkdir()
        proc = sdcli(cwd, "generate", "--from-file", tmp_path / "prompts.txt", "-m", model, "-o", "out/", "--json",
                     *ARGS, processes=processes)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = (cwd, proc)

    (dist, proc), (single, _) = runs["torchrun"], runs["single"]
    written = [json.loads(line)["path"] for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(written) == len(set(written)) == 9  # every image written once, by one of the processes
    for path in written:  # and its line printed once, in the usual form
        assert len(re.findall(rf"^{re.escape(path)}  seed \d+  \d+\.\d s$", proc.stderr, re.M)) == 1, proc.stderr

    ours, theirs = pngs(dist / "out"), pngs(single / "out")
    assert sorted(ours) == sorted(theirs) and len(ours) == 7
    assert {f"{seed}-{slug}.png" for seed, slug in [(1, "a-red-cube"), (2, "a-red-cube"), (7, "a-blue-sphere-on-grass"),
            (8, "a-blue-sphere-on-grass"), (9, "a-blue-sphere-on-grass"), (11, "a-green-cone"), (12, "a-green-cone")]} \
        == set(ours)
    for name in ours:
        a, b = Image.open(ours[name]), Image.open(theirs[name])
        np.testing.assert_array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")), err_msg=name)
        assert a.text == b.text, name  # parameters and sdcli's record: seed, batch_index, job key, ...
        assert ours[name].read_bytes() == theirs[name].read_bytes(), name

    # a prompt without --seed: both processes drew rank 0's seed (its images are seed and seed + 1)
    seeds = sorted(json.loads(Image.open(p).text["sdcli"])["seed"] for p in (dist / "random").glob("*.png"))
    assert len(seeds) == 2 and seeds[1] == seeds[0] + 1, seeds
    assert not list(dist.rglob(".sdcli-*"))  # no temporary files left behind


def test_stdout_and_stdin_are_refused_under_torchrun(tiny, run_cli, monkeypatch, tmp_path):
    """What every process of `torchrun --nproc-per-node 2 sdcli generate ... -o -` (or with prompts on stdin)
    sees: one line, exit code 2, before a model loads or a file is written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("a cat --seed 1\n", encoding="utf-8")
    for rank in ("0", "1"):
        for key, value in dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE="2", LOCAL_WORLD_SIZE="2").items():
            monkeypatch.setenv(key, value)
        code, out, err = run_cli("generate", "--from-file", "prompts.txt", "-m", tiny("sd1").single_file, "-o", "-",
                                 *ARGS)
        assert code == 2 and out == ""
        assert err == "sdcli: error: writing images to stdout does not work under torchrun (2 processes): give an " \
                      "output folder\n"
        code, out, err = run_cli("generate", "-", "-m", tiny("sd1").single_file, "-o", "out/", *ARGS)
        assert code == 2 and out == ""
        assert err == "sdcli: error: reading prompts from stdin does not work under torchrun (2 processes): put " \
                      "them in a file and pass --from-file FILE\n"
    assert list(tmp_path.iterdir()) == [tmp_path / "prompts.txt"]


@pytest.mark.slow
def test_stdout_output_is_refused_by_a_real_torchrun(tiny, tmp_path):
    """A process's one line (torchrun may stop the other before it prints its own), and a failed run."""
    proc = sdcli(tmp_path, "generate", "a cat", "--seed", "1", "-m", tiny("sd1").single_file, "-o", "-", *ARGS,
                 processes=2)
    assert proc.returncode != 0 and proc.stdout == ""
    assert "sdcli: error: writing images to stdout does not work under torchrun (2 processes): give an output " \
           "folder\n" in proc.stderr
    assert "[rank" not in proc.stderr  # no traceback from a process (torchrun's own report follows)


def test_world_reads_torchrun_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert world() == (0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert world() == (3, 4, 1)


@pytest.mark.parametrize("processes", [1, 2, 3, 4, 7])
def test_shard_deals_every_item_once_in_order(processes):
    items = list(range(10))
    shares = [shard(items, rank, processes) for rank in range(processes)]
    assert sorted(i for s in shares for i in s) == items
    assert all(s == sorted(s) for s in shares)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError):
        shard(items, processes, processes)


@pytest.mark.parametrize("processes", [1, 2, 3, 5])
def test_share_keeps_batches_whole(processes):
    requests = [Request(prompt="a", seed=1, n_images=5, batch_size=2), Request(prompt="b", seed=9, n_images=1),
                Request(prompt="c", seed=4, n_images=4, batch_size=4), Request(prompt="d", seed=2, n_images=3,
                                                                               batch_size=2)]
    jobs = plan(requests, "m", lambda r: (64, 64), name="{index}-{seed}.png")
    batches = [[j.index for j in b] for b in _batches(jobs)]
    shares = [_share(jobs, rank, processes) for rank in range(processes)]
    assert sorted(j.index for s in shares for j in s) == [j.index for j in jobs]  # every image exactly once
    # a share, batched again, is made of the single-process run's batches (the same seeds rendered together)
    assert sorted(([j.index for j in b] for s in shares for b in _batches(s)), key=lambda b: b[0]) == batches
    assert shares[0] == _share(jobs, 0, processes)  # the same in every process
