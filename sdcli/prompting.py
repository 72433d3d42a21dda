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
    """A tokenized prompt: k chunks of BOS + 75 tokens + EOS/padding, with one emphasis weight per token.

    An embedding's vectors stand at placeholder ids (0, as in A1111) and are listed in `fixes` as (chunk row,
    position in the row, vectors [n, width]): the text encoder puts them in place of those tokens' embeddings.
    """

    ids: torch.Tensor  # [k, 77] long
    weights: torch.Tensor  # [k, 77] float32
    fixes: tuple[tuple[int, int, torch.Tensor], ...] = ()


PLACEHOLDER = 0  # the id A1111 gives an embedding's positions (its token embedding is replaced)


def tokenize_prompt(tokenizer, prompt: str, chunk_length: int = 75, comma_backtrack: int = 20,
                    embeddings=None, width: int | None = None, role: str | None = None,
                    variant: str | None = None) -> PromptChunks:
    """Split a prompt into chunks of `chunk_length` tokens as A1111 does.

    BREAK closes the current chunk. When a chunk is full and its last comma is at most `comma_backtrack`
    tokens from its end, the tokens after that comma start the next chunk instead (0 turns this off).
    With `embeddings` (a networks.embeddings.Embeddings) the names of embeddings in the prompt stand for their
    vectors (`width` wide): n positions of the chunk, all in one chunk (one that does not fit starts the next).
    `role` and `variant`: the text encoder's and the model's, for Embeddings.vectors (SDXL's encoders each take
    their own tensor of an embedding).
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    comma = tokenizer.convert_tokens_to_ids(",</w>")  # a dict lookup; get_vocab() copies 49408 entries (~25 ms)
    if comma == tokenizer.unk_token_id:  # a vocabulary without it: no comma backtracking
        comma = None
    parsed = parse_prompt_attention(prompt)
    units = _units(tokenizer, parsed, embeddings, (width, role, variant), chunk_length)

    chunks: list[tuple[list[int], list[float]]] = []
    fixes: list[tuple[int, int, torch.Tensor]] = []
    tokens: list[int] = []
    weights: list[float] = []
    pending: list[tuple[int, torch.Tensor]] = []  # the current chunk's embeddings: (index in `tokens`, vectors)
    last_comma = -1  # index in `tokens` of the current chunk's last comma

    def close_chunk() -> None:
        nonlocal tokens, weights, pending, last_comma
        fill = chunk_length - len(tokens)
        fixes.extend((len(chunks), 1 + at, vec) for at, vec in pending)  # + 1: the BOS
        chunks.append(([bos, *tokens, eos] + [pad] * fill, [1.0, *weights, 1.0] + [1.0] * fill))
        tokens, weights, pending, last_comma = [], [], [], -1

    def backtrack() -> None:
        """Move what follows the last comma to the next chunk (embeddings with it: A1111 leaves their vectors
        behind, in the padding of the chunk they left)."""
        nonlocal tokens, weights, pending
        cut = last_comma + 1
        moved = tokens[cut:], weights[cut:], [(at - cut, vec) for at, vec in pending if at >= cut]
        tokens, weights, pending = tokens[:cut], weights[:cut], [(at, vec) for at, vec in pending if at < cut]
        close_chunk()
        tokens, weights, pending = moved

    for fragment_units, (text, weight) in zip(units, parsed, strict=True):
        if text == "BREAK" and weight == BREAK_WEIGHT:
            close_chunk()
            continue
        for unit in fragment_units:
            if isinstance(unit, int) and unit == comma:
                last_comma = len(tokens)
            elif (comma_backtrack and len(tokens) == chunk_length and last_comma != -1
                  and len(tokens) - last_comma <= comma_backtrack):
                backtrack()
            # A comma arriving at a full chunk opens the next one and is not remembered there (as in A1111).
            if len(tokens) == chunk_length:
                close_chunk()
            if isinstance(unit, int):
                tokens.append(unit)
                weights.append(weight)
                continue
            n = unit.shape[0]  # an embedding: all its vectors in one chunk
            if len(tokens) + n > chunk_length:
                close_chunk()
            pending.append((len(tokens), unit))
            tokens += [PLACEHOLDER] * n
            weights += [weight] * n
    if tokens or not chunks:
        close_chunk()
    import torch

    ids_list, weights_list = zip(*chunks, strict=True)
    return PromptChunks(torch.tensor(ids_list, dtype=torch.long), torch.tensor(weights_list, dtype=torch.float32),
                        tuple(fixes))


def _units(tokenizer, parsed: list[tuple[str, float]], embeddings, encoder: tuple, chunk_length: int) -> list[list]:
    """Each fragment's token ids, with an embedding's vectors [n, width] in place of its name (`encoder`: the
    (width, role, variant) that Embeddings.vectors takes)."""
    def tokenize(texts: list[str]) -> list[list[int]]:  # untruncated: long prompts are cut into chunks later
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    if embeddings is None:
        return tokenize([t for t, _ in parsed])
    if encoder[0] is None:
        raise ValueError("tokenize_prompt needs the text encoder's width to use embeddings")
    pieces = [[] if (t, w) == ("BREAK", BREAK_WEIGHT) else embeddings.split(t) for t, w in parsed]
    texts = [p.text for fragment in pieces for p in fragment if p.embedding is None]
    ids = iter(tokenize(texts) if texts else [])
    out = []
    for fragment in pieces:
        units: list = []
        for p in fragment:
            if p.embedding is None:
                units += next(ids)
                continue
            vec = embeddings.vectors(p.embedding, *encoder)
            if vec.shape[0] > chunk_length:
                raise SdcliError(f"the embedding {shown(p.embedding)} holds {vec.shape[0]} vectors: at most "
                                 f"{chunk_length} fit in one prompt chunk")
            units.append(vec)
        out.append(units)
    return out


def encode_prompts(model, prompts: list[str], clip_skip: int = 1, embeddings=None, pooled: bool = False):
    """-> [len(prompts), 77 * k, width]: every prompt padded to the same number k of chunks; with `pooled` also
    [len(prompts), projection_dim], the last encoder's pooled vector of each prompt's first chunk (SDXL's, as A1111
    takes it). SDXL's two encoders each encode the chunks, their hidden states joined: width = the sum of theirs.

    Shorter prompts are padded with chunks of the encoded empty prompt, as A1111 pads cond and uncond.
    All chunks go through each text encoder in one batch. `embeddings` (networks.embeddings.Embeddings): the
    textual-inversion embeddings that the prompts may name.
    """
    import torch

    from sdcli.networks import encoder_roles

    hidden, vectors = [], None
    encoders = model.text_encoders
    roles = encoder_roles(model.cfg)  # which of an SDXL embedding's tensors each encoder takes
    for i, ((encoder, tokenizer), role) in enumerate(zip(encoders, roles, strict=True)):
        last = i == len(encoders) - 1
        h, vectors = _encode_with(encoder, tokenizer, prompts, clip_skip, embeddings, pooled and last, role,
                                  model.cfg.variant)
        hidden.append(h)
    context = hidden[0] if len(hidden) == 1 else torch.cat(hidden, dim=-1)
    return (context, vectors) if pooled else context


def _encode_with(encoder, tokenizer, prompts: list[str], clip_skip: int, embeddings, pooled: bool,
                 role: str | None, variant: str):
    """One text encoder's encode_prompts: -> ([P, 77 * k, width], [P, projection_dim] or None). `role`: the
    encoder's networks.encoder_roles entry; `variant`: the model's (both for Embeddings.vectors)."""
    import torch

    cfg = encoder.cfg
    chunk_length = cfg.max_positions - 2
    per_prompt = [tokenize_prompt(tokenizer, p, chunk_length, embeddings=embeddings, width=cfg.width, role=role,
                                  variant=variant) for p in prompts]
    counts = [c.ids.shape[0] for c in per_prompt]
    k = max(counts)
    parts = list(per_prompt)
    if min(counts) < k:  # the empty prompt's single chunk rides along as the last row
        parts.append(tokenize_prompt(tokenizer, "", chunk_length))
    device = next(encoder.parameters()).device
    ids = torch.cat([c.ids for c in parts]).to(device)  # [n, 77]
    weights = torch.cat([c.weights for c in parts]).to(device)  # [n, 77]
    fixes, row = [], 0
    for c in parts:  # rows of the batch, not of each prompt
        fixes += [(row + r, at, vec) for r, at, vec in c.fixes]
        row += c.ids.shape[0]

    with torch.no_grad():
        out = encoder(ids, clip_skip=clip_skip, fixes=fixes or None, pooled=pooled)
        hidden, vectors = out if pooled else (out, None)  # [n, 77, width], [n, projection_dim]
        weighted = (weights != 1).any(dim=1)  # [n]
        if weighted.any():
            # A1111's "Original" emphasis: scale by the weights, then restore the mean. A1111 takes the mean over
            # the whole batch, so an image would depend on its batch mates; we take it per prompt and chunk.
            h = hidden[weighted].float()  # [m, 77, width]
            before = h.mean(dim=(1, 2), keepdim=True)
            h = h * weights[weighted, :, None]
            h = h * (before / h.mean(dim=(1, 2), keepdim=True))
            hidden[weighted] = h.to(hidden.dtype)

    out, firsts = [], []
    start = 0
    for count in counts:
        rows = hidden[start:start + count]  # [count, 77, width]
        if count < k:
            rows = torch.cat([rows, hidden[-1:].expand(k - count, -1, -1)])
        out.append(rows.reshape(-1, rows.shape[-1]))  # [77 * k, width]
        firsts.append(start)
        start += count
    return torch.stack(out), None if vectors is None else vectors[firsts]
