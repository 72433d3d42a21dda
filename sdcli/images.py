"""Input images: reading them with one-line errors, fitting them to a size, and converting to tensors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from sdcli.errors import SdcliError, shown

RESIZE_MODES = ("stretch", "crop", "fit")
MAX_INPUT_PIXELS = 8192 * 8192  # an input image may be as large as the largest render (200 MB as RGB)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")  # 16-bit greyscale (PNG, TIFF)


def load_image(path: str | Path) -> Image.Image:
    """An 8-bit RGB image, fully decoded now, so a damaged file fails before any model work. Its size is
    checked from the header, before the pixels are decoded (Pillow's own bomb limit is larger)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size check below says it
            with Image.open(path) as image:
                if image.width * image.height > MAX_INPUT_PIXELS:
                    raise SdcliError(f"{path} is {image.width}x{image.height} px, more than sdcli reads "
                                     f"({MAX_INPUT_PIXELS // 10**6} megapixels): resize it first")
                image.load()
                return to_rgb(image, path)
    except Image.DecompressionBombError:
        raise SdcliError(f"{path} is an image of over {2 * Image.MAX_IMAGE_PIXELS // 10**6} megapixels (a "
                         "decompression bomb, or a huge image): resize it first") from None
    except UnidentifiedImageError:
        raise SdcliError(f"{path} is not an image file (PNG, JPEG, WebP, ...)") from None
    except FileNotFoundError:
        raise SdcliError(f"image not found: {path}") from None
    except IsADirectoryError:
        raise SdcliError(f"{path} is a folder, not an image") from None
    except OSError as e:  # Pillow says "image file is truncated" and the like
        raise SdcliError(f"cannot read image {path}: {e.strerror or e}") from None
    except (SyntaxError, ValueError, EOFError) as e:
        raise SdcliError(f"cannot read image {path}: {e}") from None


def to_rgb(image: Image.Image, path) -> Image.Image:
    """Every mode Pillow opens, as 8-bit RGB: 16-bit greyscale scaled to 8 bits (Pillow's own conversion clips
    it, turning nearly all of it white), the rest by Pillow; 32-bit integer and float images refuse by name,
    since nothing says what range their values span."""
    if image.mode in _SIXTEEN_BIT or (image.mode == "I" and image.format == "PNG"):  # older Pillows: PNG's as I
        grey = np.asarray(image).astype(np.float64) / 257  # 65535 -> 255
        return Image.fromarray(np.clip(grey.round(), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("I", "F"):
        depth = "32-bit integer" if image.mode == "I" else "floating-point"
        raise SdcliError(f"{path} is a {depth} greyscale image (mode {image.mode}), whose range sdcli cannot "
                         "know: save it as an 8- or 16-bit image")
    return image.convert("RGB")


def fit(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """Resize to exactly width x height: `stretch` ignores the aspect ratio, `crop` fills and cuts the
    overflow (centred), `fit` fits inside and extends the edge pixels into the rest (A1111's modes)."""
    if image.size == (width, height):
        return image
    if mode == "stretch":
        return image.resize((width, height), Image.LANCZOS)
    iw, ih = image.size
    scale = (max if mode == "crop" else min)(width / iw, height / ih)
    w, h = max(1, round(iw * scale)), max(1, round(ih * scale))
    resized = image.resize((w, h), Image.LANCZOS)
    if mode == "crop":
        left, top = (w - width) // 2, (h - height) // 2
        return resized.crop((left, top, left + width, top + height))
    left, top = (width - w) // 2, (height - h) // 2
    pixels = np.pad(np.asarray(resized), ((top, height - h - top), (left, width - w - left), (0, 0)), mode="edge")
    return Image.fromarray(pixels)


def to_tensor(image):
    """RGB image, or uint8 images [B, H, W, 3] -> [1 or B, 3, H, W] float32 in [-1, 1]."""
    import torch

    pixels = torch.from_numpy(np.array(image, dtype=np.float32))  # [(B,) H, W, 3], a copy numpy owns
    pixels = pixels if pixels.ndim == 4 else pixels[None]
    return (pixels / 127.5 - 1).permute(0, 3, 1, 2).contiguous()


def lanczos(images, width: int, height: int):
    """An RGB image, or uint8 images [B, H, W, 3] -> uint8 [1 or B, height, width, 3], Lanczos-resized."""
    import torch

    batch = [images] if isinstance(images, Image.Image) else [Image.fromarray(i) for i in np.asarray(images)]
    return torch.from_numpy(np.stack([np.asarray(i.resize((width, height), Image.LANCZOS)) for i in batch]))


def mask_tensor(mask: Image.Image, blur: int):
    """A mask image (white = repaint) -> [1, 1, H, W] float32 in [0, 1], its edge blurred by `blur` px."""
    import torch
    from PIL import ImageFilter

    mask = mask.convert("L")
    if blur:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    return torch.from_numpy(np.array(mask, dtype=np.float32) / 255)[None, None]


def composite(original: Image.Image, generated, mask):
    """Blend generated uint8 images [B, H, W, 3] into the original through mask [1, 1, H, W]: where the mask
    is 0 the original's pixels come back unchanged."""
    import torch

    base = torch.from_numpy(np.array(original, dtype=np.float32))  # [H, W, 3]
    weight = mask[0, 0, :, :, None]  # [H, W, 1]
    return torch.lerp(base, generated.float(), weight).round().to(torch.uint8)


def mask_box(mask: Image.Image, padding: int, aspect: float | None = None) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) around the mask's repaint part (white from 50%), grown by `padding` px and
    then, as far as the image allows, to the width/height ratio `aspect` (A1111's "only masked" region)."""
    rows, cols = np.nonzero(np.asarray(mask.convert("L")) >= 128)
    width, height = mask.size
    box = [max(0, cols.min() - padding), max(0, rows.min() - padding),
           min(width, cols.max() + 1 + padding), min(height, rows.max() + 1 + padding)]
    if aspect:
        w, h = box[2] - box[0], box[3] - box[1]
        axis, want, limit = (0, round(h * aspect), width) if w / h < aspect else (1, round(w / aspect), height)
        grow = min(want, limit) - (box[axis + 2] - box[axis])  # around the middle, shifted back inside
        start = min(max(0, box[axis] - grow // 2), limit - (box[axis + 2] - box[axis] + grow))
        box[axis], box[axis + 2] = start, start + box[axis + 2] - box[axis] + grow
    return tuple(int(v) for v in box)


def paste(base: Image.Image, images, box: tuple[int, int, int, int]):
    """uint8 images [B, h, w, 3] resized into `box` of copies of `base` -> uint8 [B, H, W, 3]."""
    import torch

    size = (box[2] - box[0], box[3] - box[1])
    canvas = np.repeat(np.asarray(base)[None], len(images), axis=0)
    canvas[:, box[1]:box[3], box[0]:box[2]] = lanczos(images, *size).numpy()
    return torch.from_numpy(canvas)


SIDES = ("left", "top", "right", "bottom")


def parse_extend(text: str) -> dict[str, int]:
    """"left=128,top=64" -> {"left": 128, "top": 64, "right": 0, "bottom": 0} (pixels, multiples of 8)."""
    sides = dict.fromkeys(SIDES, 0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name.strip() not in sides or not re.fullmatch(r"[0-9]{1,5}", value.strip()):
            raise SdcliError(f"--extend {shown(text)}: write sides as left=128,top=64 (left, top, right, bottom)")
        sides[name.strip()] = int(value)
    if any(v % 8 or v > 4096 for v in sides.values()) or not any(sides.values()):
        raise SdcliError(f"--extend {shown(text)}: each side must be a multiple of 8 up to 4096, and one above 0")
    return sides


def extend(image: Image.Image, mask: Image.Image | None, sides: dict[str, int]) -> tuple[Image.Image, Image.Image]:
    """Outpainting: grow the canvas (the new border starts as the image's edge pixels, stretched out) and
    mark the border for repainting, together with the mask's own white part if a mask is given."""
    left, top, right, bottom = (sides[k] for k in SIDES)
    pixels = np.pad(np.asarray(image), ((top, bottom), (left, right), (0, 0)), mode="edge")
    grown = Image.new("L", (pixels.shape[1], pixels.shape[0]), 255)
    grown.paste(mask.convert("L") if mask is not None else Image.new("L", image.size, 0), (left, top))
    return Image.fromarray(pixels), grown
