"""The main job on the embedded tiny model (what `make demo` runs).

1. Trains a DreamBooth adapter of each algorithm on the sample duck (``samples/instance``) with the
   trainer and the algorithm's sample config: ``python pipelines/train_dreambooth.py --config
   samples/dreambooth_<algo>.toml`` (two trainings at a time, one thread each).
2. Loads each adapter with ``pipe.load_adapter`` and renders the instance prompt at scales 0, 0.5 and 1
   into one grid (rows: algorithms, columns: scales; scale 0 is the base model, so the first column is
   the same in every row), and prints each adapter's held-out denoising loss on the duck images before
   and after training.

The tiny model's VAE and UNet are random, so its images are textures, not ducks: the grid shows the
adapters at work, the held-out loss shows that they learned.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lycoris_lite  # noqa: E402
from lycoris_lite import ALGORITHMS  # noqa: E402
from lycoris_lite.models import build_tiny_sd_pipeline  # noqa: E402
from lycoris_lite.integrations.training import data, loss  # noqa: E402

SCALES = (0.0, 0.5, 1.0)
PROMPT = "a photo of sks duck"


def train_all(algos: list[str], out: Path, parallel: int) -> dict[str, Path]:
    """Run the trainer for each algorithm (``parallel`` at a time); returns the adapter files."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    pending, running, files = list(algos), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            algo = pending.pop(0)
            folder = out / algo
            cmd = [sys.executable, str(ROOT / "pipelines" / "train_dreambooth.py"),
                   "--config", str(ROOT / "samples" / f"dreambooth_{algo}.toml"), "--output_dir", str(folder)]
            print("$", " ".join(os.path.relpath(c) if c.startswith(str(ROOT)) else c for c in cmd[1:]), flush=True)
            log = open(out / f"{algo}.log", "w")
            running[algo] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        time.sleep(0.2)
        for algo, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[algo]
            if proc.returncode:
                sys.exit(f"training {algo} failed; see {out / f'{algo}.log'}")
            files[algo] = next((out / algo).glob("*.safetensors"))
            print(f"trained {algo}: {files[algo]}", flush=True)
    return {algo: files[algo] for algo in algos}


def render(pipe, seed: int, steps: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=6.0, generator=generator).images[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/demo", help="folder for the trainings and the grid")
    parser.add_argument("--algos", default=",".join(ALGORITHMS), help="comma-separated algorithms to train")
    parser.add_argument("--parallel", type=int, default=2, help="trainings at a time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=8, help="denoising steps of the grid's images")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    start = time.time()

    files = train_all(args.algos.split(","), out, args.parallel)

    pipe = lycoris_lite.enable(build_tiny_sd_pipeline(seed=0))  # the model the sample configs train ("tiny-sd")
    pipe.set_progress_bar_config(disable=True)
    examples = data.load_examples(ROOT / "samples" / "instance", PROMPT)
    pixels = torch.stack([data.transform(e.image, 64, True, False, None) for e in examples])
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def heldout() -> float:
        return loss.heldout_loss(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler, pixels, PROMPT)

    base_loss = heldout()
    rows = []
    for algo, path in files.items():
        row = []
        for scale in SCALES:
            pipe.load_adapter(path, scale=scale)
            row.append(render(pipe, args.seed, args.steps))
            if scale == 1.0:
                trained_loss = heldout()
            pipe.unload_adapters()
        rows.append((algo, row))
        print(f"{algo:5s} held-out denoising loss on the duck images: {base_loss:.3f} (base) -> {trained_loss:.3f}")

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
    print(f"\nwrote {path} ({len(rows)} algorithms x scales {', '.join(map(str, SCALES))}) in {time.time() - start:.0f}s")
    print(f"trained adapters (with checkpoints and validation images): {out}/<algo>/")
    print("open the web UI to try them: make ui   (or: python ui/app.py)")


if __name__ == "__main__":
    main()
