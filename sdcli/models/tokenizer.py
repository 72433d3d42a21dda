"""The CLIP BPE tokenizer: transformers 5's CLIPTokenizer pipeline (NFC, whitespace folded, lowercased; CLIP's
word regex; byte-level BPE with `</w>` word ends; the four special tokens matched whole) built on the same
Hugging Face `tokenizers` backend, without importing transformers (seconds of every start-up).
tests/test_clip.py checks it against transformers' CLIPTokenizer, token for token.

The call keeps the subset of transformers' tokenizer API that sdcli uses:

    tok = ClipTokenizer.from_folder(path)       # vocab.json + merges.txt, or tokenizer.json
    tok(["a cat"], add_special_tokens=False)["input_ids"]          # [[320, 2368]]
    tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
"""

from __future__ import annotations

import json
from pathlib import Path

BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
_WORDS = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
MAX_TOKENIZER_FILE = 64 << 20  # a CLIP tokenizer.json is 3.5 MB; a larger file is not one


class Encoded(dict):
    """{"input_ids": ...}, also as .input_ids (transformers' BatchEncoding's two spellings)."""

    @property
    def input_ids(self):
        return self["input_ids"]


class ClipTokenizer:
    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = EOS_TOKEN,
                 unk_token: str = EOS_TOKEN, model_max_length: int = 77):
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import BPE

        t = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                          end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk_token))
        t.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                             normalizers.Lowercase()])
        t.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_WORDS), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        t.decoder = decoders.ByteLevel()
        # transformers adds its named special tokens whole (not normalized): a pad "!" is one token too
        t.add_special_tokens([AddedToken(s, special=True, normalized=False)
                              for s in dict.fromkeys((BOS_TOKEN, EOS_TOKEN, unk_token, pad_token))])
        self.backend, self.model_max_length = t, model_max_length
        self.bos_token_id, self.eos_token_id = t.token_to_id(BOS_TOKEN), t.token_to_id(EOS_TOKEN)
        self.unk_token_id, self.pad_token_id = t.token_to_id(unk_token), t.token_to_id(pad_token)
        self.pad_token, self.unk_token = pad_token, unk_token
        t.post_processor = processors.RobertaProcessing((EOS_TOKEN, self.eos_token_id),
                                                        (BOS_TOKEN, self.bos_token_id), False, False)

    @classmethod
    def from_folder(cls, folder: str | Path) -> ClipTokenizer:
        """A tokenizer folder: vocab.json and merges.txt, or tokenizer.json (its BPE's vocabulary and merges, in
        CLIP's pipeline, as transformers reads them), with the special tokens of tokenizer_config.json and
        special_tokens_map.json. Raises ValueError, OSError or KeyError on a damaged folder."""
        folder = Path(folder)
        specials = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the map wins, as in transformers
            if (folder / name).is_file():
                data = _json(folder / name)
                specials.update({k: _content(data[k]) for k in ("pad_token", "unk_token") if data.get(k)})
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = _json(folder / "vocab.json")
            lines = _text(folder / "merges.txt").split("\n")
            merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
        else:
            model = _json(folder / "tokenizer.json")["model"]
            vocab = model["vocab"]
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        if not isinstance(vocab, dict):  # its entries, and the merges, the BPE constructor checks (TypeError)
            raise ValueError("the vocabulary is not a {token: id} table")
        return cls(vocab, merges, **specials)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def convert_tokens_to_ids(self, token: str) -> int:
        found = self.backend.token_to_id(token)
        return self.unk_token_id if found is None else found

    def __call__(self, texts: str | list[str], add_special_tokens: bool = True, padding: bool | str = False,
                 max_length: int | None = None, truncation: bool = False, return_tensors: str | None = None
                 ) -> Encoded:
        """Token ids of each text (a list of lists, or of one text a list); `padding="max_length"` with
        `truncation` gives rows of exactly `max_length` (the specials kept, as transformers truncates)."""
        one = isinstance(texts, str)
        rows = [e.ids for e in self.backend.encode_batch([texts] if one else list(texts),
                                                         add_special_tokens=add_special_tokens)]
        length = max_length or self.model_max_length
        if truncation:
            specials = 2 if add_special_tokens else 0
            rows = [r if len(r) <= length else r[:length - specials] + r[len(r) - specials:] for r in rows]
        if padding == "max_length":
            rows = [r + [self.pad_token_id] * (length - len(r)) for r in rows]
        if return_tensors == "pt":
            import torch

            return Encoded(input_ids=torch.tensor(rows, dtype=torch.long))
        return Encoded(input_ids=rows[0] if one else rows)

    def save_pretrained(self, folder: str | Path) -> None:
        """vocab.json, merges.txt, tokenizer.json and tokenizer_config.json: what transformers' CLIPTokenizer
        and diffusers read (transformers' own save writes the same pipeline)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        text = self.backend.to_str()  # serialised once: tokenizer.json, and the BPE tables read back from it
        (folder / "tokenizer.json").write_text(text, encoding="utf-8")
        model = json.loads(text)["model"]
        (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
        config = {"tokenizer_class": "CLIPTokenizer", "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN,
                  "unk_token": self.unk_token, "pad_token": self.pad_token, "model_max_length": self.model_max_length}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _content(value) -> str:
    """A special token as tokenizer configs spell it: text, or {"content": text, ...}."""
    value = value.get("content") if isinstance(value, dict) else value
    if not isinstance(value, str) or not value:
        raise ValueError(f"a special token is {str(value)[:40]!r}, not text")
    return value


def _text(path: Path) -> str:
    if path.stat().st_size > MAX_TOKENIZER_FILE:
        raise ValueError(f"{path.name} is over {MAX_TOKENIZER_FILE >> 20} MB: not a CLIP tokenizer file")
    return path.read_text(encoding="utf-8")


def _json(path: Path):
    return json.loads(_text(path))
