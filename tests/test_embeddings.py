"""Textual-inversion embeddings against diffusers' `load_textual_inversion` on the tiny models: every file format
A1111 reads, emphasis on the vectors, their place in the 75-token chunks (hand-computed), ComfyUI's
`embedding:NAME`, and the files that must be refused (a pickle that runs code, a wrong width, a truncated file)."""

import hashlib
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pickles import write_malicious_pickle
from sdcli.engine import Engine, Sampling
from sdcli.errors import ModelLoadError, SdcliError
from sdcli.loading import load_model
from sdcli.models.text import BOS, EOS, clip_tokenizer
from sdcli.networks.embeddings import Embeddings
from sdcli.prompting import PLACEHOLDER, encode_prompts, tokenize_prompt
from sdcli.tasks.txt2img import txt2img

CAT, DOG, COMMA = 2368, 1929, 267  # "cat</w>", "dog</w>", ",</w>"
WIDTH = {"sd1": 128, "sd2": 64}  # the tiny models' text encoders


def vectors(n: int, width: int, seed: int = 0) -> torch.Tensor:
    """Random vectors of about the size of the tiny models' token embeddings."""
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.05


# How each format is written, as its tool writes it: (file name, vectors -> what is saved)
FORMATS = {
    "one-tensor": ("onevec.safetensors", lambda v: {"vec": v[0]}),  # a 1-D tensor is one vector
    "kohya": ("kohyaemb.safetensors", lambda v: {"emb_params": v}),
    "diffusers-safetensors": ("learnedst.safetensors", lambda v: {"<learned>": v}),
    "diffusers-bin": ("learnedbin.bin", lambda v: {"<learned>": v}),
    "a1111": ("trainedemb.pt", lambda v: {  # what A1111's Embedding.save writes
        "string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "trainedemb", "step": 1000,
        "sd_checkpoint": None, "sd_checkpoint_name": None}),
}
COUNT = {"one-tensor": 1, "kohya": 3, "diffusers-safetensors": 2, "diffusers-bin": 2, "a1111": 3}


def write(folder, fmt: str, width: int, seed: int = 0):
    """-> (path, vectors [n, width])."""
    name, content = FORMATS[fmt]
    vec = vectors(COUNT[fmt], width, seed)
    path = folder / name
    if path.suffix == ".safetensors":
        save_file({k: t.contiguous() for k, t in content(vec).items()}, str(path))
    else:
        torch.save(content(vec), path)
    return path, vec


@pytest.fixture(scope="module")
def models(tiny):
    """kind -> our model (from the single file, so SD 2.x's penultimate layer is sdcli's own clip skip)."""
    return {kind: load_model(tiny(kind).single_file) for kind in ("sd1", "sd2")}


