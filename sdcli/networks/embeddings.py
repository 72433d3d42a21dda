"""Textual-inversion embeddings as AUTOMATIC1111 uses them: files in the embeddings folders, each used by writing
its name (the file's stem) in a prompt, and replaced there by the vectors it holds.

A1111 (modules/textual_inversion/textual_inversion.py) reads, in this order: `string_to_param` (its own .pt; the
dict may be a pickled ParameterDict, read through its `_parameters`), `clip_g` + `clip_l` (SDXL), then a dict of
exactly one tensor (diffusers' {"<token>": tensor}, kohya's {"emb_params": tensor}); a 1-D tensor is one vector.

SDXL's files hold two tensors, `clip_l` [n, 768] and `clip_g` [n, 1280]: the name stands for clip_l's vectors in
the CLIP ViT-L encoder and clip_g's in the bigG one (the refiner's only encoder takes clip_g), as A1111's
textual_inversion_key and diffusers' load_textual_inversion on each encoder.

Names are matched as whole words, case-insensitively (A1111 matches token sequences, and the CLIP tokenizer
lowercases both the prompt and the name). ComfyUI's spelling `embedding:NAME` (NAME with or without its suffix)
works too. Nothing in a file runs: pickles are read with torch.load(weights_only=True), safetensors through the
bounded header reader, and every size is checked before it is used.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from sdcli.errors import ModelLoadError, SdcliError, printable, shown
from sdcli.networks import XL_ROLES
from sdcli.networks.library import walk

if TYPE_CHECKING:
    import torch

SUFFIXES = (".safetensors", ".pt", ".bin")  # the preferred file first, when one folder has a stem twice
MAX_FILE_BYTES = 64 << 20  # released embeddings: 4 kB (1 vector) to 300 kB (75 vectors of 1024)
MAX_VECTORS = 75  # what one prompt chunk holds; A1111 breaks on more
MAX_TENSORS = 16  # an embedding holds one (two for SDXL)
COMFY_PREFIX = "embedding:"

_PIECE = re.compile(r"\w+|[^\w\s]")  # words, and punctuation one character at a time: where a name may start
_WORD = re.compile(r"\w")
_COMFY = re.compile(r"(?<!\w)embedding:(?P<name>[^\s,]+)")  # to whitespace or a comma, as ComfyUI reads it
WIDTHS = {768: "SD 1.x", 1024: "SD 2.x"}  # a one-tensor embedding's width -> the family it is for
XL_WIDTHS = {"clip_l": 768, "clip_g": 1280}  # an SDXL embedding's tensors and their widths
_WIDTH_HINT = {**{w: f"an embedding for {f}?" for w, f in WIDTHS.items()}, 1280: "an embedding for SDXL?"}
_ENCODER = {None: "text encoder", "clip_l": "CLIP ViT-L text encoder", "clip_g": "OpenCLIP bigG text encoder"}


class Piece(NamedTuple):
    """A stretch of prompt text: plain text (embedding None), or an embedding's name as written."""

    text: str
    embedding: str | None = None


