"""LoRA extraction from the full-size SD-1.5-shaped UNet: randomized vs full SVD, time and error.

The base is ``lycoris_lite.models.build_sd15_unet`` (859,520,964 parameters, ~3.4 GB in float32), built
once. The "fine-tuned" model is a state dict that shares every tensor with the base but one perturbed
layer, taken in turn for each distinct weight shape (40 shapes among the UNet's 282 Linear/Conv2d
layers), so memory stays at the base plus one layer and the SVD's work space. Each perturbation ``ΔW = A · diag(s) · Bᵀ`` (``A``, ``B`` with
orthonormal columns) has a chosen spectrum, scaled to 5% of ``‖W‖_F``:

* ``planted``: rank 16 (``s_j = 1``): a rank-32 LoRA holds it exactly;
* ``slow-decay``: full rank, ``s_j = j^-0.5`` (a slowly decaying spectrum, as full fine-tunes have): no
  rank-32 LoRA is close, and the randomized SVD converges slowest.

For each scenario, layer and SVD method (``randomized``, ``full``, ``auto``), ``extract_lora(base, tuned,
rank=32, method=...)`` runs end to end on a tuned state dict where only that layer changed; the methods
run one after the other on each layer, so a busy machine slows them alike. The whole-UNet estimate
multiplies each shape's time by the number of UNet layers of that shape (what extracting a fine-tune
that changed every layer would take).

    python benchmarks/bench_extract.py --threads 1           # both scenarios, all methods
    python benchmarks/bench_extract.py --scenarios planted --methods randomized,auto --max-shapes 10
    python benchmarks/bench_extract.py --json out.json --markdown out.md

Nothing here is imported by the library or run by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lycoris_lite.tools.extract import extract_lora  # noqa: E402
from lycoris_lite.models import build_sd15_unet  # noqa: E402

SCENARIOS = ("planted", "slow-decay")
METHODS = ("randomized", "full", "auto")


def layers_by_shape(unet: nn.Module) -> tuple[dict[tuple, str], Counter]:
    """``({(kind, weight shape): first layer path}, {(kind, weight shape): number of layers})``."""
    first, count = {}, Counter()
    for path, module in unet.named_modules():
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1):
            key = (type(module).__name__, tuple(module.weight.shape))
            first.setdefault(key, path)
            count[key] += 1
    return first, count


def spectrum(weight_shape, scenario: str) -> torch.Tensor:
    k = min(weight_shape[0], int(torch.tensor(weight_shape[1:]).prod()))
    return torch.ones(min(16, k)) if scenario == "planted" else torch.arange(1, k + 1, dtype=torch.float64) ** -0.5


def optimal_error(weight_shape, scenario: str, rank: int) -> float:
    """The Eckart-Young error of the planted spectrum: ``√(Σ_{j>rank} s_j² / Σ s_j²)``."""
    s = spectrum(weight_shape, scenario).double()
    return float((s[rank:].square().sum() / s.square().sum()).sqrt())


def perturbation(weight: torch.Tensor, scenario: str, generator: torch.Generator) -> torch.Tensor:
    out_dim = weight.shape[0]
    flat_in = weight[0].numel()
    s = spectrum(weight.shape, scenario).float()
    k = len(s)
    a = torch.linalg.qr(torch.randn(out_dim, k, generator=generator)).Q
    b = torch.linalg.qr(torch.randn(flat_in, k, generator=generator)).Q
    delta = (a * s) @ b.T
    delta *= 0.05 * weight.norm() / delta.norm()
    return delta.reshape(weight.shape)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    unet = build_sd15_unet(seed=0)
    build_s = time.perf_counter() - t0
    first, count = layers_by_shape(unet)
    shapes = sorted(first, key=lambda k: -k[1][0] * int(torch.tensor(k[1][1:]).prod()))[: args.max_shapes]
    base_state = unet.state_dict()
    results = {"build_s": build_s, "threads": args.threads, "rank": args.rank, "layers_in_unet": sum(count.values()),
               "shapes": [{"kind": k[0], "shape": list(k[1]), "path": first[k], "count": count[k]} for k in shapes],
               "scenarios": {}}
    print(f"built the SD-1.5 UNet in {build_s:.1f} s; {len(shapes)} of {len(first)} shapes, "
          f"{sum(count.values())} Linear/Conv2d layers", flush=True)
    for scenario in args.scenarios:
        g = torch.Generator().manual_seed(args.seed)
        per_method = {m: {"total_s": 0.0, "times": {}, "errors": {}, "methods": {}} for m in args.methods}
        for key in shapes:
            path = first[key]
            name = f"{path}.weight"
            tuned = dict(base_state)  # shares every tensor with the base but this layer's
            tuned[name] = base_state[name] + perturbation(base_state[name], scenario, g)
            for method in args.methods:  # interleaved: the machine's load hits every method alike
                start = time.perf_counter()
                result = extract_lora(unet, {"unet": tuned}, rank=args.rank, method=method)
                elapsed = time.perf_counter() - start
                entry = per_method[method]
                entry["total_s"] += elapsed
                entry["times"][path] = elapsed
                entry["errors"][path] = result.errors["unet"][path]
                entry["methods"][path] = result.methods["unet"][path]
                print(f"  {scenario} {method} {path}: {entry['errors'][path]:.4f} in {elapsed:.2f} s", flush=True)
            del tuned
        results["scenarios"][scenario] = per_method
    results["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return results


def markdown(results: dict) -> str:
    lines = []
    shapes = results["shapes"]
    for scenario, per_method in results["scenarios"].items():
        methods = list(per_method)
        lines.append(f"\n#### {scenario} (rank {results['rank']}, {results['threads']} threads)\n")
        head = "| layer (first of its shape) | ΔW flat | layers | " + " | ".join(f"{m} s" for m in methods)
        head += " | optimal error | " + " | ".join(f"{m} error" for m in methods) + " |"
        lines += [head, "|" + "---|" * (4 + 2 * len(methods))]
        for entry in shapes:
            path = entry["path"]
            shape = entry["shape"]
            flat = f"{shape[0]} × {int(torch.tensor(shape[1:]).prod())}"
            row = [f"`{path}`", flat, str(entry["count"])]
            row += [f"{per_method[m]['times'][path]:.2f}" + ("" if m != "auto" else f" ({per_method[m]['methods'][path][0]})")
                    for m in methods]
            row += [f"{optimal_error(shape, scenario, results['rank']):.4f}"]
            row += [f"{per_method[m]['errors'][path]:.4f}" for m in methods]
            lines.append("| " + " | ".join(row) + " |")
        totals = ["**total (these layers)**", "", str(len(shapes))] + [f"**{per_method[m]['total_s']:.1f}**" for m in methods]
        lines.append("| " + " | ".join(totals + [""] * (1 + len(methods))) + " |")
        estimate = ["whole UNet, every layer changed (estimate)", "", str(results["layers_in_unet"])]
        estimate += [f"{sum(per_method[m]['times'][e['path']] * e['count'] for e in shapes) / 60:.1f} min" for m in methods]
        lines.append("| " + " | ".join(estimate + [""] * (1 + len(methods))) + " |")
        for m in methods:
            gap = [per_method[m]["errors"][e["path"]] - optimal_error(e["shape"], scenario, results["rank"]) for e in shapes]
            lines.append(f"\n{m}: relative error minus the optimum: max {max(gap):.2e}, mean {sum(gap) / len(gap):.2e}.")
    lines.append(f"\nBuilding the UNet: {results['build_s']:.1f} s; peak RSS {results['peak_rss_gb']:.1f} GiB.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--max-shapes", type=int, default=None, help="only the N largest shapes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.scenarios) - set(SCENARIOS)) + sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown scenario/method {unknown}")
    results = run(args)
    text = markdown(results)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