def diffusers_pipe(tm, files: list):
    """A fresh diffusers pipeline with `files` [(path, token)] loaded by load_textual_inversion."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tm.folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for path, token in files:
        pipe.load_textual_inversion(str(path), token=token)
    return pipe


def diffusers_encode(pipe, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(prompt, "cpu", 1, False)[0][0]  # [77, width]


def close(a, b, tol=1e-4):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= tol, f"max abs error {err:.2e} > {tol:.0e}"


def one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text and text, text
    return text


# --- parity with diffusers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd1", "sd2"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_conditioning_matches_diffusers(tmp_path, tiny, models, kind, fmt):
    model = models[kind]
    path, vec = write(tmp_path, fmt, WIDTH[kind])
    name = path.stem
    lib = Embeddings([tmp_path])
    ours = encode_prompts(model, [f"a photo of {name} on a mat"], embeddings=lib)[0]
    ref = diffusers_encode(diffusers_pipe(tiny(kind), [(path, "<tok>")]), "a photo of <tok> on a mat")
    close(ours, ref)
    # the vectors are what made it so: with the placeholders' own token embeddings it is something else
    chunks = tokenize_prompt(model.tokenizer, f"a photo of {name} on a mat", embeddings=lib, width=WIDTH[kind])
    assert chunks.ids[0, 4:4 + len(vec)].tolist() == [PLACEHOLDER] * len(vec)
    close(chunks.fixes[0][2], vec, tol=0)
    with torch.no_grad():
        assert (model.text_encoder(chunks.ids)[0] - ours).abs().max() > 1e-3


def test_emphasis_applies_to_the_vectors(tmp_path, tiny, models):
    model = models["sd1"]
    path, vec = write(tmp_path, "kohya", 128)
    out = encode_prompts(model, ["a photo of (kohyaemb:1.3) on a mat"], embeddings=Embeddings([tmp_path]))[0]
    z = diffusers_encode(diffusers_pipe(tiny("sd1"), [(path, "<tok>")]), "a photo of <tok> on a mat")
    weights = torch.ones(77)
    weights[4:7] = 1.3  # BOS, "a photo of", then the 3 vectors
    weighted = z * weights[:, None]
    close(out, weighted * (z.mean() / weighted.mean()))
    assert (out - z).abs().max() > 1e-3


@pytest.mark.slow
def test_prompt_and_negative_prompt_image_matches_diffusers(tmp_path, tiny):
    """A whole 64 px render through sdcli's engine against StableDiffusionPipeline (Euler, same seed)."""
    from diffusers import EulerDiscreteScheduler

    tm = tiny("sd1")
    pos, _ = write(tmp_path, "a1111", 128, seed=1)
    neg, _ = write(tmp_path, "kohya", 128, seed=2)
    engine = Engine(load_model(tm.single_file), torch.device("cpu"), embeddings=Embeddings([tmp_path]))
    ours = txt2img(engine, "a trainedemb astronaut riding a horse", Sampling(12, 7.0, "euler", "normal"), [42],
                   width=64, height=64, negative_prompt="blurry, kohyaemb")[0].numpy()
    pipe = diffusers_pipe(tm, [(pos, "<pos>"), (neg, "<neg>")])
    pipe.scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            num_train_timesteps=1000)
    ref = pipe("a <pos> astronaut riding a horse", negative_prompt="blurry, <neg>", num_inference_steps=12,
               guidance_scale=7.0, height=64, width=64, generator=torch.Generator().manual_seed(42),
               output_type="np").images[0] * 255
    plain = txt2img(engine, "a astronaut riding a horse", Sampling(12, 7.0, "euler", "normal"), [42],
                    width=64, height=64, negative_prompt="blurry,")[0].numpy()
    err = np.abs(ref - ours).max()
    assert err <= 2.0, f"max pixel error {err:.2f}/255"
    assert np.abs(plain.astype(float) - ours).max() > 4  # the embeddings change the image (by 11/255 here)


# --- chunks -----------------------------------------------------------------------------------------------

@pytest.fixture
def lib3(tmp_path):
    """A library of one 3-vector embedding, "kohyaemb", for the tiny SD 1.x text encoder."""
    _, vec = write(tmp_path, "kohya", 128)
    return Embeddings([tmp_path]), vec


def test_an_embedding_that_does_not_fit_starts_the_next_chunk(lib3):
    lib, vec = lib3
    tok = clip_tokenizer()
    fits = tokenize_prompt(tok, " ".join(["cat"] * 72) + " kohyaemb", embeddings=lib, width=128)
    assert fits.ids.tolist() == [[BOS] + [CAT] * 72 + [PLACEHOLDER] * 3 + [EOS]]
    assert [(r, at) for r, at, _ in fits.fixes] == [(0, 73)]

    moved = tokenize_prompt(tok, " ".join(["cat"] * 73) + " (kohyaemb:1.2) dog", embeddings=lib, width=128)
    assert moved.ids.tolist() == [[BOS] + [CAT] * 73 + [EOS] * 3,
                                  [BOS] + [PLACEHOLDER] * 3 + [DOG, EOS] + [EOS] * 71]
    assert [(r, at) for r, at, _ in moved.fixes] == [(1, 1)]
    assert moved.weights[1, :6].tolist() == pytest.approx([1.0, 1.2, 1.2, 1.2, 1.0, 1.0])
    assert torch.equal(moved.fixes[0][2], vec)


def test_second_chunk_matches_diffusers(tiny, models, lib3, tmp_path):
    lib, _ = lib3
    out = encode_prompts(models["sd1"], [" ".join(["cat"] * 73) + " kohyaemb"], embeddings=lib)[0]
    pipe = diffusers_pipe(tiny("sd1"), [(tmp_path / "kohyaemb.safetensors", "<tok>")])
    close(out[:77], diffusers_encode(pipe, " ".join(["cat"] * 73)))
    close(out[77:], diffusers_encode(pipe, "<tok>"))


def test_comma_backtracking_carries_the_vectors_along(lib3):
    """A1111 moves the tokens after the comma but leaves the embedding's vectors behind (in the padding of the
    chunk they left, the moved placeholders keeping token 0's embedding): sdcli moves them with their tokens."""
    lib, _ = lib3
    prompt = " ".join(["cat"] * 70) + ", kohyaemb dog dog"
    chunks = tokenize_prompt(clip_tokenizer(), prompt, embeddings=lib, width=128)
    # 70 cats, the comma at index 70, vectors at 71-73, a dog fills the chunk; the next dog backtracks to the comma
    assert chunks.ids[0].tolist() == [BOS] + [CAT] * 70 + [COMMA, EOS] + [EOS] * 4
    assert chunks.ids[1, :7].tolist() == [BOS] + [PLACEHOLDER] * 3 + [DOG, DOG, EOS]
    assert [(r, at) for r, at, _ in chunks.fixes] == [(1, 1)]


