"""What adapters hold between calls, on the full-size SD-1.5-shaped UNet.

    python benchmarks/bench_runtime.py [--latent 8] [--json runtime.json]

For each algorithm (an adapter on the ``unet-attn-ff`` preset, non-identity weights): attach it, run one
inference UNet call with it active, then make another adapter active and run again. After each call it
counts the bytes of every tensor the adapter layers hold besides their parameters, the base weights and
the 0-d multipliers (memos, caches, anything kept from a call), against the targeted weights in the
UNet's dtype. The UNet runs in float32 (a CPU forward in half precision is slow); the figure a half
model would show is the same number of bytes against half the weight bytes.

Run it on an older checkout (``PYTHONPATH=OLD_CHECKOUT``) to compare: the library is imported, not the
test harness.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lycoris_lite import PRESETS, controller_for
from lycoris_lite.base.registry import get_algorithm
from lycoris_lite.core.layer import AdapterLayer
from lycoris_lite.models import build_sd15_unet

ALGOS = {"lora": {"r": 32}, "loha": {"r": 16}, "lokr": {"factor": 8}, "oft": {"block_size": 64},
         "boft": {"block_size": 32, "butterfly_factor": 2}, "hra": {"r": 32}}


def _tensors_in(value, seen: set, depth: int = 0):
    """Tensors reachable from ``value`` through containers and plain objects' attributes."""
    if depth > 6 or id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item, seen, depth + 1)
    elif isinstance(value, (list, tuple, set)):
        for item in value:
            yield from _tensors_in(item, seen, depth + 1)
    elif hasattr(value, "__dict__") and not isinstance(value, (type, torch.nn.Module)):
        yield from _tensors_in(vars(value), seen, depth + 1)


def held_bytes(unet) -> int:
    """Bytes of tensors held by the adapter layers and slots outside their parameters and buffers."""
    storages = {}
    for module in unet.modules():
        if not isinstance(module, AdapterLayer):
            continue
        owned = {id(t) for t in module.parameters()} | {id(t) for t in module.buffers()}
        for holder in [module, *module.adapters.values()]:
            extra = {k: v for k, v in vars(holder).items() if k not in ("_parameters", "_buffers", "_modules",
                                                                         "_base_module")}
            for t in _tensors_in(extra, set()):
                if id(t) not in owned and t.numel() > 1:
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    unet = build_sd15_unet()
    ctrl = controller_for(unet)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, args.latent, args.latent, generator=generator)
    context = torch.randn(1, 77, 768, generator=generator)
    targets = PRESETS["unet-attn-ff"]
    ctrl.add_adapter("idle", get_algorithm("lora").config_class(r=4, target_modules=targets))
    weight_bytes = sum(layer.weight.numel() * layer.weight.element_size() for _, layer in ctrl.layers())
    rows = {}
    for algo, settings in ALGOS.items():
        config = get_algorithm(algo).config_class(**settings, target_modules=targets, init_weights=False)
        ctrl.add_adapter(algo, config, generator=generator)
        ctrl.set_adapter(algo)
        start = time.perf_counter()
        with torch.no_grad():
            unet(sample, 10, context)
        active = held_bytes(unet)
        ctrl.set_adapter("idle")
        with torch.no_grad():
            unet(sample, 10, context)
        inactive = held_bytes(unet)
        params = sum(p.numel() * p.element_size() for p in ctrl.trainable_parameters([algo]))
        rows[algo] = {"adapter_bytes": params, "held_active": active, "held_inactive": inactive,
                      "held_inactive_vs_weights": inactive / weight_bytes,
                      "held_inactive_vs_fp16_weights": inactive / (weight_bytes / 2),
                      "seconds": time.perf_counter() - start}
        print(f"{algo:5s} params {params / 2**20:8.1f} MiB | held after an active call {active / 2**20:8.1f} MiB | "
              f"after deactivating {inactive / 2**20:8.1f} MiB = {inactive / (weight_bytes / 2):.2f}x the targeted "
              f"weights in fp16", flush=True)
        ctrl.delete_adapter(algo)
    print(f"targeted weights: {weight_bytes / 2**20:.0f} MiB in float32")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"targeted_weight_bytes_fp32": weight_bytes, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
