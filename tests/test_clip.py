"""sdcli's own CLIP text transformer and tokenizer (models.clip, models.tokenizer) against transformers'
CLIPTextModel and CLIPTokenizer, the independent references: the same state-dict keys, the same hidden states
at every clip skip, the same token ids for any text, and folders read as transformers reads them."""

import functools
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sdcli.architecture import TextEncoderConfig
from sdcli.models.text import TextEncoder, clip_tokenizer, folder_tokenizer
from tiny import reference_tokenizer

torch.set_num_threads(2)


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def encoders(request):
    """(ours, transformers' CLIPTextModel) with the same random weights, 3 layers, 64 wide."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = TextEncoderConfig(width=64, layers=3, heads=4, mlp_width=128, activation=request.param)
    ref = CLIPTextModel(CLIPTextConfig(vocab_size=cfg.vocab_size, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=3, num_attention_heads=4, hidden_act=request.param,
                                       max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                                       pad_token_id=1)).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    ours = TextEncoder(cfg).eval()
    ours.transformer.text_model.load_state_dict(ref.state_dict(), strict=True)  # the same names, every one
    return ours, ref, cfg


def ids(*rows):
    return torch.tensor([[49406, *r, 49407] + [49407] * (77 - 2 - len(r)) for r in rows])


def test_hidden_states_match_at_every_skip(encoders):
    ours, ref, cfg = encoders
    batch = ids([320, 2368, 525], [1125] * 40)
    with torch.no_grad():
        out = ref(batch, output_hidden_states=True)
        for clip_skip in (1, 2, 3):
            want = out.last_hidden_state if clip_skip == 1 else ref.final_layer_norm(out.hidden_states[-clip_skip])
            torch.testing.assert_close(ours(batch, clip_skip), want, atol=1e-5, rtol=1e-5)


def test_pooled_and_raw_penultimate_layer(encoders):
    """SDXL's way: the penultimate layer without the final norm, and the final layer's EOS vector projected."""
    ours, ref, cfg = encoders
    import dataclasses

    xl = TextEncoder(dataclasses.replace(cfg, skip_last_layers=1, final_norm=False, projection_dim=32)).eval()
    xl.transformer.text_model.load_state_dict(ref.state_dict())
    xl.text_projection = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    batch = ids([320, 2368], [525] * 10)
    with torch.no_grad():
        hidden, pooled = xl(batch, 1, pooled=True)
        out = ref(batch, output_hidden_states=True)
    torch.testing.assert_close(hidden, out.hidden_states[-2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, out.pooler_output @ xl.text_projection, atol=1e-5, rtol=1e-5)


def test_the_text_model_trains(encoders):
    ours, _, _ = encoders
    batch = ids([320, 2368])
    ours.train()
    try:
        ours(batch).square().mean().backward()
    finally:
        ours.eval()
    grads = [p.grad for p in ours.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    ours.zero_grad(set_to_none=True)


HARD = ["a photo of a cat", "A Photo OF   a\tcat\n", "", " ", "it's  they're we've i'm you'll he'd",
        "(masterpiece:1.2), [dog], {bird}!!", "naïve café résumé", "Ｆｕｌｌｗｉｄｔｈ", "東京タワー 夜景", "🙂🐱‍👤 emoji",
        "<|startoftext|>a<|endoftext|>b", "x²³ Ⅻ ٣٤ 12345", "a\u0301e\u0300", "hello!world! !", "\u00a0nbsp\u2003em",
        "camelCaseWord snake_case_word kebab-case", "a" * 300, "1.5e-3 99% $100 #tag @user"]


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_tokens_match_transformers(pad):
    ours, ref = clip_tokenizer(pad), reference_tokenizer(pad)
    assert len(ours) == len(ref) == 49408
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == \
        (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, ref.unk_token_id)
    assert ours(HARD, add_special_tokens=False)["input_ids"] == ref(HARD, add_special_tokens=False)["input_ids"]
    assert ours(HARD)["input_ids"] == ref(HARD)["input_ids"]
    padded = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ours(HARD, **padded).input_ids, ref(HARD, **padded).input_ids)
    for token in (",</w>", "cat</w>", "not-a-token"):
        assert ours.convert_tokens_to_ids(token) == ref.convert_tokens_to_ids(token)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_text_tokenizes_as_transformers(text):
    assert clip_tokenizer()(text, add_special_tokens=False)["input_ids"] == \
        _reference()(text, add_special_tokens=False)["input_ids"]


_reference = functools.cache(reference_tokenizer)  # built once for the 300 examples


@pytest.mark.parametrize("files", ["vocab", "tokenizer.json", "both"])
def test_a_saved_folder_reads_back_as_transformers_reads_it(tmp_path, files):
    from transformers import CLIPTokenizer

    folder = tmp_path / "tokenizer"
    clip_tokenizer("!").save_pretrained(folder)
    if files == "vocab":
        (folder / "tokenizer.json").unlink()
    elif files == "tokenizer.json":
        (folder / "vocab.json").unlink()
        (folder / "merges.txt").unlink()
    ours, ref = folder_tokenizer(folder), CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    padded = dict(padding="max_length", max_length=77, truncation=True)
    assert ours(HARD, **padded)["input_ids"] == ref(HARD, **padded)["input_ids"]
    assert ours.pad_token_id == ref.pad_token_id == 0


def test_an_old_folder_with_a_special_tokens_map(tmp_path):
    folder = tmp_path / "tokenizer"
    clip_tokenizer().save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!", "lstrip": False}}))
    assert folder_tokenizer(folder).pad_token_id == 0


@pytest.mark.parametrize("damage, words", [
    (lambda f: (f / "vocab.json").write_text("[1, 2]"), "not a {token: id} table"),
    (lambda f: (f / "vocab.json").write_text("{bad json"), "JSONDecodeError"),
    (lambda f: (f / "merges.txt").write_text("#version: 0.2\na b c\n"), "TypeError"),
    (lambda f: (f / "merges.txt").write_text("#version: 0.2\nzzz yyy\n"), "out of vocabulary"),
    (lambda f: (f / "tokenizer_config.json").write_text('{"pad_token": 5}'), "not text"),
])
def test_a_damaged_folder_is_one_error(tmp_path, damage, words):
    from sdcli.errors import ModelLoadError

    folder = tmp_path / "tokenizer"
    clip_tokenizer().save_pretrained(folder)
    (folder / "tokenizer.json").unlink()
    damage(folder)
    with pytest.raises(ModelLoadError, match="cannot be read as a CLIP tokenizer") as e:
        folder_tokenizer(folder)
    assert words in str(e.value)


def test_generate_imports_neither_transformers_nor_diffusers(tiny, tmp_path):
    """Start-up: transformers costs 3-4 s to import; a render needs none of it."""
    import subprocess
    import sys

    code = ("import sys; from sdcli.cli import main; sys.argv = ['sdcli', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'diffusers')]\n"
            "assert not bad, bad[:5]")
    done = subprocess.run([sys.executable, "-c", code, "generate", "a cat", "-m", str(tiny("sd1").folder),
                           "--steps", "2", "-W", "64", "-H", "64", "-o", str(tmp_path / "a.png"), "--quiet"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "a.png").is_file()


def test_a_new_text_encoder_starts_as_transformers_initialises_clip():
    """train-unet's new text encoder: the spread of each weight as transformers' CLIPTextModel draws it."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = TextEncoderConfig(width=256, layers=4, heads=4, mlp_width=512)
    torch.manual_seed(0)
    ours = TextEncoder(cfg).transformer.text_model.state_dict()
    ref = CLIPTextModel(CLIPTextConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                       num_attention_heads=4)).state_dict()
    assert set(ours) == set(ref)
    for name, t in ours.items():
        assert t.mean().item() == pytest.approx(ref[name].mean().item(), abs=0.01), name
        assert t.std().item() == pytest.approx(ref[name].std().item(), rel=0.1, abs=1e-6), name
