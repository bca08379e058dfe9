"""Drift and leaks: fuse/unfuse cycles of a mixed stack (bitwise exact?) and load/unload cycles (does
memory grow?), on the tiny pipeline and on the full-size SD-1.5-shaped UNet."""

from __future__ import annotations

import copy
import gc
import random
import time
from pathlib import Path

import torch

from lycoris_lite import PRESETS, LoRAConfig, controller_for
from lycoris_lite.io.files import load_adapter, save_adapter
from lycoris_lite.models import build_sd15_unet

from .memory import MiB, live_tensors, malloc_trim, peak, reset_peak, rss
from .subjects import components, make_adapter


DRIFT_STACK = ("lora", "lokr", "oft", "hra")


def make_stack_files(pipe, folder: Path, algos=DRIFT_STACK, targets: str = "unet-attn-ff") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [make_adapter(pipe, folder / f"stack-{a}.safetensors", a, seed=40 + i, targets=targets)
            for i, a in enumerate(algos)]


def _max_difference(model_tensors: dict, reference: dict) -> tuple[float, bool]:
    """``(max |a − b| over every tensor, bitwise equal)``."""
    worst, same = 0.0, True
    for c, tensors in reference.items():
        for k, ref in tensors.items():
            now = model_tensors[c][k]
            if not torch.equal(now, ref):
                same = False
                worst = max(worst, float((now.double() - ref.double()).abs().max()))
    return worst, same


def drift(pipe, files: list[Path], dtype: torch.dtype, cycles: int, seed: int = 0, time_limit: float = 600.0) -> dict:
    """``cycles`` fuse/unfuse cycles of the mixed stack in ``files`` on a copy of ``pipe`` in ``dtype``.

    Each cycle draws new weights for the stack (``set_adapters``), fuses the whole stack or a random
    part of it, and unfuses; every tensor of the UNet and the text encoder (base weights and adapter
    tensors) is then compared with its value before the first cycle. The figure is the maximum
    difference over all cycles (bitwise equality is the claim). After the cycles the adapters are
    unloaded and the model is compared with the pristine copy."""
    rng = random.Random(seed)
    work = copy.deepcopy(pipe).to(dtype=dtype)
    parts = components(work)
    pristine = {c: {k: v.clone() for k, v in getattr(work, c).state_dict().items()} for c in parts}
    names = [work.load_adapter(f, f"a{i}") for i, f in enumerate(files)]
    original = {c: {k: v.clone() for k, v in getattr(work, c).state_dict().items()} for c in parts}
    worst, bitwise, fused_moved, done = 0.0, True, False, 0
    start = time.time()
    for i in range(cycles):
        if time.time() - start > time_limit:
            break
        work.set_adapters(names, [rng.choice([0.5, 0.8, 1.0, 1.3, -0.7]) for _ in names])
        subset = names if i % 2 == 0 else sorted(rng.sample(names, rng.randint(1, len(names))))
        work.fuse_adapters(subset)
        if not fused_moved:
            now = {c: getattr(work, c).state_dict() for c in parts}
            fused_moved = _max_difference(now, original)[0] > 0
        work.unfuse_adapters()
        diff, same = _max_difference({c: getattr(work, c).state_dict() for c in parts}, original)
        worst, bitwise, done = max(worst, diff), bitwise and same, i + 1
    work.unload_adapters()
    after_unload, unload_bitwise = _max_difference({c: getattr(work, c).state_dict() for c in parts}, pristine)
    return {"dtype": str(dtype).removeprefix("torch."), "cycles": done, "stack": [Path(f).stem for f in files],
            "max_difference": worst, "bitwise": bitwise, "fusing_changed_weights": fused_moved,
            "unload_max_difference": after_unload, "unload_bitwise": unload_bitwise,
            "seconds": round(time.time() - start, 1)}


