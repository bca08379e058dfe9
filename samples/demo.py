"""The main job on the embedded pretrained model, ``tiny-world`` (what `make demo` runs).

1. Trains a DreamBooth adapter of each algorithm on the sample duck (``samples/instance``: twelve photos,
   each captioned with its background, none red; a subject the base model has never seen: it knows only
   flat circles, squares and triangles) with the trainer and the algorithm's sample config: ``python
   pipelines/train_dreambooth.py --config samples/dreambooth_<algo>.toml`` (two trainings at a time, one
   thread each).
2. Loads each adapter with ``pipe.load_adapter`` and renders, for four seeds each, the instance prompt at
   scales 0, 0.5 and 1 and a new context at scale 1 (``a photo of sks duck on a red background``), into
   one grid (rows: algorithms; scale 0 is the base model's idea of the prompt, the same in every row).
3. Measures what the grid shows: in how many images the duck is detected
   (:func:`lycoris_lite.models.world.subject_detected`: nearer a duck photo, or one repainted on the
   image's background, than any world scene in colour layout), how many backgrounds of the new context
   are red, how many objects on them are yellow like the duck (:func:`lycoris_lite.models.world.detect`)
   and how close they are to the photos (:func:`lycoris_lite.models.world.subject_similarity`, against
   the base model's on the same prompt), and the held-out denoising loss on the duck photos (with their
   captions) before and after training.
4. Does the same for the LoRA sample config on ``tiny-world-flux``, the Flux.1-shaped pretrained model (the
   grid's last row, its own base at scale 0; ``--no-flux`` skips it): the same command with
   ``--pretrained_model_name_or_path tiny-world-flux``.
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
from lycoris_lite.integrations.training import data, loss  # noqa: E402
from lycoris_lite.models import load_pipeline, world  # noqa: E402

PROMPT = "a photo of sks duck"
CONTEXT = "a photo of sks duck on a red background"
#: the grid's columns: (label, prompt, scale)
COLUMNS = (("scale 0 (base)", PROMPT, 0.0), ("scale 0.5", PROMPT, 0.5), ("scale 1", PROMPT, 1.0),
           ("on a red background", CONTEXT, 1.0))
SEEDS = (0, 1, 2, 3)
#: the grid's last row: the LoRA sample config on tiny-world-flux (its scale-0 cell is that model's base)
FLUX_ROW = "flux-lora"


def train_all(jobs: dict[str, tuple[str, Path, list[str]]], out: Path, parallel: int) -> dict[str, Path]:
    """Run the trainer for each job, ``name -> (algorithm, output folder, more arguments)``, with the
    algorithm's sample config (``parallel`` at a time, logs in ``out``); returns the adapter files."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    pending, running, files = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            algo = pending.pop(0)
            config, folder, extra = jobs[algo]
            cmd = [sys.executable, str(ROOT / "pipelines" / "train_dreambooth.py"),
                   "--config", str(ROOT / "samples" / f"dreambooth_{config}.toml"), "--output_dir", str(folder), *extra]
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
            files[algo] = next(jobs[algo][1].glob("*.safetensors"))
            print(f"trained {algo}: {files[algo]}", flush=True)
    return {algo: files[algo] for algo in jobs}


def instance_images(resolution: int = 32) -> list[Image.Image]:
    """The subject's photos at the model's resolution (the trainer's resize: Lanczos, centre crop)."""
    return [e.image.convert("RGB").resize((resolution, resolution), Image.Resampling.LANCZOS)
            for e in data.load_examples(ROOT / "samples" / "instance", PROMPT)]


def render(pipe, prompt: str, steps: int, seeds=SEEDS) -> list[Image.Image]:
    """One image per seed (each its own generator), 32 px, guidance 3 (classifier-free for tiny-world, the
    distilled guidance input for tiny-world-flux)."""
    return [pipe(prompt, num_inference_steps=steps, guidance_scale=3.0, height=32, width=32,
                 generator=torch.Generator().manual_seed(seed)).images[0] for seed in seeds]


