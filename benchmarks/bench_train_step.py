"""Training-step benchmark: lycoris_lite vs PEFT (and the lycoris package) on Stable Diffusion shapes.

    python benchmarks/bench_train_step.py            # full run (4-8 min on this 2-core machine; --threads 1 there)
    python benchmarks/bench_train_step.py --quick    # a few rounds, for a smoke test
    python benchmarks/bench_train_step.py --json results.json --markdown table.md

A step is: adapter grads set to None, forward, ``loss = mean(y²)``, backward (no optimizer step), with
the base layer frozen. Every configuration of one shape is built in one process and timed interleaved
(each round times every configuration once, the order rotated every round); the table gives medians
and, for ratios, the median over rounds of the per-round ratio. Peak memory is measured in a separate
process per shape (see ``common.step_peak_memory``). See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common as C  # noqa: E402

ALGOS = ["lora", "loha", "lokr", "oft", "boft", "hra"]
LIBS = ["ours", "peft", "lyco"]
DEFAULT_SIDE = {"oft": "output", "boft": "output", "hra": "input"}
# the PEFT BOFT configuration that the speed target is checked against (PEFT as it actually runs here)
PEFT_BOFT_REF = "as run"
SPEEDUP_TARGETS_640 = {"boft": 2.5, "hra": 1.6, "lokr": 1.5, "loha": 1.4, "oft": 1.2}
MAX_VS_LORA = 1.3
MEM_TOLERANCE_MB = 0.25  # 64 pages: RSS moves in pages, equal algorithms can differ by a few


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few rounds (smoke test, ~3-4 min)")
    p.add_argument("--json", metavar="PATH", help="write all results (samples included) as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the tables as Markdown")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (auto: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=sorted(C.DTYPES),
                   help="dtype of the base layer and input (adapters on half layers compute in float32)")
    p.add_argument("--shapes", default=",".join(C.SHAPES), help="comma-separated subset of " + ", ".join(C.SHAPES))
    p.add_argument("--algos", default=",".join(ALGOS))
    p.add_argument("--libs", default=",".join(LIBS), help="ours, peft, lyco (the lycoris package)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds per shape (default: 15 linear, 5 conv)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--input-grad", action="store_true",
                   help="the input requires grad (as inside a network with adapters below the layer)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--peft-boft-f2-conv", action="store_true",
                   help="also time PEFT's BOFT with factor 2 (emulated kernel) on the conv: ~10-20 s a step on CPU")
    p.add_argument("--no-snapshot", action="store_true",
                   help="import lycoris_lite from the working tree instead of a copy taken at the start")
    p.add_argument("--memory-child", metavar="SHAPE", help=argparse.SUPPRESS)
    p.add_argument("--lib-root", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def with_f2(args, shape: str) -> bool:
    return not shape.startswith("conv") or args.peft_boft_f2_conv


# ---- memory (child process) -----------------------------------------------------------------------

def memory_child(args) -> None:
    device, dtype = resolve_device(args.device), C.DTYPES[args.dtype]
    shape = args.memory_child
    import lycoris_lite  # noqa: F401
    from lycoris_lite import algos  # noqa: F401

    fingerprint = C.library_fingerprint()  # right after the import: the code this process runs
    x = C.make_input(shape, device, dtype, args.input_grad)
    out = {}
    for lib, algo, variant in C.case_specs(args.libs.split(","), args.algos.split(","), with_f2(args, shape)):
        case = C.build_case(lib, algo, variant, shape, device, dtype)
        try:
            out[case.key] = C.step_peak_memory(case, x, device)
        except Exception as exc:  # report, keep going
            out[case.key] = None
            log(f"memory {shape} {case.key}: {exc!r}")
        del case
    print("MEMORY-JSON " + json.dumps({"fingerprint": fingerprint, "bytes": out}), flush=True)


def measure_memory(args, shape: str) -> tuple[dict[str, float | None], str | None]:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", shape, "--device", args.device,
           "--dtype", args.dtype, "--algos", args.algos, "--libs", args.libs]
    if args.lib_root:
        cmd += ["--lib-root", args.lib_root]
    if args.input_grad:
        cmd.append("--input-grad")
    if args.peft_boft_f2_conv:
        cmd.append("--peft-boft-f2-conv")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=C.env_for_memory_child())
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY-JSON "):
            payload = json.loads(line[len("MEMORY-JSON "):])
            return payload["bytes"], payload["fingerprint"]
    log(f"memory process for {shape} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {}, None


# ---- timing ---------------------------------------------------------------------------------------

def run_shape(args, shape: str, device: str, dtype) -> dict:
    conv = shape.startswith("conv")
    rounds = args.rounds or ((1 if conv else 3) if args.quick else (5 if conv else 15))
    warmup = args.warmup if args.warmup is not None else 1
    specs = C.case_specs(args.libs.split(","), args.algos.split(","), with_f2(args, shape))
    if ("ours", "lora", "") not in specs:
        specs.insert(0, ("ours", "lora", ""))
    cases = []
    for lib, algo, variant in specs:
        try:
            cases.append(C.build_case(lib, algo, variant, shape, device, dtype))
        except Exception as exc:
            log(f"{shape}: cannot build {lib}/{algo}[{variant}]: {exc!r}")
    x = C.make_input(shape, device, dtype, args.input_grad)
    t0 = time.perf_counter()
    samples = C.time_interleaved(cases, x, rounds, warmup=warmup, device=device,
                                 progress=lambda m: log(f"  {shape}: {m} ({time.perf_counter() - t0:.0f}s)"))
    notes = {c.key: c.note for c in cases}
    del cases
    memory, mem_fingerprint = ({}, None) if args.no_memory else measure_memory(args, shape)
    return {"shape": shape, "input": list(C.SHAPES[shape][1]), "rounds": len(samples["ours/lora"]),
            "samples": samples, "notes": notes, "memory_bytes": memory, "memory_fingerprint": mem_fingerprint}


# ---- summary --------------------------------------------------------------------------------------

def ours_key(algo: str, variant: str = "") -> str:
    return f"ours/{algo}" + (f"[{variant}]" if variant else "")


def peft_key(algo: str, boft_variant: str = PEFT_BOFT_REF) -> str:
    return f"peft/{algo}" + (f"[{boft_variant}]" if algo == "boft" else "")


def summarize(result: dict) -> list[dict]:
    s, mem = result["samples"], result["memory_bytes"]
    ref = s["ours/lora"]
    rows = []
    med = {k: statistics.median(v) for k, v in s.items()}
    for key in s:
        lib, _, rest = key.partition("/")
        algo, _, variant = rest.partition("[")
        variant = variant.rstrip("]")
        row = {"key": key, "lib": lib, "algo": algo, "variant": variant, "ms": med[key] * 1e3,
               "note": result["notes"].get(key, ""), "mem_mb": (mem.get(key) or 0) / 2**20 if mem.get(key) is not None else None}
        if lib == "ours":
            row["x_our_lora"] = C.paired_ratio(s[key], ref)
            row["default_side"] = variant in ("", DEFAULT_SIDE.get(algo, ""))
        lib_lora = f"{lib}/lora"
        if lib_lora in s:
            row["x_own_lora"] = C.paired_ratio(s[key], s[lib_lora])
        rows.append(row)
    # speed-ups: other libraries vs each of our variants of the same algorithm
    for row in rows:
        if row["lib"] != "ours":
            continue
        for other in rows:
            if other["lib"] == "ours" or other["algo"] != row["algo"]:
                continue
            row.setdefault("speedup", {})[other["key"]] = C.paired_ratio(s[other["key"]], s[row["key"]])
    return rows


def fmt(v, spec=".2f", none="–"):
    return none if v is None else format(v, spec)


def markdown_tables(results: list[dict]) -> str:
    lines = []
    for result in results:
        rows = summarize(result)
        by_key = {r["key"]: r for r in rows}
        lines.append(f"#### {result['shape']} — input {tuple(result['input'])}, {result['rounds']} rounds\n")
        lines.append("| algorithm | ours: ms | ÷ our LoRA | PEFT: ms | PEFT ÷ PEFT LoRA | **PEFT ÷ ours** | LyCORIS: ms | LyCORIS ÷ ours | mem ours MiB | mem PEFT MiB | mem LyCORIS MiB |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for row in rows:
            if row["lib"] != "ours":
                continue
            algo = row["algo"]
            label = algo + (f" ({row['variant']} side{', default' if row['default_side'] else ''})" if row["variant"] else "")
            peft_keys = [k for k in by_key if k.startswith(f"peft/{algo}")]
            lyco = by_key.get(f"lyco/{algo}")
            for i, pk in enumerate(peft_keys or [None]):
                p = by_key.get(pk) if pk else None
                plabel = label + (f" vs PEFT {p['variant']}" if p and p["variant"] else "")
                cells = [
                    plabel if i == 0 else f"↳ vs PEFT {p['variant']}",
                    fmt(row["ms"], ".1f") if i == 0 else "",
                    fmt(row["x_our_lora"]) + "×" if i == 0 else "",
                    fmt(p["ms"], ".1f") if p else "–",
                    (fmt(p.get("x_own_lora")) + "×") if p else "–",
                    f"**{fmt(row['speedup'][pk])}×**" if p else "–",
                    (fmt(lyco["ms"], ".1f") if lyco else "–") if i == 0 else "",
                    (fmt(row["speedup"][lyco["key"]]) + "×" if lyco else "–") if i == 0 else "",
                    fmt(row["mem_mb"], ".1f") if i == 0 else "",
                    fmt(p["mem_mb"], ".1f") if p else "–",
                    (fmt(lyco["mem_mb"], ".1f") if lyco else "–") if i == 0 else "",
                ]
                lines.append("| " + " | ".join(cells) + " |")
        notes = sorted({f"`{k}`: {v}" for k, v in result["notes"].items() if v})
        if notes:
            lines.append("\n<sub>" + "; ".join(notes) + "</sub>\n")
        lines.append("")
    return "\n".join(lines)


def check_targets(results: list[dict]) -> list[dict]:
    checks = []

    def add(name, value, ok, detail=""):
        checks.append({"target": name, "value": value, "met": bool(ok) if ok is not None else None, "detail": detail})

    for result in results:
        shape = result["shape"]
        rows = {r["key"]: r for r in summarize(result)}
        for row in rows.values():
            if row["lib"] != "ours" or row["algo"] == "lora":
                continue
            tag = f"{shape} {row['algo']}" + (f" [{row['variant']}]" if row["variant"] else "")
            suffix = "" if row["default_side"] else " (non-default side)"
            add(f"≤ {MAX_VS_LORA}× our LoRA: {tag}{suffix}", row["x_our_lora"], row["x_our_lora"] <= MAX_VS_LORA)
            pk = peft_key(row["algo"])
            if pk in rows:
                sp = row["speedup"][pk]
                add(f"not slower than PEFT: {tag}{suffix}", sp, sp >= 1.0)
                if shape == "linear640x1024" and row["algo"] in SPEEDUP_TARGETS_640:
                    goal = SPEEDUP_TARGETS_640[row["algo"]]
                    add(f"≥ {goal}× PEFT: {tag}{suffix}", sp, sp >= goal)
                mo, mp = row["mem_mb"], rows[pk]["mem_mb"]
                if mo is not None and mp is not None:
                    add(f"peak memory ≤ PEFT: {tag}{suffix}", mo - mp, mo <= mp + MEM_TOLERANCE_MB,
                        f"{mo:.1f} MiB vs {mp:.1f} MiB")
        if "ours/lora" in rows and "peft/lora" in rows:
            r = rows["ours/lora"]
            sp = r["speedup"]["peft/lora"]
            add(f"not slower than PEFT: {shape} lora", sp, sp >= 1.0)
            mo, mp = r["mem_mb"], rows["peft/lora"]["mem_mb"]
            if mo is not None and mp is not None:
                add(f"peak memory ≤ PEFT: {shape} lora", mo - mp, mo <= mp + MEM_TOLERANCE_MB, f"{mo:.1f} MiB vs {mp:.1f} MiB")
    return checks


def environment(device: str, dtype: str, args) -> dict:
    import peft

    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__, "peft": peft.__version__, "python": platform.python_version(),
        "device": device, "dtype": dtype, "threads": torch.get_num_threads(),
        "input_requires_grad": bool(args.input_grad), "quick": bool(args.quick),
        "cpu": platform.processor() or platform.machine(),
    }
    try:
        import importlib.metadata as md

        info["lycoris"] = md.version("lycoris-lora")
    except Exception:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = f"{names[0]} ({len(names)} logical CPUs)" if names else info["cpu"]
    except OSError:
        pass
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lycoris_lite"], cwd=root, capture_output=True,
                               text=True).stdout.strip()
        info["lycoris_lite_commit"] = commit + ("+dirty" if dirty else "")
    except OSError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def snapshot_library() -> str:
    """Copy ``lycoris_lite`` to a temporary folder and import it from there (this process and the memory
    processes): the library may be edited while a run is going, every measurement sees one version."""
    root = tempfile.mkdtemp(prefix="bench_lycoris_lite_")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.copytree(os.path.join(repo, "lycoris_lite"), os.path.join(root, "lycoris_lite"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    return root


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    snapshot = None
    if not args.memory_child and not args.no_snapshot and not args.lib_root:
        snapshot = args.lib_root = snapshot_library()
    if args.lib_root:
        sys.path.insert(0, args.lib_root)
        for name in [m for m in sys.modules if m == "lycoris_lite" or m.startswith("lycoris_lite.")]:
            del sys.modules[name]  # common imported the repo's copy (for DTYPES): measure the snapshot's
    try:
        return run(args)
    finally:
        if snapshot:
            shutil.rmtree(snapshot, ignore_errors=True)


def run(args) -> int:
    if args.memory_child:
        memory_child(args)
        return 0
    device, dtype = resolve_device(args.device), C.DTYPES[args.dtype]
    if device == "cpu" and dtype != torch.float32:
        log("note: half precision on CPU is not what this benchmark is for; timing it anyway")
    env = environment(device, args.dtype, args)
    import lycoris_lite  # noqa: F401  (imported once, now: the timings run this code)
    from lycoris_lite import algos  # noqa: F401

    files = C.library_files()
    env["lycoris_lite_fingerprint"] = C.library_fingerprint(files)
    env["lycoris_lite_imported_from"] = "snapshot" if args.lib_root else "working tree"
    log(f"{env}")
    start = time.perf_counter()
    results = []
    for shape in args.shapes.split(","):
        log(f"== {shape}")
        results.append(run_shape(args, shape, device, dtype))
    env["wall_s"] = round(time.perf_counter() - start, 1)
    try:
        env["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    prints = {env["lycoris_lite_fingerprint"], C.library_fingerprint(files)}
    prints |= {r["memory_fingerprint"] for r in results if r.get("memory_fingerprint")}
    if len(prints) > 1:
        env["warning"] = (f"lycoris_lite changed during the run (fingerprints {sorted(prints)}): timings use "
                          f"{env['lycoris_lite_fingerprint']}, memory columns may not; rerun")
        log("WARNING: " + env["warning"])
    checks = check_targets(results)
    header = (f"_{env['date']} · torch {env['torch']} · peft {env['peft']} · lycoris {env.get('lycoris', '?')} · "
              f"{env['device']} {env['dtype']} ({env['cpu']}, {env['threads']} threads) · "
              f"input requires grad: {env['input_requires_grad']} · lycoris_lite {env.get('lycoris_lite_commit', '?')} "
              f"(code {env['lycoris_lite_fingerprint']}) · "
              f"load average {env.get('loadavg_start', ('?',))[0]:.2f} → {env.get('loadavg_end', ('?',))[0]:.2f} · "
              f"{env['wall_s']} s_\n")
    if env.get("warning"):
        header += f"\n**WARNING: {env['warning']}**\n"
    text = header + "\n" + markdown_tables(results)
    text += "\n#### Targets\n\n| target | value | met |\n|---|---:|:---:|\n"
    for c in checks:
        value = f"{c['value']:.2f}" + ("" if c["target"].startswith("peak") else "×")
        if c["target"].startswith("peak"):
            value = c["detail"]
        text += f"| {c['target']} | {value} | {'yes' if c['met'] else '**no**'} |\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        payload = {"environment": env, "results": results,
                   "summary": {r["shape"]: summarize(r) for r in results}, "targets": checks}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
