import os
import sys
from pathlib import Path

# No hub, ever: the references are built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)
sys.path.insert(0, str(Path(__file__).parent))

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-models")


def _built(build, root):
    """kind -> build(kind, root), each built once."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = build(kind, root)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def tiny(tiny_root):
    """tiny(kind) -> TinyModel, built once per session: "sd1", "sd2", "inpaint", "x4"."""
    import tiny as builder

    return _built(builder.build, tiny_root)


@pytest.fixture(scope="session")
def xl(tiny_root):
    """xl(kind) -> tiny_xl.TinyXL, built once per session: "base", "refiner" or "inpaint" (9 channels)."""
    import tiny_xl

    return _built(tiny_xl.build, tiny_root)


@pytest.fixture(scope="session")
def sd_pipelines(tiny):
    """{"sd1": (pipeline, engine), "sd2": ...}: diffusers' StableDiffusionPipeline and an sdcli Engine on the same
    tiny eps (sd1) and v-prediction (sd2) model, built once. Shared: set pipeline.scheduler before each use."""
    from diffusers import StableDiffusionPipeline

    from sdcli.engine import Engine
    from sdcli.loading import load_model

    out = {}
    for kind in ("sd1", "sd2"):
        tm = tiny(kind)
        pipe = StableDiffusionPipeline.from_pretrained(tm.folder, safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        out[kind] = pipe, Engine(load_model(tm.single_file), torch.device("cpu"))
    return out


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run the real console entry point in-process: returns (exit code, stdout, stderr)."""
    from sdcli.cli import main

    def run(*args: str):
        monkeypatch.setattr(sys, "argv", ["sdcli", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def sdcli(run_cli):
    """hostile.run_sdcli's Result for a run in this process (run_cli's): for refusals that need no memory cap or
    fresh interpreter, at none of a new interpreter's start-up cost."""
    import time

    from hostile import Result

    def run(*args) -> Result:
        start = time.perf_counter()
        code, out, err = run_cli(*args)
        return Result(code, out.encode(), err, time.perf_counter() - start)

    return run
