"""The synthetic world of the embedded pretrained model: captioned scenes of one flat shape on a flat
background, and a detector that reads a scene back.

A scene is a :class:`Scene`: a shape (circle, square, triangle) of a colour at a position (left, right,
top, bottom or centre, with jitter) and a size on a background colour, drawn at 4× and downsampled (soft
edges). Its caption names the colour, the shape, the background and, for half the scenes, the position:
``"a red circle on a blue background"``, ``"a red circle at the left on a blue background"``.
:func:`scene` is a pure function of ``(seed, index)``: the dataset is a recipe, never a download.

:func:`detect` is the world's measuring instrument (what DINO/CLIP are for photos): the background is the
median colour of the border, the object the pixels far from it; its colour is the nearest palette entry to
their median, its shape comes from how much of its bounding box it fills (square ≈ 1, circle ≈ π/4,
triangle ≈ ½; edge pixels count by the share of the object's colour in them), its position from the
centre of its bounding box (where the scene centres it). It reads every drawn scene exactly.

:func:`clutter` makes generic pictures (gradients, random shapes of any colour) for the autoencoder, so
that it also encodes what lies outside the world. :func:`appearance` / :func:`subject_similarity` /
:func:`subject_detected` are the feature space for *subject fidelity* of a DreamBooth subject (what DINO
is for photos): the subject's colours and silhouette, wherever it stands and on whatever background.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

#: the colours of objects and backgrounds, RGB
PALETTE = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 180), "white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128),
}
OBJECT_COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
BACKGROUNDS = ("black", "gray", "white", "red", "green", "blue")
SHAPES = ("circle", "square", "triangle")
#: position name -> centre as a fraction of the image side (x, y)
POSITIONS = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72),
             "center": (0.5, 0.5)}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    position: str
    size: float          # the shape's half-width as a fraction of the image side
    jitter: tuple[float, float]
    mention_position: bool

    @property
    def caption(self) -> str:
        where = f" at the {self.position}" if self.mention_position and self.position != "center" else ""
        if self.mention_position and self.position == "center":
            where = " in the center"
        return f"a {self.colour} {self.shape}{where} on a {self.background} background"


def scene(seed: int, index: int) -> Scene:
    """The ``index``-th scene of the world drawn with ``seed``: every field uniform over its choices
    (the object's colour never the background's), size 0.14–0.22, jitter ±0.05."""
    rng = random.Random(seed * 1_000_003 + index)
    background = rng.choice(BACKGROUNDS)
    colour = rng.choice([c for c in OBJECT_COLOURS if c != background])
    return Scene(rng.choice(SHAPES), colour, background, rng.choice(list(POSITIONS)), rng.uniform(0.14, 0.22),
                 (rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05)), rng.random() < 0.5)


def draw(s: Scene, size: int = 32, supersample: int = 4) -> Image.Image:
    """The scene as an RGB image of ``size``² pixels: drawn at ``supersample``× and box-filtered down
    (soft edges, as a camera's pixels). A square has the circle's area (side ``r·√π``), a triangle too
    (half-width ``r·√(π/2)``), so size alone never tells the shapes apart."""
    big = size * supersample
    image = Image.new("RGB", (big, big), PALETTE[s.background])
    cx, cy = POSITIONS[s.position]
    cx, cy, r = (cx + s.jitter[0]) * big, (cy + s.jitter[1]) * big, s.size * big
    pen = ImageDraw.Draw(image)
    fill = PALETTE[s.colour]
    if s.shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif s.shape == "square":
        h = r * math.sqrt(math.pi) / 2  # the circle's area
        pen.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:  # an upward triangle with the circle's area, centred on its bounding box
        h = r * math.sqrt(math.pi / 2)
        pen.polygon([(cx - h, cy + h), (cx + h, cy + h), (cx, cy - h)], fill=fill)
    return image.resize((size, size), Image.Resampling.BOX)


def nearest_colour(rgb, names=tuple(PALETTE)) -> str:
    """The palette name among ``names`` nearest (RGB distance) to ``rgb``."""
    return min(names, key=lambda n: sum((a - b) ** 2 for a, b in zip(PALETTE[n], rgb)))


def _near(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one pixel in each direction (the object's blended rim)."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


@dataclass(frozen=True)
class Detection:
    """What :func:`detect` reads: ``found`` is False when no object stands out from the background
    (then ``shape``/``colour``/``position`` are None)."""

    background: str
    found: bool
    shape: str | None = None
    colour: str | None = None
    position: str | None = None
    area: float = 0.0

    def matches(self, s: Scene) -> bool:
        """The detection agrees with the scene on shape, colour and background."""
        return self.found and (self.shape, self.colour, self.background) == (s.shape, s.colour, s.background)


def detect(image: Image.Image, threshold: float = 60.0, min_area: float = 0.01) -> Detection:
    """Read a scene from an image (see the module docstring). ``threshold``: the RGB distance from the
    background beyond which a pixel belongs to the object; ``min_area``: the smallest object, as a
    fraction of the image."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w, _ = a.shape
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    bg_rgb = np.median(border, axis=0)
    background = nearest_colour(bg_rgb)
    mask = np.linalg.norm(a - bg_rgb, axis=-1) > threshold
    if mask.mean() < min_area:
        return Detection(background, False)
    ys, xs = np.nonzero(mask)
    rgb = np.median(a[mask], axis=0)
    colour = nearest_colour(rgb, OBJECT_COLOURS)
    # coverage: how much of each pixel the object covers (its colour's share along background -> object),
    # so the edge pixels a camera (or the 4x drawing) blends count by their share
    direction = rgb - bg_rgb
    coverage = np.clip((a - bg_rgb) @ direction / max(float(direction @ direction), 1e-6), 0, 1) * _near(mask)
    width, height = coverage.max(axis=0).sum(), coverage.max(axis=1).sum()
    fill = coverage.sum() / max(width * height, 1e-6)
    shape = "square" if fill > 0.88 else "circle" if fill > 0.66 else "triangle"
    cx, cy = (xs.min() + xs.max() + 1) / (2 * w), (ys.min() + ys.max() + 1) / (2 * h)  # the box's centre
    dx, dy = cx - 0.5, cy - 0.5
    position = "center" if max(abs(dx), abs(dy)) < 0.12 else (
        ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("bottom" if dy > 0 else "top"))
    return Detection(background, True, shape, colour, position, float(mask.mean()))


def clutter(seed: int, index: int, size: int = 32, supersample: int = 4) -> Image.Image:
    """A generic picture for the autoencoder: a random background (flat, or a linear gradient between two
    random colours in a random direction) under one to five random shapes (ellipses, rectangles, polygons
    of 3–6 corners, lines) of random colours and sizes, some of them small details. The world's scenes
    alone would teach the VAE only eight flat colours; with these it also reconstructs pictures it was
    never shown (the DreamBooth subject, a style), as a real model's VAE does. Pure function of
    ``(seed, index)``."""
    rng = random.Random(seed * 1_000_003 + index + 7_777_777)
    big = size * supersample

    def colour() -> tuple[int, int, int]:
        return tuple(rng.randrange(256) for _ in range(3))

    if rng.random() < 0.3:
        image = Image.new("RGB", (big, big), colour())
    else:
        a, b = np.array(colour(), np.float32), np.array(colour(), np.float32)
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:big, 0:big] / (big - 1) - 0.5
        t = np.clip(0.5 + xx * math.cos(angle) + yy * math.sin(angle), 0, 1)[..., None]
        image = Image.fromarray((a + (b - a) * t).round().astype(np.uint8))
    pen = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 5)):
        kind = rng.choice(("ellipse", "rectangle", "polygon", "line"))
        r = big * (rng.uniform(0.03, 0.1) if rng.random() < 0.4 else rng.uniform(0.1, 0.35))
        cx, cy = rng.uniform(0.1, 0.9) * big, rng.uniform(0.1, 0.9) * big
        if kind == "ellipse":
            pen.ellipse([cx - r, cy - r * rng.uniform(0.5, 1), cx + r, cy + r * rng.uniform(0.5, 1)], fill=colour())
        elif kind == "rectangle":
            pen.rectangle([cx - r, cy - r * rng.uniform(0.4, 1), cx + r, cy + r * rng.uniform(0.4, 1)], fill=colour())
        elif kind == "polygon":
            corners = rng.randint(3, 6)
            pen.polygon([(cx + r * rng.uniform(0.5, 1) * math.cos(2 * math.pi * k / corners + rng.uniform(0, 0.5)),
                          cy + r * rng.uniform(0.5, 1) * math.sin(2 * math.pi * k / corners + rng.uniform(0, 0.5)))
                         for k in range(corners)], fill=colour())
        else:
            pen.line([cx - r, cy - r * rng.uniform(-1, 1), cx + r, cy + r * rng.uniform(-1, 1)], fill=colour(),
                     width=max(1, round(r * rng.uniform(0.05, 0.2))))
    return image.resize((size, size), Image.Resampling.BOX)


