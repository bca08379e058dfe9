"""What the web UI does, without the UI: one shared pipeline serving many sessions' adapter stacks.

``ui/app.py`` is a Gradio page over this module; everything here is plain Python and testable alone.

* :class:`StackEntry` / :func:`parse_prompt`: a session's stack (adapter, weight, optional separate UNet
  and text-encoder weights, on/off) and AUTOMATIC1111's ``<lora:name:w>`` / ``<lora:name:te:unet>``
  (also ``<lyco:…>``, ``te=``/``unet=``) prompt tags, which add to the stack and are stripped from the
  text that is encoded.
* :func:`format_parameters` / :func:`parse_parameters`: AUTOMATIC1111's "parameters" text (the PNG
  ``parameters`` chunk): the prompt line with the applied stack as ``<lora:…>`` tags, ``Negative prompt:``,
  then ``Steps: …, Sampler: …, CFG scale: …, Seed: …, Size: WxH, Model: …, Lora hashes: "name: hash"``.
* :class:`AdapterLibrary`: the adapters folder as cards (name, algorithm, rank, family, trigger words,
  metadata, A1111 short hash) read with :func:`lycoris_lite.integrations.cli.describe`, cached per file version.
* :class:`SharedPipeline`: the pipeline every session shares. Every change to it happens under one
  process-wide lock: before each generation it is brought to the session's stack from the adapters
  already attached (a loaded adapter stays attached and costs nothing while inactive, so switching sets
  scales and reads no disk); at most ``max_loaded`` adapters stay attached, the least recently used
  one leaving first. A fused stack is global: while it is fused every generation uses it.

Composition order is the stack order. The layers compose adapters in the order they were attached, so
when a stack lists attached adapters in another relative order, the ones from the first misplaced one on
are attached again (from disk) at the end: an image depends on its stack alone, never on what other
sessions loaded before.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import threading
import time
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from .. import __version__
from ..io import files
from ..io.formats import kohya
from ..io.formats.safe_io import PICKLE_SUFFIXES, AdapterFileError, atomic_write, check_safetensors_header
from .pipeline import enable
from .cli import CLIError, describe
from ..base.presets import PRESETS
from ..core.controller import controller_for
from ..base.registry import get_algorithm
from ..io.metadata import build_metadata

SAFETENSORS = ".safetensors"
MAX_SEED = 2**32 - 1


# ---- stacks and prompt tags -----------------------------------------------------------------------
@dataclass
class StackEntry:
    """One adapter of a session's stack. ``unet`` / ``text_encoder`` override ``weight`` for that part.

    The weights become floats when the entry is built (``ValueError`` naming the weight for one that is no
    number); whether they are finite is checked when the stack is applied."""

    name: str
    weight: float = 1.0
    unet: float | None = None
    text_encoder: float | None = None
    enabled: bool = True

    def __post_init__(self):
        self.weight = _number(self.weight, f"the weight of {self.name}")
        if self.unet is not None:
            self.unet = _number(self.unet, f"the UNet weight of {self.name}")
        if self.text_encoder is not None:
            self.text_encoder = _number(self.text_encoder, f"the text-encoder weight of {self.name}")
        self.enabled = bool(self.enabled)

    @property
    def unet_weight(self) -> float:
        return self.weight if self.unet is None else self.unet

    @property
    def text_encoder_weight(self) -> float:
        return self.weight if self.text_encoder is None else self.text_encoder

    def pipeline_weight(self):
        """The weight for ``pipe.set_adapters``: one number, or one per component."""
        if self.unet is None and self.text_encoder is None:
            return float(self.weight)
        te = float(self.text_encoder_weight)
        return {"unet": float(self.unet_weight), "text_encoder": te, "text_encoder_2": te}

    def is_zero(self) -> bool:
        return self.unet_weight == 0 and self.text_encoder_weight == 0

    def tag(self) -> str:
        """The AUTOMATIC1111 tag: ``<lora:name:w>``, or ``<lora:name:te:unet>`` with separate weights."""
        if self.unet is None and self.text_encoder is None:
            return f"<lora:{self.name}:{_num(self.weight)}>"
        return f"<lora:{self.name}:{_num(self.text_encoder_weight)}:{_num(self.unet_weight)}>"


def _num(x: float) -> str:
    """The shortest text that reads back as the same float (``1`` for 1.0)."""
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


def _number(value, what: str) -> float:
    """``value`` (a number, or text of one) as a float, or ``ValueError`` naming ``what``."""
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None


def _finite(value, what: str) -> float:
    x = _number(value, what)
    if not math.isfinite(x):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return x


def _whole(value, what: str) -> int:
    """``value`` as an int (``20.0`` from a slider too), or ``ValueError`` naming ``what``."""
    if isinstance(value, int):
        return int(value)
    x = _number(value, what)
    if not x.is_integer():
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    return int(x)


_TAG = re.compile(r"<(lora|lyco):([^<>]*)>", re.IGNORECASE)


def parse_prompt(prompt: str) -> tuple[str, list[StackEntry]]:
    """``(prompt without tags, entries)`` for AUTOMATIC1111's extra-network tags.

    ``<lora:NAME>`` (weight 1), ``<lora:NAME:W>``, ``<lora:NAME:TE:UNET>`` and the named forms
    ``te=``/``unet=`` (``<lyco:…>`` is the same). Raises ``ValueError`` for a malformed tag.
    """
    entries = []
    for match in _TAG.finditer(prompt or ""):
        name, *args = [part.strip() for part in match.group(2).split(":")]
        if not name:
            raise ValueError(f"{match.group(0)}: the tag names no adapter")
        positional, named = [], {}
        for arg in args:
            key, eq, value = arg.partition("=")
            if eq:
                if key.strip() not in ("te", "unet"):
                    raise ValueError(f"{match.group(0)}: {key.strip()}= is not supported (te= and unet= are)")
                named[key.strip()] = _finite(value, f"{key.strip()} in {match.group(0)}")
            else:
                positional.append(_finite(arg, f"a weight in {match.group(0)}"))
        if len(positional) > 2:
            raise ValueError(f"{match.group(0)}: at most two weights (text encoder, UNet); "
                             "dynamic rank (a third one) is not supported")
        te = named.get("te", positional[0] if positional else 1.0)
        unet = named.get("unet", positional[1] if len(positional) > 1 else te)
        entries.append(StackEntry(name, te, unet=None if unet == te else unet))
    cleaned = re.sub(r"[ \t]{2,}", " ", _TAG.sub("", prompt or "")).strip()
    return cleaned, entries


def effective_stack(stack: list[StackEntry], tags: list[StackEntry]) -> list[StackEntry]:
    """The stack a generation applies: the session's enabled entries, then the prompt's tags (a tag for
    an adapter already in the stack replaces its weights in place); entries whose weights are all zero
    are left out. Raises when the session's stack names an adapter twice."""
    out: dict[str, StackEntry] = {}
    for entry in stack:
        if not entry.enabled:
            continue
        if entry.name in out:
            raise ValueError(f"adapter {entry.name!r} is twice in the stack")
        out[entry.name] = entry
    for entry in tags:
        out[entry.name] = entry
    return [e for e in out.values() if not e.is_zero()]