def leak_cycles(target, source: Path, cycles: int, fuse: bool = True, time_limit: float = 900.0) -> dict:
    """``cycles`` × (load ``source``, [fuse, unfuse,] unload) on ``target``: a pipeline given
    ``lycoris_lite.enable`` (its API) or a bare UNet (:func:`lycoris_lite.io.files.load_adapter` and the
    controller's ``unload``). After each cycle: ``gc.collect()``, then VmRSS (*raw*), then
    ``malloc_trim(0)`` and VmRSS again (*trimmed*: glibc's free heap pages given back, so what is left is
    memory in use), and the number of live tensors. Growth is measured from the end of the first cycle
    (which allocates the caches, the name maps and the allocator's arenas for good)."""
    is_pipe = hasattr(target, "load_adapter")
    raw, trimmed, tensors, seconds = [], [], [], []
    start = time.time()
    for i in range(cycles):
        if i >= 2 and time.time() - start > time_limit:
            break
        t0 = time.perf_counter()
        if is_pipe:
            name = target.load_adapter(source, "leak")
            if fuse:
                target.fuse_adapters()
                target.unfuse_adapters()
            target.unload_adapters()
        else:
            load_adapter({"unet": target}, source, "leak")
            ctrl = controller_for(target)
            if fuse:
                ctrl.merge_adapter(["leak"])
                ctrl.unmerge_adapter()
            ctrl.unload()
        seconds.append(time.perf_counter() - t0)
        gc.collect()
        raw.append(rss())
        malloc_trim()
        trimmed.append(rss())
        tensors.append(live_tensors())
    growth = lambda series: (series[-1] - series[0]) / series[0]  # noqa: E731
    return {"cycles": len(raw), "rss_after_first_mib": round(raw[0] / MiB, 1),
            "growth_raw": growth(raw), "growth_trimmed": growth(trimmed),
            "growth_raw_mib": round((raw[-1] - raw[0]) / MiB, 2), "growth_trimmed_mib": round((trimmed[-1] - trimmed[0]) / MiB, 2),
            "max_growth_trimmed": max((t - trimmed[0]) / trimmed[0] for t in trimmed),
            "live_tensors_first": tensors[0], "live_tensors_last": tensors[-1], "live_tensors_max": max(tensors),
            "seconds_per_cycle": round(sum(seconds) / len(seconds), 3), "adapter_bytes": Path(source).stat().st_size,
            "rss_raw_mib": [round(r / MiB, 1) for r in raw], "rss_trimmed_mib": [round(r / MiB, 1) for r in trimmed]}


def sd15_leaks(cycles: int, folder: Path) -> dict:
    """``cycles`` load/unload cycles of a LoRA (r=16, attention + feed-forward) on the full-size
    SD-1.5-shaped UNet (859M parameters, float32), and the peak memory of one load against the file."""
    t0 = time.time()
    unet = build_sd15_unet(seed=0)
    built = time.time() - t0
    ctrl = controller_for(unet)
    ctrl.add_adapter("tmp", LoRAConfig(r=16, target_modules=PRESETS["unet-attn-ff"], init_weights=False),
                     generator=torch.Generator().manual_seed(0))
    path = save_adapter({"unet": unet}, "tmp", folder / "sd15-lora.safetensors")
    ctrl.unload()
    del ctrl
    gc.collect()
    malloc_trim()
    measured = reset_peak()
    rest = rss()
    load_adapter({"unet": unet}, path, "probe")
    peak_extra = peak() - rest if measured else None
    controller_for(unet).unload()
    result = leak_cycles(unet, path, cycles, fuse=False)
    result.update(model_parameters=sum(p.numel() for p in unet.parameters()), build_seconds=round(built, 1),
                  load_peak_extra_mib=round(peak_extra / MiB, 1) if peak_extra is not None else None,
                  load_peak_over_file=round(peak_extra / path.stat().st_size, 2) if peak_extra is not None else None)
    return result
