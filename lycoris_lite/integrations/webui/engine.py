"""The pipeline every session shares (:class:`SharedPipeline`).

Every change to it happens under one process-wide lock: before each generation it is brought to the
session's stack from the adapters already attached (a loaded adapter stays attached and costs nothing
while inactive, so switching sets scales and reads no disk); at most ``max_loaded`` adapters stay
attached, the least recently used one leaving first. A fused stack is global: while it is fused every
generation uses it.

Composition order is the stack order. The layers compose adapters in the order they were attached, so
when a stack lists attached adapters in another relative order, the ones from the first misplaced one on
are attached again (from disk) at the end: an image depends on its stack alone, never on what other
sessions loaded before.
"""

from __future__ import annotations

import os
import random
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from PIL import PngImagePlugin
from torch import nn

from ...io import files
from ...io.formats import kohya
from ...io.formats.safe_io import atomic_write, check_safetensors_header
from ..pipeline import enable
from .library import AdapterCard, AdapterLibrary, adapter_name, addnet_hash, preview_destination, read_card
from .settings import (DEFAULT_SCHEDULER, MAX_SEED, SCHEDULERS, GenerationCancelled, GenerationResult,
                       GenerationSettings)
from .tags import StackEntry, effective_stack, format_parameters, has_tags, parse_prompt
from .values import finite


def _block_groups(denoiser: nn.Module) -> dict[str, int]:
    """A denoiser's block groups and their sizes, as block weights name them: a UNet's ``down``, ``mid``
    and ``up``; a transformer's block lists (``transformer_blocks``, ``single_transformer_blocks``, …)."""
    if hasattr(denoiser, "down_blocks"):
        return {"down": len(denoiser.down_blocks), "mid": 1, "up": len(denoiser.up_blocks)}
    return {name: len(child) for name, child in denoiser.named_children() if isinstance(child, nn.ModuleList) and child}


