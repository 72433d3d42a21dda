"""A1111 prompt syntax, chunking and long-prompt encoding, against hand-worked expectations and the
transformers CLIPTextModel of the tiny models."""

import pytest
import torch

from sdcli.errors import SdcliError
from sdcli.loading import load_model
from sdcli.models.text import BOS, EOS, clip_tokenizer
from sdcli.prompting import encode_prompts, parse_prompt_attention, tokenize_prompt

R, S = 1.1, 1 / 1.1  # one ( ) and one [ ]
COMMA = 267  # ",</w>"
CAT, DOG = 2368, 1929  # "cat</w>", "dog</w>": one token each


# Worked out by hand from A1111's rules: a closing bracket scales every fragment since its opening one,
# unclosed brackets reach to the end, and neighbours of equal weight merge.
PARSE_CASES = [
    ("", [("", 1.0)]),
    ("a cat", [("a cat", 1.0)]),
    ("a (b) c", [("a ", 1.0), ("b", R), (" c", 1.0)]),
    ("((b))", [("b", R * R)]),
    ("[b]", [("b", S)]),
    ("[[b]]", [("b", S * S)]),
    ("(b:1.5)", [("b", 1.5)]),
    ("(b:1.5) [c]", [("b", 1.5), (" ", 1.0), ("c", S)]),
    ("((a:1.2) b)", [("a", 1.2 * R), (" b", R)]),
    ("(a [b] c)", [("a ", R), ("b", 1.0), (" c", R)]),
    ("(a:0.5)", [("a", 0.5)]),
    ("(a: -0.25 )", [("a", -0.25)]),
    ("(a:.5) (b:2)", [("a", 0.5), (" ", 1.0), ("b", 2.0)]),
    (r"\(x\)", [("(x)", 1.0)]),
    (r"a \[b\] \\ c", [("a [b] \\ c", 1.0)]),
    (r"(\(x\))", [("(x)", R)]),
    ("a\\b", [("ab", 1.0)]),  # a backslash before an ordinary character is dropped
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a break b", [("a break b", 1.0)]),  # only uppercase
    ("aBREAK b", [("aBREAK b", 1.0)]),  # only as its own word
    ("BREAK a", [("", 1.0), ("BREAK", -1.0), ("a", 1.0)]),
    ("(a BREAK b)", [("a", R), ("BREAK", -R), ("b", R)]),  # scaled, so no longer a BREAK (A1111 does so too)
    ("unclosed (a", [("unclosed ", 1.0), ("a", R)]),
    ("[unbalanced", [("unbalanced", S)]),
    ("((a)", [("a", R * R)]),
    ("a (b [c", [("a ", 1.0), ("b ", R), ("c", R * S)]),
    ("a) b]", [("a) b]", 1.0)]),  # closers with nothing open are text
    ("a:1.5) b", [("a:1.5) b", 1.0)]),
    ("a:b", [("a:b", 1.0)]),
    ("(a)(b)", [("ab", R)]),  # equal neighbours merge
    ("(a) (b)", [("a", R), (" ", 1.0), ("b", R)]),
    ("(a:1.1)(b)", [("ab", R)]),
]


@pytest.mark.parametrize("text, expected", PARSE_CASES)
def test_parse_prompt_attention(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_parse_rejects_a_malformed_weight():
    with pytest.raises(SdcliError, match="1.2.3"):
        parse_prompt_attention("(a:1.2.3)")


# --- tokenize ---------------------------------------------------------------------------------------------

@pytest.fixture(params=["sd1", "sd2"])
def tokenizer(request):
    return clip_tokenizer("!" if request.param == "sd2" else "<|endoftext|>")


def inner(chunks):
    """The prompt tokens of every chunk, concatenated (between BOS and the first EOS)."""
    out = []
    for row in chunks.ids.tolist():
        assert row[0] == BOS
        out += row[1:row.index(EOS)]
    return out


@pytest.mark.parametrize("prompt", [
    "a photograph of an astronaut riding a horse, 4k, masterpiece",
    "",
    " ".join(["cat"] * 75),
])
def test_short_prompt_is_the_plain_tokenization(tokenizer, prompt):
    chunks = tokenize_prompt(tokenizer, prompt)
    expected = tokenizer(prompt, padding="max_length", max_length=77).input_ids
    assert chunks.ids.dtype == torch.long and chunks.weights.dtype == torch.float32
    assert chunks.ids.tolist() == [expected]
    assert chunks.weights.tolist() == [[1.0] * 77]


def test_long_prompt_is_split_and_nothing_is_lost(tokenizer):
    prompt = " ".join(["cat dog"] * 50)  # 100 tokens, no comma
    chunks = tokenize_prompt(tokenizer, prompt)
    assert chunks.ids.shape == (2, 77)
    assert inner(chunks) == tokenizer(prompt, add_special_tokens=False).input_ids
    assert chunks.ids[1, 26:].tolist() == [EOS] + [tokenizer.pad_token_id] * 50


def test_break_closes_the_chunk(tokenizer):
    def plain(text):
        return tokenizer(text, padding="max_length", max_length=77).input_ids

    assert tokenize_prompt(tokenizer, "a cat BREAK a dog").ids.tolist() == [plain("a cat"), plain("a dog")]
    assert tokenize_prompt(tokenizer, "BREAK a dog").ids.tolist() == [plain(""), plain("a dog")]
    assert tokenize_prompt(tokenizer, "a dog BREAK").ids.tolist() == [plain("a dog")]
    assert tokenize_prompt(tokenizer, "a BREAK b BREAK c").ids.shape == (3, 77)


def test_comma_backtrack(tokenizer):
    prompt = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)
    assert tokenizer(prompt, add_special_tokens=False).input_ids == [CAT] * 70 + [COMMA] + [DOG] * 10
    # the chunk fills at 75 with its last comma 5 tokens back: the 4 dogs after it move on
    chunks = tokenize_prompt(tokenizer, prompt)
    assert chunks.ids[0, :73].tolist() == [BOS] + [CAT] * 70 + [COMMA, EOS]
    assert chunks.ids[1, :12].tolist() == [BOS] + [DOG] * 10 + [EOS]
    assert inner(chunks) == [CAT] * 70 + [COMMA] + [DOG] * 10
    # without backtracking the split is at token 75
    chunks = tokenize_prompt(tokenizer, prompt, comma_backtrack=0)
    assert chunks.ids[0].tolist() == [BOS] + [CAT] * 70 + [COMMA] + [DOG] * 4 + [EOS]
    assert chunks.ids[1, :8].tolist() == [BOS] + [DOG] * 6 + [EOS]
    # a comma 25 tokens back is beyond the default 20
    far = " ".join(["cat"] * 50) + ", " + " ".join(["dog"] * 30)
    assert tokenize_prompt(tokenizer, far).ids[0].tolist() == [BOS] + [CAT] * 50 + [COMMA] + [DOG] * 24 + [EOS]


