"""Reliability under faults, load and bad input (issue 8): every figure of the "Reliability" section of
``benchmarks/README.md``.

    python benchmarks/bench_reliability.py                      # every section (bounded: ~25 min here)
    python benchmarks/bench_reliability.py --only fuzz,drift    # some sections
    python benchmarks/bench_reliability.py --quick              # the sizes the tests use

Sections (each bounded in count and in time, and each stops by itself):

* ``fuzz``: a seeded mutation fuzzer over real adapter files of every format and algorithm, loaded onto
  the tiny SD pipeline in a forked worker, so a segfault or a hang is seen and counted;
* ``drift``: fuse/unfuse cycles of a mixed stack in float32, float16 and bfloat16;
* ``leaks``: load/unload cycles on the tiny pipeline and on the full-size SD-1.5-shaped UNet;
* ``killwrite``: a process saving adapters SIGKILLed at random moments;
* ``training``: a DreamBooth run SIGKILLed three times and resumed, and a process writing training
  checkpoints SIGKILLed at random moments;
* ``ui``: concurrent ``gradio_client`` clients on the web UI;
* ``badargs``: wrong arguments to the command line, the trainer and the UI.

The runs themselves are the harness in ``tests/reliability/``, which ``tests/test_reliability.py`` runs
at small sizes; this script picks the sizes, runs the sections and prints the README's tables.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lycoris_lite.io.files import read_adapter  # noqa: E402
from tests.reliability.bad_inputs import (bad_input_files, cached_tiny_models, run_cli_bad_arguments,  # noqa: E402
                                          run_trainer_bad_arguments, run_ui_bad_inputs)
from tests.reliability.corpus import build_corpus  # noqa: E402
from tests.reliability.cycles import drift, leak_cycles, make_stack_files, sd15_leaks  # noqa: E402
from tests.reliability.fuzzing import fuzz  # noqa: E402
from tests.reliability.killing import (adapter_versions, checkpoint_kill_writes, kill_during_writes,  # noqa: E402
                                       killed_training)
from tests.reliability.memory import MiB  # noqa: E402
from tests.reliability.subjects import UI_APP, child_env, fuzz_pipe, load_script, make_adapter, tiny_pipe  # noqa: E402
from tests.reliability.ui_load import ui_load  # noqa: E402


# ---- the leak runs (a worker process each) -------------------------------------------------------------
def _worker(kind: str, cycles: int) -> dict:
    """Runs in a fresh process: a leak measurement that nothing else in this benchmark disturbs."""
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="leaks-"))
    try:
        if kind == "leaks-tiny":
            pipe = tiny_pipe()
            path = make_adapter(pipe, folder / "loha.safetensors", "loha", seed=3)
            return {"model": "tiny SD pipeline (UNet + text encoder)", "adapter": "LoHa r=4, unet-full + text encoder",
                    **leak_cycles(pipe, path, cycles, fuse=True)}
        if kind == "leaks-sd15":
            return {"model": "SD-1.5-shaped UNet", "adapter": "LoRA r=16, unet-attn-ff", **sd15_leaks(cycles, folder)}
        raise ValueError(kind)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_worker(kind: str, cycles: int, timeout: float) -> dict:
    """:func:`_worker` in a child Python process (default glibc malloc settings)."""
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--cycles", str(cycles)], capture_output=True,
                          text=True, timeout=timeout, env=child_env())
    if proc.returncode:
        raise RuntimeError(f"{kind} worker failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the whole run -----------------------------------------------------------------------------------------
SECTIONS = ("fuzz", "drift", "leaks", "killwrite", "training", "ui", "badargs")
FULL = {"fuzz_cases": 10_000, "fuzz_minutes": 40, "drift_cycles": 1000, "leak_cycles_tiny": 200,
        "leak_cycles_sd15": 20, "kills": 50, "training_kills": 3, "ui_clients": 8, "ui_generations": 25}
QUICK = {"fuzz_cases": 240, "fuzz_minutes": 5, "drift_cycles": 50, "leak_cycles_tiny": 30, "leak_cycles_sd15": 0,
         "kills": 6, "training_kills": 0, "ui_clients": 2, "ui_generations": 3}


def run(sections, sizes: dict, log=print, results: dict | None = None) -> dict:
    """Run ``sections``; the figures go into ``results`` (a new dict by default) as each section ends, so
    a caller keeps what finished if a later section fails."""
    results = {} if results is None else results
    results.update({"sizes": sizes, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
                    "threads": torch.get_num_threads()})
    scratch = Path(tempfile.mkdtemp(prefix="reliability-"))
    try:
        if "fuzz" in sections:
            log("fuzz: building the corpus")
            pipe = fuzz_pipe()
            corpus = build_corpus(pipe, scratch / "corpus", sdxl_pipe=tiny_pipe(sdxl=True))
            report = fuzz(pipe, corpus, sizes["fuzz_cases"], master_seed=2026, workers=2,
                          time_limit=60 * sizes["fuzz_minutes"], log=log)
            results["fuzz"] = {**report.summary(), "corpus": {s.name: s.size for s in corpus},
                               "crash_examples": [{k: r.get(k) for k in ("case", "seed", "mutation", "error", "message",
                                                                           "origin")} for r in report.crashes[:10]]}
            log(f"fuzz: {json.dumps({k: results['fuzz'][k] for k in ('cases', 'outcomes', 'crashes', 'model_changed')})}")
        if "drift" in sections:
            pipe = fuzz_pipe()
            files = make_stack_files(pipe, scratch / "stack")
            results["drift"] = [drift(pipe, files, dtype, sizes["drift_cycles"], seed=i)
                                for i, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16))]
            log(f"drift: {json.dumps(results['drift'])}")
        if "leaks" in sections:
            results["leaks"] = [run_worker("leaks-tiny", sizes["leak_cycles_tiny"], 3600)]
            if sizes["leak_cycles_sd15"]:
                results["leaks"].append(run_worker("leaks-sd15", sizes["leak_cycles_sd15"], 3600))
            log(f"leaks: {json.dumps([{k: v for k, v in r.items() if not k.startswith('rss_')} for r in results['leaks']])}")
        if "killwrite" in sections:
            pipe = tiny_pipe()
            results["killwrite"] = {}
            for fmt in ("kohya", "diffusers", "peft"):
                versions, target = adapter_versions(pipe, scratch / f"write-{fmt}", fmt)

                def write(v, target=target, fmt=fmt):
                    pipe.save_adapter(v[0], target, format=fmt, metadata=v[1])

                def verify(path):
                    read_adapter(pipe, path, "check")

                results["killwrite"][fmt] = kill_during_writes(write, versions, target, sizes["kills"], seed=1,
                                                               verify=verify)
                pipe.unload_adapters()
            log(f"killwrite: {json.dumps(results['killwrite'])}")
        if "training" in sections:
            training = {"checkpoint_writes": checkpoint_kill_writes(scratch / "ckpt", sizes["kills"], seed=2)}
            if sizes["training_kills"]:
                training["killed_runs"] = killed_training(scratch / "train", sizes["training_kills"], log=log)
            results["training"] = training
            log(f"training: {json.dumps(results['training'])}")
        if "ui" in sections:
            results["ui"] = ui_load(scratch / "ui", sizes["ui_clients"], sizes["ui_generations"])
            log(f"ui: {json.dumps(results['ui'])}")
        if "badargs" in sections:
            pipe = tiny_pipe()
            names = bad_input_files(pipe, scratch / "cli")
            with cached_tiny_models():
                results["badargs"] = {"cli": run_cli_bad_arguments(names)}
            results["badargs"]["trainer"] = run_trainer_bad_arguments(scratch / "trainer")
            app = load_script(UI_APP, "lycoris_ui_app_engine")
            engine = app.open_engine("tiny-sd", scratch / "ui-bad" / "adapters")
            results["badargs"]["ui"] = run_ui_bad_inputs(engine, scratch / "ui-bad")
            log("badargs: " + json.dumps({k: _bad_summary(v) for k, v in results["badargs"].items()}))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def _bad_summary(rows: list[dict]) -> dict:
    refused = [r for r in rows if (r.get("exit") == 2 if "exit" in r else r["outcome"] == "gr.Error")]
    return {"cases": len(rows), "refused": len(refused), "message_names_the_problem": sum(r["message_ok"] for r in rows),
            "wrote_something": sum(bool(r["written"]) for r in rows),
            "failing": [r["id"] for r in rows if not (r in refused and r["message_ok"] and not r["written"])]}


def markdown(results: dict) -> str:
    """The figures as the README's tables."""
    lines = []
    f = results.get("fuzz")
    if f:
        o = f["outcomes"]
        lines += ["| cases | accepted | clean errors | crashes | model changed | code run | max file | max peak extra |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {f['cases']:,} | {o.get('accepted', 0):,} | {o.get('clean', 0):,} | {f['crashes']} | "
                  f"{f['model_changed']} | {f['code_ran']} | {f['max_file_bytes'] / MiB:.2f} MiB | "
                  f"{(f['max_peak_extra_bytes'] or 0) / MiB:.1f} MiB |", ""]
        lines += ["| mutation | cases | accepted | clean | crash | max peak extra (MiB) |", "|---|---|---|---|---|---|"]
        for m, c in f["by_mutation"].items():
            lines.append(f"| {m} | {c.get('cases', 0)} | {c.get('accepted', 0)} | {c.get('clean', 0)} | "
                         f"{c.get('crash', 0)} | {f['max_peak_extra_mib_by_mutation'].get(m, '–')} |")
        lines.append("")
    if results.get("drift"):
        lines += ["| dtype | cycles | max difference | bitwise | fusing moved the weights | after unload |",
                  "|---|---|---|---|---|---|"]
        for d in results["drift"]:
            lines.append(f"| {d['dtype']} | {d['cycles']} | {d['max_difference']} | {d['bitwise']} | "
                         f"{d['fusing_changed_weights']} | {d['unload_max_difference']} |")
        lines.append("")
    if results.get("leaks"):
        lines += ["| model | cycles | RSS after cycle 1 | growth (raw) | growth (after malloc_trim) | live tensors "
                  "first → last | s/cycle |", "|---|---|---|---|---|---|---|"]
        for r in results["leaks"]:
            lines.append(f"| {r['model']} | {r['cycles']} | {r['rss_after_first_mib']} MiB | "
                         f"{100 * r['growth_raw']:.3f}% ({r['growth_raw_mib']} MiB) | "
                         f"{100 * r['growth_trimmed']:.3f}% ({r['growth_trimmed_mib']} MiB) | "
                         f"{r['live_tensors_first']} → {r['live_tensors_last']} | {r['seconds_per_cycle']} |")
        lines.append("")
    if results.get("killwrite"):
        lines += ["| format | kills | old version | new version | partial or mixed | most temporaries | "
                  "temporaries after the next save |", "|---|---|---|---|---|---|---|"]
        for fmt, r in results["killwrite"].items():
            v = list(r["versions_found"].values())
            lines.append(f"| {fmt} | {r['kills']} | {v[0]} | {v[1]} | {r['partial_or_mixed']} | "
                         f"{r['most_temporaries_at_once']} | {r['temporaries_after_next_save']} |")
        lines.append("")
    t = results.get("training")
    if isinstance(t, dict):
        c = t["checkpoint_writes"]
        lines.append(f"Checkpoint writes: {c['kills']} kills, {c['problems']} partial or wrong checkpoints, "
                     f"{c['checkpoints_written']} checkpoints written, {c['hidden_leftovers_after_cleanup']} "
                     "temporaries left after the trainer's clean-up.")
        if "killed_runs" in t:
            k = t["killed_runs"]
            lines.append(f"Killed runs: {k['kills']} kills after checkpoints {k['killed_after_checkpoints']} of "
                         f"{k['steps']} steps; max difference to the uninterrupted run {k['max_difference']:.3g}; "
                         f"partial files seen {len(k['partial_files_seen'])}.")
        lines.append("")
    u = results.get("ui")
    if isinstance(u, dict):
        lines += ["| clients | generations each | served | mismatches | errors | p50 | p95 | throughput |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {u['clients']} | {u['generations_each']} | {u['requests_served']} | {u['mismatches']} | "
                  f"{u['errors']} | {u['p50_seconds']} s | {u['p95_seconds']} s | {u['throughput_per_second']}/s |", ""]
    if results.get("badargs"):
        lines += ["| surface | cases | refused | message names the problem | wrote something | failing |",
                  "|---|---|---|---|---|---|"]
        for k, rows in results["badargs"].items():
            b = _bad_summary(rows)
            lines.append(f"| {k} | {b['cases']} | {b['refused']} | {b['message_names_the_problem']} | "
                         f"{b['wrote_something']} | {', '.join(b['failing']) or '–'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="the sizes the tests use")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--cycles", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.cycles)))
        return 0
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    start, results = time.time(), {}
    try:
        run(sections, QUICK if args.quick else FULL, log=lambda m: print(m, flush=True), results=results)
    finally:  # what finished is written even when a section fails
        results["seconds"] = round(time.time() - start, 1)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1, default=str))
    print(markdown(results))
    print(f"\n{results['seconds']:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
