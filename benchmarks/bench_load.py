"""Load-speed benchmark: a kohya LoRA on the full-size SD-1.5-shaped UNet and text encoder, ours vs diffusers.

    python benchmarks/bench_load.py --threads 1                 # the table in benchmarks/README.md
    python benchmarks/bench_load.py --rounds 3 --no-memory      # quicker

The file: a random LoRA (rank 32, alpha 16, float16 as community files are) on the UNet's attention and
feed-forward layers (``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``ff.net.0.proj``, ``ff.net.2``) and the text
encoder's (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``fc1``, ``fc2``), written by our kohya writer
(``lora_unet_…``, ``lora_te_text_model_…`` names, what AUTOMATIC1111 and ComfyUI read).

* **Time**: ``files.load_adapter(pipe, file)`` against diffusers' ``pipe.load_lora_weights(file)`` (PEFT
  backend), both on the same pipeline (``build_sd15_unet``, ``build_sd15_text_encoder``), interleaved in one
  process (the order alternates every round); each round unloads before the next load. The ratio is the
  median over rounds of diffusers' time over ours in the same round. Before timing, both loads are
  checked to give the same outputs on a few of the adapted layers.
* **Memory**: one process per library (started with ``MALLOC_MMAP_THRESHOLD_=65536`` so RSS follows the
  live tensors, as in ``bench_train_step.py``) builds the pipeline, then reads RSS (rest), loads, and reads
  the peak (``VmHWM``, reset just before) and RSS after. ``kept`` = after − rest (what the loaded adapter
  holds), ``transient`` = peak − after (freed again); both also in units of the adapter's tensors as held
  in the model (``adapter MiB``), so ``transient`` ≤ 1.0 means at most one transient copy. Ours keeps
  the file's block idle for the next load (``buffers``' read pool); RSS "after" is read once
  ``buffers.release_idle()`` has handed it back, so that block counts as transient, not as kept.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common as C  # noqa: E402

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
ADAPTER = "bench"
# layers whose outputs are compared between the two loaders
PROBES = {"unet": ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                   "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"],
          "text_encoder": ["encoder.layers.11.mlp.fc1"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--file-dtype", default="float16", choices=["float16", "float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (1 on a shared machine)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--markdown", metavar="PATH")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--file", metavar="PATH", help="use this kohya file instead of writing one")
    p.add_argument("--memory-child", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def quiet_libraries() -> None:
    import diffusers
    import transformers

    warnings.filterwarnings("ignore")
    diffusers.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:  # pragma: no cover
        pass


def build_pipeline():
    """A ``StableDiffusionPipeline`` with the full-size SD-1.5-shaped UNet and text encoder (random
    weights; the tiny VAE, tokenizer and scheduler, which loading does not touch)."""
    from diffusers import StableDiffusionPipeline

    from lycoris_lite.models import build_sd15_text_encoder, build_sd15_unet, build_tiny_sd_pipeline

    tiny = build_tiny_sd_pipeline()
    components = {**tiny.components, "unet": build_sd15_unet(), "text_encoder": build_sd15_text_encoder(),
                  "safety_checker": None, "feature_extractor": None}
    return StableDiffusionPipeline(**components, requires_safety_checker=False)


def write_file(pipe, path: str, rank: int, alpha: float, dtype: torch.dtype) -> str:
    from lycoris_lite import LoRAConfig, controller_for
    from lycoris_lite.io.files import save_adapter

    g = torch.Generator().manual_seed(0)
    for component, targets in ((pipe.unet, UNET_TARGETS), (pipe.text_encoder, TE_TARGETS)):
        cfg = LoRAConfig(r=rank, alpha=alpha, target_modules=targets, init_weights=False)
        controller_for(component).add_adapter("make", cfg, generator=g)
    save_adapter(pipe, "make", path, dtype=dtype)
    for component in (pipe.unet, pipe.text_encoder):
        controller_for(component).unload()
    return path


# ---- the two loaders ----------------------------------------------------------------------------------
def load_ours(pipe, path):
    from lycoris_lite.io.files import load_adapter

    return load_adapter(pipe, path, ADAPTER)


def unload_ours(pipe):
    from lycoris_lite import controller_for

    for component in (pipe.unet, pipe.text_encoder):
        ctrl = controller_for(component, create=False)
        if ctrl is not None:
            ctrl.unload()


def load_diffusers(pipe, path):
    pipe.load_lora_weights(path, adapter_name=ADAPTER)


def unload_diffusers(pipe):
    pipe.unload_lora_weights()


LOADERS = {"ours": (load_ours, unload_ours), "diffusers": (load_diffusers, unload_diffusers)}


def adapter_bytes(pipe, lib: str) -> int:
    """Bytes of the adapter tensors as held in the model after loading."""
    total = 0
    for component in (pipe.unet, pipe.text_encoder):
        for name, p in component.named_parameters():
            ours = lib == "ours" and f".adapters.{ADAPTER}." in name
            theirs = lib == "diffusers" and ("lora_A" in name or "lora_B" in name)
            if ours or theirs:
                total += p.numel() * p.element_size()
    return total


def probe_outputs(pipe) -> dict[str, torch.Tensor]:
    out = {}
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for component, names in PROBES.items():
            model = getattr(pipe, component)
            for name in names:
                layer = model.get_submodule(name)
                x = torch.randn(2, 5, layer.in_features, generator=g)
                out[f"{component}.{name}"] = layer(x)
    return out


def check_same_layers(pipe, path) -> float:
    """Largest relative difference between the two loaders' outputs on the probe layers."""
    load_ours(pipe, path)
    ours = probe_outputs(pipe)
    unload_ours(pipe)
    base = probe_outputs(pipe)
    load_diffusers(pipe, path)
    theirs = probe_outputs(pipe)
    unload_diffusers(pipe)
    worst = 0.0
    for key in ours:
        if (theirs[key] - base[key]).abs().max() <= 1e-3 * base[key].abs().max():
            raise RuntimeError(f"{key}: diffusers' load changed nothing")
        worst = max(worst, float((ours[key] - theirs[key]).abs().max() / theirs[key].abs().max()))
    return worst


