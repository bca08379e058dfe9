"""The web UI's stack switch on the full-size SD-1.5-shaped model: Generate → first denoising step.

    python benchmarks/bench_ui.py [--rounds 5] [--threads 1] [--size 512]

On the SD-1.5-shaped UNet (859,520,964 parameters) and text encoder (123,060,480) with seeded random
weights (the tiny VAE and tokenizer: nothing here decodes), four adapter files are written and served by
:class:`lycoris_lite.integrations.webui.SharedPipeline`, the engine behind ``ui/app.py``:

* stack A: LoRA r=16 (UNet attention + feed-forward + proj, and the text encoder) and LoKr r=8 (UNet
  attention);
* stack B: LoHa r=8 (UNet attention) and OFT with 32×32 blocks (UNet attention + feed-forward + proj).

After both stacks have been used once (each file read once), generations alternate A, B, A, … and each is
timed from the call to ``SharedPipeline.generate`` to the UNet's first forward (a forward pre-hook stops
it there): taking the lock, bringing the pipeline to the stack, setting the scheduler, encoding the
prompt and the negative prompt, preparing latents. The same is timed with the stack unchanged (no switch),
and the switch alone (``SharedPipeline.apply``). Against it: one fuse of stack A
(``SharedPipeline.fuse``: ``pipe.fuse_adapters(safe=True)``) and the unfuse after it. Target: the switch
to the first step is no slower than one fuse. Every file opened while switching is counted
(``open``/``os.open``, ``safetensors`` and ``torch.load`` readers): it must be none.
"""

from __future__ import annotations

import argparse
import builtins
import io
import os
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import torch

from lycoris_lite import PRESETS, controller_for
from lycoris_lite.base.registry import get_algorithm

from lycoris_lite.io import files

from lycoris_lite.integrations import webui
from lycoris_lite.io.formats import safe_io
from lycoris_lite.models import build_sd15_text_encoder, build_sd15_unet, build_tiny_sd_pipeline

ADAPTERS = {  # name: (algorithm, settings, UNet targets, also the text encoder)
    "a_lora": ("lora", {"r": 16, "alpha": 16}, "unet-attn-ff", True),
    "a_lokr": ("lokr", {"r": 8, "alpha": 8}, "unet-attn", False),
    "b_loha": ("loha", {"r": 8, "alpha": 8}, "unet-attn", False),
    "b_oft": ("oft", {"block_size": 32}, "unet-attn-ff", False),
}
STACK_A = [webui.StackEntry("a_lora", 0.8), webui.StackEntry("a_lokr", 0.6)]
STACK_B = [webui.StackEntry("b_loha", 0.7), webui.StackEntry("b_oft", 0.5)]


class FirstStep(Exception):
    """Raised by the UNet's pre-hook: the first denoising step is about to run."""


def sd15_pipeline():
    pipe = build_tiny_sd_pipeline()
    pipe.unet = build_sd15_unet(seed=0)
    pipe.text_encoder = build_sd15_text_encoder(seed=0)
    return pipe


def write_adapters(pipe, folder: Path) -> None:
    for seed, (name, (algo, settings, unet_targets, text)) in enumerate(ADAPTERS.items()):
        cls = get_algorithm(algo).config_class
        parts = {"unet": PRESETS[unet_targets], **({"text_encoder": PRESETS["text-encoder"]} if text else {})}
        gen = torch.Generator().manual_seed(seed)
        for component, targets in parts.items():
            controller_for(getattr(pipe, component)).add_adapter(
                name, cls(**settings, target_modules=targets, init_weights=False), generator=gen)
        files.save_adapter({c: getattr(pipe, c) for c in parts}, name, folder / f"{name}.safetensors")
        for component in parts:
            controller_for(getattr(pipe, component)).unload()


