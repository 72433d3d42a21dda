"""The CLIP tokenizer built from openai-clip's BPE file, against OpenAI's own reference tokenizer."""

import importlib.util
import json

import pytest

from sdcli.models.text import BOS, EOS, clip_bpe_file, clip_tokenizer, clip_vocab, folder_tokenizer

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A Photograph Of An ASTRONAUT, riding a horse!!",
    "masterpiece, (best quality:1.2), [ugly], 1girl, 4k, f/1.8, café, naïve, don't, it's",
    "Über-realistic 🐱 cat — « guillemets » & ampersands; semicolons: colons? 12345678",
    # 80+ tokens: nothing may be dropped by the tokenizer itself
    " ".join(["a large red circle on a blue background in the top left,"] * 9),
]


@pytest.fixture(scope="module")
def reference():
    """openai-clip's SimpleTokenizer (its package __init__ needs torchvision, so load the module by path)."""
    path = clip_bpe_file().parent / "simple_tokenizer.py"
    spec = importlib.util.spec_from_file_location("openai_clip_simple_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(clip_bpe_file()))


def test_known_ids():
    assert clip_tokenizer()("a photograph of an astronaut riding a horse").input_ids == [
        49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_match_openai_reference(reference, prompt):
    ids = clip_tokenizer()(prompt).input_ids
    assert ids == [BOS, *reference.encode(prompt), EOS]


def test_long_prompt_is_not_cut_by_the_tokenizer(reference):
    ids = clip_tokenizer()(PROMPTS[-1]).input_ids
    assert len(ids) > 77


def test_vocabulary_is_the_full_clip_vocabulary():
    vocab, merges = clip_vocab()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    assert clip_tokenizer() is clip_tokenizer()  # built once per process


def test_padding_tokens_sd1_and_sd2():
    sd1 = clip_tokenizer()("a cat", padding="max_length", max_length=77).input_ids
    sd2 = clip_tokenizer("!")("a cat", padding="max_length", max_length=77).input_ids
    assert sd1[:4] == sd2[:4] == [BOS, 320, 2368, EOS]
    assert set(sd1[4:]) == {EOS} and set(sd2[4:]) == {0}


def test_folder_tokenizer_vocab_and_merges_files(tmp_path, reference):
    """Published diffusers folders ship vocab.json + merges.txt; transformers 5 writes tokenizer.json."""
    vocab, merges = clip_vocab()
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    saved = tmp_path / "saved"
    clip_tokenizer().save_pretrained(saved)
    for folder in (tmp_path, saved):
        tok = folder_tokenizer(folder)
        for prompt in PROMPTS:
            assert tok(prompt).input_ids == [BOS, *reference.encode(prompt), EOS]