# ---- timing -----------------------------------------------------------------------------------------------
def time_loads(pipe, path: str, rounds: int) -> dict[str, list[float]]:
    samples = {lib: [] for lib in LOADERS}
    for lib, (load, unload) in LOADERS.items():  # warm-up (imports, first-call caches)
        load(pipe, path)
        unload(pipe)
    for r in range(rounds):
        order = list(LOADERS) if r % 2 == 0 else list(LOADERS)[::-1]
        for lib in order:
            load, unload = LOADERS[lib]
            gc.collect()
            t0 = time.perf_counter()
            load(pipe, path)
            samples[lib].append(time.perf_counter() - t0)
            unload(pipe)
        log(f"round {r + 1}/{rounds}: ours {samples['ours'][-1]:.3f} s, diffusers {samples['diffusers'][-1]:.3f} s")
    return samples


# ---- memory (child process) -------------------------------------------------------------------------------
def memory_child(args) -> None:
    quiet_libraries()
    pipe = build_pipeline()
    load, _ = LOADERS[args.memory_child]
    if args.memory_child == "ours":
        import lycoris_lite.io.files  # noqa: F401  (imported before the measurement, as diffusers' loaders are)
    gc.collect()
    if not C.reset_peak_rss():
        raise RuntimeError("cannot reset peak RSS (/proc/self/clear_refs)")
    rest = C._status_kb("VmRSS")
    load(pipe, args.file)
    peak, after = C._status_kb("VmHWM"), C._status_kb("VmRSS")
    idle = 0
    if args.memory_child == "ours":
        # the file's block is kept idle for the next load (buffers' read pool, MADV_FREE after 10 s):
        # hand it back now, so "kept" is what the adapter holds and the block counts as transient
        from lycoris_lite.core import buffers

        idle = buffers.idle_bytes()
        buffers.release_idle()
        after = C._status_kb("VmRSS")
    result = {"rest_kb": rest, "peak_kb": peak, "after_kb": after, "idle_bytes": idle,
              "adapter_bytes": adapter_bytes(pipe, args.memory_child)}
    print("MEMORY-JSON " + json.dumps(result), flush=True)


