"""Draw the DreamBooth sample subject: a yellow toy duck, six views, into ``samples/instance/``.

The images are made here, from code, so the project ships no photographs of anyone's property. Each
view changes the background, the duck's position, size and facing, as photos of one subject would.
Two views get a caption file (same stem, ``.txt``) to show per-image prompts. The output is
deterministic: running the script again writes the same files.

    python samples/make_instance_images.py [--out samples/instance] [--size 128]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

# (background top, background bottom, centre x, centre y, scale, facing right, caption)
VIEWS = [
    ((135, 190, 235), (90, 160, 80), 0.50, 0.55, 1.00, True, None),
    ((240, 220, 200), (200, 170, 140), 0.42, 0.58, 0.85, False, None),
    ((110, 170, 220), (40, 90, 170), 0.55, 0.52, 1.10, True, "a photo of sks duck floating on blue water"),
    ((230, 230, 230), (170, 170, 170), 0.50, 0.60, 0.75, False, None),
    ((250, 200, 150), (120, 160, 90), 0.60, 0.56, 0.95, False, "a photo of sks duck on the grass at sunset"),
    ((200, 210, 250), (150, 120, 200), 0.45, 0.50, 1.05, True, None),
]


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
    for i, (top, bottom, cx, cy, scale, right, caption) in enumerate(VIEWS):
        path = out / f"duck_{i:02d}.png"
        draw_duck(args.size, top, bottom, cx, cy, scale, right).save(path, optimize=True)
        if caption:
            path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        print(path)


if __name__ == "__main__":
    main()