def test_without_embeddings_nothing_changes(lib3):
    lib, _ = lib3
    tok = clip_tokenizer()
    for prompt in ["a (cat:1.3), [dog] BREAK x", " ".join(["cat"] * 70) + ", " + "dog " * 10, "", "kohyaemb2"]:
        plain, other = tokenize_prompt(tok, prompt), tokenize_prompt(tok, prompt, embeddings=lib, width=128)
        assert torch.equal(plain.ids, other.ids) and torch.equal(plain.weights, other.weights)
        assert other.fixes == () == plain.fixes


# --- names ----------------------------------------------------------------------------------------------------

def test_names_are_words_matched_ignoring_case(lib3):
    lib, _ = lib3
    tok = clip_tokenizer()

    def n_fixes(prompt):
        return len(tokenize_prompt(tok, prompt, embeddings=lib, width=128).fixes)

    assert n_fixes("KohyaEmb, kohyaemb,(kohyaemb)") == 3  # A1111's tokenizer lowercases prompt and names
    assert n_fixes("kohyaemb2 kohyaembx xkohyaemb kohya_emb my_kohyaemb") == 0


def test_comfyui_spelling(lib3):
    lib, _ = lib3
    tok = clip_tokenizer()
    plain = tokenize_prompt(tok, "a kohyaemb, (kohyaemb:1.3) cat", embeddings=lib, width=128)
    for prompt in ["a embedding:kohyaemb, (embedding:kohyaemb.safetensors:1.3) cat",
                   "a embedding:KOHYAEMB, (kohyaemb:1.3) cat"]:
        comfy = tokenize_prompt(tok, prompt, embeddings=lib, width=128)
        assert torch.equal(comfy.ids, plain.ids) and torch.equal(comfy.weights, plain.weights)
    with pytest.raises(SdcliError) as e:
        tokenize_prompt(tok, "a embedding:missing cat", embeddings=lib, width=128)
    assert "embedding:missing" in one_line(e)


def test_used_names_and_hashes(tmp_path):
    a, _ = write(tmp_path, "kohya", 128)
    b, _ = write(tmp_path, "a1111", 128)
    lib = Embeddings([tmp_path])
    assert lib.used("x, trainedemb BREAK (kohyaemb:1.2), embedding:trainedemb.pt, KOHYAEMB") == \
        ["trainedemb", "kohyaemb"]
    assert lib.used("nothing here") == []
    for path in (a, b):  # A1111's "TI hashes": sha256 of the whole file, 12 hex digits
        assert lib.short_hash(path.stem) == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        assert lib.path(path.stem) == lib.find(path.name) == path


def test_listing(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    save_file({"emb_params": vectors(1, 128)}, str(tmp_path / "sub" / "deeper" / "nested.safetensors"))
    torch.save({"x": vectors(2, 128)}, tmp_path / "twice.pt")
    save_file({"x": vectors(1, 128)}, str(tmp_path / "twice.safetensors"))
    (tmp_path / "preview.png").write_bytes(b"\x89PNG")
    (tmp_path / "notes.txt").write_text("kohyaemb")
    os.symlink(tmp_path, tmp_path / "sub" / "loop")  # a folder that holds itself: listed once, no hang
    lib = Embeddings([tmp_path])
    assert lib.names() == ["nested", "twice"]
    assert lib.path("twice").suffix == ".safetensors"  # the safetensors file of a stem given twice
    assert lib.vectors("twice", 128).shape == (1, 128) and lib.vectors("twice.pt", 128).shape == (2, 128)
    with pytest.raises(SdcliError) as e:
        Embeddings([tmp_path / "nope"]).names()
    assert "nope" in one_line(e)


def test_old_a1111_parameter_dict(tmp_path):
    """A1111's files from torch 1.11 pickle a ParameterDict (A1111 reads its _parameters)."""
    vec = vectors(2, 128)
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())}), "name": "old"},
               tmp_path / "old.pt")
    assert torch.equal(Embeddings([tmp_path]).vectors("old", 128), vec)


# --- refusals ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["evil.pt", "evil.bin", "evil.safetensors"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_a_pickle_that_runs_code_is_refused(tmp_path, name, protocol):
    marker = tmp_path / "marker"
    (tmp_path / "emb").mkdir()
    write_malicious_pickle(tmp_path / "emb" / name, marker, protocol=protocol)
    with pytest.raises(ModelLoadError) as e:
        tokenize_prompt(clip_tokenizer(), "a evil cat", embeddings=Embeddings([tmp_path / "emb"]), width=128)
    assert name in one_line(e)
    assert not marker.exists()


