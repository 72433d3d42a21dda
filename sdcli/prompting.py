"""Prompts as AUTOMATIC1111 reads them: emphasis syntax, BREAK, and prompts longer than CLIP's 75 tokens.

A prompt is parsed into (text, weight) fragments, tokenized into chunks of 75 tokens (each framed by BOS/EOS
and padded to 77), every chunk is encoded by the text encoder on its own, its hidden states are scaled by the
token weights, and the chunks are concatenated along the sequence axis. This mirrors A1111's
`prompt_parser.parse_prompt_attention` and `sd_hijack_clip` with the "Original" emphasis mode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sdcli.errors import SdcliError, shown

if TYPE_CHECKING:  # torch is imported where prompts are tokenized: checking their syntax needs none
    import torch

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK_WEIGHT = -1.0  # marks a BREAK fragment; only ("BREAK", -1) exactly is one (see parse_prompt_attention)

# One syntax element per match, tried in this order. A backslash before anything but ( ) [ ] \ is dropped,
# and a ':' that does not start a "(text:weight)" close is plain text, as in A1111.
_ATTENTION = re.compile(
    r"""
    \\(?P<escaped>[()\[\]\\])       # \( \) \[ \] \\ : the character itself
    | (?P<backslash>\\)             # any other backslash
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+ | :)
    """,
    re.X,
)
_BREAK = re.compile(r"\bBREAK\b")  # and the whitespace around it, stripped (a regex doing that is quadratic)
MAX_WEIGHT = 100  # emphasis weights, nested or given, beyond which the text encoder's output is no longer finite
MAX_NESTING = 100  # brackets open at once: 1.1 ** 100 is far past MAX_WEIGHT, and each fragment is multiplied
# once per bracket around it, so the parse stays linear in the prompt


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """A1111's emphasis syntax: (word) x1.1, ((word)) x1.21, [word] /1.1, (word:1.3), escapes \\( \\) \\[ \\] \\\\,
    unbalanced brackets handled as A1111 does (unclosed ( / [ still apply their multiplier to the rest), adjacent
    equal weights merged, and BREAK (uppercase, as its own word) returned as ("BREAK", -1). Empty text -> [("", 1.0)].

    A BREAK inside brackets gets multiplied like any fragment and so stops being a BREAK (A1111 does the same).
    """
    res: list[list] = []  # [text, weight], mutable so that closing brackets can scale earlier entries
    rounds: list[int] = []  # index into res where each open "(" began
    squares: list[int] = []

    def multiply(start: int, multiplier: float) -> None:
        for item in res[start:]:
            item[1] *= multiplier

    for m in _ATTENTION.finditer(text):
        if m["escaped"] is not None:
            res.append([m["escaped"], 1.0])
        elif m["backslash"] is not None:
            continue
        elif m["open"] is not None:
            (rounds if m["open"] == "(" else squares).append(len(res))
            if len(rounds) + len(squares) > MAX_NESTING:
                raise SdcliError(f"the prompt's emphasis brackets nest more than {MAX_NESTING} deep (or stay open): "
                                 "close them, or write a literal bracket as \\( or \\[")
        elif m["weight"] is not None and rounds:
            try:
                weight = float(m["weight"])
            except ValueError:  # the pattern admits "1.2.3" and "."; A1111 fails here with a traceback
                raise SdcliError(f"bad emphasis weight {m['weight']!r} in the prompt: write e.g. (word:1.2)") from None
            multiply(rounds.pop(), weight)
        elif m["close"] == ")" and rounds:
            multiply(rounds.pop(), ROUND_MULTIPLIER)
        elif m["close"] == "]" and squares:
            multiply(squares.pop(), SQUARE_MULTIPLIER)
        else:  # text, a lone ':', or a closing bracket / weight with nothing open: literal text
            parts = _BREAK.split(m[0])
            for i, part in enumerate(parts):
                if i:
                    res.append(["BREAK", BREAK_WEIGHT])
                part = part.lstrip() if i else part
                res.append([part.rstrip() if i < len(parts) - 1 else part, 1.0])

    # Unclosed brackets reach to the end; all "(" first, then all "[", as A1111 (float products depend on order).
    for start in rounds:
        multiply(start, ROUND_MULTIPLIER)
    for start in squares:
        multiply(start, SQUARE_MULTIPLIER)

    for fragment, weight in res:
        if not abs(weight) <= MAX_WEIGHT and (fragment, weight) != ("BREAK", BREAK_WEIGHT):
            raise SdcliError(f"the prompt gives {shown(fragment, 30)} a weight of {weight:g}: emphasis weights go up "
                             f"to {MAX_WEIGHT} (fewer brackets, or (word:1.5))")
    merged: list[list] = []
    for item in res:
        if merged and merged[-1][1] == item[1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, w) for t, w in merged] or [("", 1.0)]


@dataclass(frozen=True)
class PromptChunks:
    """A tokenized prompt: k chunks of BOS + 75 tokens + EOS/padding, with one emphasis weight per token."""

    ids: torch.Tensor  # [k, 77] long
    weights: torch.Tensor  # [k, 77] float32


def tokenize_prompt(tokenizer, prompt: str, chunk_length: int = 75, comma_backtrack: int = 20) -> PromptChunks:
    """Split a prompt into chunks of `chunk_length` tokens as A1111 does.

    BREAK closes the current chunk. When a chunk is full and its last comma is at most `comma_backtrack`
    tokens from its end, the tokens after that comma start the next chunk instead (0 turns this off).
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    comma = tokenizer.convert_tokens_to_ids(",</w>")  # a dict lookup; get_vocab() copies 49408 entries (~25 ms)
    if comma == tokenizer.unk_token_id:  # a vocabulary without it: no comma backtracking
        comma = None
    parsed = parse_prompt_attention(prompt)
    # verbose=False: prompts longer than model_max_length are the point here, not a mistake to warn about
    tokenized = tokenizer([t for t, _ in parsed], add_special_tokens=False, truncation=False, verbose=False)

    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1  # index in `tokens` of the current chunk's last comma

    def close_chunk() -> None:
        nonlocal tokens, weights, last_comma
        fill = chunk_length - len(tokens)
        chunks.append(([bos, *tokens, eos] + [pad] * fill, [1.0, *weights, 1.0] + [1.0] * fill))
        tokens, weights, last_comma = [], [], -1

    for ids, (text, weight) in zip(tokenized["input_ids"], parsed, strict=True):
        if text == "BREAK" and weight == BREAK_WEIGHT:
            close_chunk()
            continue
        for token in ids:
            if token == comma:
                last_comma = len(tokens)
            elif (comma_backtrack and len(tokens) == chunk_length and last_comma != -1
                  and len(tokens) - last_comma <= comma_backtrack):
                moved, moved_weights = tokens[last_comma + 1:], weights[last_comma + 1:]
                tokens, weights = tokens[:last_comma + 1], weights[:last_comma + 1]
                close_chunk()
                tokens, weights = moved, moved_weights
            # A comma arriving at a full chunk opens the next one and is not remembered there (as in A1111).
            if len(tokens) == chunk_length:
                close_chunk()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        close_chunk()
    import torch

    ids_list, weights_list = zip(*chunks, strict=True)
    return PromptChunks(torch.tensor(ids_list, dtype=torch.long), torch.tensor(weights_list, dtype=torch.float32))


def encode_prompts(model, prompts: list[str], clip_skip: int = 1) -> torch.Tensor:
    """-> [len(prompts), 77 * k, width]: every prompt padded to the same number k of chunks.

    Shorter prompts are padded with chunks of the encoded empty prompt, as A1111 pads cond and uncond.
    All chunks go through the text encoder in one batch.
    """
    import torch

    chunk_length = model.cfg.text.max_positions - 2
    per_prompt = [tokenize_prompt(model.tokenizer, p, chunk_length) for p in prompts]
    counts = [c.ids.shape[0] for c in per_prompt]
    k = max(counts)
    parts = list(per_prompt)
    if min(counts) < k:  # the empty prompt's single chunk rides along as the last row
        parts.append(tokenize_prompt(model.tokenizer, "", chunk_length))
    device = next(model.text_encoder.parameters()).device
    ids = torch.cat([c.ids for c in parts]).to(device)  # [n, 77]
    weights = torch.cat([c.weights for c in parts]).to(device)  # [n, 77]

    with torch.no_grad():
        hidden = model.text_encoder(ids, clip_skip=clip_skip)  # [n, 77, width]
        weighted = (weights != 1).any(dim=1)  # [n]
        if weighted.any():
            # A1111's "Original" emphasis: scale by the weights, then restore the mean. A1111 takes the mean over
            # the whole batch, so an image would depend on its batch mates; we take it per prompt and chunk.
            h = hidden[weighted].float()  # [m, 77, width]
            before = h.mean(dim=(1, 2), keepdim=True)
            h = h * weights[weighted, :, None]
            h = h * (before / h.mean(dim=(1, 2), keepdim=True))
            hidden[weighted] = h.to(hidden.dtype)

    out = []
    start = 0
    for count in counts:
        rows = hidden[start:start + count]  # [count, 77, width]
        if count < k:
            rows = torch.cat([rows, hidden[-1:].expand(k - count, -1, -1)])
        out.append(rows.reshape(-1, rows.shape[-1]))  # [77 * k, width]
        start += count
    return torch.stack(out)