class Embeddings:
    """The embeddings in some folders (and their subfolders, as A1111), listed on first use, read when used."""

    def __init__(self, dirs: list[Path | str]):
        self.dirs = [Path(d) for d in dirs]
        self._stems: dict[str, Path] | None = None  # stem -> its file (the first found wins)
        self._files: dict[str, Path] = {}  # file name -> file, for embedding:NAME.suffix
        self._by_start: dict[str, list[str]] = {}  # first piece of a name, lowercased -> names, longest first
        self._vectors: dict[Path, dict[str | None, torch.Tensor]] = {}  # file -> read_vectors'
        self._hashes: dict[Path, str] = {}

    # --- the library --------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self._index())

    def find(self, name: str) -> Path | None:
        """The file of an embedding name, a stem or a file name, exact first, then ignoring case."""
        return self._lookup(name)[1]

    def path(self, name: str) -> Path:
        path = self.find(name)
        if path is None:
            raise SdcliError(f"no embedding named {shown(name)} in the embeddings folders "
                             f"({', '.join(map(str, self.dirs)) or 'none given'}): check the name")
        return path

    def vectors(self, name: str, width: int, role: str | None = None, variant: str | None = None) -> torch.Tensor:
        """The embedding's vectors for one text encoder, float32 [n, width] on the CPU (the file read once).
        `role`: the encoder's (networks.encoder_roles: None for SD 1.x/2.x, "clip_l"/"clip_g" for SDXL's);
        `variant`: the model's name, for the message when the file is for another family."""
        path = self.path(name)
        if path not in self._vectors:
            self._vectors[path] = read_vectors(path)
        found = self._vectors[path]
        if role not in found:
            raise ModelLoadError(_other_family(path, found, variant))
        vec = found[role]
        if vec.shape[1] != width:
            hint = _WIDTH_HINT.get(vec.shape[1], "an embedding for another model family?")
            what = f"{role} " if role else ""
            raise ModelLoadError(f"{printable(str(path))} holds {vec.shape[1]}-wide {what}vectors; this model's "
                                 f"{_ENCODER[role]} is {width} wide ({hint}): use an embedding made for this model's "
                                 "family")
        return vec

    def short_hash(self, name: str) -> str:
        """A1111's "TI hashes" value: the first 12 hex digits of the file's sha256 (hashes.sha256, full file)."""
        from sdcli.hashing import sha256_file

        path = self.path(name)
        if path not in self._hashes:
            _check_size(path)
            self._hashes[path] = sha256_file(path)[:12]
        return self._hashes[path]

    def used(self, prompt: str) -> list[str]:
        """The embeddings a prompt uses, in order of first use, each once (the names as `split` gives them)."""
        from sdcli.prompting import BREAK_WEIGHT, parse_prompt_attention

        out: list[str] = []
        for text, weight in parse_prompt_attention(prompt):
            if (text, weight) == ("BREAK", BREAK_WEIGHT):
                continue
            out += [p.embedding for p in self.split(text) if p.embedding is not None and p.embedding not in out]
        return out

    # --- finding names in a prompt ------------------------------------------------------------------------

    def split(self, text: str) -> list[Piece]:
        """Text (one emphasis fragment) -> plain pieces and embedding pieces (embedding: the canonical name).

        `embedding:NAME` is read first; an unknown one is an error (it can only mean an embedding). Elsewhere a
        name counts as a whole word: not inside a longer word ("easynegative2" is not "easynegative").
        """
        out: list[Piece] = []
        start = 0
        for m in _COMFY.finditer(text):
            key = self._comfy_name(m["name"])
            out += self._split_words(text[start:m.start()])
            out.append(Piece(m[0], key))
            start = m.end()
        out += self._split_words(text[start:])
        return [p for p in out if p.text]

    def _comfy_name(self, name: str) -> str:
        key, path = self._lookup(name)
        if path is None and name.rstrip(".;") != name:  # sentence punctuation, as ComfyUI strips a comma
            key, path = self._lookup(name.rstrip(".;"))
        if path is None:
            raise SdcliError(f"the prompt uses {COMFY_PREFIX}{shown(name)[1:-1]}, which is in none of the "
                             f"embeddings folders ({', '.join(map(str, self.dirs)) or 'none given'}): check the "
                             "name, or add its folder")
        return key

    def _split_words(self, text: str) -> list[Piece]:
        index = self._index()
        if not index or not text:
            return [Piece(text)]
        out, start, skip_to = [], 0, 0
        for m in _PIECE.finditer(text):
            if m.start() < skip_to or (candidates := self._by_start.get(m[0].lower())) is None:
                continue
            name = _first_match(text, m.start(), candidates)
            if name is not None:
                out += [Piece(text[start:m.start()]), Piece(text[m.start():m.start() + len(name)], name)]
                start = skip_to = m.start() + len(name)
        out.append(Piece(text[start:]))
        return out

    def _lookup(self, name: str) -> tuple[str, Path | None]:
        """-> (canonical name, file): a stem as the stem, a file name as its stem when that is the same file."""
        stems = self._index()
        for folded in (False, True):
            for table in (stems, self._files):
                key = name if not folded else next((k for k in table if k.lower() == name.lower()), None)
                if key is not None and key in table:
                    path = table[key]
                    return (path.stem if stems.get(path.stem) == path else path.name), path
        return name, None

    def _index(self) -> dict[str, Path]:
        if self._stems is None:
            files = list_embedding_files(self.dirs)
            stems: dict[str, Path] = {}
            for path in files:
                stems.setdefault(path.stem, path)
                self._files.setdefault(path.name, path)
            for stem in stems:
                first = _PIECE.match(stem)
                if first and first.start() == 0 and stem == stem.strip():  # else: only as embedding:NAME
                    self._by_start.setdefault(first[0].lower(), []).append(stem)
            for names in self._by_start.values():
                names.sort(key=len, reverse=True)
            self._stems = stems
        return self._stems


