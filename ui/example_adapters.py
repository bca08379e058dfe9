"""The web UI's example adapters for ``tiny-world``, trained by the DreamBooth trainer on its own world drawn
differently, and the checks of what each one promises.

    python ui/example_adapters.py [--out lycoris_lite/integrations/webui/examples] [--only outline swap]

``make tiny-model`` runs it after pretraining the model; it prints what each example changes
(:func:`measure`). Each example is one row of :data:`lycoris_lite.integrations.webui.EXAMPLES` (name,
algorithm, settings, UNet targets, trigger word) and one dataset: the first :data:`IMAGES` scenes of
:func:`lycoris_lite.models.world.scene` (seed :data:`DATA_SEED`) that the example can change, changed in one
way, captioned as the world captions them with the trigger word appended (``"a red circle on a blue
background, outline"``):

* ``outline`` (LoRA), a style: the object hollow, a band of :data:`OUTLINE_WIDTH` of its half-width inside
  its edge left.
* ``swap`` (OFT), a colour shift: the object in the colour :data:`SWAP` pairs with the captioned one (red
  and blue, green and yellow, purple and white trade places); scenes where that is the background's colour
  are left out.
* ``zoom`` (HRA): the object :data:`ZOOM` times larger, at its place.
* ``night`` (BOFT): the background black, the object as captioned.
* ``snow`` (LoHa): the object white (scenes with white in them left out).

The recipe (the committed files): the trainer (``pipelines/train_dreambooth.py``) on ``tiny-world`` at 32 px
with one torch thread, ``--seed 0``, batch :data:`BATCH`, AdamW (the trainer's defaults: weight decay 1e-2,
gradient norm clipped to 1) at a constant rate, the learning rate and steps of :data:`RECIPES`, latents
cached, the adapter on the UNet's layers of the row's targets and on the text encoder (``text-encoder``
preset), saved in float16. 300 to 800 steps, 20 to 60 s per example on one core.

The checks (:func:`kept`) read a picture drawn from a :func:`prompt` with the adapter at weight 1 and say
whether it shows the promised change; ``tests/test_ui_examples.py`` asserts that they hold in most held-out
scenes (:func:`check_scenes`) at weight 1, in few at weight 0, and that the pictures change visibly.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from lycoris_lite.integrations.webui import EXAMPLES, EXAMPLES_DIR  # noqa: E402
from lycoris_lite.models import TINY_WORLD_NAME, load_pipeline, world  # noqa: E402

RESOLUTION = 32
SUPERSAMPLE = 4
DATA_SEED = 0
IMAGES = 256
BATCH = 8
#: per example: (learning rate, steps); the rotations (OFT, BOFT, HRA) move further per step at a higher
#: rate, and a new way of drawing (outline) takes longer than a recolouring
RECIPES = {"outline": (1e-3, 500), "swap": (3e-3, 500), "zoom": (3e-3, 400),
           "night": (3e-3, 300), "snow": (1e-3, 600)}
OUTLINE_WIDTH = 0.35
SWAP = {"red": "blue", "blue": "red", "green": "yellow", "yellow": "green", "purple": "white", "white": "purple"}
ZOOM = 1.7
#: held-out scenes for the checks: another seed of the world
CHECK_SEED = 99


def _down(image: Image.Image) -> Image.Image:
    return image.resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX)


def draw_outline(s: world.Scene) -> Image.Image:
    """The scene with its object hollowed out: the filled shape eroded by :data:`OUTLINE_WIDTH` of its
    half-width is painted back in the background's colour."""
    big = world.draw(s, RESOLUTION * SUPERSAMPLE, supersample=1)
    filled = np.any(np.asarray(big) != world.PALETTE[s.background], axis=-1)
    width = max(3, round(OUTLINE_WIDTH * s.size * RESOLUTION * SUPERSAMPLE))
    inner = Image.fromarray(filled.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(2 * width + 1))
    big.paste(world.PALETTE[s.background], mask=inner)
    return _down(big)


def example_image(name: str, s: world.Scene) -> Image.Image | None:
    """The training picture of example ``name`` for scene ``s`` (None: the example leaves it out)."""
    if name == "outline":
        return draw_outline(s)
    if name == "swap":
        return world.draw(replace(s, colour=SWAP[s.colour])) if shows(name, s) else None
    if name == "night":
        return world.draw(replace(s, background="black"))
    if name == "zoom":
        return world.draw(replace(s, size=s.size * ZOOM))
    if name == "snow":
        return world.draw(replace(s, colour="white")) if shows(name, s) else None
    raise KeyError(f"no dataset for example {name!r}")


