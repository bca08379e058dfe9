"""What users do to a pipeline with an adapter, checked on a GPU in float16 and bfloat16.

    python benchmarks/gpu_check.py --json gpu.json                       # CUDA, float16 and bfloat16
    python benchmarks/gpu_check.py --device cpu --dtypes float32 \\
        --checks cast_after_loading,fuse,unfuse_bitexact,disable_enable_fused   # smoke run without a GPU

On the tiny SD pipeline, for every algorithm (one adapter file each, random non-identity weights on the
whole UNet and the text encoder), every dtype and every check of ``tests/pipeline_checks.py``, which
holds the checks and says what each one asserts: the adapter loaded then the pipeline cast
(``pipe.to(device, dtype)``), fuse, bit-exact unfuse, disable/enable while fused, ``torch.compile`` then
switching weights (graph breaks and recompiles counted; for ``--compile-algos`` only, each compile takes
tens of seconds), model and sequential CPU offload, and the UNet loaded in NF4 through diffusers' own
``BitsAndBytesConfig`` (CUDA only) with the adapter on top. One line per check (PASS, FAIL or SKIP with its
numbers); a check that fails or crashes is reported and the next one runs. Exit status 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import library_fingerprint  # noqa: E402

import diffusers  # noqa: E402

import lycoris_lite  # noqa: E402
from lycoris_lite.base.dtypes import DTYPES  # noqa: E402
from tests import pipeline_checks as checks  # noqa: E402


def names_from(known):
    """An argparse type: a comma-separated list of names from ``known`` (``all``: every one)."""
    def parse(text: str) -> list[str]:
        chosen = list(known) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in chosen if n not in known]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(f"unknown {unknown or text!r}; choose from {', '.join(known)} or all")
        return chosen
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:1, cpu (default cuda)")
    p.add_argument("--dtypes", default="float16,bfloat16", type=names_from(DTYPES),
                   help="comma-separated (default float16,bfloat16)")
    p.add_argument("--algos", default="all", type=names_from(lycoris_lite.ALGORITHMS), help="comma-separated (default all)")
    p.add_argument("--checks", default="all", type=names_from(checks.CHECKS),
                   help=f"comma-separated, of {', '.join(checks.CHECKS)} (default all)")
    p.add_argument("--compile-algos", default="lora,oft", type=names_from(lycoris_lite.ALGORITHMS),
                   help="the algorithms the compile check runs for (default lora,oft: one additive, one rotation)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--json", type=Path, help="write the summary and every result here")
    args = p.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here (a smoke run: --device cpu --dtypes float32)")
    return args


def environment(device: str) -> dict:
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"device": device,
            "device_name": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else platform.processor(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
            "python": platform.python_version(), "commit": commit, "library_fingerprint": library_fingerprint()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    diffusers.utils.logging.set_verbosity_error()  # its dtype advice would bury the one line per check
    env = environment(args.device)
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    started, start = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), time.perf_counter()
    results: list[checks.Result] = []

    def summary(finished: bool) -> dict:
        counts = {status: sum(r.status == status for r in results) for status in ("PASS", "FAIL", "SKIP")}
        return {"environment": env, "started": started, "seconds": round(time.perf_counter() - start, 1),
                "finished": finished, "options": vars(args), "counts": counts,
                "results": [asdict(r) for r in results]}

    def report(result: checks.Result) -> None:
        """Print the line and rewrite the JSON: a run cut short still leaves what it did."""
        results.append(result)
        print(result.line(), flush=True)
        if args.json:
            args.json.write_text(json.dumps(summary(False), indent=1, default=str))

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as folder:
        checks.run_checks(Path(folder), args.device, [DTYPES[d] for d in args.dtypes], args.algos, args.checks,
                          args.compile_algos, args.compile_backend, report=report)
    final = summary(True)
    if args.json:
        args.json.write_text(json.dumps(final, indent=1, default=str))
    counts = final["counts"]
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in {final['seconds']:.0f} s")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