def _first_match(text: str, at: int, candidates: list[str]) -> str | None:
    """The longest name written at `at` (ignoring case, preferring the exact spelling) that ends a word."""
    best = None
    for name in candidates:  # longest first
        if best is not None and len(name) < len(best):
            break
        end = at + len(name)
        ends_a_word = not (_WORD.match(name[-1]) and _WORD.match(text, end))  # a name ending in "-" needs no gap
        if text[at:end].lower() == name.lower() and ends_a_word and (best is None or text[at:end] == name):
            best = name
    return best


def list_embedding_files(dirs: list[Path]) -> list[Path]:
    """Files with an embedding suffix, folder by folder, each folder's own files before its subfolders', names
    sorted, the preferred suffix first (library.walk: symlinked folders followed once, the search bounded)."""
    order = {s: i for i, s in enumerate(SUFFIXES)}
    out: list[Path] = []
    for folder, names in walk(dirs, "embeddings", "--embeddings-dir"):
        files = [n for n in names if os.path.splitext(n)[1].lower() in order]
        files.sort(key=lambda n: (os.path.splitext(n)[0], order[os.path.splitext(n)[1].lower()]))
        out += [folder / n for n in files]
    return out


def _other_family(path: Path, found: dict, variant: str | None) -> str:
    """The one-line refusal of an SDXL embedding on a one-encoder model, or of a one-tensor one on SDXL."""
    model = variant or "this model"
    if None in found:
        width = found[None].shape[1]
        made_for = WIDTHS.get(width, "SD 1.x/2.x")
        return (f"{printable(str(path))} is an embedding for {made_for} (one {width}-wide tensor); the model is "
                f"{model}, whose embeddings hold clip_l and clip_g: use an embedding made for SDXL")
    return (f"{printable(str(path))} is an SDXL embedding (clip_l + clip_g); the model is {model}, whose embeddings "
            "hold one tensor: use an embedding made for this model's family")


# --- reading one file ----------------------------------------------------------------------------------------

def read_vectors(path: Path) -> dict[str | None, torch.Tensor]:
    """One embedding file -> its vectors by encoder role, float32 [n, width], checked (n <= MAX_VECTORS, finite):
    {None: vectors} for a one-tensor embedding, {"clip_l": ..., "clip_g": ...} for SDXL's (the same n)."""
    _check_size(path)
    data = _read_safetensors(path) if path.suffix.lower() == ".safetensors" else _read_pickle(path)
    found = _vectors_of(path, data)
    if not isinstance(found, dict):
        return {None: _checked(path, found)}
    found = {role: _checked(path, vec) for role, vec in found.items()}
    counts = {role: vec.shape[0] for role, vec in found.items()}
    if len(set(counts.values())) != 1:  # each encoder's vectors take the same positions of the prompt
        raise ModelLoadError(f"{printable(str(path))} holds {counts['clip_l']} clip_l vectors and {counts['clip_g']} "
                             "clip_g vectors: an SDXL embedding has as many of each; the file is damaged")
    return found


def summary(path: Path | str) -> dict | None:
    """What `sdcli info` shows of an embedding: {"path", "kind": "embedding", "vectors", "width" (one-tensor files)
    or "widths" ({"clip_l": 768, "clip_g": 1280}, SDXL's), "family"}; None when the file is not an embedding that
    read_vectors reads at a width some model has (a model, a damaged file, one stray tensor: inspect_model says
    what it is)."""
    path = Path(path)
    try:
        if path.suffix.lower() not in SUFFIXES or not path.is_file():
            return None
        found = read_vectors(path)  # bounded: its size is checked first, pickles read as tensors only
    except (OSError, ModelLoadError):
        return None
    head = {"path": str(path), "kind": "embedding"}
    if None in found:
        count, width = found[None].shape
        return {**head, "vectors": count, "width": width, "family": WIDTHS[width]} if width in WIDTHS else None
    widths = {role: found[role].shape[1] for role in XL_WIDTHS}
    return {**head, "vectors": found["clip_g"].shape[0], "widths": widths, "family": "SDXL"} \
        if widths == XL_WIDTHS else None


def _check_size(path: Path) -> None:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ModelLoadError(f"cannot read {printable(str(path))}: {e.strerror or e}") from None
    if size == 0:
        raise ModelLoadError(f"{printable(str(path))} is empty: not an embedding")
    if size > MAX_FILE_BYTES:
        raise ModelLoadError(f"{printable(str(path))} is {size:,} bytes, over the {MAX_FILE_BYTES >> 20} MiB of any "
                             "embedding (released ones are under 1 MB): not an embedding")