# ---- AUTOMATIC1111 "parameters" text --------------------------------------------------------------
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _quote(text) -> str:
    text = str(text)
    return text if not any(c in text for c in ",\n:") else json.dumps(text, ensure_ascii=False)


def format_parameters(prompt: str, negative_prompt: str, *, steps: int, sampler: str, guidance: float, seed: int,
                      width: int, height: int, model: str, stack: list[StackEntry],
                      hashes: dict[str, str] | None = None, fused: bool = False) -> str:
    """AUTOMATIC1111's infotext. The prompt line is the encoded prompt followed by the applied stack as
    ``<lora:…>`` tags (in order), so pasting it back reproduces the stack."""
    tags = " ".join(e.tag() for e in stack)
    lines = [f"{prompt} {tags}".strip() if tags else prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    fields = {"Steps": steps, "Sampler": sampler, "CFG scale": _num(guidance), "Seed": seed,
              "Size": f"{width}x{height}", "Model": model}
    known = {e.name: hashes[e.name] for e in stack if hashes and hashes.get(e.name)}
    if known:
        fields["Lora hashes"] = ", ".join(f"{n}: {h}" for n, h in known.items())
    if fused:
        fields["Lora fused"] = "True"
    fields["Version"] = f"lycoris-lite {__version__}"
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items()))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict[str, str]:
    """The fields of an infotext (AUTOMATIC1111's reader): ``Prompt``, ``Negative prompt`` and the
    ``key: value`` pairs of the last line (quoted values unquoted)."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        value = value.strip()
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key] = value
    return out


# ---- the adapters folder --------------------------------------------------------------------------
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

    @property
    def usable(self) -> bool:
        return self.problem is None

    def details(self) -> dict:
        """The card as JSON-ready data (the metadata panel)."""
        return {"name": self.name, "file": self.path.name, "format": self.format, "algorithms": self.algorithms,
                "rank": self.rank, "family": self.family, "trigger_words": self.trigger_words,
                "hash": self.shorthash, "size_bytes": self.size_bytes, "problem": self.problem,
                "metadata": self.metadata}


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
        cards, seen = [], set()
        cache = {}
        for path in self.entries():
            card = self._cache.get(path)
            if card is None or card.stamp != _stamp(path):
                card = read_card(path)
            cache[path] = card
            if card.name in seen:
                card = AdapterCard(card.name, path, card.stamp, problem=f"another adapter is named {card.name!r}")
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


# ---- example adapters for the tiny model ----------------------------------------------------------
#: (name, algorithm, settings, UNet targets, trigger words); all also adapt the text encoder
EXAMPLES = (
    ("watercolor", "lora", {"r": 4, "alpha": 8}, "unet-attn-ff", ["watercolor"]),
    ("sks_dog", "lokr", {"r": 4, "alpha": 8}, "unet-attn", ["sks", "dog"]),
    ("tilt", "oft", {"block_size": 4}, "unet-attn-ff", ["tilted"]),
    ("mirror", "hra", {"r": 4}, "unet-attn-ff", ["mirror"]),
    ("butterfly", "boft", {"block_size": 4, "butterfly_factor": 2}, "unet-attn", ["butterfly"]),
)


def write_example_adapters(pipe, folder: str | os.PathLike, model_name: str = "tiny-sd") -> list[Path]:
    """Write :data:`EXAMPLES` (non-identity random weights, fixed seeds) for ``pipe`` into ``folder``;
    ``pipe`` must have no adapters and is left as it was."""
    components = files.components_of(pipe)
    if any(controller_for(m, create=False) is not None for m in components.values()):
        raise ValueError("write_example_adapters needs a pipeline without adapters")
    written = []
    for seed, (name, algo, settings, unet_targets, words) in enumerate(EXAMPLES):
        config_class = get_algorithm(algo).config_class
        generator = torch.Generator().manual_seed(seed)
        configs = {}
        for c, module in components.items():
            targets = PRESETS[unet_targets] if c == "unet" else PRESETS["text-encoder"]
            configs[c] = config_class(**settings, target_modules=targets, init_weights=False)
            controller_for(module).add_adapter(name, configs[c], generator=generator)
        try:
            meta = build_metadata(algo, configs["unet"], base_model=model_name, trigger_words=words, output_name=name)
            written.append(files.save_adapter(components, name, Path(folder) / f"{name}{SAFETENSORS}", metadata=meta))
        finally:
            for module in components.values():
                controller_for(module).unload()
    return written


# ---- the shared pipeline --------------------------------------------------------------------------
#: AUTOMATIC1111's sampler names -> diffusers scheduler classes
SCHEDULERS = {
    "DDIM": "DDIMScheduler",
    "Euler": "EulerDiscreteScheduler",
    "Euler a": "EulerAncestralDiscreteScheduler",
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "UniPC": "UniPCMultistepScheduler",
    "PNDM": "PNDMScheduler",
    "Heun": "HeunDiscreteScheduler",
}
DEFAULT_SCHEDULER = "Default"


class GenerationCancelled(Exception):
    """Raised inside a generation whose session pressed Cancel."""


@dataclass
class GenerationSettings:
    """What a session asks for. When it is built, seed, steps, width, height and count become ints and
    guidance a float (``ValueError`` naming the field for a value that is no number, or no whole one);
    :meth:`check` raises ``ValueError`` on anything out of range."""

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1                     # -1: random
    steps: int = 20
    guidance: float = 7.0
    width: int = 512
    height: int = 512
    count: int = 1
    scheduler: str = DEFAULT_SCHEDULER

    def __post_init__(self):
        for name, what in (("seed", "seed"), ("steps", "steps"), ("width", "width"), ("height", "height"),
                           ("count", "the number of images")):
            setattr(self, name, _whole(getattr(self, name), what))
        self.guidance = _number(self.guidance, "the CFG scale")

    def check(self) -> None:
        if not (-1 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be -1 (random) or 0..{MAX_SEED}, got {self.seed}")
        if not 1 <= self.steps <= 150:
            raise ValueError(f"steps must be 1..150, got {self.steps}")
        if not 1 <= self.count <= 8:
            raise ValueError(f"the number of images must be 1..8, got {self.count}")
        if not 0 <= _finite(self.guidance, "the CFG scale") <= 30:
            raise ValueError(f"the CFG scale must be 0..30, got {self.guidance}")
        for what, value in (("width", self.width), ("height", self.height)):
            if not 8 <= value <= 2048 or value % 8:
                raise ValueError(f"{what} must be a multiple of 8 in 8..2048, got {value}")
        if self.scheduler != DEFAULT_SCHEDULER and self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown sampler {self.scheduler!r}; one of {', '.join(SCHEDULERS)}")


@dataclass
class GenerationResult:
    images: list                      # PIL images, each with .info["parameters"]
    parameters: list[str]
    seeds: list[int]
    stack: list[StackEntry]           # what was applied, in composition order
    fused: bool
    loaded_from_disk: list[str]       # adapters read for this generation (empty when all were attached)
    switch_seconds: float
    notes: list[str] = field(default_factory=list)


class SharedPipeline:
    """One diffusers pipeline shared by every session; see the module docstring.

    Every method that reads or changes the pipeline holds :attr:`lock` (an ``RLock``), so direct calls,
    queued events and API calls are all serialised. :meth:`status` reads a snapshot taken at the end of
    each change and never waits.
    """

    def __init__(self, pipe, library: AdapterLibrary, model_name: str, *, max_loaded: int = 8):
        if max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        self.pipe = enable(pipe)
        self.pipe.set_progress_bar_config(disable=True)
        self.library = library
        self.model_name = model_name
        self.max_loaded = max_loaded
        self.lock = threading.RLock()
        self.components = files.components_of(self.pipe)
        self.family = kohya.model_family(self.components)[0]
        self._default_scheduler = type(self.pipe.scheduler), self.pipe.scheduler.config
        self._default_sampler = next((k for k, v in SCHEDULERS.items() if v == type(self.pipe.scheduler).__name__),
                                     type(self.pipe.scheduler).__name__)
        self._cards: dict[str, AdapterCard] = {}
        self._compatibility: dict[tuple, str | None] = {}
        self._attached: dict[str, tuple] = {}    # name -> file version, in attach (= composition) order
        self._active: list[str] = []             # the pipeline's active stack and its weights
        self._weights: dict[str, object] = {}
        self._last_used: dict[str, int] = {}
        self._clock = 0
        self._cancel: dict[str, threading.Event] = {}
        self._fused: list[StackEntry] | None = None
        self._snapshot: dict = {}
        self.disk_loads = 0
        self.library_version = 0   # goes up whenever a rescan finds the folder changed
        self.rescan()

    # ---- the library ------------------------------------------------------------------------------
    @property
    def cards(self) -> dict[str, AdapterCard]:
        return self._cards

    def usable_names(self) -> list[str]:
        return [n for n, c in self._cards.items() if c.usable]

    def _check_fit(self, card: AdapterCard) -> str | None:
        """Why ``card`` cannot load on this model (``None``: it can). Reads and maps the whole file
        against the model without changing it; the answer is cached per file version."""
        key = (card.name, card.stamp)
        if key not in self._compatibility:
            problem = None
            if card.family and self.family and card.family != self.family:
                problem = f"for {card.family}; the model is {self.family}"
            else:
                try:
                    files.read_adapter(self.components, card.path, card.name)
                except (ValueError, OSError) as exc:
                    problem = f"does not fit this model: {exc}"
            self._compatibility[key] = problem
        return self._compatibility[key]

    def rescan(self) -> list[AdapterCard]:
        """Read the adapters folder again; attached adapters whose file changed or went are detached
        (unless fused)."""
        with self.lock:
            cards = {}
            for card in self.library.scan():
                if card.usable:
                    problem = self._check_fit(card)
                    if problem:
                        card = replace(card, problem=problem)
                cards[card.name] = card
            if [(c.name, c.stamp, c.problem) for c in cards.values()] != [
                    (c.name, c.stamp, c.problem) for c in self._cards.values()]:
                self.library_version += 1
            self._cards = cards
            self._compatibility = {(c.name, c.stamp): self._compatibility[(c.name, c.stamp)]
                                   for c in cards.values() if (c.name, c.stamp) in self._compatibility}
            fused = {e.name for e in self._fused or []}
            stale = [n for n, stamp in self._attached.items()
                     if n not in fused and (n not in cards or cards[n].stamp != stamp)]
            if stale:
                self._detach(stale)
            self._take_snapshot()
            return list(cards.values())

    def add_upload(self, source: str | os.PathLike, filename: str | None = None, *, max_bytes: int) -> AdapterCard:
        """Validate an uploaded file and copy it into the adapters folder under a safe name.

        Refused (``ValueError``, nothing written): a name that is unsafe or taken, a file over
        ``max_bytes``, anything that is not a readable safetensors adapter, NaN/Inf weights, or an adapter
        that does not fit the model (another family, unknown layers, wrong shapes)."""
        source = Path(source)
        size = source.stat().st_size
        if size > max_bytes:
            raise ValueError(f"the file is {size / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.1f} MiB")
        with self.lock:
            dest = self.library.destination(filename or source.name)
            name = adapter_name(dest)
            if name in self._cards:
                raise ValueError(f"an adapter named {name!r} is already in the library")
            check_safetensors_header(source)
            card = read_card(source)
            if card.problem:
                raise ValueError(card.problem)
            if card.family and self.family and card.family != self.family:
                raise ValueError(f"this adapter is for {card.family}; the model is {self.family}")
            files.read_adapter(self.components, source, name)
            self.library.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(dest, lambda tmp: shutil.copyfile(source, tmp))
            self.rescan()
            return self._cards[name]

    # ---- bringing the pipeline to a stack ---------------------------------------------------------
    def card(self, name: str) -> AdapterCard:
        """The usable library card called ``name``, or ``ValueError`` saying why not."""
        card = self._cards.get(name)
        if card is None:
            raise ValueError(f"no adapter named {name!r} in the library ({', '.join(self._cards) or 'empty'})")
        if not card.usable:
            raise ValueError(f"adapter {name!r} cannot be used: {card.problem}")
        return card

    def _detach(self, names: list[str]) -> None:
        names = [n for n in names if n in self._attached]
        if names:
            self.pipe.delete_adapters(names)
        for n in names:
            del self._attached[n]
            self._last_used.pop(n, None)
            self._active = [a for a in self._active if a != n]

    def _make_room(self, keep: set[str]) -> None:
        fused = {e.name for e in self._fused or []}
        spare = sorted((n for n in self._attached if n not in keep and n not in fused),
                       key=lambda n: self._last_used.get(n, 0))
        while len(self._attached) >= self.max_loaded and spare:
            self._detach([spare.pop(0)])

    def apply(self, stack: list[StackEntry]) -> tuple[list[StackEntry], list[str]]:
        """Make ``stack`` (enabled, non-zero entries, in order) the pipeline's active stack; returns the
        entries applied and the adapters read from disk. On any error the pipeline's active stack and
        weights are put back and the error is raised."""
        entries = effective_stack(stack, [])
        weights = {e.name: e.pipeline_weight() for e in entries}
        for e in entries:
            self.card(e.name)
            _finite(e.weight, f"the weight of {e.name}")
            _finite(e.unet_weight, f"the UNet weight of {e.name}")
            _finite(e.text_encoder_weight, f"the text-encoder weight of {e.name}")
        wanted = list(weights)
        with self.lock:
            if self._fused is not None:
                raise ValueError("a stack is fused; unfuse it before changing the stack")
            before = list(self._active)
            # attached adapters from the first one out of stack order on are attached again at the end
            position, last, redo = {n: i for i, n in enumerate(self._attached)}, -1, len(wanted)
            for i, n in enumerate(wanted):
                if n not in position or position[n] < last:
                    redo = i
                    break
                last = position[n]
            read = []
            try:
                self._detach(wanted[redo:])
                for name in wanted[redo:]:
                    card = self.card(name)
                    self._make_room(set(wanted))
                    self.pipe.load_adapter(card.path, adapter_name=name)
                    self._attached[name] = card.stamp
                    read.append(name)
                    self.disk_loads += 1
                self.pipe.set_adapters(wanted, list(weights.values()))
                self._active, self._weights = wanted, weights
            except Exception:
                still = [n for n in before if n in self._attached]
                self.pipe.set_adapters(still, [self._weights[n] for n in still])
                self._active = still
                raise
            finally:
                self._take_snapshot()
            for n in wanted:
                self._clock += 1
                self._last_used[n] = self._clock
            return entries, read

    # ---- generating -------------------------------------------------------------------------------
    def _scheduler(self, name: str):
        import diffusers

        cls, config = self._default_scheduler
        if name == DEFAULT_SCHEDULER:
            return cls.from_config(config), self._default_sampler
        return getattr(diffusers, SCHEDULERS[name]).from_config(config), name

    def generate(self, settings: GenerationSettings, stack: list[StackEntry], *, session: str = "default",
                 on_step: Callable[[int, int, str], None] | None = None) -> GenerationResult:
        """Images for one session: waits for the lock, brings the pipeline to ``stack`` plus the prompt's
        tags (or uses the fused stack), then renders ``settings.count`` images, image ``i`` with seed
        ``seed + i`` in its own call so each one is reproducible alone. ``on_step(done, total, what)``
        follows the denoising steps; :meth:`cancel` for ``session`` stops it (``GenerationCancelled``)."""
        settings.check()
        prompt, tags = parse_prompt(settings.prompt)
        if _TAG.search(settings.negative_prompt or ""):
            raise ValueError("<lora:…> tags work in the prompt only, not in the negative prompt")
        token = threading.Event()
        self._cancel[session] = token
        total = settings.steps * settings.count
        report = on_step or (lambda done, total, what: None)
        report(0, total, "waiting for the pipeline")
        try:
            with self.lock:
                if token.is_set():
                    raise GenerationCancelled("cancelled before it started")
                notes = []
                start = time.perf_counter()
                if self._fused is not None:
                    applied, read, fused = list(self._fused), [], True
                    notes.append("a fused stack is in use for everyone: " + ", ".join(e.tag() for e in applied))
                    if tags or any(e.enabled for e in stack):
                        notes.append("your stack and the prompt's tags were not applied (unfuse to use them)")
                else:
                    applied, read = self.apply(effective_stack(stack, tags))
                    fused = False
                switch_seconds = time.perf_counter() - start
                scheduler, sampler = self._scheduler(settings.scheduler)
                self.pipe.scheduler = scheduler
                seed = settings.seed if settings.seed >= 0 else random.SystemRandom().randrange(MAX_SEED - 8)
                hashes = {e.name: self._cards[e.name].shorthash for e in applied if e.name in self._cards}
                images, texts, seeds, done = [], [], [], 0

                def step_end(pipe, step, timestep, callback_kwargs):
                    nonlocal done
                    done += 1
                    report(done, total, "denoising")
                    if token.is_set():
                        raise GenerationCancelled(f"cancelled after {done} of {total} steps")
                    return callback_kwargs

                for i in range(settings.count):
                    image_seed = (seed + i) % (MAX_SEED + 1)
                    generator = torch.Generator().manual_seed(image_seed)
                    image = self.pipe(prompt, negative_prompt=settings.negative_prompt or None,
                                      num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                                      width=settings.width, height=settings.height, generator=generator,
                                      callback_on_step_end=step_end).images[0]
                    text = format_parameters(prompt, settings.negative_prompt, steps=settings.steps, sampler=sampler,
                                             guidance=settings.guidance, seed=image_seed, width=settings.width,
                                             height=settings.height, model=self.model_name, stack=applied,
                                             hashes=hashes, fused=fused)
                    image.info["parameters"] = text
                    images.append(image)
                    texts.append(text)
                    seeds.append(image_seed)
                return GenerationResult(images, texts, seeds, applied, fused, read, switch_seconds, notes)
        finally:
            if self._cancel.get(session) is token:
                del self._cancel[session]

    def cancel(self, session: str = "default") -> bool:
        """Stop ``session``'s generation (running or waiting); ``False`` when it has none."""
        token = self._cancel.get(session)
        if token is None:
            return False
        token.set()
        return True

    # ---- global actions ---------------------------------------------------------------------------
    def fuse(self, stack: list[StackEntry]) -> list[StackEntry]:
        """Fold ``stack`` into the weights for everyone (NaN/Inf checked first: a failure fuses nothing)."""
        with self.lock:
            if self._fused is not None:
                raise ValueError("a stack is already fused; unfuse it first")
            applied, _ = self.apply(stack)
            if not applied:
                raise ValueError("the stack is empty: nothing to fuse")
            self.pipe.fuse_adapters(safe=True)
            self._fused = applied
            self._take_snapshot()
            return applied

    def unfuse(self) -> None:
        with self.lock:
            self.pipe.unfuse_adapters()
            self._fused = None
            self._take_snapshot()

    def unload_all(self) -> None:
        """Unfuse and detach every adapter (the model is bitwise the original); the library stays."""
        with self.lock:
            self.pipe.unfuse_adapters()
            self.pipe.unload_adapters()
            self._fused = None
            self._attached.clear()
            self._active, self._weights = [], {}
            self._last_used.clear()
            self._take_snapshot()

    # ---- status -----------------------------------------------------------------------------------
    def _take_snapshot(self) -> None:
        self._snapshot = {"model": self.model_name, "family": self.family,
                          "loaded": list(self._attached), "max_loaded": self.max_loaded,
                          "fused": list(self._fused) if self._fused is not None else None}

    def status(self) -> dict:
        """``{model, family, loaded (attach order), max_loaded, fused (entries or None)}``, without waiting."""
        return dict(self._snapshot)


__all__ = ["EXAMPLES", "SCHEDULERS", "AdapterCard", "AdapterLibrary", "GenerationCancelled", "GenerationResult",
           "GenerationSettings", "SharedPipeline", "StackEntry", "addnet_hash", "adapter_name", "effective_stack",
           "format_parameters", "parse_parameters", "parse_prompt", "read_card", "safe_adapter_filename",
           "write_example_adapters"]
