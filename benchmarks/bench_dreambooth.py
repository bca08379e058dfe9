"""DreamBooth training steps per second and peak memory, lycoris_lite vs PEFT, per algorithm.

The same loop on both sides, only the adapter library differs: the Stable Diffusion UNet (frozen, SD
1.5's layout) gets an adapter on the same target modules (``--targets``, default diffusers' DreamBooth
LoRA targets ``to_q, to_k, to_v, to_out.0``), then each step is: UNet forward on noisy latents with a
text context, MSE against the noise, backward, AdamW step. The VAE and the frozen text encoder are left
out (identical work on both sides); latents, timesteps and contexts are fixed random tensors.

* **Speed**: for each algorithm one UNet carries our adapter and a copy carries PEFT's; their steps are
  timed interleaved (ours, PEFT, PEFT, ours, …) for ``--rounds`` rounds after a warm-up step each, and
  the ratio is the median over rounds of PEFT's step time over ours (> 1: we are faster).
* **Memory**: one child process per case (library × algorithm; started with ``MALLOC_MMAP_THRESHOLD_``
  fixed, so RSS follows live tensors; see ``benchmarks/README.md``) builds the UNet and the case, runs
  a warm-up step, resets the peak RSS and reports peak − rest of one step: activations, saved tensors,
  gradients, optimizer state and temporaries. A fresh process each: in a shared one, small tensors
  (< the mmap threshold) of a later case reuse heap holes that earlier cases left inside the resting
  RSS, which hid up to 20 MiB of PEFT's OFT step. On CUDA: ``max_memory_allocated`` −
  ``memory_allocated`` around the step.

    python benchmarks/bench_dreambooth.py --threads 1                     # SD-1.5 UNet, 128 px, batch 1
    python benchmarks/bench_dreambooth.py --threads 1 --model tiny --resolution 64 --rounds 5   # smoke
    python benchmarks/bench_dreambooth.py --device cuda --dtype bfloat16 --resolution 512    # on a GPU
    python benchmarks/bench_dreambooth.py --threads 2 --model flux-width --targets flux-attn-mlp --resolution 256

``--model flux-width``: the flow-matching step of the transformer trainer on a Flux.1-width transformer
(hidden 3072, 2 double + 4 single blocks, seeded random weights; ``build_flux_width_transformer``): packed
latents (``resolution/16`` squared tokens), 64 text tokens of T5 width, the velocity target ``ε − x₀``,
guidance input; the same loop on both sides. ``--base-quantization nf4|int8|fp8`` (memory phase) holds the
base quantized as the trainer's ``--base_quantization`` does; each case also reports its process's peak
RSS (weights included), the figure to compare with a bfloat16 base:

    python benchmarks/bench_dreambooth.py --threads 2 --model flux-width --targets flux-attn-mlp --resolution 256 \
        --dtype bfloat16 --no-timing --algos lora [--base-quantization nf4]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import (DTYPES, _quiet, _status_kb, env_for_memory_child, library_fingerprint,  # noqa: E402
                    paired_ratio, reset_peak_rss, synchronize)

ALGOS = ("lora", "loha", "lokr", "oft", "boft", "hra")
#: adapter sizes, the same on both sides (lycoris_lite's names; PEFT's spelled in attach_peft): the
#: sizes of benchmarks/bench_train_step.py for SD 1.5, smaller ones that fit the tiny UNet's 8-32 widths
SETTINGS = {
    "sd15": {"lora": {"r": 16}, "loha": {"r": 8}, "lokr": {"r": 8}, "oft": {"block_size": 32},
             "boft": {"block_size": 8, "butterfly_factor": 2}, "hra": {"r": 8}},
    "tiny": {"lora": {"r": 4}, "loha": {"r": 4}, "lokr": {"r": 4}, "oft": {"block_size": 4},
             "boft": {"block_size": 4, "butterfly_factor": 2}, "hra": {"r": 4}},
    "flux-width": {"lora": {"r": 16}, "loha": {"r": 8}, "lokr": {"r": 8}, "oft": {"block_size": 64},
                   "boft": {"block_size": 32, "butterfly_factor": 2}, "hra": {"r": 8}},
}


def build_unet(model: str, device, dtype):
    from lycoris_lite.models import build_sd15_unet, build_tiny_unet

    if model == "sd15":
        return build_sd15_unet(seed=0, dtype=dtype, device=device).requires_grad_(False)
    if model == "flux-width":
        from lycoris_lite.models import build_flux_width_transformer

        return build_flux_width_transformer(seed=0, dtype=dtype, device=device).requires_grad_(False)
    return build_tiny_unet(0).to(device=device, dtype=dtype).requires_grad_(False)


def attach_ours(unet, algo: str, targets: list[str], settings: dict) -> list:
    from lycoris_lite import controller_for
    from lycoris_lite.base.registry import get_algorithm

    config = get_algorithm(algo).config_class(**settings, target_modules=targets, init_weights=False)
    controller = controller_for(unet)
    controller.add_adapter("bench", config, generator=torch.Generator().manual_seed(0))
    controller.set_adapter("bench")
    return controller.trainable_parameters(["bench"])


def attach_peft(unet, algo: str, targets: list[str], settings: dict):
    """``(model, params, note)``: PEFT's adapter injected into ``unet`` (``get_peft_model``)."""
    import peft

    common = dict(target_modules=targets, init_weights=False)
    r, b = settings.get("r"), settings.get("block_size")
    config = {
        "lora": lambda: peft.LoraConfig(r=r, lora_alpha=r, target_modules=targets, init_lora_weights=False),
        "loha": lambda: peft.LoHaConfig(r=r, alpha=r, **common),
        "lokr": lambda: peft.LoKrConfig(r=r, alpha=r, **common),
        "oft": lambda: peft.OFTConfig(r=0, oft_block_size=b, use_cayley_neumann=False, **common),
        "boft": lambda: peft.BOFTConfig(boft_block_size=b, boft_n_butterfly_factor=settings.get("butterfly_factor"),
                                        **common),
        "hra": lambda: peft.HRAConfig(r=r, **common),
    }[algo]()
    with _quiet():  # BOFT without its CUDA extension: "Setting boft_n_butterfly_factor to 1" (warnings only)
        model = peft.get_peft_model(unet, config)
    note = ""
    if algo == "boft":
        layer = next(m for m in model.modules() if hasattr(m, "boft_R"))
        note = f"PEFT BOFT ran butterfly factor {layer.boft_R['default'].shape[0]}"
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, note


