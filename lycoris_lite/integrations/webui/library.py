"""The adapters folder as cards, and the example adapters written for the tiny model.

* :class:`AdapterLibrary`: the adapters folder as cards (name, algorithm, rank, family, trigger words,
  metadata, A1111 short hash) read with :func:`describe`, cached per file version.
* :func:`safe_adapter_filename`: where an upload may go; :func:`addnet_hash`: AUTOMATIC1111's file hash.
* :func:`preview_of` / :func:`preview_destination`: an adapter's sidecar preview image;
  :func:`search_cards`: the cards a search box and the algorithm and family filters leave.
* :data:`EXAMPLES` / :func:`write_example_adapters`: five adapters of five algorithms, for the tiny models
  (trained ones for ``tiny-world``, random ones for the others).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ...base.presets import PRESETS
from ...base.registry import ALGORITHMS, get_algorithm
from ...core.controller import controller_for
from ...io import files
from ...io.formats.kohya import FAMILY_WIDTHS, TRANSFORMER_FAMILIES
from ...io.formats.safe_io import PICKLE_SUFFIXES, AdapterFileError
from ...io.metadata import build_metadata
from ...io.inspect import InspectError as CLIError, describe
from ...models import TINY_WORLD_NAME

SAFETENSORS = ".safetensors"
#: the model families a card may name (the filters' choices), "unknown" for files that name none
FAMILIES = (*FAMILY_WIDTHS.values(), *TRANSFORMER_FAMILIES.values(), "unknown")


def algorithm_names() -> list[str]:
    """The registered algorithms (the filters' choices)."""
    return list(ALGORITHMS)


def addnet_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's hash of a safetensors file (``addnet_hash_safetensors``: SHA-256 of the bytes
    after the header); ``Lora hashes`` shows its first 12 characters."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(8 + int.from_bytes(fh.read(8), "little"))
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def safe_adapter_filename(name: str) -> str:
    """A file name for an upload that cannot leave the adapters folder, or ``ValueError``.

    Names with a path separator, a leading dot or a NUL are refused; other characters outside
    ``[A-Za-z0-9_-]`` in the stem become ``_`` (so the stem is also the adapter's name); only
    ``.safetensors`` is accepted.
    """
    name = unicodedata.normalize("NFKC", str(name or "")).strip()
    if not name or any(c in name for c in "/\\\x00") or name.startswith("."):
        raise ValueError(f"unsafe file name {name!r}: give a plain name such as style.safetensors")
    stem, suffix = os.path.splitext(name)
    if suffix.lower() != SAFETENSORS:
        raise ValueError(f"{name!r}: only {SAFETENSORS} files are accepted (pickles can run code when loaded)")
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:100]
    if not stem:
        raise ValueError(f"{name!r}: the name has no usable characters")
    return stem + SAFETENSORS


def adapter_name(path: Path) -> str:
    """The name an adapter file or folder goes by (stacks, ``<lora:name:w>``): its stem, dots as ``_``."""
    return (path.name if path.is_dir() else path.stem).replace(".", "_")


def _path_name(path: Path, folder: Path) -> str:
    """The name of an adapter whose stem another adapter of the library shares: its path under ``folder``
    without the suffix (``sub/tilt``), dots as ``_``."""
    parents = path.relative_to(folder).parts[:-1]
    return "/".join([*(part.replace(".", "_") for part in parents), adapter_name(path)])


#: an adapter's sidecar preview, beside it: ``name.preview.png`` (ours, AUTOMATIC1111's) or ``name.png``
PREVIEW_SUFFIXES = (".preview.png", ".png")


def _base(path: Path) -> Path:
    return path if path.is_dir() else path.with_suffix("")


def preview_of(path: Path) -> Path | None:
    """The sidecar preview image of the adapter at ``path`` (see :data:`PREVIEW_SUFFIXES`), if any."""
    base = _base(path)
    for suffix in PREVIEW_SUFFIXES:
        candidate = base.with_name(base.name + suffix)
        if candidate.is_file():
            return candidate
    return None


def preview_destination(path: Path) -> Path:
    """Where a preview made for the adapter at ``path`` is kept: ``name.preview.png`` beside it."""
    base = _base(path)
    return base.with_name(base.name + PREVIEW_SUFFIXES[0])


def _is_adapter_folder(path: Path) -> bool:
    return any((path / p).is_file() for p in ("adapter_config.json", "pytorch_lora_weights.safetensors")) or any(
        (path / c / "adapter_config.json").is_file() for c in files.COMPONENTS)


def _stamp(path: Path) -> tuple:
    paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)


