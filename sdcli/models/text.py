"""Text conditioning: the CLIP BPE tokenizer (models.tokenizer) and the CLIP text transformer (models.clip)."""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
from pathlib import Path

import torch
from torch import nn

from sdcli.architecture import TextEncoderConfig
from sdcli.errors import SdcliError

BOS, EOS = 49406, 49407


class TextEncoder(nn.Module):
    """`cond_stage_model`: a CLIP text transformer at `transformer.text_model`, the SD 1.x key path, with
    transformers' CLIPTextModel's module names (models.clip).

    SD 2.x's OpenCLIP weights are renamed into the same module when loaded (see loading.keymaps).
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        from sdcli.models.clip import CLIPTextTransformer

        self.cfg = cfg
        self.transformer = nn.Module()
        self.transformer.text_model = CLIPTextTransformer(cfg)
        if cfg.projection_dim:  # OpenCLIP's orientation, x @ P: SDXL's pooled vector; SD 2.x's only round-trips
            self.register_buffer("text_projection", torch.empty(cfg.width, cfg.projection_dim))
            if cfg.layout == "openclip":  # never used: kept so OpenCLIP single files round-trip
                self.register_buffer("logit_scale", torch.empty(()))

    def forward(self, ids: torch.Tensor, clip_skip: int = 1,
                fixes: list[tuple[int, int, torch.Tensor]] | None = None, pooled: bool = False):
        """Token ids [B, T] -> hidden states [B, T, width], and with `pooled` also [B, projection_dim]: the
        projected end-of-text embedding of the last layer (SDXL's pooled vector).

        clip_skip=1 is the model's own conditioning layer; 2 takes the layer before it (A1111's
        "Clip skip"), followed by the final layer norm where the config says. `fixes`: (row, position, vectors
        [n, width]) that replace the token embeddings of positions position..position+n-1 of that row
        (textual-inversion embeddings, as A1111's EmbeddingsWithFixes), for this call only.
        """
        if not fixes:
            return self._encode(ids, clip_skip, pooled)

        def put(module, args, out):  # out: [B, T, width], the token embeddings
            out = out.clone()
            for row, at, vec in fixes:
                out[row, at:at + vec.shape[0]] = vec.to(out.device, out.dtype)
            return out

        hook = self.transformer.text_model.embeddings.token_embedding.register_forward_hook(put)
        try:
            return self._encode(ids, clip_skip, pooled)
        finally:
            hook.remove()

    def _encode(self, ids: torch.Tensor, clip_skip: int, pooled: bool):
        model = self.transformer.text_model
        n = len(model.encoder.layers)
        skip = self.cfg.skip_last_layers + clip_skip - 1  # layers left out (tasks.base bounds it below n)
        h = model.run(model.embeddings(ids), 0, n - skip)  # [B, T, width]
        hidden = model.final_layer_norm(h) if not skip or self.cfg.final_norm else h
        if not pooled:
            return hidden
        final = hidden if not skip else model.final_layer_norm(model.run(h, n - skip, n))
        # the end-of-text token's position: the first EOS (padding may be EOS too, or "!")
        eos = (ids == EOS).int().argmax(dim=-1)
        last = final[torch.arange(ids.shape[0], device=ids.device), eos]  # [B, width]
        return hidden, last @ self.text_projection.to(last.dtype)


def clip_bpe_file() -> Path:
    """The CLIP BPE merges shipped by the `openai-clip` package (its __init__ needs torchvision: not imported)."""
    try:
        files = importlib.metadata.files("openai-clip") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == "bpe_simple_vocab_16e6.txt.gz":
            path = Path(f.locate())
            if path.is_file():
                return path
    raise SdcliError(
        "the CLIP vocabulary file is missing: install the 'openai-clip' package (pip install openai-clip)"
    )


def _bytes_to_unicode() -> list[str]:
    """CLIP/GPT-2's reversible map of the 256 byte values to printable characters, in vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


@functools.cache
def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab.json and merges.txt of CLIP, derived from the BPE file exactly as OpenAI's tokenizer does."""
    lines = gzip.open(clip_bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


@functools.cache
def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The CLIP tokenizer built from the package's BPE file, cached per process."""
    from sdcli.models.tokenizer import ClipTokenizer

    vocab, merges = clip_vocab()
    return ClipTokenizer(vocab, merges, pad_token=pad_token)


def folder_tokenizer(path: Path):
    """A diffusers folder's own `tokenizer/` (vocab.json + merges.txt, or tokenizer.json)."""
    from sdcli.errors import ModelLoadError, printable
    from sdcli.models.tokenizer import ClipTokenizer

    try:
        tokenizer = ClipTokenizer.from_folder(path)
        tokenizer("a photo")
        return tokenizer
    except Exception as e:  # what a damaged file's parsing meets: ValueError, KeyError, OSError, TypeError, ...
        raise ModelLoadError(f"{path} cannot be read as a CLIP tokenizer ({type(e).__name__}: "
                             f"{printable(str(e).splitlines()[0] if str(e) else '')[:200]})") from None