class Case:
    """A UNet with one library's adapter, its AdamW optimizer and the fixed batch."""

    def __init__(self, lib: str, algo: str, unet, targets, batch, settings: dict):
        self.lib, self.algo, self.note = lib, algo, ""
        if lib == "ours":
            self.model, self.params = unet, attach_ours(unet, algo, targets, settings)
        else:
            self.model, self.params, self.note = attach_peft(unet, algo, targets, settings)
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5)
        self.batch = batch
        self.trainable = sum(p.numel() for p in self.params)

    def step(self) -> None:
        if isinstance(self.batch, dict):  # a transformer's flow-matching step
            batch = dict(self.batch)
            target = batch.pop("target")
            prediction = self.model(**batch).sample
            loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
        else:
            latents, timesteps, context, noise = self.batch
            prediction = self.model(latents, timesteps, context).sample
            loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self):
        """Take the adapter off (the UNet is the base model again)."""
        if self.lib == "ours":
            from lycoris_lite import controller_for

            controller_for(self.model).unload()
        else:
            self.model.unload()
        self.model = self.params = self.optimizer = None
        gc.collect()


def make_batch(unet, batch: int, resolution: int, device, dtype):
    g = torch.Generator().manual_seed(1)
    if not hasattr(unet.config, "cross_attention_dim"):  # Flux: packed latents at noise level σ, velocity target
        config, tokens = unet.config, (resolution // 16) ** 2
        x0 = torch.randn(batch, tokens, config.in_channels, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        sigma = torch.rand(batch, generator=g)
        noisy = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        return {"hidden_states": noisy.to(device, dtype), "timestep": sigma.to(device, dtype),
                "guidance": torch.full((batch,), 3.5, device=device, dtype=dtype) if config.guidance_embeds else None,
                "pooled_projections": torch.randn(batch, config.pooled_projection_dim, generator=g).to(device, dtype),
                "encoder_hidden_states": torch.randn(batch, 64, config.joint_attention_dim, generator=g).to(device, dtype),
                "txt_ids": torch.zeros(64, 3, device=device, dtype=dtype),
                "img_ids": torch.zeros(tokens, 3, device=device, dtype=dtype), "target": (noise - x0).to(device, dtype)}
    size = resolution // 8
    latents = torch.randn(batch, unet.config.in_channels, size, size, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    return (latents.to(device, dtype), timesteps.to(device), context.to(device, dtype), noise.to(device, dtype))


def timed(case: Case, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    case.step()
    synchronize(device)
    return time.perf_counter() - start


def time_algorithm(args, base, algo: str, targets, batch) -> dict:
    """Interleaved step times of ours and PEFT for one algorithm."""
    settings = SETTINGS[args.model][algo]
    peft_case = Case("peft", algo, copy.deepcopy(base), targets, batch, settings)  # copied before ours is attached
    ours = Case("ours", algo, base, targets, batch, settings)
    for case in (ours, peft_case):
        case.step()  # warm-up
    samples = {"ours": [], "peft": []}
    for r in range(args.rounds):
        order = (ours, peft_case) if r % 2 == 0 else (peft_case, ours)
        for case in order:
            samples[case.lib].append(timed(case, args.device))
    result = {
        "algo": algo, "ours_s": statistics.median(samples["ours"]), "peft_s": statistics.median(samples["peft"]),
        "speedup": paired_ratio(samples["peft"], samples["ours"]), "rounds": len(samples["ours"]),
        "ours_params": ours.trainable, "peft_params": peft_case.trainable, "note": peft_case.note,
    }
    peft_case.close()
    ours.close()
    del peft_case, ours
    gc.collect()
    return result


def memory_child(args) -> None:
    """Runs in a child process: one line of JSON per case (``--memory-lib``, default both) with its
    step's peak extra bytes."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    base = build_unet(args.model, device, dtype)
    if args.base_quantization:  # the trainer's --base_quantization: the frozen base held quantized
        from lycoris_lite.tools.quantize import quantize_base

        quantize_base(base, args.base_quantization, compute_dtype=dtype)
        gc.collect()
    targets = _targets(args)
    batch = make_batch(base, args.batch, args.resolution, device, dtype)
    for algo in args.algos:
        for lib in [args.memory_lib] if args.memory_lib else ["ours", "peft"]:  # one at a time: no copy
            case = Case(lib, algo, base, targets, batch, SETTINGS[args.model][algo])
            case.step()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                rest = torch.cuda.memory_allocated()
                case.step()
                torch.cuda.synchronize()
                extra = torch.cuda.max_memory_allocated() - rest
            else:
                if not reset_peak_rss():
                    raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
                rest = _status_kb("VmRSS")
                case.step()
                extra = (_status_kb("VmHWM") - rest) * 1024
            peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _status_kb("VmHWM") * 1024
            case.close()
            del case
            print(json.dumps({"lib": lib, "algo": algo, "bytes": extra, "peak": peak}), flush=True)


def _targets(args) -> list[str] | str:
    """A preset's targets (a list of names or, for the transformer presets, one full-match pattern, which
    PEFT reads alike) or the comma-separated module names."""
    from lycoris_lite.base.presets import PRESETS, resolve_targets

    if args.targets in PRESETS:
        return resolve_targets(args.targets)
    return [t.strip() for t in args.targets.split(",")]


def measure_memory(args) -> dict[tuple[str, str], float]:
    """Peak extra bytes of one step per ``(lib, algo)``, each case in a fresh child process."""
    rows = []
    for algo in args.algos:
        for lib in ("ours", "peft"):
            cmd = [sys.executable, __file__, "--memory-child", "--memory-lib", lib, "--model", args.model,
                   "--resolution", str(args.resolution), "--batch", str(args.batch), "--algos", algo,
                   "--targets", args.targets, "--device", args.device, "--dtype", args.dtype,
                   "--threads", str(args.threads)] + (["--base-quantization", args.base_quantization]
                                                       if args.base_quantization else [])
            out = subprocess.run(cmd, env=env_for_memory_child(), capture_output=True, text=True, check=True).stdout
            rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            print(f"memory {algo:5s} {lib:4s} {rows[-1]['bytes'] / 2**20:.1f} MiB (process peak "
                  f"{rows[-1]['peak'] / 2**20:.0f} MiB)", flush=True)
    return {(r["lib"], r["algo"]): r["bytes"] for r in rows}


def markdown(args, results, memory, header) -> str:
    mib = 1024 * 1024
    lines = [header, "",
             "| algorithm | ours: s/step | PEFT: s/step | **PEFT ÷ ours** (speed-up) | target | mem ours MiB | mem PEFT MiB "
             "| trainable ours / PEFT |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    targets = {"lora": 1.0, "boft": 2.0, "hra": 2.0, **({"lokr": 1.5} if args.model == "flux-width" else {})}
    for r in results:
        a = r["algo"]
        target = targets.get(a)
        met = "" if target is None else f"≥ {target:.1f}× {'yes' if r['speedup'] >= target else '**no**'}"
        m_ours, m_peft = memory.get(("ours", a)), memory.get(("peft", a))
        mem_cells = [f"{m / mib:.1f}" if m is not None else "–" for m in (m_ours, m_peft)]
        if m_ours is not None and m_peft is not None:
            mem_cells[0] += "" if m_ours <= m_peft else " (more)"
        lines.append(f"| {a} | {r['ours_s']:.3f} | {r['peft_s']:.3f} | **{r['speedup']:.2f}×** | {met} | "
                     f"{mem_cells[0]} | {mem_cells[1]} | {r['ours_params']:,} / {r['peft_params']:,} |")
    for a in [] if results else args.algos:
        m_ours, m_peft = memory.get(("ours", a)), memory.get(("peft", a))
        lines.append(f"| {a} | – | – | – | | {m_ours / mib:.1f} | {m_peft / mib:.1f} | |")
    notes = [r["note"] for r in results if r["note"]]
    if notes:
        lines += ["", "<sub>" + "; ".join(notes) + "</sub>"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15", choices=("sd15", "tiny", "flux-width"),
                        help="SD 1.5's UNet, the tiny one, or a Flux.1-width transformer (flow matching)")
    parser.add_argument("--resolution", type=int, default=128, help="image resolution (latents are 1/8)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--algos", default=",".join(ALGOS))
    parser.add_argument("--targets", default="unet-attn", help="a preset or comma-separated module names")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--base-quantization", choices=("nf4", "int8", "fp8"),
                        help="memory phase: the base quantized as the trainer's --base_quantization does")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-timing", action="store_true", help="memory only")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--markdown", help="also write the table here")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-lib", choices=("ours", "peft"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.memory_child:
        memory_child(args)
        return

    import peft

    started = time.time()
    load_before = os.getloadavg()[0]
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    base = build_unet(args.model, device, dtype)
    targets = _targets(args)
    batch = make_batch(base, args.batch, args.resolution, device, dtype)
    results = []
    for algo in [] if args.no_timing else args.algos:
        results.append(time_algorithm(args, base, algo, targets, batch))
        r = results[-1]
        print(f"{algo:5s} ours {r['ours_s']:.3f} s  PEFT {r['peft_s']:.3f} s  PEFT÷ours {r['speedup']:.2f}×  "
              f"{r['note']}", flush=True)
    del base
    gc.collect()
    memory = {} if args.no_memory else measure_memory(args)
    cpu = platform.processor() or platform.machine()
    header = (f"_{time.strftime('%Y-%m-%dT%H:%M')} · torch {torch.__version__} · peft {peft.__version__} · "
              f"{args.model} UNet, {args.resolution} px (latents {args.resolution // 8}²), batch {args.batch}, "
              f"{args.device} {args.dtype} ({cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads) · "
              f"targets {args.targets} · {args.rounds} rounds · lycoris_lite code {library_fingerprint()} · "
              f"load average {load_before:.2f} → {os.getloadavg()[0]:.2f} · {time.time() - started:.0f} s_")
    table = markdown(args, results, memory, header)
    print()
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "memory": {f"{k[0]}/{k[1]}": v for k, v in memory.items()},
                                               "header": header}, indent=2))


if __name__ == "__main__":
    main()
