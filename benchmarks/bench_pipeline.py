"""Pipeline-level adapter operations on the full-size SD-1.5-shaped UNet: ours against diffusers + PEFT.

    python benchmarks/bench_pipeline.py [--threads 1] [--rounds 3] [--latent 64] [--skip-steps]

Measured in one run, on the same UNet (859,520,964 parameters, seeded random weights) and the same kohya
LoRA file (r=32 on the attention, feed-forward and proj layers: the ``unet-attn-ff`` preset):

1. **cycle**: load + fuse + unfuse + unload. Ours: ``pipe.load_adapter`` / ``fuse_adapters`` /
   ``unfuse_adapters`` / ``unload_adapters``; diffusers: ``load_lora_weights`` / ``fuse_lora`` /
   ``unfuse_lora`` / ``unload_lora_weights``. Afterwards: the largest difference from the original weights.
2. **switch**: two cached stacks of two adapters each (no disk read: file reads are counted), unfused
   (``set_adapters``) and fused (``unfuse`` + ``set_adapters`` + ``fuse``), against one fuse.
3. **fuse memory**: extra peak resident memory while fusing, against one copy of the targeted weights.
4. **steps**: one unfused UNet forward (batch 2, as with classifier-free guidance) with LoRA r=32, and
   with LoKr, OFT and HRA of a similar parameter count, against the plain UNet; diffusers' PEFT LoRA too.
   The four are loaded together and timed in interleaved rounds (plain with the adapters disabled, then
   each one active alone); a ratio is the median over rounds of the per-round ratio.

The UNet is driven directly for the steps (the tiny text encoder's width does not match it); the
pipeline object carries the UNet for the adapter operations. Ratios are what to read: this machine is
shared, so absolute times move from run to run.
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
from lycoris_lite import PRESETS, controller_for
from lycoris_lite.algos.lora import LoRAConfig
from lycoris_lite.base.registry import get_algorithm
from lycoris_lite.core import buffers
from lycoris_lite.core.targets import find_targets
from lycoris_lite.io.files import save_adapter  # noqa: E402
from lycoris_lite.io.formats import safe_io  # noqa: E402
from lycoris_lite.models import build_sd15_unet, build_tiny_sd_pipeline  # noqa: E402

TARGETS = PRESETS["unet-attn-ff"]


def median_time(fn, rounds: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(rounds):
        gc.collect()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def make_adapter_file(pipe, path: Path, algo: str, settings: dict, seed: int) -> tuple[Path, int]:
    cls = get_algorithm(algo).config_class
    ctrl = controller_for(pipe.unet)
    ctrl.add_adapter("tmp", cls(**settings, target_modules=TARGETS, init_weights=False),
                     generator=torch.Generator().manual_seed(seed))
    n_params = sum(p.numel() for p in ctrl.trainable_parameters(["tmp"]))
    save_adapter({"unet": pipe.unet}, "tmp", path)
    ctrl.unload()
    return path, n_params


def targeted_numel(unet) -> int:
    return sum(unet.get_submodule(n).weight.numel() for n in find_targets(unet, LoRAConfig(target_modules=TARGETS)))


def weights_of(unet) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in unet.state_dict().items()}


def max_diff(unet, original) -> float:
    return max((v.float() - original[k].float()).abs().max().item() for k, v in unet.state_dict().items())


def count_reads():
    """Patch the safetensors reader; returns the list its calls are appended to."""
    calls = []
    real = safe_io.read_state_dict

    def counting(*args, **kwargs):
        calls.append(args[0] if args else None)
        return real(*args, **kwargs)

    safe_io.read_state_dict = counting
    lycoris_lite.io.files.read_state_dict = counting
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latent", type=int, default=64, help="latent size for the UNet steps (64: 512 px)")
    parser.add_argument("--skip-steps", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from diffusers.utils import logging as dlogging
    dlogging.set_verbosity_error()

    pipe = lycoris_lite.enable(build_tiny_sd_pipeline())
    pipe.unet = build_sd15_unet()
    pipe.unet.requires_grad_(False)
    unet = pipe.unet
    numel = targeted_numel(unet)
    print(f"threads {torch.get_num_threads()}; UNet {sum(p.numel() for p in unet.parameters()):,} params; "
          f"{numel:,} targeted weights ({numel * 4 / 2**20:.0f} MiB)")
    tmp = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    lora, lora_params = make_adapter_file(pipe, tmp / "lora.safetensors", "lora", {"r": 32}, 0)
    original = weights_of(unet)
    rows = []

    # ---- 1. cycle ------------------------------------------------------------------------------
    phases = {}
    for lib, steps in (("ours", (lambda: pipe.load_adapter(lora, "a"), pipe.fuse_adapters, pipe.unfuse_adapters,
                                 pipe.unload_adapters)),
                       ("diffusers", (lambda: pipe.load_lora_weights(str(lora), adapter_name="a"), pipe.fuse_lora,
                                      pipe.unfuse_lora, pipe.unload_lora_weights))):
        steps[0]()  # warm-up (imports, first-touch)
        for fn in steps[1:]:
            fn()
        per = {n: [] for n in ("load", "fuse", "unfuse", "unload")}
        for _ in range(args.rounds):
            for n, fn in zip(per, steps):
                gc.collect()
                t = time.perf_counter()
                fn()
                per[n].append(time.perf_counter() - t)
        phases[lib] = {n: statistics.median(v) for n, v in per.items()}
        phases[lib]["rounds"] = per
        phases[lib]["drift"] = max_diff(unet, original)
        if lib == "diffusers":  # restore the exact original for what follows
            unet.load_state_dict(original)
    ours, theirs = phases["ours"], phases["diffusers"]
    print("\n1. load + fuse + unfuse + unload of a kohya LoRA r=32 (median of", args.rounds, "rounds, seconds)")
    print(f"   {'':10s} {'load':>7s} {'fuse':>7s} {'unfuse':>7s} {'unload':>7s} {'cycle':>7s} {'max |W - W0|':>13s}")
    for lib in ("ours", "diffusers"):
        p = phases[lib]
        p["cycle"] = p["load"] + p["fuse"] + p["unfuse"] + p["unload"]
        print(f"   {lib:10s} {p['load']:7.3f} {p['fuse']:7.3f} {p['unfuse']:7.3f} {p['unload']:7.3f} "
              f"{p['cycle']:7.3f} {p['drift']:13.2e}")
    for lib in ("ours", "diffusers"):
        print(f"   {lib} per round: " + "; ".join(f"{n} " + " ".join(f"{t:.3f}" for t in v)
                                            for n, v in phases[lib]["rounds"].items()))
    print(f"   diffusers / ours: cycle {theirs['cycle'] / ours['cycle']:.2f}x, load {theirs['load'] / ours['load']:.2f}x, "
          f"fuse {theirs['fuse'] / ours['fuse']:.2f}x (target: cycle >= 3x, drift 0)")
    rows.append(("cycle speed-up over diffusers", f"{theirs['cycle'] / ours['cycle']:.2f}x", ">= 3x"))

    # ---- 2. switching cached stacks ---------------------------------------------------------------
    files = [make_adapter_file(pipe, tmp / f"s{i}.safetensors", "lora", {"r": 32}, 10 + i)[0] for i in range(4)]
    for i, f in enumerate(files):
        pipe.load_adapter(f, f"s{i}")
    stacks = [(["s0", "s1"], [0.8, 0.6]), (["s2", "s3"], [1.0, 0.5])]
    reads = count_reads()
    pipe.set_adapters(*stacks[0])
    pipe.fuse_adapters()  # warm-up
    pipe.unfuse_adapters()
    fuse_times = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        pipe.fuse_adapters()
        fuse_times.append(time.perf_counter() - t)
        pipe.unfuse_adapters()
    fuse_time = statistics.median(fuse_times)
    state = {"i": 0}

    def switch_unfused():
        state["i"] ^= 1
        pipe.set_adapters(*stacks[state["i"]])

    def switch_fused():
        state["i"] ^= 1
        pipe.unfuse_adapters()
        pipe.set_adapters(*stacks[state["i"]])
        pipe.fuse_adapters()

    unfused_switch, _ = median_time(switch_unfused, max(5, args.rounds))
    pipe.fuse_adapters()
    fused_switch, _ = median_time(switch_fused, args.rounds)
    pipe.unfuse_adapters()
    print("\n2. switching between two cached stacks of two LoRA r=32 each (seconds)")
    print(f"   one fuse {fuse_time:.3f}; switch unfused (set_adapters) {unfused_switch:.4f} "
          f"({unfused_switch / fuse_time:.3f} of a fuse); switch fused (unfuse + set + fuse) {fused_switch:.3f} "
          f"({fused_switch / fuse_time:.2f} of a fuse); file reads while switching: {len(reads)}")
    rows.append(("unfused stack switch / one fuse", f"{unfused_switch / fuse_time:.4f}", "<= 1, no disk read"))

    # ---- 3. fuse memory --------------------------------------------------------------------------
    pipe.set_adapters(*stacks[0])
    gc.collect()
    kept = buffers.release_idle()  # from cold: the block a previous fuse left idle would hide the cost
    if reset_peak_rss():
        rest = _status_kb("VmRSS")
        pipe.fuse_adapters()
        extra = (_status_kb("VmHWM") - rest) * 1024
        copy = numel * 4
        print(f"\n3. extra peak memory while fusing a stack of two (no idle block): {extra / 2**20:.0f} MiB; one "
              f"copy of the targeted weights is {copy / 2**20:.0f} MiB ({extra / copy:.2f} copies)")
        rows.append(("fuse peak memory / one copy of targets", f"{extra / copy:.2f}", "<= 1"))
        pipe.unfuse_adapters()
        print(f"   after the unfuse the block stays idle for the next fuse: {buffers.idle_bytes() / 2**20:.0f} MiB "
              f"(before this fuse {kept / 2**20:.0f} MiB were idle and were released)")
    pipe.unload_adapters()
    assert max_diff(unet, original) == 0.0

    # ---- 4. unfused steps --------------------------------------------------------------------------
    if not args.skip_steps:
        g = torch.Generator().manual_seed(0)
        sample = torch.randn(2, 4, args.latent, args.latent, generator=g)
        text = torch.randn(2, 77, 768, generator=g)
        t = torch.tensor([500, 500])

        def step():
            with torch.no_grad():
                unet(sample, t, encoder_hidden_states=text)

        variants = {
            "lora r=32": ("lora", {"r": 32}),
            "lokr f=8": ("lokr", {"r": 32, "factor": 8, "decompose_both": False}),
            "oft b=64": ("oft", {"block_size": 64}),
            "hra r=64": ("hra", {"r": 64}),
        }
        variant_files = {}
        for label, (algo, settings) in variants.items():
            variant_files[label] = make_adapter_file(pipe, tmp / f"{algo}.safetensors", algo, settings, 3)
        step()
        plain, _ = median_time(step, 1)
        # every adapter loaded under its own name; each round times the plain step (adapters disabled)
        # and each adapter active alone, one after the other, so drift hits them alike; the ratio is the
        # median over rounds of the per-round ratio
        names = {label: f"v{i}" for i, label in enumerate(variant_files)}
        for label, (path, _) in variant_files.items():
            pipe.load_adapter(path, names[label])
        times = {label: [] for label in ["plain", *variant_files]}
        for _ in range(args.rounds + 1):  # the first round warms every route up and is not counted
            pipe.disable_adapters()
            times["plain"].append(median_time(step, 1)[0])
            pipe.enable_adapters()
            for label in variant_files:
                pipe.set_adapters([names[label]])
                times[label].append(median_time(step, 1)[0])
        pipe.unload_adapters()
        print(f"\n4. one unfused UNet step, batch 2, latent {args.latent}x{args.latent}: plain {plain:.2f} s before "
              f"loading; with the adapters loaded and disabled {statistics.median(times['plain'][1:]):.2f} s "
              f"(median of {args.rounds} interleaved rounds)")
        print(f"   {'adapter':22s} {'params':>12s} {'step s':>8s} {'/ plain':>8s}   per round")
        for label, (path, n) in variant_files.items():
            ratios = [a / b for a, b in zip(times[label][1:], times["plain"][1:])]
            ratio = statistics.median(ratios)
            print(f"   {'ours ' + label:22s} {n:12,d} {statistics.median(times[label][1:]):8.2f} {ratio:8.3f}   "
                  + " ".join(f"{r:.3f}" for r in ratios))
            rows.append((f"unfused step, {label}", f"{ratio:.3f}", "<= 1.10" if label.startswith("lora") else "<= 1.20"))
        pipe.load_lora_weights(str(lora), adapter_name="a")
        step()
        took, _ = median_time(step, args.rounds)
        pipe.unload_lora_weights()
        print(f"   {'diffusers lora r=32':22s} {lora_params:12,d} {took:8.2f} {took / plain:8.3f}")

    print("\nsummary")
    for what, value, target in rows:
        print(f"   {what:42s} {value:>8s}   target {target}")


if __name__ == "__main__":
    main()
