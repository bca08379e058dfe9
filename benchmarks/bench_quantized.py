"""Adapters on quantized base layers, on a Flux-width linear stack: ours against PEFT on the same quantized
layers, in one run.

    python benchmarks/bench_quantized.py [--rounds 5] [--tokens 128] [--layers 2]

The stack: ``--layers`` linear layers 3072 -> 3072 (Flux.1's hidden width) with GELU between, quantized by
each backend that runs here (bitsandbytes NF4 and int8, torchao int8 and float8 weight-only, GGUF Q8_0,
float8 storage). For each backend:

1. **training step** (forward + backward + AdamW on the adapter) of LoRA r=16, LoKr (factor 16) and OFT
   (block 64) of ours, unfused on the quantized layers, and PEFT's LoRA r=16 on the same quantized layers
   (PEFT has LoRA for bitsandbytes and torchao layers, and no LoKr/OFT on them),
   each against the frozen quantized base alone (its forward + backward to the input), interleaved per
   round; a cell is the median of per-round ratios to the base. (PEFT's LoRA also runs on the GGUF and
   float8-storage layers here: they are ``nn.Linear`` subclasses whose forward it calls.)
2. **adapter state**: bytes of the adapter's tensors (the base's quantized bytes beside it).
3. **fuse** (float8 storage only; every other backend refuses to fuse): time of fuse + unfuse and the
   error of the fused float8 weight against the float32 ``W + ΔW``, relative to ``ΔW``.

Ratios are what to read: this machine is shared and noisy, so absolute times move from run to run.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from lycoris_lite import LoKrConfig, LoRAConfig, OFTConfig, controller_for  # noqa: E402
from lycoris_lite.core.quantized import quantized_weight  # noqa: E402

WIDTH = 3072


def float_stack(layers: int) -> nn.Sequential:
    torch.manual_seed(0)
    mods = []
    for i in range(layers):
        mods += [nn.Linear(WIDTH, WIDTH)] + ([nn.GELU()] if i < layers - 1 else [])
    return nn.Sequential(*mods).requires_grad_(False)


def quantize(stack: nn.Sequential, backend: str) -> nn.Sequential:
    stack = copy.deepcopy(stack)
    if backend in ("bnb-nf4", "bnb-int8"):
        import bitsandbytes as bnb

        for i, m in enumerate(stack):
            if isinstance(m, nn.Linear):
                q = (bnb.nn.Linear4bit(WIDTH, WIDTH, compute_dtype=torch.float32, quant_type="nf4")
                     if backend == "bnb-nf4" else bnb.nn.Linear8bitLt(WIDTH, WIDTH, has_fp16_weights=False))
                q.load_state_dict(m.state_dict())
                stack[i] = q.to("cpu").requires_grad_(False)
    elif backend.startswith("torchao"):
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        quantize_(stack, Int8WeightOnlyConfig() if backend == "torchao-int8" else Float8WeightOnlyConfig())
    elif backend == "gguf-q8_0":
        import gguf
        from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

        for i, m in enumerate(stack):
            if isinstance(m, nn.Linear):
                q = GGUFLinear(WIDTH, WIDTH, compute_dtype=torch.float32)
                data = gguf.quants.quantize(m.weight.detach().numpy(), gguf.GGMLQuantizationType.Q8_0)
                q.weight = GGUFParameter(torch.from_numpy(data), quant_type=gguf.GGMLQuantizationType.Q8_0)
                q.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
                stack[i] = q
    elif backend == "float8-storage":
        from diffusers.hooks import apply_layerwise_casting

        apply_layerwise_casting(stack, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    return stack


BACKENDS = {"bnb-nf4": "bitsandbytes", "bnb-int8": "bitsandbytes", "torchao-int8": "torchao",
            "torchao-fp8": "torchao", "gguf-q8_0": "gguf", "float8-storage": "diffusers"}
#: the linear layers' indices in the stack (GELUs between): a full-match pattern, for ours and PEFT's
TARGETS = r"\d*[02468]"
OURS = {"LoRA r16": LoRAConfig(r=16, target_modules=TARGETS, init_weights=False),
        "LoKr f16": LoKrConfig(r=16, factor=16, target_modules=TARGETS, init_weights=False),
        "OFT b64": OFTConfig(block_size=64, target_modules=TARGETS, init_weights=False)}


def variant(base_stack: nn.Sequential, backend: str, name: str):
    """``(model, trainable params)`` of a variant on its own quantized copy of the stack (made afresh:
    diffusers' ``GGUFParameter`` does not survive ``copy.deepcopy``)."""
    model = quantize(base_stack, backend)
    if name == "base":
        return model, []
    if name == "PEFT LoRA r16":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, target_modules=TARGETS, init_lora_weights=False))
        return model, [p for p in model.parameters() if p.requires_grad]
    ctrl = controller_for(model)
    ctrl.add_adapter("a", OURS[name])
    ctrl.set_adapters("a")
    return model, [p for _, layer in ctrl.layers() for p in layer.adapters["a"].parameters()]


