"""Draw the DreamBooth sample subject: a yellow toy duck, twelve photos, into ``samples/instance/``.

The images are made here, from code, so the project ships no photographs of anyone's property. Six poses
(the duck's position, size and facing change, as in photos of one subject), each photographed on two of
the embedded model's backgrounds (blue, white, green, gray, black: never red, so that "on a red
background" is a context the adapter has not seen). Every photo has a caption file (same stem, ``.txt``)
naming its background, ``a photo of sks duck on a blue background``: what the caption explains (the
background, a word the base model knows) is not learnt into ``sks duck``, so the subject can be put on
other backgrounds afterwards. The output is deterministic: running the script again writes the same files.

    python samples/make_instance_images.py [--out samples/instance] [--size 128]
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from PIL import Image, ImageDraw

# (centre x, centre y, scale, facing right): the six poses
POSES = [(0.50, 0.55, 1.00, True), (0.42, 0.58, 0.85, False), (0.55, 0.52, 1.10, True), (0.50, 0.60, 0.75, False),
         (0.60, 0.56, 0.95, False), (0.45, 0.50, 1.05, True)]
#: the backgrounds, cycled over the photos (the RGB of the embedded model's palette: ``world.PALETTE``)
BACKGROUNDS = {"blue": (40, 80, 220), "white": (245, 245, 245), "green": (40, 170, 60), "gray": (128, 128, 128),
               "black": (20, 20, 20)}
CAPTION = "a photo of sks duck on a {} background"


def photos() -> list[tuple[tuple[float, float, float, bool], str]]:
    """The twelve (pose, background) pairs: each pose twice, the backgrounds in turn."""
    return list(zip([pose for pose in POSES for _ in range(2)], itertools.cycle(BACKGROUNDS)))


def draw_duck(size: int, top, bottom, cx: float, cy: float, scale: float, right: bool) -> Image.Image:
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    for y in range(size):  # vertical gradient background
        t = y / (size - 1)
        draw.line([(0, y), (size, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    s = size * 0.32 * scale
    x, y = cx * size, cy * size
    d = 1 if right else -1
    yellow, orange, dark = (250, 215, 40), (245, 130, 20), (30, 30, 30)
    draw.ellipse([x - 0.9 * s, y + 0.75 * s, x + 0.9 * s, y + 0.95 * s], fill=tuple(int(c * 0.7) for c in bottom))
    draw.ellipse([x - s, y - 0.1 * s, x + s, y + 0.8 * s], fill=yellow)                        # body
    draw.polygon([(x - d * s, y + 0.1 * s), (x - d * 1.35 * s, y - 0.15 * s), (x - d * 0.8 * s, y + 0.35 * s)],
                 fill=yellow)                                                                  # tail
    hx, hy = x + d * 0.45 * s, y - 0.45 * s
    draw.ellipse([hx - 0.5 * s, hy - 0.5 * s, hx + 0.5 * s, hy + 0.5 * s], fill=yellow)         # head
    draw.polygon([(hx + d * 0.4 * s, hy - 0.05 * s), (hx + d * 0.85 * s, hy + 0.08 * s),
                  (hx + d * 0.4 * s, hy + 0.2 * s)], fill=orange)                              # beak
    ex, ey = hx + d * 0.18 * s, hy - 0.15 * s
    draw.ellipse([ex - 0.08 * s, ey - 0.08 * s, ex + 0.08 * s, ey + 0.08 * s], fill=dark)      # eye
    draw.arc([x - 0.55 * s, y + 0.05 * s, x + 0.45 * s, y + 0.55 * s], 200 if right else -20, 340 if right else 120,
             fill=(220, 175, 20), width=max(1, size // 64))                                    # wing
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "instance"))
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, ((cx, cy, scale, right), background) in enumerate(photos()):
        path = out / f"duck_{i:02d}.png"
        colour = BACKGROUNDS[background]
        draw_duck(args.size, colour, colour, cx, cy, scale, right).save(path, optimize=True)
        path.with_suffix(".txt").write_text(CAPTION.format(background) + "\n", encoding="utf-8")
        print(path)


if __name__ == "__main__":
    main()
