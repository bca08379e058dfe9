"""The main job on the embedded tiny model (what `make demo` runs).

Builds the offline tiny Stable Diffusion pipeline, attaches each registered algorithm with non-zero
weights to the UNet (attention + feed-forward) and the text encoder, renders the same prompt and seed
at scales 0, 0.5 and 1, and writes one labelled grid: rows are algorithms, columns are scales.
Scale 0 is the base model, so the first column is identical in every row.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from lycoris_lite import ALGORITHMS, PRESETS, AdapterModel, get_algorithm
from lycoris_lite.models import build_tiny_sd_pipeline

# settings that fit the tiny model's 8..128-wide layers
SETTINGS = {
    "lora": {"r": 4, "alpha": 4},
    "loha": {"r": 4, "alpha": 16},
    "lokr": {"r": 4, "alpha": 4},
    "oft": {"block_size": 4},
    "boft": {"block_size": 4, "butterfly_factor": 2},
    "hra": {"r": 4},
}
SCALES = (0.0, 0.5, 1.0)


def render(pipe, prompt: str, seed: int, steps: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=6.0, generator=generator).images[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/demo", help="folder for the grid")
    parser.add_argument("--prompt", default="a photo of sks dog")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    start = time.time()
    pipe = build_tiny_sd_pipeline(seed=args.seed)
    rows = []
    for algo in ALGORITHMS:
        config_class = get_algorithm(algo).config_class
        unet_config = config_class(**SETTINGS[algo], target_modules=PRESETS["unet-attn-ff"], init_weights=False)
        text_config = config_class(**SETTINGS[algo], target_modules=PRESETS["text-encoder"], init_weights=False)
        unet, text_encoder = pipe.unet, pipe.text_encoder
        pipe.unet = AdapterModel(unet, unet_config, algo)
        pipe.text_encoder = AdapterModel(text_encoder, text_config, algo)
        row = []
        for scale in SCALES:
            pipe.unet.set_scale(algo, scale)
            pipe.text_encoder.set_scale(algo, scale)
            row.append(render(pipe, args.prompt, args.seed, args.steps))
        pipe.unet, pipe.text_encoder = pipe.unet.unload(), pipe.text_encoder.unload()
        rows.append((algo, row))
        print(f"{algo:5s} rendered at scales {', '.join(map(str, SCALES))}")

    cell, label = 128, 60
    grid = Image.new("RGB", (label + cell * len(SCALES), 20 + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, scale in enumerate(SCALES):
        draw.text((label + j * cell + 4, 4), f"scale {scale}", fill="black")
    for i, (algo, row) in enumerate(rows):
        draw.text((4, 20 + i * cell + cell // 2), algo, fill="black")
        for j, image in enumerate(row):
            grid.paste(image.resize((cell, cell), Image.NEAREST), (label + j * cell, 20 + i * cell))
    path = out / "grid.png"
    grid.save(path)
    print(f"wrote {path} ({len(rows)} algorithms x {len(SCALES)} scales) in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