def test_a_wrong_width_names_both(tmp_path, models):
    save_file({"emb_params": vectors(2, 64)}, str(tmp_path / "sd2emb.safetensors"))
    with pytest.raises(ModelLoadError) as e:
        encode_prompts(models["sd1"], ["a sd2emb cat"], embeddings=Embeddings([tmp_path]))
    text = one_line(e)
    assert "sd2emb.safetensors holds 64-wide vectors" in text and "128 wide" in text


def test_a_truncated_safetensors_is_refused(tmp_path):
    path, _ = write(tmp_path, "kohya", 128)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 100])
    with pytest.raises(ModelLoadError) as e:
        Embeddings([tmp_path]).vectors("kohyaemb", 128)
    assert "kohyaemb.safetensors" in one_line(e)


@pytest.mark.parametrize("content, needle", [
    ({"x": torch.zeros(76, 128)}, "shape [76, 128]"),  # more than one chunk holds
    ({"string_to_param": {"*": torch.zeros(1, 128), "+": torch.zeros(1, 128)}}, "2 terms"),
    ({"a": torch.zeros(1, 128), "b": torch.zeros(1, 128)}, "2 tensors"),
    ({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, "SDXL"),
    ({"x": torch.zeros(1, 128, dtype=torch.int64)}, "torch.int64"),
    ({"x": torch.full((1, 128), float("nan"))}, "not finite"),
    ({"x": torch.zeros(2, 2, 128)}, "shape [2, 2, 128]"),
    ({"name": "no tensors"}, "neither"),
    (torch.zeros(1, 128), "does not hold a dict"),
    (None, "empty"),
])
def test_what_is_not_an_embedding_is_refused(tmp_path, content, needle):
    path = tmp_path / "bad.pt"
    if content is None:
        path.write_bytes(b"")
    else:
        torch.save(content, path)
    with pytest.raises(ModelLoadError) as e:
        Embeddings([tmp_path]).vectors("bad", 128)
    text = one_line(e)
    assert needle in text and "bad.pt" in text, text


def test_a_large_file_is_not_read(tmp_path, monkeypatch):
    import sdcli.networks.embeddings as embeddings

    write(tmp_path, "a1111", 128)
    monkeypatch.setattr(embeddings, "MAX_FILE_BYTES", 1000)
    with pytest.raises(ModelLoadError) as e:
        Embeddings([tmp_path]).vectors("trainedemb", 128)
    assert "bytes, over" in one_line(e)


# --- through the CLI: metadata, and mistakes found before the model loads ----------------------------------

def test_cli_records_ti_hashes_and_reproduces_from_image(tmp_path, tiny, run_cli):
    from PIL import Image

    from sdcli.metadata import read_parameters_text

    folder = tmp_path / "emb"
    folder.mkdir()
    path, _ = write(folder, "a1111", WIDTH["sd1"])
    args = ["-m", tiny("sd1").folder, "--embeddings-dir", folder, "--steps", "4", "-W", "64", "-H", "64",
            "--seed", "3", "--quiet"]
    code, _, err = run_cli("generate", "a photo of trainedemb", "-n", "embedding:trainedemb", *args,
                           "-o", tmp_path / "a.png")
    assert code == 0, err
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert f"TI hashes: \"trainedemb: {digest}\"" in read_parameters_text(tmp_path / "a.png")
    code, _, err = run_cli("generate", "--from-image", tmp_path / "a.png", "--embeddings-dir", folder,
                           "-o", tmp_path / "b.png", "--quiet")
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


def test_cli_refuses_a_wrong_width_before_writing(tmp_path, tiny, sdcli):
    from hostile import assert_refused, files

    folder = tmp_path / "emb"
    folder.mkdir()
    write(folder, "kohya", WIDTH["sd2"])  # 64-wide vectors; the sd1 model's text encoder is 128 wide
    lines = tmp_path / "prompts.txt"
    lines.write_text("a cat\na kohyaemb cat\n")  # the second line's embedding: found before the first image
    before = files(tmp_path)
    assert_refused(sdcli("generate", "--from-file", lines, "-m", tiny("sd1").folder, "--embeddings-dir", folder,
                             "-o", f"{tmp_path}/out/", "-W", "64", "-H", "64"),
                   "kohyaemb.safetensors holds 64-wide vectors", "128 wide", folder=tmp_path, before=before)
    assert_refused(sdcli("generate", "a", "--embeddings-dir", tmp_path / "none", "-m", tiny("sd1").folder),
                   "is not a folder")