@dataclass
class AdapterCard:
    """What the library shows of one adapter, read from its file without touching the model."""

    name: str
    path: Path
    stamp: tuple = ()
    size_bytes: int = 0
    format: str | None = None
    algorithm: str | None = None
    algorithms: dict = field(default_factory=dict)
    rank: str | None = None
    family: str | None = None
    trigger_words: list = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    shorthash: str | None = None
    problem: str | None = None        # unreadable, pickle, duplicate name, or does not fit the model
    location: str = ""                # the path under the library's folder (``sub/tilt.safetensors``)
    preview: Path | None = None       # the sidecar preview image (:func:`preview_of`)

    def summary(self) -> dict[str, str]:
        """What the metadata card shows, in order, empty fields left out: algorithm, rank, family, base
        model, trigger words, training prompt and steps, tags, file, size, hash, and why it is unusable."""
        meta = self.metadata
        training = meta.get("training") or {}
        fields = {
            "Algorithm": ", ".join(self.algorithms) or self.algorithm, "Rank": self.rank,
            "Family": self.family or "unknown", "Base model": meta.get("base_model") or training.get("sd_model_name"),
            "Trigger words": ", ".join(self.trigger_words),
            "Training prompt": training.get("instance_prompt") or training.get("prompt"),
            "Steps": training.get("max_train_steps") or training.get("steps"),
            "Tags": f"{meta['tag_count']} distinct in ss_tag_frequency" if meta.get("tag_count") else None,
            "File": self.location or self.path.name,
            "Size": f"{self.size_bytes / 2**20:.2f} MiB" if self.size_bytes else None,
            "Hash": self.shorthash, "Not usable": self.problem,
        }
        return {k: str(v) for k, v in fields.items() if v not in (None, "", [], {})}

    def search_text(self) -> str:
        """Everything a search matches, lower case: name, file, trigger words and metadata."""
        return " ".join([self.name, self.location, *self.trigger_words,
                         json.dumps(self.metadata, default=str, ensure_ascii=False)]).lower()

    @property
    def usable(self) -> bool:
        return self.problem is None


def search_cards(cards, query: str = "", algorithm: str | None = None, family: str | None = None) -> list[AdapterCard]:
    """The cards whose :meth:`AdapterCard.search_text` holds every word of ``query``, of ``algorithm`` (one
    of the file's algorithms) and ``family`` (``"unknown"``: no family), each filter off when ``None``."""
    words = (query or "").lower().split()
    return [c for c in cards
            if (algorithm is None or algorithm in c.algorithms)
            and (family is None or (c.family or "unknown") == family)
            and all(w in c.search_text() for w in words)]


def read_card(path: Path) -> AdapterCard:
    """A card for one adapter file or folder (problems are recorded, never raised)."""
    card = AdapterCard(adapter_name(path), path, _stamp(path))
    if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
        card.problem = ("a pickle file, which can run code when loaded: convert it with "
                        "`python -m lycoris_lite convert` first")
        return card
    try:
        info = describe(str(path))
    except (CLIError, AdapterFileError, ValueError, OSError) as exc:
        card.problem = f"unreadable: {exc}"
        return card
    card.size_bytes, card.format = info["size_bytes"], info["format"]
    card.algorithms = info["algorithms"]
    card.algorithm = next(iter(info["algorithms"]), None)
    ranks = info["ranks"].get(card.algorithm) or {}
    card.rank = next(iter(ranks), None)
    card.family, card.trigger_words = info["family"], info["trigger_words"]
    card.metadata = {k: v for k, v in info["metadata"].items() if v not in (None, {}, [], "", 0)}
    weights = Path(info["file"])
    if weights.is_file() and weights.suffix == SAFETENSORS:
        card.shorthash = addnet_hash(weights)[:12]
    if not card.algorithms:
        card.problem = "no adapter layers recognised"
    return card


class AdapterLibrary:
    """The adapters folder, as cards: its ``*.safetensors`` files and diffusers/PEFT adapter folders, also
    in subfolders (``outputs/demo/<algo>/…`` of ``make demo``) down to :attr:`MAX_DEPTH`; hidden entries and
    training checkpoints (``checkpoint-N/``) are skipped. Cards are cached per file version (size and
    modification time), so a rescan re-reads only what changed."""

    MAX_DEPTH = 3
    _SKIPPED_FOLDER = re.compile(r"^checkpoint-\d+$")

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).resolve()
        self._cache: dict[Path, AdapterCard] = {}

    def entries(self) -> list[Path]:
        found = []

        def walk(folder: Path, depth: int) -> None:
            for path in sorted(folder.iterdir()):
                if path.name.startswith("."):
                    continue  # hidden files and the temporaries of atomic writes
                if path.is_file() and path.suffix.lower() in {SAFETENSORS, *PICKLE_SUFFIXES}:
                    found.append(path)
                elif path.is_dir() and _is_adapter_folder(path):
                    found.append(path)
                elif path.is_dir() and depth < self.MAX_DEPTH and not self._SKIPPED_FOLDER.match(path.name):
                    walk(path, depth + 1)

        if self.folder.is_dir():
            walk(self.folder, 1)
        return found

    def scan(self) -> list[AdapterCard]:
        """The cards, in folder order. An adapter goes by its stem, or by its path under the folder
        (``sub/tilt``) when another adapter has the same stem, so every name is unique and stays the same
        from one scan to the next; the rare names that still collide are marked unusable."""
        cards, seen = [], set()
        cache = {}
        entries = self.entries()
        stems = Counter(adapter_name(path) for path in entries)
        for path in entries:
            card = self._cache.get(path)
            if card is None or card.stamp != _stamp(path):
                card = read_card(path)
            cache[path] = card
            name = card.name if stems[card.name] == 1 else _path_name(path, self.folder)
            card = replace(card, name=name, location=path.relative_to(self.folder).as_posix(),
                           preview=preview_of(path))
            if card.name in seen:
                card = replace(card, problem=f"another adapter is named {card.name!r}")
            seen.add(card.name)
            cards.append(card)
        self._cache = cache
        return cards

    def destination(self, filename: str) -> Path:
        """Where an upload called ``filename`` goes (see :func:`safe_adapter_filename`); refuses to
        overwrite."""
        dest = self.folder / safe_adapter_filename(filename)
        if dest.resolve().parent != self.folder:
            raise ValueError(f"unsafe file name {filename!r}")
        if dest.exists():
            raise ValueError(f"{dest.name} is already in the adapters folder; rename the upload")
        return dest