def step_time(model, params, x) -> float:
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    xin = x.clone().requires_grad_(True)
    t = time.perf_counter()
    loss = model(xin).square().mean()
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    x = torch.randn(args.tokens, WIDTH, generator=torch.Generator().manual_seed(1))
    base_stack = float_stack(args.layers)
    names = ["base", *OURS, "PEFT LoRA r16"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.layers} layers of {WIDTH}x{WIDTH}, "
          f"{args.tokens} tokens, {args.rounds} rounds (interleaved; medians of per-round ratios)\n")
    print("| backend | base step (s) | " + " | ".join(f"{n} / base" for n in names[1:]) +
          " | our LoRA state | PEFT LoRA state | quantized weights |")
    print("|---|---|" + "---|" * (len(names) - 1) + "---|---|---|")
    for backend, package in BACKENDS.items():
        if importlib.util.find_spec(package) is None:
            print(f"| {backend} | not installed ({package}) |")
            continue
        stack = quantize(base_stack, backend)
        models, cells = {}, {}
        for name in names:
            try:
                models[name] = variant(base_stack, backend, name)
            except Exception as exc:  # noqa: BLE001 - PEFT's refusal is the result
                cells[name] = f"PEFT: {type(exc).__name__}"
        times = {n: [] for n in models}
        for _ in range(args.rounds + 1):  # the first round warms up and is dropped
            for name, (model, params) in models.items():
                times[name].append(step_time(model, params, x))
        base = statistics.median(times["base"][1:])
        for name in models:
            if name != "base":
                ratios = [t / b for t, b in zip(times[name][1:], times["base"][1:])]
                cells[name] = f"{statistics.median(ratios):.2f}"
        ours_bytes = sum(p.numel() * p.element_size() for p in models["LoRA r16"][1])
        peft_bytes = (sum(p.numel() * p.element_size() for p in models["PEFT LoRA r16"][1])
                      if "PEFT LoRA r16" in models else None)
        quant_bytes = 0
        for m in stack.modules():
            if quantized_weight(m) is not None:
                w = m.weight
                quant_bytes += (sum(t.numel() * t.element_size() for t in (w.qdata, w.scale) if t is not None)
                                if hasattr(w, "qdata") else w.numel() * w.element_size())
        print(f"| {backend} | {base:.3f} | " + " | ".join(cells[n] for n in names[1:]) +
              f" | {ours_bytes / 2**20:.2f} MiB | " + (f"{peft_bytes / 2**20:.2f} MiB" if peft_bytes else "—") +
              f" | {quant_bytes / 2**20:.1f} MiB |")
    # fuse on float8 storage
    stack = quantize(base_stack, "float8-storage")
    ctrl = controller_for(stack)
    ctrl.add_adapter("a", OURS["LoKr f16"])
    ctrl.set_adapters("a")
    layer = dict(ctrl.layers())["0"]
    exact = layer.effective_weight(["a"])
    delta = exact - layer.float_weight().float()
    fuse_times = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        ctrl.merge_adapter(["a"])
        ctrl.unmerge_adapter()
        fuse_times.append(time.perf_counter() - t)
    ctrl.merge_adapter(["a"])
    error = float((layer.weight.detach().float() - exact).abs().max() / delta.abs().max())
    ctrl.unmerge_adapter()
    print(f"\nthe same weights in bfloat16: {args.layers * WIDTH * WIDTH * 2 / 2**20:.1f} MiB, in float32: "
          f"{args.layers * WIDTH * WIDTH * 4 / 2**20:.1f} MiB")
    print(f"\nfloat8 storage, LoKr f16 on {args.layers} layers: fuse + unfuse {statistics.median(fuse_times) * 1e3:.0f} ms "
          f"(median of {args.rounds}); fused weight vs float32 W + ΔW: max error {error:.3f} of max |ΔW| "
          "(the float8 cast); unfuse restores the float8 bits exactly (tests/test_quantized.py)")


if __name__ == "__main__":
    main()