def prompt(name: str, s: world.Scene) -> str:
    """The caption of scene ``s`` in example ``name``'s data, trigger word appended."""
    return f"{s.caption}, {trigger_word(name)}"


def trigger_word(name: str) -> str:
    return next(words[0] for n, _, _, _, words in EXAMPLES if n == name)


def dataset(name: str, count: int = IMAGES, seed: int = DATA_SEED) -> list[tuple[Image.Image, str]]:
    """The first ``count`` (picture, caption) pairs of example ``name`` from the scenes of ``seed``."""
    pairs, index = [], 0
    while len(pairs) < count:
        s = world.scene(seed, index)
        index += 1
        image = example_image(name, s)
        if image is not None:
            pairs.append((image, prompt(name, s)))
    return pairs


# ---- what each example promises, read from a picture ----------------------------------------------------
def _border_colour(image: Image.Image) -> np.ndarray:
    """The median RGB of the picture's outermost pixels (the background, as :func:`world.detect` reads it)."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    return np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]), axis=0)


def _object_mask(image: Image.Image) -> np.ndarray:
    """The pixels far (RGB distance > 60) from the background, as :func:`world.detect` reads them."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    return np.linalg.norm(a - _border_colour(image), axis=-1) > 60


def filled_fraction(image: Image.Image) -> float:
    """How much of the object's bounding box the object covers (a disc ≈ 0.79, its outline ≈ 0.5); 1 when
    no object stands out."""
    mask = _object_mask(image)
    if mask.mean() < 0.01:
        return 1.0
    ys, xs = np.nonzero(mask)
    return float(mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)))


def hollow(image: Image.Image) -> bool:
    """Whether the object's centroid is background: a ring, a hollow square or triangle (a filled shape, or
    no object: False)."""
    mask = _object_mask(image)
    if mask.mean() < 0.01:
        return False
    ys, xs = np.nonzero(mask)
    return not mask[round(ys.mean()), round(xs.mean())]


def shows(name: str, s: world.Scene) -> bool:
    """Whether example ``name``'s change can show on scene ``s``: not ``swap`` where the swapped colour is
    the background's, ``night`` on a black background, or ``snow`` on a white one or with a white object."""
    return not ((name == "swap" and SWAP[s.colour] == s.background) or (name == "night" and s.background == "black")
                or (name == "snow" and "white" in (s.colour, s.background)))


def check_scenes(name: str, count: int = 8, seed: int = CHECK_SEED) -> list[world.Scene]:
    """The first ``count`` held-out scenes (``seed``) on which example ``name``'s change :func:`shows`."""
    scenes, index = [], 0
    while len(scenes) < count:
        s = world.scene(seed, index)
        index += 1
        if shows(name, s):
            scenes.append(s)
    return scenes


def kept(name: str, s: world.Scene, image: Image.Image, base: Image.Image) -> bool:
    """Whether ``image`` (drawn from :func:`prompt` of ``s`` with the adapter) shows what example ``name``
    promises, ``base`` being the same prompt and seed drawn without it: ``outline`` a :func:`hollow` object,
    ``swap`` the swapped colour (as
    :func:`world.detect` reads it), ``zoom`` an object of 1.5× the base's area, ``night`` a black background,
    ``snow`` a white object."""
    if name == "outline":
        return hollow(image)
    found = world.detect(image)
    if name == "swap":
        return found.found and found.colour == SWAP[s.colour]
    if name == "night":
        return found.background == "black"
    if name == "zoom":
        return found.area >= 1.5 * max(world.detect(base).area, 0.01)
    if name == "snow":
        return found.found and found.colour == "white"
    raise KeyError(f"no check for example {name!r}")