def _read_safetensors(path: Path) -> dict:
    import torch

    from sdcli.loading.files import open_safetensors, read_tensors

    meta = open_safetensors(path)  # the header only, bounded; a bad or truncated file is refused here
    if len(meta) > MAX_TENSORS:
        raise ModelLoadError(f"{printable(str(path))} holds {len(meta):,} tensors: not an embedding (it holds one)")
    for k, t in meta.items():
        if t.ndim > 2 or t.numel() > MAX_VECTORS * 16384:
            raise ModelLoadError(f"{printable(str(path))}: tensor {shown(k)} has shape {list(t.shape)}: not an "
                                 f"embedding (at most {MAX_VECTORS} vectors)")
    try:
        return read_tensors(path, list(meta), "cpu", torch.float32)
    except Exception as e:  # safetensors' own errors: data that the header's offsets do not find
        raise ModelLoadError(printable(f"{path} cannot be read as safetensors ({type(e).__name__}: {e})")[:300]) \
            from None


def _read_pickle(path: Path):
    """torch.load(weights_only=True) on a file object: nothing in the file runs (a path named .safetensors would
    be read as safetensors by torch). A1111's old files pickle a ParameterDict: allowed, it only holds tensors."""
    import torch

    _check_archive(path)
    try:
        with open(path, "rb") as f, warnings.catch_warnings(), \
                torch.serialization.safe_globals([torch.nn.ParameterDict]):
            warnings.simplefilter("ignore")  # torch warns about pickle protocols
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types: disallowed objects, truncated archives, not a pickle
        raise ModelLoadError(f"{printable(str(path))} was not loaded: {_refusal(e)}") from None


def _check_archive(path: Path) -> None:
    """A torch zip archive stores its tensors uncompressed: a compressed entry could expand far past the file."""
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise ModelLoadError(f"{printable(str(path))} is a damaged archive ({printable(str(e))[:100]})") from None
    if sum(i.file_size for i in infos) > MAX_FILE_BYTES:
        raise ModelLoadError(f"{printable(str(path))} unpacks to over {MAX_FILE_BYTES >> 20} MiB: not an embedding")


def _refusal(e: Exception) -> str:
    """torch's reason in one line, and what to do."""
    from sdcli.loading.files import pickle_refusal

    if reason := pickle_refusal(e):
        return reason + "; get a .safetensors release of this embedding"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return printable(f"it is damaged or not a PyTorch file ({type(e).__name__}: {first}")[:250] + ")"


def _vectors_of(path: Path, data):
    """A1111's order: string_to_param, then clip_g/clip_l (SDXL: returned as {"clip_l": ..., "clip_g": ...}), then a
    dict of one tensor. Not yet checked (_checked)."""
    import torch

    where = printable(str(path))
    if not isinstance(data, dict):
        raise ModelLoadError(f"{where} does not hold a dict: not a textual-inversion embedding")
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # a pickled ParameterDict
        if isinstance(params, torch.Tensor):
            return params
        if not isinstance(params, dict) or len(params) != 1:
            count = len(params) if isinstance(params, dict) else "no"
            raise ModelLoadError(f"{where} holds {count} terms under string_to_param: an embedding has one")
        return next(iter(params.values()))
    if "clip_g" in data and "clip_l" in data:
        return {role: data[role] for role in XL_ROLES.values()}
    if data and isinstance(next(iter(data.values())), torch.Tensor):
        if len(data) != 1:
            names = printable(", ".join(map(str, list(data)[:3])))[:80]
            raise ModelLoadError(f"{where} holds {len(data)} tensors ({names}, ...): an embedding holds one")
        return next(iter(data.values()))
    raise ModelLoadError(f"{where} is not a textual-inversion embedding: it has neither A1111's string_to_param nor "
                         "a single tensor (diffusers, kohya)")


def _checked(path: Path, vec) -> torch.Tensor:
    import torch

    where = printable(str(path))
    if not isinstance(vec, torch.Tensor) or not vec.is_floating_point() or vec.layout != torch.strided:
        kind = f"a {vec.dtype} tensor" if isinstance(vec, torch.Tensor) else type(vec).__name__
        raise ModelLoadError(f"{where} holds {kind} where an embedding holds floating-point vectors")
    vec = vec.detach()
    if vec.ndim == 1:
        vec = vec[None]  # one vector
    if vec.ndim != 2 or not 1 <= vec.shape[0] <= MAX_VECTORS or vec.shape[1] == 0:
        raise ModelLoadError(f"{where} holds a tensor of shape {list(vec.shape)}: an embedding is 1 to {MAX_VECTORS} "
                             "vectors (what one prompt chunk holds)")
    vec = vec.to(torch.float32).contiguous()
    if not torch.isfinite(vec).all():
        raise ModelLoadError(f"{where} holds values that are not finite (NaN or inf): the embedding is damaged")
    return vec