class OpenCounter:
    """Counts files opened (and adapter readers called) while active."""

    def __init__(self):
        self.calls: list[str] = []

    def _wrap(self, label, fn):
        def wrapper(*args, **kwargs):
            self.calls.append(f"{label}({args[0] if args else ''})")
            return fn(*args, **kwargs)
        return wrapper

    def __enter__(self):
        import safetensors
        import safetensors.torch

        self._stack = ExitStack()
        for target, original in [("builtins.open", builtins.open), ("io.open", io.open), ("os.open", os.open),
                                 ("safetensors.safe_open", safetensors.safe_open),
                                 ("safetensors.torch.load_file", safetensors.torch.load_file),
                                 ("torch.load", torch.load),
                                 ("lycoris_lite.io.files.read_state_dict", safe_io.read_state_dict)]:
            self._stack.enter_context(mock.patch(target, self._wrap(target, original)))
        return self

    def __exit__(self, *exc):
        self._stack.close()


def to_first_step(engine, stack, settings) -> float:
    """Seconds from ``generate`` to the UNet's first forward."""
    start = time.perf_counter()
    try:
        engine.generate(settings, stack)
    except FirstStep as reached:
        return reached.args[0] - start
    raise RuntimeError("the UNet never ran")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timings of each kind (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    parser.add_argument("--size", type=int, default=512, help="image size (latents size/8)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    t = time.perf_counter()
    pipe = sd15_pipeline()
    folder = Path(tempfile.mkdtemp(prefix="bench_ui_"))
    write_adapters(pipe, folder)
    engine = webui.SharedPipeline(pipe, webui.AdapterLibrary(folder), "sd15-shaped", max_loaded=8)
    print(f"model, adapter files and library ready in {time.perf_counter() - t:.0f} s: "
          + ", ".join(f"{c.name} ({c.algorithm}, {c.size_bytes / 2**20:.1f} MiB)" for c in engine.cards.values()))

    def stop(module, args_):
        raise FirstStep(time.perf_counter())

    hook = pipe.unet.register_forward_pre_hook(stop)
    settings = webui.GenerationSettings(prompt="a photo of sks dog", negative_prompt="blurry", seed=0, steps=20,
                                        width=args.size, height=args.size)
    for stack in (STACK_A, STACK_B):  # first use: each file read once
        to_first_step(engine, stack, settings)
    reads = engine.disk_loads

    switched, same, applied = [], [], []
    with OpenCounter() as opened:
        for i in range(args.rounds):
            for stack in (STACK_A, STACK_B):
                switched.append(to_first_step(engine, stack, settings))
            same.append(to_first_step(engine, STACK_B, settings))
            for stack in (STACK_A, STACK_B):
                t = time.perf_counter()
                engine.apply(stack)
                applied.append(time.perf_counter() - t)
    hook.remove()

    fused, unfused = [], []
    for _ in range(args.rounds):
        t = time.perf_counter()
        engine.fuse(STACK_A)
        fused.append(time.perf_counter() - t)
        t = time.perf_counter()
        engine.unfuse()
        unfused.append(time.perf_counter() - t)

    med = statistics.median
    rows = [("Generate → first step, switching stacks (A↔B)", med(switched), len(switched)),
            ("Generate → first step, same stack (no switch)", med(same), len(same)),
            ("switch alone (`SharedPipeline.apply`)", med(applied), len(applied)),
            ("one fuse of stack A (`fuse_adapters(safe=True)`)", med(fused), len(fused)),
            ("unfuse", med(unfused), len(unfused))]
    print(f"\nSD-1.5-shaped UNet + text encoder, {args.size}x{args.size}, torch threads {args.threads}, "
          f"{args.rounds} rounds\n")
    print("| what | median | runs |\n|---|---:|---:|")
    for what, value, n in rows:
        print(f"| {what} | {value * 1000:.0f} ms | {n} |")
    ratio = med(switched) / med(fused)
    print(f"\nswitch to first step / one fuse = {ratio:.3f} (target ≤ 1: {'met' if ratio <= 1 else 'MISSED'})")
    print(f"files opened while switching: {len(opened.calls)}; adapter files read: {engine.disk_loads - reads}"
          + (f" ({opened.calls[:5]})" if opened.calls else ""))


if __name__ == "__main__":
    main()
