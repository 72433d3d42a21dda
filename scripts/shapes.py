"""The demo model's world: a grammar of coloured shapes, drawn and analysed.

    a {size} {color} {shape} on a {color} background[ in the {position}]

`sample` draws a scene from a random.Random, `caption` writes its sentence, `parse` reads one back, `draw`
renders it, and `analyze` recovers (background, colour, shape, position) from any image by pixel analysis,
so it can grade what a model renders. Used by make_shapes.py (training data), eval_demo.py (accuracy) and
demo_grid.py (the README's grid).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# plain, saturated colours, far apart in RGB (the closest pair, orange/yellow, are 115 apart)
COLORS = {
    "red": (255, 0, 0), "green": (0, 180, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "purple": (128, 0, 192), "orange": (255, 140, 0), "white": (255, 255, 255), "black": (0, 0, 0),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (0.25, 0.34), "large": (0.50, 0.62)}  # the object's width (= height), a fraction of the image
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
MARGIN = 0.03  # an object never comes closer to the edge than this (of the image)
# analysis (see analyze): each threshold sits between the ideal shapes' values, nearer the circle's (which blur
# barely changes) than the triangle's or square's (which blur pulls towards the circle's)
CENTER_BOX = 0.12  # an object whose middle is this close to the image's middle (both axes) is centred
TRIANGLE_DROP = 0.54  # centre of mass from the top, in box heights: triangle 2/3, circle and square 1/2
SQUARE_DIAGONAL = 1.1  # reach along the diagonals over reach along the axes: square sqrt(2), circle 1
SUPERSAMPLE = 4  # drawn this much larger, then reduced: anti-aliased edges

_PROMPT = re.compile(r"^a (\w+) (\w+) (\w+) on a (\w+) background(?: in the ([a-z ]+))?$")


@dataclass(frozen=True)
class Scene:
    size: str
    color: str
    shape: str
    background: str
    position: str | None  # None: anywhere (the caption names no position)
    extent: float  # width and height of the object, in image fractions
    cx: float  # the middle of its bounding box, in image fractions
    cy: float


def sample(rng: random.Random, p_position: float = 0.6) -> Scene:
    """A random scene; the object and background colours always differ."""
    color, background = rng.sample(sorted(COLORS), 2)
    size, shape = rng.choice(sorted(SIZES)), rng.choice(SHAPES)
    position = rng.choice(POSITIONS) if rng.random() < p_position else None
    extent = rng.uniform(*SIZES[size])
    half, jitter = extent / 2, 0.04
    lo, hi = MARGIN + half, 1 - MARGIN - half  # the middle's range that keeps the object inside
    if position is None:
        cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
    elif position == "center":
        cx, cy = 0.5 + rng.uniform(-jitter, jitter), 0.5 + rng.uniform(-jitter, jitter)
    else:  # pushed into its corner, up to `jitter` away from the margin
        vertical, horizontal = position.split()
        cx = lo + rng.uniform(0, jitter) if horizontal == "left" else hi - rng.uniform(0, jitter)
        cy = lo + rng.uniform(0, jitter) if vertical == "top" else hi - rng.uniform(0, jitter)
    return Scene(size, color, shape, background, position, extent, cx, cy)


def caption(s: Scene) -> str:
    text = f"a {s.size} {s.color} {s.shape} on a {s.background} background"
    return f"{text} in the {s.position}" if s.position else text


def parse(prompt: str) -> dict | None:
    """{size, color, shape, background, position} of a grammar sentence, or None."""
    m = _PROMPT.match(prompt.strip())
    if not m or m[1] not in SIZES or m[2] not in COLORS or m[3] not in SHAPES or m[4] not in COLORS \
            or (m[5] is not None and m[5] not in POSITIONS):
        return None
    return dict(size=m[1], color=m[2], shape=m[3], background=m[4], position=m[5])


def draw(s: Scene, px: int = 64) -> Image.Image:
    big = px * SUPERSAMPLE
    image = Image.new("RGB", (big, big), COLORS[s.background])
    pen = ImageDraw.Draw(image)
    half = s.extent * big / 2
    left, top, right, bottom = s.cx * big - half, s.cy * big - half, s.cx * big + half, s.cy * big + half
    fill = COLORS[s.color]
    if s.shape == "circle":
        pen.ellipse((left, top, right, bottom), fill=fill)
    elif s.shape == "square":
        pen.rectangle((left, top, right, bottom), fill=fill)
    else:  # upright: apex at the top middle, base along the bottom
        pen.polygon([(s.cx * big, top), (right, bottom), (left, bottom)], fill=fill)
    return image.resize((px, px), Image.Resampling.BOX)


# --- analysis ---------------------------------------------------------------------------------------

_NAMES = sorted(COLORS)
_PALETTE = np.array([COLORS[n] for n in _NAMES], dtype=np.float32)


def _labels(rgb: np.ndarray) -> np.ndarray:
    """Each pixel's nearest named colour (an index into _NAMES)."""
    d = ((rgb[..., None, :] - _PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (stray pixels elsewhere are dropped)."""
    seen, best = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start], stack, blob = True, [start], []
        while stack:
            y, x = stack.pop()
            blob.append((y, x))
            for n in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= n[0] < mask.shape[0] and 0 <= n[1] < mask.shape[1] and mask[n] and not seen[n]:
                    seen[n] = True
                    stack.append(n)
        best = max(best, blob, key=len)
    out = np.zeros_like(mask)
    out[tuple(np.array(best).T)] = True
    return out


def _reach(coverage: np.ndarray, start: tuple[float, float], direction: tuple[float, float]) -> float:
    """How far (px) from `start` the object reaches along `direction`: the first point, in quarter-pixel
    steps, where the coverage (bilinearly interpolated) falls below 1/2."""
    h, w = coverage.shape
    t = 0.0
    while True:
        t += 0.25
        y, x = start[0] + t * direction[0], start[1] + t * direction[1]
        if not (0 <= y <= h - 1 and 0 <= x <= w - 1):
            return t
        y0, x0 = min(int(y), h - 2), min(int(x), w - 2)
        fy, fx = y - y0, x - x0
        value = ((1 - fy) * ((1 - fx) * coverage[y0, x0] + fx * coverage[y0, x0 + 1])
                 + fy * ((1 - fx) * coverage[y0 + 1, x0] + fx * coverage[y0 + 1, x0 + 1]))
        if value < 0.5:
            return t


def analyze(image: Image.Image) -> dict:
    """What an image shows: {background, color, shape, position, box, drop, diagonal}; color, shape and
    position are None when no object is found.

    The background is the border's most common named colour, the object's colour the most common other
    one. Each pixel's coverage by the object is read from where it lies between the two colours, so blurred
    edges count by how much they are covered; the object's box is the largest region at least half covered.
    Its shape is read from two measures of the coverage inside that box, both kept under blur:
    - drop: the height of its centre of mass, as a fraction of the box's height from the top. An upright
      triangle holds 3/4 of its area in its lower half (2/3); circles and squares are symmetric (1/2).
      TRIANGLE_DROP and above is a triangle.
    - diagonal: how far the object reaches from the box's middle along the diagonals, over how far along
      the axes: sqrt(2) for a square, 1 for a circle. SQUARE_DIAGONAL and above is a square, below it a
      circle.
    The position is the box's middle: within CENTER_BOX of the image's middle on both axes is "center",
    else its quadrant."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w, _ = rgb.shape
    labels = _labels(rgb)
    border = np.concatenate([labels[:2].ravel(), labels[-2:].ravel(), labels[:, :2].ravel(), labels[:, -2:].ravel()])
    bg = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    result = dict(background=_NAMES[bg], color=None, shape=None, position=None, box=None, drop=None,
                  diagonal=None)
    others = labels != bg
    if others.sum() < 0.005 * h * w:
        return result
    color = int(np.bincount(labels[others], minlength=len(_NAMES)).argmax())
    result["color"] = _NAMES[color]
    step = _PALETTE[color] - _PALETTE[bg]
    coverage = np.clip((rgb - _PALETTE[bg]) @ step / (step @ step), 0, 1)
    ys, xs = np.nonzero(_largest_blob(coverage >= 0.5))
    if len(ys) == 0:
        return result
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    inside = coverage[int(box[1]):int(box[3]), int(box[0]):int(box[2])]
    drop = float((inside.sum(1) @ (np.arange(inside.shape[0]) + 0.5)) / inside.sum() / inside.shape[0])
    middle = ((box[1] + box[3]) / 2 - 0.5, (box[0] + box[2]) / 2 - 0.5)  # in pixel-centre coordinates (y, x)
    axes = np.mean([_reach(coverage, middle, d) for d in ((0, 1), (0, -1), (1, 0), (-1, 0))])
    unit = 0.5 ** 0.5
    diagonals = np.mean([_reach(coverage, middle, (dy * unit, dx * unit)) for dy in (1, -1) for dx in (1, -1)])
    diagonal = float(diagonals / axes)
    shape = "triangle" if drop >= TRIANGLE_DROP else "square" if diagonal >= SQUARE_DIAGONAL else "circle"
    result.update(shape=shape, box=box, drop=drop, diagonal=diagonal)
    mx, my = (box[0] + box[2]) / 2 / w - 0.5, (box[1] + box[3]) / 2 / h - 0.5
    if abs(mx) < CENTER_BOX and abs(my) < CENTER_BOX:
        result["position"] = "center"
    else:
        result["position"] = f"{'top' if my < 0 else 'bottom'} {'left' if mx < 0 else 'right'}"
    return result