# ---- training --------------------------------------------------------------------------------------------
def _trainer():
    spec = importlib.util.spec_from_file_location("train_dreambooth", ROOT / "pipelines" / "train_dreambooth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trainer_arguments(name: str, data_dir: Path, output_dir: Path) -> list[str]:
    """The trainer's command line for example ``name`` (its row of ``EXAMPLES``, the recipe above)."""
    _, algo, settings, unet_targets, words = next(row for row in EXAMPLES if row[0] == name)
    learning_rate, steps = RECIPES[name]
    flags = {"r": "--rank", "alpha": "--alpha", "block_size": "--block_size", "butterfly_factor": "--butterfly_factor"}
    argv = ["--pretrained_model_name_or_path", TINY_WORLD_NAME, "--instance_data_dir", str(data_dir),
            "--instance_prompt", words[0], "--resolution", str(RESOLUTION), "--center_crop", "--algo", algo,
            "--unet_targets", unet_targets, "--train_batch_size", str(BATCH), "--max_train_steps", str(steps),
            "--learning_rate", str(learning_rate), "--train_text_encoder", "--cache_latents", "--seed", "0",
            "--checkpointing_steps", str(10 * steps), "--save_precision", "fp16", "--output_dir", str(output_dir),
            "--output_name", name]
    for key, value in settings.items():
        argv += [flags[key], str(value)]
    return argv


def train(name: str, out: Path, log=print) -> Path:
    """Train example ``name`` (the module docstring's recipe) and copy its file to ``out/<name>.safetensors``."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir, output_dir = Path(tmp) / "data", Path(tmp) / "run"
        data_dir.mkdir()
        for i, (image, caption) in enumerate(dataset(name)):
            image.save(data_dir / f"{i:04d}.png")
            (data_dir / f"{i:04d}.txt").write_text(caption)
        start = time.time()
        status = _trainer().main(trainer_arguments(name, data_dir, output_dir))
        if status:
            raise SystemExit(f"training {name} failed (exit status {status})")
        target = out / f"{name}.safetensors"
        shutil.copyfile(output_dir / f"{name}.safetensors", target)
    log(f"{name}: trained in {time.time() - start:.0f} s, {target.stat().st_size / 1024:.0f} kB")
    return target


def effect(name: str, scenes: list[world.Scene], base: list[Image.Image], adapted: list[Image.Image]) -> dict:
    """What example ``name`` did to the pictures of ``scenes`` (their :func:`prompt`, same seeds) drawn at
    weight 0 (``base``) and 1 (``adapted``): the fraction :func:`kept` at each weight, the mean absolute pixel
    difference (0-255) and, where the example has one, the mean of its measure at each weight."""
    measures = {"outline": filled_fraction}
    result = {"kept at 0": float(np.mean([kept(name, s, b, b) for s, b in zip(scenes, base)])),
              "kept at 1": float(np.mean([kept(name, s, a, b) for s, a, b in zip(scenes, adapted, base)])),
              "mean abs diff": float(np.mean([np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean()
                                              for a, b in zip(adapted, base)]))}
    if name in measures:
        result[measures[name].__name__] = tuple(round(float(np.mean([measures[name](im) for im in images])), 3)
                                                for images in (base, adapted))
    if name == "zoom":
        result["area"] = tuple(round(float(np.mean([world.detect(im).area for im in images])), 3)
                               for images in (base, adapted))
    return result


def measure(pipe, name: str, folder: Path = EXAMPLES_DIR, count: int = 8, steps: int = 20,
            guidance: float = 3.0) -> dict:
    """:func:`effect` of example ``name`` (``folder/<name>.safetensors``) on ``pipe`` over ``count``
    :func:`check_scenes`, one batch per weight (generator 0)."""
    import lycoris_lite

    scenes = check_scenes(name, count)
    prompts = [prompt(name, s) for s in scenes]

    def draw():
        return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=RESOLUTION, width=RESOLUTION,
                    generator=torch.Generator().manual_seed(0)).images

    pipe = lycoris_lite.enable(pipe)
    base = draw()
    pipe.load_adapter(str(folder / f"{name}.safetensors"), name)
    adapted = draw()
    pipe.unload_adapters()
    return effect(name, scenes, base, adapted)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=EXAMPLES_DIR, help="folder for <name>.safetensors")
    parser.add_argument("--only", nargs="+", choices=[row[0] for row in EXAMPLES], help="train these examples only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    names = args.only or [row[0] for row in EXAMPLES]
    for name in names:
        train(name, args.out, log=lambda line: print(line, flush=True))
    pipe = load_pipeline(TINY_WORLD_NAME)
    pipe.set_progress_bar_config(disable=True)
    for name in names:
        print(name, measure(pipe, name, args.out), flush=True)


if __name__ == "__main__":
    main()