#: (name, algorithm, settings, UNet targets, trigger words): five adapters of five algorithms (LoKr has none:
#: its "star" object example did not draw stars, see ui/example_adapters.py). For ``tiny-world`` they are
#: trained (``ui/example_adapters.py``, ``make tiny-model``) and kept in :data:`EXAMPLES_DIR`: ``outline``
#: draws objects hollow, ``swap`` trades object colours in pairs, ``zoom`` enlarges the object, ``night`` makes the background black, ``snow``
#: makes the object white. For the random-weight tiny models they are random. On a UNet model they also adapt
#: the text encoders, on a transformer model the transformer's attention only.
EXAMPLES = (
    ("outline", "lora", {"r": 4, "alpha": 4}, "unet-full", ["outline"]),
    ("swap", "oft", {"block_size": 4}, "unet-attn-ff", ["swapped"]),
    ("zoom", "hra", {"r": 4}, "unet-full", ["close-up"]),
    ("night", "boft", {"block_size": 4, "butterfly_factor": 2}, "unet-attn", ["night"]),
    ("snow", "loha", {"r": 4, "alpha": 8}, "unet-attn-ff", ["snowy"]),
)
#: the trained example adapters of ``tiny-world`` (package data), ``<name>.safetensors`` per row of EXAMPLES
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"


def write_example_adapters(pipe, folder: str | os.PathLike, model_name: str = "tiny-sd") -> list[Path]:
    """Put :data:`EXAMPLES` for ``pipe`` into ``folder``: for ``tiny-world`` copies of the trained files of
    :data:`EXAMPLES_DIR` (``FileNotFoundError`` when one is missing); for any other model non-identity
    random weights (fixed seeds), written for ``pipe``, which must have no adapters and is left as it was."""
    if model_name == TINY_WORLD_NAME:
        return _copy_trained_examples(Path(folder))
    components = files.components_of(pipe)
    if any(controller_for(m, create=False) is not None for m in components.values()):
        raise ValueError("write_example_adapters needs a pipeline without adapters")
    written = []
    for seed, (name, algo, settings, unet_targets, words) in enumerate(EXAMPLES):
        config_class = get_algorithm(algo).config_class
        generator = torch.Generator().manual_seed(seed)
        configs = {}
        for c, module in components.items():
            if c == "unet":
                targets = PRESETS[unet_targets]
            elif c in files.DENOISERS:
                targets = PRESETS["unet-attn"]     # to_q, to_k, to_v, to_out.0: every transformer has them
            elif "unet" in components:
                targets = PRESETS["text-encoder"]
            else:
                continue
            configs[c] = config_class(**settings, target_modules=targets, init_weights=False)
            controller_for(module).add_adapter(name, configs[c], generator=generator)
        try:
            meta = build_metadata(algo, next(iter(configs.values())), base_model=model_name, trigger_words=words,
                                  output_name=name)
            written.append(files.save_adapter(components, name, Path(folder) / f"{name}{SAFETENSORS}", metadata=meta,
                                              layout=None if "unet" in components else "diffusers"))
        finally:
            for c in configs:
                controller_for(components[c]).unload()
    return written


def _copy_trained_examples(folder: Path) -> list[Path]:
    missing = [name for name, *_ in EXAMPLES if not (EXAMPLES_DIR / f"{name}{SAFETENSORS}").is_file()]
    if missing:
        raise FileNotFoundError(f"the trained example adapters {', '.join(missing)} are missing from {EXAMPLES_DIR}: "
                                "train them with `make tiny-model` (python ui/example_adapters.py)")
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copyfile(EXAMPLES_DIR / f"{name}{SAFETENSORS}", folder / f"{name}{SAFETENSORS}"))
            for name, *_ in EXAMPLES]