def measure_memory(args, lib: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", lib, "--file", args.file]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=C.env_for_memory_child())
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY-JSON "):
            return json.loads(line[len("MEMORY-JSON "):])
    raise RuntimeError(f"memory process for {lib} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


# ---- report -----------------------------------------------------------------------------------------------
def report(env: dict, samples: dict, memory: dict, check: float) -> str:
    med = {lib: statistics.median(v) for lib, v in samples.items()}
    ratio = C.paired_ratio(samples["diffusers"], samples["ours"])
    lines = [
        f"_{env['date']} · torch {env['torch']} · diffusers {env['diffusers']} · peft {env['peft']} · "
        f"{env['cpu']}, {env['threads']} threads · lycoris_lite {env['commit']} · load average "
        f"{env['load_start']:.2f} → {env['load_end']:.2f} · file {env['file_mib']:.1f} MiB ({env['file_dtype']}), "
        f"{env['modules']} modules (UNet {env['unet_modules']}, text encoder {env['te_modules']}), rank {env['rank']}_",
        "",
        f"Probe layers: ours vs diffusers, largest relative difference {check:.1e}.",
        "",
        "| | ours | diffusers | **diffusers ÷ ours** |",
        "|---|---:|---:|---:|",
        f"| load time, median of {len(samples['ours'])} (s) | {med['ours']:.3f} | {med['diffusers']:.3f} | **{ratio:.2f}×** |",
    ]
    if memory:
        o, d = memory["ours"], memory["diffusers"]

        def mib(kb):
            return kb / 1024

        lines += [
            f"| adapter tensors held (MiB) | {o['adapter_bytes'] / 2**20:.1f} | {d['adapter_bytes'] / 2**20:.1f} | |",
            f"| peak − rest (MiB) | {mib(o['peak_kb'] - o['rest_kb']):.1f} | {mib(d['peak_kb'] - d['rest_kb']):.1f} | "
            f"**{(d['peak_kb'] - d['rest_kb']) / max(o['peak_kb'] - o['rest_kb'], 1):.2f}×** |",
            f"| idle file block kept for the next load (MiB) | {o['idle_bytes'] / 2**20:.1f} | – | |",
            f"| kept: after − rest (MiB) | {mib(o['after_kb'] - o['rest_kb']):.1f} | {mib(d['after_kb'] - d['rest_kb']):.1f} | |",
            f"| transient: peak − after (MiB) | {mib(o['peak_kb'] - o['after_kb']):.1f} | {mib(d['peak_kb'] - d['after_kb']):.1f} | |",
            f"| transient ÷ adapter tensors | {transient_copies(o):.2f} | {transient_copies(d):.2f} | |",
        ]
    targets = ["\n| target | value | met |\n|---|---:|:---:|",
               f"| ≥ 3× faster than diffusers' `load_lora_weights` | {ratio:.2f}× | {'yes' if ratio >= 3 else '**no**'} |"]
    if memory:
        copies = transient_copies(memory["ours"])
        targets.append(f"| ≤ 1 transient copy of the adapter tensors | {copies:.2f} | {'yes' if copies <= 1.0 else '**no**'} |")
    return "\n".join(lines + targets) + "\n"


def transient_copies(m: dict) -> float:
    return (m["peak_kb"] - m["after_kb"]) * 1024 / m["adapter_bytes"]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return 0
    quiet_libraries()
    import diffusers
    import peft

    log("building the SD-1.5-shaped pipeline ...")
    pipe = build_pipeline()
    tmp = tempfile.mkdtemp(prefix="bench_load_")
    if args.file is None:
        args.file = write_file(pipe, os.path.join(tmp, "lora_r32.safetensors"), args.rank, args.alpha,
                               getattr(torch, args.file_dtype))
    from safetensors import safe_open

    with safe_open(args.file, "pt") as f:
        modules = {k.split(".", 1)[0] for k in f.keys()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
           "diffusers": diffusers.__version__, "peft": peft.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "commit": commit or "?", "load_start": os.getloadavg()[0],
           "file_mib": os.path.getsize(args.file) / 2**20, "file_dtype": args.file_dtype, "rank": args.rank,
           "modules": len(modules), "unet_modules": sum(m.startswith("lora_unet_") for m in modules),
           "te_modules": sum(m.startswith("lora_te_") for m in modules)}
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        env["cpu"] = f"{names[0]} ({len(names)} logical CPUs)" if names else env["cpu"]
    except OSError:
        pass
    check = check_same_layers(pipe, args.file)
    log(f"probe layers agree to {check:.1e}")
    if check > 1e-5:
        raise RuntimeError(f"ours and diffusers' loads differ by {check:.1e} on the probe layers")
    samples = time_loads(pipe, args.file, args.rounds)
    del pipe
    gc.collect()
    memory = {} if args.no_memory else {lib: measure_memory(args, lib) for lib in LOADERS}
    env["load_end"] = os.getloadavg()[0]
    text = report(env, samples, memory, check)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "samples": samples, "memory": memory, "check": check}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
