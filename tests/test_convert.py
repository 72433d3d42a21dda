"""`sdcli convert`: pickle checkpoints to safetensors, reading tensors only."""

import pytest
import torch
from safetensors.torch import load_file

from pickles import write_malicious_pickle
from sdcli.loading import load_model


def test_ckpt_converts_and_loads_like_the_original(tiny, tmp_path, run_cli):
    state = load_file(str(tiny("sd1").single_file))
    state["model_ema.decay"] = torch.tensor(0.9999)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 1234, "epoch": 3}, ckpt)  # Lightning's layout
    out = tmp_path / "model.safetensors"
    code, _, err = run_cli("convert", ckpt, out)
    assert code == 0, err
    converted = load_file(str(out))
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[k], state[k]) for k in state)
    a, b = load_model(out), load_model(tiny("sd1").single_file)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_existing_output_is_not_overwritten(tmp_path, run_cli):
    ckpt = tmp_path / "a.ckpt"
    torch.save({"w": torch.ones(2)}, ckpt)
    out = tmp_path / "a.safetensors"
    out.write_bytes(b"precious")
    code, _, err = run_cli("convert", ckpt, out)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"precious"
    code, _, _ = run_cli("convert", ckpt, out, "--overwrite")
    assert code == 0 and torch.equal(load_file(str(out))["w"], torch.ones(2))


@pytest.mark.parametrize("protocol,message", [
    (2, "holds more than tensors (it would call io.open)"),  # what torch.save writes
    (5, "reading tensors only refused it"),
])
def test_malicious_pickle_is_refused_and_nothing_runs_or_is_written(tmp_path, run_cli, protocol, message):
    marker = tmp_path / "code-ran"
    ckpt = tmp_path / "evil.ckpt"
    write_malicious_pickle(ckpt, marker, protocol)
    out = tmp_path / "evil.safetensors"
    code, _, err = run_cli("convert", ckpt, out)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert message in err
    assert not marker.exists() and not out.exists()
    assert list(tmp_path.iterdir()) == [ckpt]  # no temporary file left either


def test_convert_checks_the_output_before_reading(tmp_path, run_cli):
    junk = tmp_path / "junk.ckpt"  # reading it would fail: the error must be about the output
    junk.write_text("not a checkpoint")
    (tmp_path / "taken.safetensors").write_bytes(b"precious")
    code, _, err = run_cli("convert", junk, tmp_path / "taken.safetensors")
    assert code == 2 and "already exists" in err
    ckpt = tmp_path / "a.ckpt"
    torch.save({"w": torch.ones(2)}, ckpt)
    (tmp_path / "dir.safetensors").mkdir()
    code, _, err = run_cli("convert", ckpt, tmp_path / "dir.safetensors", "--overwrite")
    assert code == 2 and "it is a folder" in err and "Traceback" not in err
    code, _, err = run_cli("convert", ckpt, tmp_path / "missing" / "a.safetensors")
    assert code == 2 and "does not exist" in err


def test_convert_write_failure_is_one_line(tmp_path, run_cli, monkeypatch):
    ckpt = tmp_path / "a.ckpt"
    torch.save({"w": torch.ones(2)}, ckpt)
    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    out = tmp_path / "a.safetensors"
    code, _, err = run_cli("convert", ckpt, out)
    assert code == 2 and "cannot write" in err and "No space left" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt"]


def test_convert_long_output_name_and_odd_tensors(tmp_path, run_cli):
    ckpt = tmp_path / "a.ckpt"
    torch.save({"w": torch.ones(2)}, ckpt)
    out = tmp_path / ("c" * 240 + ".safetensors")  # legal, and longer than a name-derived temp file could be
    code, _, err = run_cli("convert", ckpt, out)
    assert code == 0 and out.exists(), err
    sparse = tmp_path / "sparse.ckpt"
    torch.save({"w": torch.eye(3).to_sparse()}, sparse)
    code, _, err = run_cli("convert", sparse, tmp_path / "s.safetensors")
    assert code == 2 and "cannot store" in err and "Traceback" not in err
    torch.save({1: torch.ones(1)}, tmp_path / "intkeys.ckpt")
    code, _, err = run_cli("convert", tmp_path / "intkeys.ckpt", tmp_path / "i.safetensors")
    assert code == 2 and "cannot store" in err


def test_convert_input_errors(tmp_path, run_cli):
    code, _, err = run_cli("convert", tmp_path / "missing.ckpt", tmp_path / "x.safetensors")
    assert code == 2 and "not found" in err
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    code, _, err = run_cli("convert", tmp_path / "junk.ckpt", tmp_path / "x.safetensors")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("convert", tmp_path / "junk.ckpt", tmp_path / "x.bin")
    assert code == 2 and ".safetensors" in err