def test_emphasis_weights_land_on_their_tokens(tokenizer):
    chunks = tokenize_prompt(tokenizer, "a (photorealistic:1.3) [cat] on a ((mat))")
    ids = tokenizer("a photorealistic cat on a mat", add_special_tokens=False).input_ids
    word = tokenizer("photorealistic", add_special_tokens=False).input_ids
    assert len(word) > 1  # a word of several tokens: every one of them gets the weight
    n = len(ids)
    assert chunks.ids[0, 1:n + 1].tolist() == ids
    expected = [1.0, 1.0] + [1.3] * len(word) + [S, 1.0, 1.0, R * R] + [1.0] * (76 - n)
    assert chunks.weights[0].tolist() == pytest.approx(expected)


# --- encode -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pair(request, tiny):
    """(our model, the reference transformers CLIPTextModel)."""
    ref = tiny(request.param)
    return load_model(ref.folder), ref.text_encoder


def reference(ref, ids, clip_skip=1):
    """The conditioning of one chunk of ids from transformers: [77, width]."""
    with torch.no_grad():
        out = ref(torch.tensor([ids]), output_hidden_states=True)
    if clip_skip == 1:
        return out.last_hidden_state[0]
    return ref.final_layer_norm(out.hidden_states[-clip_skip])[0]


def close(a, b, tol=1e-5):
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= tol, f"max abs error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_short_prompt_matches_the_reference(pair, clip_skip):
    model, ref = pair
    prompt = "a photograph of an astronaut riding a horse"
    out = encode_prompts(model, [prompt], clip_skip=clip_skip)
    ids = model.tokenizer(prompt, padding="max_length", max_length=77).input_ids
    assert out.dtype == torch.float32 and out.device.type == "cpu" and not out.requires_grad
    assert out.shape == (1, 77, ref.config.hidden_size)
    close(out[0], reference(ref, ids, clip_skip))


def test_two_chunk_prompt_is_the_concatenation_of_its_chunks(pair):
    model, ref = pair
    tok = model.tokenizer
    prompt = " ".join(["cat dog"] * 50)
    ids = tok(prompt, add_special_tokens=False).input_ids
    first = [BOS, *ids[:75], EOS]
    second = [BOS, *ids[75:], EOS] + [tok.pad_token_id] * 50
    out = encode_prompts(model, [prompt])
    assert out.shape == (1, 154, ref.config.hidden_size)
    close(out[0], torch.cat([reference(ref, first), reference(ref, second)]))


def test_emphasis_scales_and_restores_the_mean(pair):
    model, ref = pair
    prompt = "a (red:1.5) [cat] on a mat"
    ids = model.tokenizer("a red cat on a mat", padding="max_length", max_length=77).input_ids
    weights = torch.tensor([1.0, 1.0, 1.5, S] + [1.0] * 73)
    z = reference(ref, ids)
    weighted = z * weights[:, None]
    expected = weighted * (z.mean() / weighted.mean())
    out = encode_prompts(model, [prompt])
    close(out[0], expected)
    assert (out[0] - z).abs().max() > 1e-3  # the weights did something
    # per prompt, not per batch: a batch mate changes nothing
    close(encode_prompts(model, ["(a dog:0.3), BREAK [[[x]]]", prompt])[1, :77], out[0], tol=1e-6)


def test_shorter_prompts_are_padded_with_the_empty_prompt(pair):
    model, ref = pair
    long = " ".join(["cat dog"] * 50)
    calls = []
    hook = model.text_encoder.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape))
    try:
        out = encode_prompts(model, ["short", long])
    finally:
        hook.remove()
    assert calls == [(4, 77)]  # one batched call: 1 + 2 chunks and the empty prompt
    assert out.shape == (2, 154, ref.config.hidden_size)
    empty = model.tokenizer("", padding="max_length", max_length=77).input_ids
    close(out[0, 77:], reference(ref, empty))
    close(out[0, :77], encode_prompts(model, ["short"])[0], tol=1e-6)
    close(out[1], encode_prompts(model, [long])[0], tol=1e-6)