def tile(images: list[Image.Image], cell: int) -> Image.Image:
    """Four images as a 2×2 tile of ``cell`` pixels."""
    half = cell // 2
    out = Image.new("RGB", (cell, cell), "white")
    for k, image in enumerate(images[:4]):
        out.paste(image.resize((half - 2, half - 2), Image.Resampling.NEAREST), ((k % 2) * half + 1, (k // 2) * half + 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/demo", help="folder for the trainings and the grid")
    parser.add_argument("--algos", default=",".join(ALGORITHMS), help="comma-separated algorithms to train")
    parser.add_argument("--parallel", type=int, default=2, help="trainings at a time")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps of the grid's images")
    parser.add_argument("--no-flux", dest="flux", action="store_false",
                        help="skip the last row: LoRA on tiny-world-flux, the Flux.1-shaped pretrained model")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    start = time.time()

    jobs = {algo: (algo, out / algo, []) for algo in args.algos.split(",")}
    if args.flux:  # its own folder: `make ui` (tiny-world) lists the adapters under outputs/demo
        jobs[FLUX_ROW] = ("lora", out.parent / f"{out.name}-flux" / "lora",
                          ["--pretrained_model_name_or_path", "tiny-world-flux"])
    files = train_all(jobs, out, args.parallel)

    subject = instance_images()
    examples = data.load_examples(ROOT / "samples" / "instance", PROMPT)
    pixels = torch.stack([data.transform(e.image, 32, True, False, None) for e in examples])
    captions = [e.prompt for e in examples]  # each photo's caption (it names the background)
    rows = []
    print(f"\n{'':9s}  duck detected (of {len(SEEDS)} seeds): scale 0 / 0.5 / 1 / on red | on red: red background, "
          "yellow object, similarity to the photos (the base's) | held-out loss on the duck photos")
    for model in ("tiny-world", "tiny-world-flux"):
        names = [name for name in files if (name == FLUX_ROW) == (model == "tiny-world-flux")]
        if not names:
            continue
        pipe = lycoris_lite.enable(load_pipeline(model))  # the model the sample configs train
        pipe.set_progress_bar_config(disable=True)
        if model == "tiny-world":
            scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

            def heldout() -> str:
                return f"{loss.heldout_loss(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler, pixels, captions):.3f}"
        else:  # the held-out loss is the UNet objective's
            def heldout() -> str:
                return "-"
        base_loss = heldout()
        base = render(pipe, PROMPT, args.steps)
        base_context = world.subject_similarity(render(pipe, CONTEXT, args.steps), subject).mean()
        for algo in names:
            row = []
            for _, prompt, scale in COLUMNS:
                if scale == 0.0:
                    row.append(base)
                    continue
                pipe.load_adapter(files[algo], scale=scale)
                row.append(render(pipe, prompt, args.steps))
                if scale == 1.0 and prompt == PROMPT:
                    trained_loss = heldout()
                pipe.unload_adapters()
            rows.append((algo, row))
            ducks = [int(world.subject_detected(images, subject).sum()) for images in row]
            context = [world.detect(im) for im in row[-1]]
            red = sum(d.background == "red" for d in context)
            yellow = sum(d.background == "red" and d.colour == "yellow" for d in context)
            similarity = world.subject_similarity(row[-1], subject).mean()
            print(f"{algo:9s}  {' / '.join(map(str, ducks)):>28s}            | {red}, {yellow} of {len(SEEDS)}, "
                  f"{similarity:.2f} ({base_context:.2f}){'':32s}| {base_loss} (base) -> {trained_loss}")

    cell, label, top = 128, 60, 20
    strip = 32
    grid = Image.new("RGB", (label + cell * len(COLUMNS), top + strip + 8 + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, top + 10), "subject", fill="black")
    for k, image in enumerate(subject):
        grid.paste(image, (label + k * (strip + 4), top))
    y0 = top + strip + 8
    for j, (name, _, _) in enumerate(COLUMNS):
        draw.text((label + j * cell + 4, 4), name, fill="black")
    for i, (algo, row) in enumerate(rows):
        draw.text((4, y0 + i * cell + cell // 2), algo, fill="black")
        for j, images in enumerate(row):
            grid.paste(tile(images, cell), (label + j * cell, y0 + i * cell))
    path = out / "grid.png"
    grid.save(path)
    print(f"\nwrote {path}: {len(rows)} algorithms x ({'; '.join(c[0] for c in COLUMNS)}), seeds "
          f"{', '.join(map(str, SEEDS))} in each cell, in {time.time() - start:.0f}s")
    print(f"trained adapters (with checkpoints and validation images): {out}/<algo>/"
          + (f", on tiny-world-flux: {jobs[FLUX_ROW][1]}/" if args.flux else ""))
    print("open the web UI to try them: make ui   (or: python ui/app.py --adapters outputs/demo)")


if __name__ == "__main__":
    main()
