"""Finding LoRAs and embeddings: --lora's tag names the file as A1111 does (its stem) and the run still uses the
given file; a stored path tag falls back to its file's name in the LoRA folders; symlinked subfolders are
searched (loops and huge trees bounded); kohya's ss_output_name finds a file; stale $SDCLI_*_DIR entries are
skipped and a missing --lora-dir is refused naming the option."""

import hashlib
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

import sdcli.networks.library as library
from sdcli.batch import Request
from sdcli.errors import SdcliError
from sdcli.networks.embeddings import Embeddings
from sdcli.networks.library import find, folders
from sdcli.networks.loras import Loras
from sdcli.networks.tags import lora_name, with_lora_tags

SUFFIXES = (".safetensors",)


def lora(path, alias=None, value=0.0):
    """A small safetensors file (a LoRA as far as finding it goes), with kohya's ss_output_name when `alias`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": np.full(2, value, np.float32)}, str(path), metadata={"ss_output_name": alias} if alias else None)
    return path


def look(name, *dirs):
    return find(name, list(dirs), SUFFIXES, "LoRA", "--lora-dir", alias="ss_output_name")


def refusal(call) -> str:
    with pytest.raises(SdcliError) as e:
        call()
    return str(e.value)


# --- 1. --lora's tag: the file's stem; the run uses the given file --------------------------------------------

def test_lora_option_tags_name_the_file_by_its_stem():
    r = with_lora_tags(Request(prompt="a cat", lora=("rel/path/x.safetensors:0.5", "plain:0.5:1", "~/y.SafeTensors")))
    assert r.prompt == "a cat <lora:x:0.5> <lora:plain:0.5:1> <lora:y:1>"
    assert r.lora == ("rel/path/x.safetensors:0.5", "plain:0.5:1", "~/y.SafeTensors")  # the files the run uses
    assert [lora_name(n) for n in ("a/b.c", "b.c", "x.pt", "dir/", "/")] == ["b.c", "b.c", "x.pt", "dir", "/"]


def test_a_missing_path_falls_back_to_its_file_name_in_the_folders(tmp_path):
    folder = tmp_path / "loras"
    there = lora(folder / "sub" / "x.safetensors")
    top = lora(folder / "other" / "sub" / "y.safetensors")
    assert look("elsewhere/x.safetensors", folder) == there  # a tag from a run in another folder
    assert look("/gone/x", folder) == there
    assert look("other/sub/y", folder) == top  # a path within a folder comes first
    assert look(str(there), tmp_path / "empty") == there  # an existing path is used as given
    line = refusal(lambda: look("elsewhere/z.safetensors", folder))
    assert "looked for elsewhere/z.safetensors or z.safetensors in" in line and str(folder) in line


def test_the_run_uses_the_given_file_whatever_the_folders_hold(tmp_path, monkeypatch):
    given = lora(tmp_path / "mine" / "x.safetensors", value=1)
    folder = tmp_path / "loras"
    lora(folder / "x.safetensors", value=2)  # the same name, another file
    monkeypatch.chdir(tmp_path)
    loras = Loras([folder], given=("mine/x.safetensors",))
    assert loras.path("x").resolve() == given.resolve()
    assert Loras([folder]).path("x") == folder / "x.safetensors"
    same = Loras([folder], given=("mine/x.safetensors", str(given), "./mine/x.safetensors"))  # one file
    assert same.path("x").resolve() == given.resolve()
    line = refusal(lambda: Loras([folder], given=("mine/x.safetensors", "x")))
    assert "'mine/x.safetensors' and --lora 'x' are two files" in line and "rename one" in line


@pytest.fixture(scope="module")
def sd1(tiny):
    return tiny("sd1")


def test_a_lora_option_run_is_reproduced_from_another_folder(sd1, tmp_path, monkeypatch, run_cli):
    """--lora rel/x.safetensors stores <lora:x:...> and uses that file, not the lora-dir's x (the recorded hash
    is the given file's, computed here as A1111 does); --from-image run elsewhere finds x in its LoRA folders
    ($SDCLI_LORA_DIR, a stale entry first) and renders the same image."""
    import lora_files
    from sdcli.metadata import read_png

    args = ["-m", sd1.folder, "--steps", "3", "--sampler", "euler", "--seed", "7", "-W", "64", "-H", "64", "--quiet"]
    (tmp_path / "a" / "rel").mkdir(parents=True)
    given = lora_files.kohya_lora(sd1, tmp_path / "a" / "rel" / "x.safetensors", seed=3)
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    lora_files.kohya_lora(sd1, decoy / "x.safetensors", seed=4)
    data = given.read_bytes()
    digest = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]

    monkeypatch.chdir(tmp_path / "a")
    code, _, err = run_cli("generate", "a cat", "--lora", "rel/x.safetensors:0.8", "--lora-dir", decoy, *args,
                           "-o", tmp_path / "first.png")
    assert code == 0, err
    record = read_png(tmp_path / "first.png")
    assert record["prompt"] == "a cat <lora:x:0.8>" and record["lora_hashes"] == {"x": digest}

    elsewhere = tmp_path / "b"
    shutil.copytree(tmp_path / "a" / "rel", elsewhere / "loras")
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("SDCLI_LORA_DIR", os.pathsep.join([str(tmp_path / "gone"), "loras"]))
    code, _, err = run_cli("generate", "--from-image", tmp_path / "first.png", "-o", tmp_path / "again.png")
    assert code == 0, err
    assert "gone' (from $SDCLI_LORA_DIR) is not a folder: skipped" in err
    first, again = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("first", "again"))
    assert np.array_equal(again, first)


# --- 2. symlinked subfolders, one bounded walker --------------------------------------------------------------

def test_symlinked_subfolders_are_searched_and_loops_end(tmp_path):
    folder, store = tmp_path / "loras", tmp_path / "store"
    deep = lora(store / "deep" / "y.safetensors")
    folder.mkdir()
    os.symlink(store, folder / "linked")
    os.symlink(folder, folder / "loop")  # a folder that holds itself
    os.symlink(tmp_path / "nowhere", folder / "dangling")
    assert look("y", folder) == folder / "linked" / "deep" / "y.safetensors"
    assert look("y", folder).resolve() == deep.resolve()
    assert "'z' not found" in refusal(lambda: look("z", folder))  # the loop walked once


def test_lora_and_embedding_searches_share_the_bound(tmp_path, monkeypatch):
    for i in range(6):
        lora(tmp_path / f"d{i}" / f"f{i}.safetensors")
    monkeypatch.setattr(library, "MAX_ENTRIES", 8)
    assert "the LoRA folders hold over 8 files and folders" in refusal(lambda: look("missing", tmp_path))
    line = refusal(lambda: Embeddings([tmp_path]).names())
    assert "the embeddings folders hold over 8 files and folders" in line and "--embeddings-dir" in line
    monkeypatch.setattr(library, "MAX_ENTRIES", 12)  # 6 folders + 6 files
    assert len(Embeddings([tmp_path]).names()) == 6


def test_embeddings_in_symlinked_folders(tmp_path):
    lora(tmp_path / "store" / "emb.safetensors")
    (tmp_path / "embs").mkdir()
    os.symlink(tmp_path / "store", tmp_path / "embs" / "linked")
    os.symlink(tmp_path / "embs", tmp_path / "store" / "back")  # a loop through both
    assert Embeddings([tmp_path / "embs"]).names() == ["emb"]


# --- 3. kohya's ss_output_name --------------------------------------------------------------------------------

def test_ss_output_name_finds_a_file_only_when_no_file_has_the_name(tmp_path):
    folder = tmp_path / "loras"
    aliased = lora(folder / "sub" / "cute_style_v2-000010.safetensors", alias="cute-style")
    assert look("cute-style", folder) == aliased
    assert Loras([folder]).path("cute-style") == aliased
    named = lora(folder / "cute-style.safetensors")
    assert look("cute-style", folder) == named  # a file's name first, as A1111
    assert "ss_output_name is 'Cute-Style'" in refusal(lambda: look("Cute-Style", folder))  # matched exactly


def test_an_ambiguous_ss_output_name_names_both_files(tmp_path):
    a = lora(tmp_path / "a.safetensors", alias="style")
    b = lora(tmp_path / "sub" / "b.safetensors", alias="style")
    os.symlink(a, tmp_path / "sub" / "a-again.safetensors")  # the same file twice is one
    line = refusal(lambda: look("style", tmp_path))
    assert f"is the ss_output_name of 2 files, {a} and {b}" in line


def test_headers_read_for_an_alias_are_bounded(tmp_path, monkeypatch):
    (tmp_path / "huge.safetensors").write_bytes((2**63).to_bytes(8, "little") + b"{}")
    deep = b'{"__metadata__":' + b"[" * 100_000
    (tmp_path / "nested.safetensors").write_bytes(len(deep).to_bytes(8, "little") + deep)
    late = lora(tmp_path / "v3.safetensors", alias="late")
    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "big.safetensors"),
              metadata={"ss_output_name": "big-header", "ss_tag_frequency": "x" * 1000})
    monkeypatch.setattr(library, "MAX_ALIAS_HEADER", 500)  # v3's header is under 200 bytes, big's over 1000
    assert "not found" in refusal(lambda: look("big-header", tmp_path))  # its header is not read
    assert look("late", tmp_path) == late
    monkeypatch.setattr(library, "MAX_ALIAS_FILES", 3)  # big, huge, nested: v3 is the fourth file
    assert "(read in the first 3 .safetensors files only)" in refusal(lambda: look("late", tmp_path))


# --- 4. stale environment entries, a missing --lora-dir ------------------------------------------------------

def test_stale_environment_entries_are_skipped(tmp_path, monkeypatch, capsys):
    (tmp_path / "real").mkdir()
    monkeypatch.setenv("SDCLI_LORA_DIR", os.pathsep.join([str(tmp_path / "gone"), str(tmp_path / "real")]))
    assert folders(None, "SDCLI_LORA_DIR", "--lora-dir") == [tmp_path / "real"]
    assert "gone' (from $SDCLI_LORA_DIR) is not a folder: skipped" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert refusal(lambda: folders(["nowhere"], "SDCLI_LORA_DIR", "--lora-dir")) == \
        "'nowhere' (from --lora-dir) is not a folder: give an existing folder"
    assert "(from --embeddings-dir)" in refusal(lambda: folders(["nowhere"], "SDCLI_EMBEDDINGS_DIR",
                                                                 "--embeddings-dir"))
