"""Training data: a folder of images with same-name .txt captions, or a `metadata.jsonl` of {"file_name",
"text"} lines (the Hugging Face imagefolder convention).

Every random choice about a sample (which image, crop, flip, caption dropout, noise, timestep) comes from a
generator keyed by (seed, global position), where position counts samples from the start of training.
So a resumed run sees exactly the data of an uninterrupted one, and N processes with batch B see exactly
the samples of one process with batch N*B.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdcli.errors import SdcliError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str


@dataclass
class Dataset:
    examples: list[Example]
    skipped: dict[str, list[Path]] = field(default_factory=dict)  # reason -> files

    def __len__(self) -> int:
        return len(self.examples)

    def report(self) -> str | None:
        """One line about the skipped files, or None."""
        if not self.skipped:
            return None
        parts = [f"{len(files)} {reason} (e.g. {files[0]})" for reason, files in self.skipped.items()]
        return f"skipped {', '.join(parts)}; --strict makes this an error"


def scan(folder: str | Path, captions: bool, strict: bool) -> Dataset:
    """The usable examples of a data folder, sorted by path; unreadable images (and, when captions are
    needed, images with an empty or missing caption) are skipped and counted, or refused with `strict`."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise SdcliError(f"data folder not found: {folder}")
    if not folder.is_dir():
        raise SdcliError(f"{folder} is not a folder: give a folder of images (with .txt captions or a metadata.jsonl)")
    metadata = folder / "metadata.jsonl"
    pairs = _from_metadata(metadata) if metadata.is_file() else _from_folder(folder, captions)
    if not pairs:
        where = "lists no images" if metadata.is_file() else "holds no images (.png, .jpg, .webp, ...)"
        raise SdcliError(f"{metadata if metadata.is_file() else folder} {where}")
    data = Dataset([])
    for path, caption in pairs:
        if captions and not caption.strip():
            data.skipped.setdefault("with an empty or missing caption", []).append(path)
        elif not _readable(path):
            data.skipped.setdefault("unreadable images", []).append(path)
        else:
            data.examples.append(Example(path, caption.strip()))
    if strict and data.skipped:
        reason, files = next(iter(data.skipped.items()))
        raise SdcliError(f"{files[0]}: {reason.removesuffix('s').replace('images', 'image')} "
                         f"({len(files)} such file(s)); fix or remove it, or drop --strict to skip them")
    if not data.examples:
        raise SdcliError(f"{folder}: no usable images ({data.report()})")
    return data


def _from_folder(folder: Path, captions: bool) -> list[tuple[Path, str]]:
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not captions:
        return [(p, "") for p in images]
    return [(p, _read_caption(p.with_suffix(".txt"))) for p in images]


def _read_caption(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as e:
        raise SdcliError(f"cannot read caption {path}: {e}") from None


def _from_metadata(path: Path) -> list[tuple[Path, str]]:
    pairs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SdcliError(f"cannot read {path}: {e}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            name, text = entry["file_name"], entry.get("text", "")
            if not isinstance(name, str) or not isinstance(text, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise SdcliError(f"{path} line {number}: expected a JSON object with \"file_name\" and \"text\" "
                             "strings") from None
        pairs.append((path.parent / name, text))
    return pairs


def _readable(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))  # JPEGs decode at a reduced size: this checks the data, quickly
            im.load()
        return True
    except Exception:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return False


# --- keyed randomness ----------------------------------------------------------------------------------


def generator(seed: int, *key) -> torch.Generator:
    """A CPU generator seeded from (seed, *key): independent streams without shared state."""
    digest = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=generator(seed, "epoch", epoch)).tolist()


def example_at(n: int, seed: int, position: int) -> int:
    """The example at a global sample position: a fresh seeded shuffle every epoch."""
    epoch, i = divmod(position, n)
    return _permutation(n, seed, epoch)[i]


def positions(step: int, micro: int, rank: int, world: int, batch: int, accum: int) -> list[int]:
    """Global sample positions of one process's micro-batch: step-major, then micro-batch, then rank."""
    start = (step * accum + micro) * world * batch + rank * batch
    return list(range(start, start + batch))


def holdout(n: int, seed: int, count: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices) for validation, chosen by the seed."""
    order = torch.randperm(n, generator=generator(seed, "holdout")).tolist()
    return sorted(order[count:]), sorted(order[:count])


# --- images --------------------------------------------------------------------------------------------


def load_image(path: Path, resolution: int, g: torch.Generator | None = None, random_crop: bool = False,
               flip: bool = False) -> tuple[torch.Tensor, bool]:
    """An image resized (shorter side) and cropped to a square -> ([3, R, R] in [-1, 1], flipped).

    Draws from g in a fixed order (crop x, crop y, flip) so every sample's stream stays aligned."""
    from PIL import Image

    from sdcli.images import to_rgb, to_tensor

    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # it was readable when the data set was scanned
        raise SdcliError(f"cannot read {path} any more: {e}") from None
    im = to_rgb(im, path)  # 16-bit greyscale scaled, not clipped; what has no known range refused by name
    scale = resolution / min(im.size)
    size = (max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale)))
    im = im.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    u = torch.rand(3, generator=g).tolist() if g is not None else [0.5, 0.5, 1.0]
    if random_crop:
        left, top = round(u[0] * (im.width - resolution)), round(u[1] * (im.height - resolution))
    else:
        left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    flipped = flip and u[2] < 0.5
    if flipped:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(im)[0], flipped
