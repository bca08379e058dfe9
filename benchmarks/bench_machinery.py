"""Does the memory machinery pay for itself? Interleaved A/B on end-to-end pipeline operations.

What stays in ``lycoris_lite.core.buffers`` and the reader in ``io/formats/safe_io.py`` is what this
measures at >= 20 % end to end; what measured less (decay timers before ``MADV_FREE``, transparent
huge pages) was removed. Figures: benchmarks/README, "Memory machinery".

    python benchmarks/bench_machinery.py [--rounds 7] [--threads 0]

On the full-size SD-1.5-shaped UNet (seeded random weights) and kohya LoRA files r=32 on the attention,
feed-forward and proj layers (``unet-attn-ff``, 33 MiB in float32), each variant runs once per round in
a rotating order, and a ratio is the median over rounds of the per-round ratio to the baseline (this
machine is shared: absolute times move, paired ratios much less).

1. **load**: ``pipe.load_adapter(file)`` + ``unload_adapters()``, the file read by
   - ``reader``: our safetensors reader (``preadv`` straight into one 64-byte aligned block whose
     views the adapter keeps, pooled for reads: its pages reused by the next load), or
   - ``reader, no pool``: the same reader, its block fresh memory each time, or
   - ``safetensors``: the same validated header, then ``safetensors.torch.load(path.read_bytes())``
     (bytes to tensors; attaching copies them into the adapter's own storage).
2. **fused switch**: ``unfuse_adapters`` + ``set_adapters`` (other stack of two) + ``fuse_adapters``:
   - ``pool``: the fused weights in one block kept idle, its pages handed to the kernel with
     ``MADV_FREE``, for the next fuse (the default);
   - ``no pool``: one block, unmapped when dropped (``LYCORIS_LITE_KEEP_FUSE_MEMORY=0``);
   - ``per layer``: each fused weight its own ``torch.empty`` (no block, no ``MADV_POPULATE_WRITE``).
3. **cold fuse** (the idle block released first): ``fuse_adapters`` into a ``block`` (populated at
   once by ``MADV_POPULATE_WRITE``) or ``per layer`` (glibc's heap, which may still hold pages freed by
   the last unfuse).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import make_adapter_file  # noqa: E402

import lycoris_lite  # noqa: E402
from lycoris_lite.core import buffers, controller  # noqa: E402
from lycoris_lite.io.formats import safe_io  # noqa: E402
from lycoris_lite.models import build_sd15_unet, build_tiny_sd_pipeline  # noqa: E402


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def env(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _plain_read(path, header, data_start):
    return safetensors_load(Path(path).read_bytes())


def _per_layer(shapes, dtype, device, pool=None):
    return [torch.empty(s, dtype=dtype, device=device) for s in shapes]


def interleaved(variants: dict, rounds: int, before=None) -> dict[str, list[float]]:
    times = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if before is not None:
                before()
            gc.collect()
            with variants[name][0]():
                t = time.perf_counter()
                variants[name][1]()
                times[name].append(time.perf_counter() - t)
    return times


def report(title: str, times: dict[str, list[float]], base: str) -> None:
    print(f"\n{title} (seconds; median of per-round ratios to {base!r})")
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, times[base]))
        print(f"   {name:12s} median {statistics.median(ts):7.3f}  ratio {ratio:5.2f}  rounds "
              + " ".join(f"{t:.3f}" for t in ts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pipe = lycoris_lite.enable(build_tiny_sd_pipeline())
    pipe.unet = build_sd15_unet()
    pipe.unet.requires_grad_(False)
    tmp = Path(tempfile.mkdtemp(prefix="bench_machinery_"))
    files = [make_adapter_file(pipe, tmp / f"s{i}.safetensors", "lora", {"r": 32}, 10 + i)[0] for i in range(4)]
    print(f"threads {torch.get_num_threads()}; file {files[0].stat().st_size / 2**20:.1f} MiB; "
          f"pools on this platform: {buffers.portable.pools_memory()}")

    none = contextlib.nullcontext

    def load_cycle():
        pipe.load_adapter(files[0], "a")
        pipe.unload_adapters()

    load_cycle()
    report("1. load + unload", interleaved({
        "reader": (none, load_cycle),
        "reader, no pool": (lambda: patched(safe_io, "read_block", lambda n: buffers.read_block(n, pooled=False)), load_cycle),
        "safetensors": (lambda: patched(safe_io, "_read_tensors", _plain_read), load_cycle),
    }, args.rounds), "reader")

    for i, f in enumerate(files):
        pipe.load_adapter(f, f"s{i}")
    stacks = [(["s0", "s1"], [0.8, 0.6]), (["s2", "s3"], [1.0, 0.5])]
    state = {"i": 0}
    pipe.set_adapters(*stacks[0])
    pipe.fuse_adapters()

    def switch():
        state["i"] ^= 1
        pipe.unfuse_adapters()
        pipe.set_adapters(*stacks[state["i"]])
        pipe.fuse_adapters()

    switch()
    report("2. fused switch (unfuse + set_adapters + fuse)", interleaved({
        "pool": (none, switch),
        "no pool": (lambda: env("LYCORIS_LITE_KEEP_FUSE_MEMORY", "0"), switch),
        "per layer": (lambda: patched(controller, "packed_empty", _per_layer), switch),
    }, args.rounds), "pool")
    pipe.unfuse_adapters()

    def cold():
        pipe.unfuse_adapters()
        gc.collect()
        buffers.release_idle()

    pipe.fuse_adapters()
    report("3. cold fuse (idle block released first)", interleaved({
        "block": (none, pipe.fuse_adapters),
        "per layer": (lambda: patched(controller, "packed_empty", _per_layer), pipe.fuse_adapters),
    }, args.rounds, before=cold), "block")
    pipe.unfuse_adapters()
    pipe.unload_adapters()


if __name__ == "__main__":
    main()
