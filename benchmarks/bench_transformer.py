"""Adapter operations on a Flux-width transformer: ours against diffusers + PEFT, in one run.

    python benchmarks/bench_transformer.py [--rounds 3] [--tokens 256] [--dtype float32|bfloat16]

The transformer is ``FluxTransformer2DModel`` at Flux.1-dev's widths (hidden 3072 = 24 heads x 128, T5
width 4096) with 2 double-stream and 4 single-stream blocks (``lycoris_lite.models.build_flux_width_transformer``,
seeded random weights), inside the tiny Flux pipeline (its text encoders are tiny; the adapters are on
the transformer). The LoRA file: rank 16 on the ``flux-attn-mlp`` preset, diffusers format (what both
loaders read).

1. **load**: ``pipe.load_adapter`` + ``unload_adapters`` against ``load_lora_weights`` +
   ``unload_lora_weights``, interleaved per round.
2. **cycle**: load + fuse + unfuse + unload, both libraries, and the largest weight difference afterwards.
3. **unfused forward**: one transformer forward (``--tokens`` image tokens, 64 text tokens) with a LoKr
   (factor 16) and an OFT (block 64) adapter of ours on the same preset, each active alone, against the
   plain transformer (adapters disabled), interleaved; ratio = median of per-round ratios.
4. **peak memory**: extra peak RSS of our cycle and of diffusers' (after ``buffers.release_idle()``).

Ratios are what to read: this machine is shared, so absolute times move from run to run.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import _status_kb, reset_peak_rss  # noqa: E402

import lycoris_lite  # noqa: E402
from lycoris_lite import PRESETS, LoKrConfig, LoRAConfig, OFTConfig, controller_for, save_adapter  # noqa: E402
from lycoris_lite.core import buffers  # noqa: E402
from lycoris_lite.models import build_flux_width_transformer, build_tiny_flux_pipeline  # noqa: E402

TARGETS = PRESETS["flux-attn-mlp"]


def timed(fn) -> float:
    gc.collect()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def peak_extra(fn) -> float | None:
    """Extra peak RSS (MiB) while ``fn`` runs, or None where the peak cannot be reset."""
    gc.collect()
    buffers.release_idle()
    if not reset_peak_rss():
        return None
    rest = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - rest) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=256, help="image tokens of the forward (256: 256x256 px)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--skip-forward", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    from diffusers.utils import logging as dlogging
    dlogging.set_verbosity_error()

    pipe = lycoris_lite.enable(build_tiny_flux_pipeline())
    pipe.transformer = build_flux_width_transformer(seed=0, dtype=dtype).requires_grad_(False)
    transformer = pipe.transformer
    print(f"threads {torch.get_num_threads()}; transformer {sum(p.numel() for p in transformer.parameters()):,} "
          f"params ({args.dtype})")
    tmp = Path(tempfile.mkdtemp(prefix="bench_transformer_"))
    ctrl = controller_for(transformer)
    ctrl.add_adapter("file", LoRAConfig(r=16, target_modules=TARGETS, init_weights=False),
                     generator=torch.Generator().manual_seed(0))
    lora = tmp / "lora.safetensors"
    save_adapter({"transformer": transformer}, "file", lora, format="diffusers")
    ctrl.unload()
    print(f"LoRA r=16 file: {lora.stat().st_size / 2**20:.1f} MiB")
    original = {k: v.clone() for k, v in transformer.state_dict().items()}

    ours = (lambda: pipe.load_adapter(lora, "a"), pipe.fuse_adapters, pipe.unfuse_adapters, pipe.unload_adapters)
    theirs = (lambda: pipe.load_lora_weights(str(lora), adapter_name="a"), pipe.fuse_lora, pipe.unfuse_lora,
              pipe.unload_lora_weights)
    for steps in (ours, theirs):  # warm-up
        for fn in steps:
            fn()
    transformer.load_state_dict(original)

    # ---- 1. load + unload, 2. cycle -------------------------------------------------------------
    load = {"ours": [], "diffusers": []}
    cycle = {"ours": [], "diffusers": []}
    for r in range(args.rounds):
        for lib, steps in (("ours", ours), ("diffusers", theirs))[::1 if r % 2 == 0 else -1]:
            load[lib].append(timed(steps[0]) + timed(steps[3]))
            cycle[lib].append(sum(timed(fn) for fn in steps))
            if lib == "diffusers":
                transformer.load_state_dict(original)
    drift = {}
    for lib, steps in (("ours", ours), ("diffusers", theirs)):
        for fn in steps:
            fn()
        drift[lib] = max((v.float() - original[k].float()).abs().max().item() for k, v in transformer.state_dict().items())
        transformer.load_state_dict(original)

    def ratio(d):
        return statistics.median(t / o for t, o in zip(d["diffusers"], d["ours"]))

    print("\n1-2. seconds, median of", args.rounds, "rounds (interleaved)")
    for name, d in (("load + unload", load), ("load + fuse + unfuse + unload", cycle)):
        print(f"   {name:30s} ours {statistics.median(d['ours']):.3f}  diffusers {statistics.median(d['diffusers']):.3f}"
              f"  diffusers / ours {ratio(d):.2f}x (target >= 3x)")
    print(f"   largest |W - W0| after a cycle: ours {drift['ours']:.2e}, diffusers {drift['diffusers']:.2e}")

    # ---- 4. peak memory ---------------------------------------------------------------------------
    mem = {"ours": peak_extra(lambda: [fn() for fn in ours])}
    mem["diffusers"] = peak_extra(lambda: [fn() for fn in theirs])
    transformer.load_state_dict(original)
    if mem["ours"] is not None:
        print(f"\n4. extra peak RSS of one cycle: ours {mem['ours']:.0f} MiB, diffusers {mem['diffusers']:.0f} MiB")

    if args.skip_forward:
        return
    # ---- 3. unfused forward -----------------------------------------------------------------------
    ctrl = controller_for(transformer)
    ctrl.add_adapter("lokr", LoKrConfig(r=16, factor=16, target_modules=TARGETS, init_weights=False),
                     generator=torch.Generator().manual_seed(1))
    ctrl.add_adapter("oft", OFTConfig(block_size=64, target_modules=TARGETS, init_weights=False),
                     generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(3)
    config = transformer.config
    inputs = dict(hidden_states=torch.randn(1, args.tokens, config.in_channels, generator=g, dtype=dtype),
                  encoder_hidden_states=torch.randn(1, 64, config.joint_attention_dim, generator=g, dtype=dtype),
                  pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g, dtype=dtype),
                  timestep=torch.tensor([0.5], dtype=dtype), img_ids=torch.zeros(args.tokens, 3),
                  txt_ids=torch.zeros(64, 3), guidance=torch.tensor([3.5], dtype=dtype))

    def forward():
        with torch.no_grad():
            transformer(**inputs)

    variants = {"plain": lambda: ctrl.disable_adapter_layers(), "lokr": lambda: (ctrl.enable_adapter_layers(),
                                                                                   ctrl.set_adapter("lokr")),
                "oft": lambda: (ctrl.enable_adapter_layers(), ctrl.set_adapter("oft"))}
    for setup in variants.values():
        setup()
        forward()
    times = {n: [] for n in variants}
    for r in range(args.rounds):
        for name, setup in variants.items():
            setup()
            times[name].append(timed(forward))
    print(f"\n3. one unfused transformer forward ({args.tokens} image + 64 text tokens), seconds")
    for name in ("lokr", "oft"):
        per = [t / p for t, p in zip(times[name], times["plain"])]
        params = sum(p.numel() for p in ctrl.trainable_parameters([name]))
        print(f"   {name:5s} {params:>12,} params  {statistics.median(times[name]):.2f} s  / plain "
              f"{statistics.median(per):.3f} (target <= 1.2)  per round " + " ".join(f"{x:.3f}" for x in per))
    print(f"   plain {statistics.median(times['plain']):.2f} s")
    ctrl.unload()


if __name__ == "__main__":
    main()