class _Job:
    """One session's generation: ``cancelled`` is set by :meth:`SharedPipeline.cancel`, ``finished`` once
    it has stopped; ``outcome`` says how a cancelled one stopped."""

    def __init__(self):
        self.cancelled, self.finished = threading.Event(), threading.Event()
        self.outcome = "still stopping"


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
        self.denoiser = next(c for c in files.DENOISERS if c in self.components)
        self.block_groups = _block_groups(self.components[self.denoiser])
        self._default_scheduler = type(self.pipe.scheduler), self.pipe.scheduler.config
        self._default_sampler = next((k for k, v in SCHEDULERS.items() if v == type(self.pipe.scheduler).__name__),
                                     type(self.pipe.scheduler).__name__)
        # AUTOMATIC1111's samplers are noise-prediction schedulers; a flow-matching model keeps its own
        flow = "FlowMatch" in type(self.pipe.scheduler).__name__
        self.samplers = [DEFAULT_SCHEDULER, *([] if flow else SCHEDULERS)]
        parameter = next(self.components[self.denoiser].parameters())
        self.dtype, self.device = str(parameter.dtype).removeprefix("torch."), parameter.device.type
        self._cards: dict[str, AdapterCard] = {}
        self._compatibility: dict[tuple, str | None] = {}
        self._attached: dict[str, tuple] = {}    # name -> file version, in attach (= composition) order
        # the active stack and its weights are the pipeline's own (pipe.adapter_stack), not copied here
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
    def default_size(self) -> int:
        """The pipeline's default image side in pixels (its denoiser's sample size times the VAE's scale)."""
        model = self.components[self.denoiser]
        sample = model.config.sample_size if self.denoiser == "unet" else getattr(self.pipe, "default_sample_size", 64)
        return int(sample * self.pipe.vae_scale_factor)

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
            if [(c.name, c.stamp, c.problem, c.preview) for c in cards.values()] != [
                    (c.name, c.stamp, c.problem, c.preview) for c in self._cards.values()]:
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
        ``max_bytes``, anything that is not a readable safetensors adapter, weights already in the library
        (the same content hash; the message names that adapter), NaN/Inf weights, or an adapter that does
        not fit the model (another family, unknown layers, wrong shapes)."""
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
            same = [c for c in self._cards.values() if card.shorthash and c.shorthash == card.shorthash
                    and addnet_hash(c.path) == addnet_hash(source)]
            if same:
                raise ValueError(f"these weights are already in the library as {same[0].name} "
                                 f"({same[0].location or same[0].path.name})")
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
            same_stem = [n for n in self._cards if n.endswith(f"/{name}")]
            if same_stem:
                raise ValueError(f"no adapter named {name!r}: several adapters have that file name; use one of "
                                 f"{', '.join(same_stem)}")
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
        weights = {e.name: e.pipeline_weight(self.denoiser, list(self.block_groups)) for e in entries}
        for e in entries:
            self.card(e.name)
            finite(e.weight, f"the weight of {e.name}")
            finite(e.unet_weight, f"the UNet weight of {e.name}")
            finite(e.text_encoder_weight, f"the text-encoder weight of {e.name}")
        wanted = list(weights)
        with self.lock:
            if self._fused is not None:
                raise ValueError("a stack is fused; unfuse it before changing the stack")
            before = self.pipe.adapter_stack
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
            except Exception:
                still = [n for n in before.names if n in self._attached]
                self.pipe.set_adapters(still, [before.weights[n] for n in still])
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
        if name not in self.samplers:
            raise ValueError(f"the {name} sampler does not work with this model's {cls.__name__}; use "
                             f"{', '.join(self.samplers)}")
        if name == DEFAULT_SCHEDULER:
            return cls.from_config(config), self._default_sampler
        return getattr(diffusers, SCHEDULERS[name]).from_config(config), name

    def generate(self, settings: GenerationSettings, stack: list[StackEntry], *, session: str = "default",
                 on_step: Callable[[int, int, str], None] | None = None) -> GenerationResult:
        """Images for one session: waits for the lock, brings the pipeline to ``stack`` plus the prompt's
        tags (or uses the fused stack), then renders ``settings.count`` images, image ``i`` with seed
        ``seed + i`` in its own call so each one is reproducible alone. ``on_step(done, total, what)``
        follows it ("waiting for the pipeline" only while another generation holds it, then the stack, the
        prompt and each denoising step); :meth:`cancel` for ``session`` stops it (``GenerationCancelled``)."""
        settings.check()
        prompt, tags = parse_prompt(settings.prompt)
        if has_tags(settings.negative_prompt):
            raise ValueError("<lora:…> tags work in the prompt only, not in the negative prompt")
        job = _Job()
        self._cancel[session] = job
        token = job.cancelled
        total = settings.steps * settings.count
        report = on_step or (lambda done, total, what: None)
        try:
            if not self.lock.acquire(blocking=False):
                report(0, total, "waiting for the pipeline")  # only while another generation holds it
                self.lock.acquire()
            try:
                if token.is_set():
                    raise GenerationCancelled("cancelled before it started")
                notes = []
                report(0, total, "applying the stack")
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
                report(0, total, "encoding the prompt")
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
                self.lock.release()
        except GenerationCancelled as exc:
            job.outcome = str(exc)
            raise
        finally:
            if self._cancel.get(session) is job:
                del self._cancel[session]
            job.finished.set()

    def make_preview(self, name: str, settings: GenerationSettings) -> Path:
        """Render ``name``'s preview with the current model: the adapter alone at weight 1, its trigger words
        (or its name) as the prompt, ``settings``' seed, steps, CFG and size; kept beside the file
        (:func:`~.library.preview_destination`, with the PNG's parameters text). Refused when it has a
        preview already or a stack is fused for everyone (the image would show that stack)."""
        with self.lock:
            card = self.card(name)
            if card.preview is not None:
                raise ValueError(f"{name} already has a preview ({card.preview.name})")
            if self._fused is not None:
                raise ValueError("a stack is fused for everyone; unfuse it before making previews")
            prompt = ", ".join(card.trigger_words) or name.rsplit("/", 1)[-1].replace("_", " ")
            result = self.generate(replace(settings, prompt=prompt, negative_prompt="", count=1), [StackEntry(name)],
                                   session=f"preview of {name}")
            info = PngImagePlugin.PngInfo()
            info.add_text("parameters", result.parameters[0])
            dest = preview_destination(card.path)
            atomic_write(dest, lambda tmp: result.images[0].save(tmp, format="PNG", pnginfo=info))
            self.rescan()
            return dest

    def cancel(self, session: str = "default", *, wait: float = 0.0) -> str | None:
        """Stop ``session``'s generation (running or waiting for the pipeline); ``None`` when it has
        none. Waits up to ``wait`` seconds for it to stop and says how it stopped (``"cancelled after 3
        of 20 steps"``; ``"still stopping"`` when the time ran out, ``"finished"`` when it ended first)."""
        job = self._cancel.get(session)
        if job is None:
            return None
        job.cancelled.set()
        if job.finished.wait(wait) and job.outcome == "still stopping":
            job.outcome = "finished"
        return job.outcome

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
            self._last_used.clear()
            self._take_snapshot()

    # ---- status -----------------------------------------------------------------------------------
    def _take_snapshot(self) -> None:
        self._snapshot = {"model": self.model_name, "family": self.family, "dtype": self.dtype, "device": self.device,
                          "loaded": list(self._attached), "max_loaded": self.max_loaded,
                          "fused": list(self._fused) if self._fused is not None else None}

    def status(self) -> dict:
        """``{model, family, dtype, device, loaded (attach order), max_loaded, fused (entries or None)}``,
        without waiting."""
        return dict(self._snapshot)

