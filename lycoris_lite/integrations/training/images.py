"""Images the trainer writes: generated class images and validation images, each file atomically."""

from __future__ import annotations

import hashlib
import inspect
from contextlib import ExitStack
from pathlib import Path

import torch

from ...io.formats.safe_io import atomic_write
from .data import image_files, mix_seed


def write_png(image, path: str | Path) -> Path:
    """Save a PIL image as PNG through a temporary file and a rename."""
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def render(pipe, prompt: str, *, count: int, seed: int, steps: int, resolution: int, batch_size: int,
           autocast=None) -> list:
    """``count`` images of ``prompt``; image ``i`` uses a generator seeded with ``(seed, i)`` (the same
    image whatever the batch size). A video pipeline (Wan) renders one-frame videos. The global RNG is
    left as it was."""
    device = pipe._execution_device
    video = {"num_frames": 1, "output_type": "pil"} if "num_frames" in inspect.signature(pipe.__call__).parameters else {}
    images = []
    with torch.random.fork_rng(devices=[]), torch.no_grad(), ExitStack() as stack:
        if autocast is not None:
            stack.enter_context(autocast)
        for start in range(0, count, batch_size):
            indices = range(start, min(count, start + batch_size))
            generators = [torch.Generator(device).manual_seed(mix_seed(seed, "image", i)) for i in indices]
            out = pipe(prompt=[prompt] * len(indices), num_inference_steps=steps, height=resolution, width=resolution,
                       generator=generators, **video)
            images += [frames[0] for frames in out.frames] if video else out.images
    return images


def generate_class_images(pipe, folder: str | Path, prompt: str, count: int, *, seed: int, steps: int,
                          resolution: int, batch_size: int, disabled: list = (), autocast=None) -> int:
    """Fill ``folder`` up to ``count`` images of ``prompt`` rendered by the base model (the ``disabled``
    controllers' adapters are switched off meanwhile). Returns how many were written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    existing = len(image_files(folder))
    missing = count - existing
    if missing <= 0:
        return 0
    with ExitStack() as stack:
        for controller in disabled:
            stack.enter_context(controller.disable_adapter())
        pipe.set_progress_bar_config(disable=True)
        images = render(pipe, prompt, count=missing, seed=mix_seed(seed, "class", existing), steps=steps,
                        resolution=resolution, batch_size=batch_size, autocast=autocast)
    for i, image in enumerate(images):
        digest = hashlib.sha1(image.tobytes()).hexdigest()[:10]
        write_png(image, folder / f"class-{existing + i:05d}-{digest}.png")
    return len(images)


def save_validation(images: list, output_dir: str | Path, step: int) -> list[Path]:
    """``output_dir/validation/step_<step>/<i>.png``."""
    folder = Path(output_dir) / "validation" / f"step_{step}"
    return [write_png(image, folder / f"{i}.png") for i, image in enumerate(images)]