def object_mask(image: Image.Image, threshold: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """``(mask, pixels)``: the pixels that stand out from the background (H×W bool) and the image as
    float RGB. The background is estimated per row from the two outermost pixels on each side (their
    median), so flat backgrounds and the vertical gradients of photos both come out clean."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    rows = np.median(np.concatenate([a[:, :2], a[:, -2:]], axis=1), axis=1)  # H×3
    return np.linalg.norm(a - rows[:, None, :], axis=-1) > threshold, a


def on_background(images: list[Image.Image], background: str) -> list[Image.Image]:
    """The pictures with their background replaced by the flat palette colour ``background``: each
    pixel of :func:`object_mask` kept, the others painted. The references for :func:`subject_detected`
    when the subject is asked for on a background its photos do not have (``"sks duck on a red
    background"``): the subject's photos as they would look there."""
    out = []
    for image in images:
        mask, a = object_mask(image)
        a[~mask] = PALETTE[background]
        out.append(Image.fromarray(a.round().astype(np.uint8)))
    return out


def appearance(image: Image.Image) -> np.ndarray:
    """The world's feature space for *subject fidelity* (what DINO features are for photos): a unit vector,
    half the object's colours, half its silhouette. Colours: the square root of the histogram of the
    object's pixels over 8 levels per RGB channel (512 bins; the root lets a beak or an eye count next to
    the body). Silhouette: the object's mask resampled to 16×16 over its bounding box, read as its width
    on each row and its height on each column (the columns averaged with their mirror image, so a subject
    facing left and right is one subject), minus their mean: a disc, a square, a triangle and a duck of
    one size all differ. Two pictures of one subject on different backgrounds, at different places and
    sizes, are close. The zero vector when no object stands out."""
    mask, a = object_mask(image)
    if mask.mean() < 0.01:
        return np.zeros(512 + 32, np.float32)
    bins = (a[mask] // 32).astype(int)
    histogram = np.sqrt(np.bincount(bins[:, 0] * 64 + bins[:, 1] * 8 + bins[:, 2], minlength=512).astype(np.float32))
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    box = np.asarray(Image.fromarray(box.astype(np.uint8) * 255).resize((16, 16), Image.Resampling.BOX), np.float32)
    columns = box.mean(axis=0)
    silhouette = np.concatenate([box.mean(axis=1), (columns + columns[::-1]) / 2])
    silhouette -= silhouette.mean()
    parts = [v / (np.linalg.norm(v) + 1e-8) for v in (histogram, silhouette)]
    return np.concatenate(parts) / math.sqrt(2)


def subject_similarity(images: list[Image.Image], references: list[Image.Image]) -> np.ndarray:
    """For each image, the mean cosine similarity of its :func:`appearance` to the references' (the
    DreamBooth paper's DINO score, image by image): 1 is the subject itself, 0 nothing in common."""
    ref = np.stack([appearance(r) for r in references])
    return np.stack([appearance(im) for im in images]) @ ref.T.mean(axis=1)


def layout(image: Image.Image, side: int = 8) -> np.ndarray:
    """The picture's colour layout: its RGB averaged over ``side``×``side`` cells, in [0, 1] (a vector of
    ``3·side²``). Blur, noise and small details vanish; what is where, in which colours, stays."""
    return np.asarray(image.convert("RGB").resize((side, side), Image.Resampling.BOX), np.float32).ravel() / 255


@functools.lru_cache(maxsize=4)
def _world_layouts(seed: int, n: int) -> np.ndarray:
    return np.stack([layout(draw(scene(seed, i))) for i in range(n)])


def subject_detected(images: list[Image.Image], references: list[Image.Image], *, seed: int = 11,
                     scenes: int = 3000) -> np.ndarray:
    """Whether each image shows the subject of ``references`` rather than the world (bool array): a
    nearest-neighbour vote in :func:`layout` space between the references (their mirror images too, and
    all of them repainted on the image's own background by :func:`on_background`: the subject wherever
    it is asked for) and ``scenes`` scenes of the world (seed ``seed``): the image is the subject's when its
    nearest neighbour is a reference. A picture of the base model's world is nearest a scene; one of the
    subject, on its photos' backgrounds or another, nearest a photo."""
    mirrored = list(references) + [r.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for r in references]
    own = np.stack([layout(r) for r in mirrored])
    other = _world_layouts(seed, scenes)
    repainted: dict[str, np.ndarray] = {}
    detected = []
    for image in images:
        background = detect(image).background
        if background not in repainted:
            repainted[background] = np.stack([layout(r) for r in on_background(mirrored, background)])
        x = layout(image)
        nearest_ref = np.linalg.norm(np.concatenate([own, repainted[background]]) - x, axis=-1).min()
        detected.append(nearest_ref < np.linalg.norm(other - x, axis=-1).min())
    return np.array(detected, dtype=bool)
