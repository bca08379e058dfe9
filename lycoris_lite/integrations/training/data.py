"""DreamBooth data: image folders checked up front, captions, a resumable sample order, augmentation.

Randomness is a function of ``(seed, position)``: the sample order is an endless sequence of epochs,
each a seeded permutation of the images, and a sample's crop, flip and (in :mod:`.loss`) noise and
timestep are drawn from a generator seeded with its position in that sequence. So a run resumed at
step N sees exactly the samples and noise an uninterrupted run sees, and one process with batch 4,
two processes with batch 2 and batch 2 with two accumulation steps train on the same draws.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class TrainingInputError(ValueError):
    """Input that cannot be trained on (reported before any training starts)."""


def mix_seed(*parts) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (ints and strings), the same on every
    machine and process."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass
class Example:
    """One training image (decoded RGB) and its prompt."""

    path: Path
    prompt: str
    image: Any  # a decoded RGB PIL.Image.Image


def image_files(folder: str | Path) -> list[Path]:
    """The image files of ``folder`` (sorted; hidden files and other suffixes ignored)."""
    folder = Path(folder)
    if not folder.exists():
        raise TrainingInputError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise TrainingInputError(f"{folder}: not a folder")
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise TrainingInputError(f"{folder}: cannot be read ({exc.strerror or exc})") from None
    return [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()]


def read_caption(image: Path, extension: str, default: str) -> str:
    """The caption in ``image``'s same-stem ``extension`` file when there is one, else ``default``."""
    caption_file = image.with_suffix(extension)
    if not caption_file.is_file():
        return default
    try:
        caption = caption_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainingInputError(f"{caption_file}: cannot be read as UTF-8 text ({exc})") from None
    if not caption:
        raise TrainingInputError(f"{caption_file}: empty caption (delete the file to use the prompt instead)")
    return " ".join(caption.split())


def load_examples(folder: str | Path, prompt: str, caption_extension: str = ".txt", what: str = "instance",
                  allow_empty: bool = False) -> list[Example]:
    """Decode every image of ``folder`` (EXIF orientation applied, converted to RGB) with its caption.

    ``TrainingInputError`` for a missing or unreadable folder, a folder without images (unless
    ``allow_empty``), and images that do not decode (all of them are listed)."""
    from PIL import Image, ImageOps

    files = image_files(folder)
    if not files and not allow_empty:
        raise TrainingInputError(f"{what} folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    examples, bad = [], []
    for path in files:
        try:
            with Image.open(path) as img:
                img.load()
                image = ImageOps.exif_transpose(img).convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            bad.append(f"{path.name} ({exc})")
            continue
        if min(image.size) < 1:
            bad.append(f"{path.name} (empty image)")
            continue
        examples.append(Example(path, read_caption(path, caption_extension, prompt), image))
    if bad:
        raise TrainingInputError(f"{what} images that cannot be decoded in {folder}: " + "; ".join(bad))
    return examples


@dataclass(frozen=True)
class SampleOrder:
    """Positions 0, 1, 2, … of an endless sequence of epochs, each a seeded permutation of
    ``range(size)``: ``index(position)`` is the example at that position."""

    size: int
    seed: int
    name: str = "instance"

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        return int(_permutation(self.size, mix_seed(self.seed, self.name, "order", epoch))[offset])

    def epoch(self, position: int) -> int:
        return position // self.size


@lru_cache(maxsize=64)
def _permutation(size: int, seed: int) -> torch.Tensor:
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))


def batch_positions(micro_step: int, batch_size: int, num_processes: int, process_index: int) -> range:
    """Sample positions of one process's micro-batch: global batch ``micro_step`` of size
    ``batch_size · num_processes``, this process's slice."""
    start = micro_step * batch_size * num_processes + process_index * batch_size
    return range(start, start + batch_size)


def transform(image, resolution: int, center_crop: bool, random_flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Resize the shorter side to ``resolution`` (Lanczos), crop a square (centered or at random), flip
    at random; returns ``(3, resolution, resolution)`` in ``[-1, 1]``."""
    from PIL import Image

    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if size != (w, h):
        image = image.resize(size, Image.LANCZOS)
    w, h = image.size
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=generator))
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=generator))
    image = image.crop((left, top, left + resolution, top + resolution))
    flip = bool(torch.rand((), generator=generator) < 0.5) if random_flip else False
    array = np.asarray(image, dtype=np.float32)
    if flip:
        array = array[:, ::-1]
    return torch.from_numpy(array.copy()).permute(2, 0, 1) / 127.5 - 1.0


class DreamBoothDataset(torch.utils.data.Dataset):
    """Items are keyed by ``(kind, position)``, ``kind`` being ``"instance"`` or ``"class"``: the
    example at that position of the kind's :class:`SampleOrder`, transformed with a generator seeded by
    ``(seed, kind, position)``, and its tokenised prompt (none without a ``tokenizer``)."""

    def __init__(self, instance: list[Example], tokenizer, resolution: int, *, seed: int,
                 class_examples: list[Example] | None = None, center_crop: bool = False, random_flip: bool = False):
        self.examples = {"instance": instance, "class": class_examples or []}
        self.orders = {kind: SampleOrder(len(ex), seed, kind) for kind, ex in self.examples.items() if ex}
        self.tokenizer = tokenizer
        self.resolution = resolution
        self.seed = seed
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.examples["instance"])

    def tokenize(self, prompt: str) -> torch.Tensor:
        return self.tokenizer(prompt, padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length,
                              return_tensors="pt").input_ids[0]

    def __getitem__(self, key: tuple[str, int]) -> dict:
        kind, position = key
        index = self.orders[kind].index(position)
        example = self.examples[kind][index]
        generator = torch.Generator().manual_seed(mix_seed(self.seed, kind, "augment", position))
        pixels = transform(example.image, self.resolution, self.center_crop, self.random_flip, generator)
        item = {"pixel_values": pixels, "kind": kind, "position": position, "index": index, "prompt": example.prompt}
        if self.tokenizer is not None:  # the UNet's objective encodes each step; flow matching caches embeddings
            item["input_ids"] = self.tokenize(example.prompt)
        return item


class MicroBatches(torch.utils.data.Sampler):
    """This process's micro-batches from ``start`` on, endless: lists of dataset keys, the instance
    samples first, then (with prior preservation) as many class samples at the same positions."""

    def __init__(self, batch_size: int, num_processes: int, process_index: int, start: int = 0,
                 with_class: bool = False):
        self.batch_size, self.num_processes, self.process_index = batch_size, num_processes, process_index
        self.start, self.with_class = start, with_class

    def __iter__(self):
        step = self.start
        while True:
            positions = batch_positions(step, self.batch_size, self.num_processes, self.process_index)
            keys = [("instance", p) for p in positions]
            if self.with_class:
                keys += [("class", p) for p in positions]
            yield keys
            step += 1


def collate(items: list[dict]) -> dict:
    batch = {
        "pixel_values": torch.stack([i["pixel_values"] for i in items]).contiguous(),
        "kinds": [i["kind"] for i in items],
        "positions": [i["position"] for i in items],
        "indices": [i["index"] for i in items],
        "prompts": [i["prompt"] for i in items],
    }
    if "input_ids" in items[0]:
        batch["input_ids"] = torch.stack([i["input_ids"] for i in items])
    return batch


def data_loader(dataset: DreamBoothDataset, batch_size: int, num_processes: int, process_index: int, *,
                start: int = 0, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """Endless loader of this process's micro-batches from micro-step ``start`` on."""
    sampler = MicroBatches(batch_size, num_processes, process_index, start, with_class="class" in dataset.orders)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)
