"""The fuzz run: each case loaded onto the tiny pipeline in a forked worker (so a segfault or a hang is
seen and counted), its outcome judged (clean error, accepted, crash) and the model compared with its
pristine copy."""

from __future__ import annotations

import gc
import json
import os
import select
import shutil
import signal
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .corpus import Case, Seed, make_case
from .memory import MiB, mmap_large_allocations, peak, reset_peak, rss
from .subjects import LIB_DIR, ROOT, model_changes, model_state


#: exception types a load documents (``AdapterFileError`` and ``FamilyMismatch`` are ``ValueError``s)
DOCUMENTED = (ValueError, FileNotFoundError)


def error_origin(exc: BaseException) -> str:
    """``file:line`` of the innermost frame of ``exc``'s traceback (where it was raised)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "?"
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"


def is_clean(exc: BaseException) -> bool:
    """A *clean* error: a documented type (``ValueError`` — ``AdapterFileError`` is one — or
    ``FileNotFoundError``), exactly that class or one of ours (not, e.g., ``json.JSONDecodeError``
    leaking from a parser), raised by a ``raise`` in lycoris_lite (the innermost frame of the traceback
    is in the package), with a message."""
    cls = type(exc)
    documented = cls in DOCUMENTED or (issubclass(cls, DOCUMENTED) and cls.__module__.startswith("lycoris_lite"))
    return documented and error_origin(exc).startswith(LIB_DIR) and bool(str(exc).strip())


def use_adapter(pipe, fuse: bool = True) -> None:
    """Run the UNet and the text encoder with the adapter; fuse it and unfuse it."""
    unet, te = pipe.unet, pipe.text_encoder
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
        context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
        unet(sample, 10, encoder_hidden_states=context)
        te(torch.arange(8)[None])
    if not fuse:
        return
    try:
        pipe.fuse_adapters()
    except ValueError as exc:  # extreme values: NaN/Inf weights refused, nothing fused
        if "NaN/Inf" not in str(exc):
            raise
    pipe.unfuse_adapters()


def write_case(case: Case, folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, blob in case.files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    return folder / case.load if case.load else folder


def run_case(pipe, case: Case, folder: Path, before: dict, marker: Path, fuse: bool = True) -> dict:
    """Load ``case`` onto ``pipe`` and judge the outcome (see :func:`is_clean`, :func:`model_changes`)."""
    source = write_case(case, folder)
    size = sum(len(b) for b in case.files.values())
    result = {"case": case.index, "seed": case.seed, "mutation": case.mutation, "size": size}
    gc.collect()
    measured = reset_peak()
    rest = rss()
    start = time.perf_counter()
    try:
        pipe.load_adapter(source, "fuzz", allow_pickle=case.allow_pickle)
    except Exception as exc:  # noqa: BLE001 - judging every exception is the point
        result.update(outcome="clean" if is_clean(exc) else "crash", error=type(exc).__name__,
                      message=str(exc)[:300], origin=error_origin(exc).replace(str(ROOT) + "/", ""))
        if result["outcome"] == "crash":
            result["traceback"] = "".join(traceback.format_exception(exc))[-3000:]
    else:
        result["outcome"] = "accepted"
    result["seconds"] = time.perf_counter() - start
    result["peak_extra"] = peak() - rest if measured else None
    if result["outcome"] == "accepted":
        try:
            use_adapter(pipe, fuse)
        except Exception as exc:  # noqa: BLE001
            result.update(outcome="crash", error=type(exc).__name__, message=f"using the loaded adapter: {exc}"[:300],
                          origin=error_origin(exc).replace(str(ROOT) + "/", ""),
                          traceback="".join(traceback.format_exception(exc))[-3000:])
        pipe.unload_adapters()
    result["changed"] = model_changes(pipe, before)  # the worker then ends: the next one starts pristine
    result["code_ran"] = marker.exists()
    if result["code_ran"]:
        marker.unlink()
    return result


# ---- the fuzz run: forked workers --------------------------------------------------------------------
def _fuzz_child(write_fd: int, pipe, corpus, before, indices: range, master_seed: int, deadline: float,
                folder: Path) -> None:
    """Runs in a forked child: the cases ``indices`` until ``deadline``, one JSON line per event."""
    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork()
    mmap_large_allocations()
    gc.collect()
    gc.freeze()  # the pipeline and the corpus: never scanned again, so each case's gc.collect() is cheap
    out = os.fdopen(write_fd, "w", buffering=1)
    marker = folder / "CODE_RAN"
    # one pristine seed first, not reported: a forked worker's first load and fuse pay one-time costs
    # (the thread pool, the allocator's arenas: ~17 MiB) that would be charged to whichever case came first
    for fmt in ("kohya", "peft"):
        seed = next(s for s in corpus if s.format == fmt)
        run_case(pipe, Case(-1, seed.name, "none", dict(seed.files), None if seed.is_folder else next(iter(seed.files))),
                 folder / "warm-up", before, marker, fuse=True)
    for index in indices:
        if time.time() > deadline:
            break
        out.write(json.dumps({"start": index}) + "\n")
        case = make_case(index, corpus, master_seed, str(marker))
        result = run_case(pipe, case, folder / "case", before, marker, fuse=index % 4 == 0)
        out.write(json.dumps({"result": result}) + "\n")
        if result["changed"]:
            break
    out.write(json.dumps({"done": True}) + "\n")
    out.flush()


@dataclass
class FuzzReport:
    results: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    workers: int = 1
    spawned: int = 0

    def add(self, result: dict) -> None:
        self.results.append(result)

    @property
    def crashes(self) -> list[dict]:
        return [r for r in self.results if r["outcome"] == "crash"]

    @property
    def changed(self) -> list[dict]:
        return [r for r in self.results if r.get("changed")]

    @property
    def code_ran(self) -> list[dict]:
        return [r for r in self.results if r.get("code_ran")]

    def counts(self, key: str = "outcome") -> Counter:
        return Counter(r[key] for r in self.results)

    def summary(self) -> dict:
        by_mutation = {}
        for r in self.results:
            row = by_mutation.setdefault(r["mutation"], Counter())
            row["cases"] += 1
            row[r["outcome"]] += 1
        peaks = [r for r in self.results if r.get("peak_extra") is not None]
        worst = max(peaks, key=lambda r: r["peak_extra"], default=None)
        refused = [r for r in peaks if r["outcome"] != "accepted"]
        return {
            "cases": len(self.results), "seconds": round(self.seconds, 1), "workers": self.workers,
            "worker_processes": self.spawned,
            "outcomes": dict(self.counts()), "crashes": len(self.crashes), "model_changed": len(self.changed),
            "code_ran": len(self.code_ran), "by_mutation": {m: dict(c) for m, c in sorted(by_mutation.items())},
            "max_file_bytes": max((r["size"] for r in self.results), default=0),
            "max_peak_extra_bytes": worst["peak_extra"] if worst else None,
            "max_peak_extra_case": {k: worst[k] for k in ("case", "seed", "mutation", "size", "outcome")} if worst else None,
            "max_peak_extra_refused_bytes": max((r["peak_extra"] for r in refused), default=None),
            "max_peak_over_size": max((r["peak_extra"] / max(r["size"], 1) for r in peaks if r["size"] >= 64 * 1024),
                                      default=None),
            "peak_measured": bool(peaks),
            "max_peak_extra_mib_by_mutation": {
                m: round(max(r["peak_extra"] for r in peaks if r["mutation"] == m) / MiB, 2)
                for m in sorted({r["mutation"] for r in peaks})},
            "mean_case_ms": round(1000 * sum(r["seconds"] for r in self.results) / max(len(self.results), 1), 1),
        }


def fuzz(pipe, corpus: list[Seed], cases: int, master_seed: int = 0, time_limit: float = 1200.0,
         case_timeout: float = 120.0, workers: int = 1, log=None) -> FuzzReport:
    """Run cases ``0..cases-1`` in forked children of this process (which keeps the pristine pipeline),
    ``workers`` at a time, worker ``w`` taking the cases ``w, w + workers, …``. A child that dies (a
    signal: segfault, abort, the kernel's out-of-memory killer) or hangs past ``case_timeout`` costs one
    case, recorded as a crash, and a new child goes on from the case after it; so does a case that left
    the model changed (the next child starts from the pristine copy). Stops after ``time_limit`` s."""
    report = FuzzReport(workers=workers)
    before = model_state(pipe)
    root = Path(tempfile.mkdtemp(prefix="fuzz-"))
    start = time.time()
    deadline = start + time_limit
    slots = {}  # read fd -> [pid, next index, pending index, buffer, done, folder]

    def spawn(w: int, first: int) -> None:
        if first >= cases or time.time() >= deadline:
            return
        folder = root / f"w{w}"
        folder.mkdir(exist_ok=True)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(read_fd)
            for fd in slots:
                os.close(fd)
            code = 0
            try:
                _fuzz_child(write_fd, pipe, corpus, before, range(first, cases, workers), master_seed, deadline,
                            folder)
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        os.close(write_fd)
        report.spawned += 1
        slots[read_fd] = {"pid": pid, "worker": w, "next": first, "pending": None, "buffer": b"", "done": False,
                          "folder": folder, "last": time.time()}

    def finish(fd: int, hung: bool) -> None:
        slot = slots.pop(fd)
        if hung:
            os.kill(slot["pid"], signal.SIGKILL)
        os.close(fd)
        _, status = os.waitpid(slot["pid"], 0)
        if slot["pending"] is not None:
            how = (f"killed by {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status)
                   else f"exit status {os.WEXITSTATUS(status)}")
            case = make_case(slot["pending"], corpus, master_seed, "")
            report.add({"case": case.index, "seed": case.seed, "mutation": case.mutation,
                        "size": sum(len(b) for b in case.files.values()), "outcome": "crash",
                        "error": "hang" if hung else "worker died",
                        "message": f"the worker was {how}" + (f" after {case_timeout:.0f} s without an answer"
                                                               if hung else ""),
                        "seconds": case_timeout if hung else 0.0, "peak_extra": None, "changed": [],
                        "code_ran": (slot["folder"] / "CODE_RAN").exists()})
            slot["next"] = slot["pending"] + workers
        elif not slot["done"] and time.time() < deadline and slot["next"] < cases:
            raise RuntimeError(f"fuzz worker {slot['worker']} ended without reporting (status {status})")
        spawn(slot["worker"], slot["next"])

    try:
        for w in range(min(workers, cases)):
            spawn(w, w)
        while slots:
            ready, _, _ = select.select(list(slots), [], [], 1.0)
            now = time.time()
            for fd in list(slots):
                if fd not in ready:
                    if now - slots[fd]["last"] > case_timeout:
                        finish(fd, hung=True)
                    continue
                slot = slots[fd]
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    finish(fd, hung=False)
                    continue
                slot["last"] = now
                slot["buffer"] += chunk
                while b"\n" in slot["buffer"]:
                    line, slot["buffer"] = slot["buffer"].split(b"\n", 1)
                    event = json.loads(line)
                    if "start" in event:
                        slot["pending"] = event["start"]
                    elif "result" in event:
                        report.add(event["result"])
                        slot["pending"] = None
                        slot["next"] = event["result"]["case"] + workers
                        if log and len(report.results) % 500 == 0:
                            log(f"  fuzz: {len(report.results)} cases, {dict(report.counts())}, "
                                f"{time.time() - start:.0f} s")
                    elif "done" in event:
                        slot["done"] = True
    finally:
        for fd, slot in list(slots.items()):
            os.kill(slot["pid"], signal.SIGKILL)
            os.waitpid(slot["pid"], 0)
            os.close(fd)
        report.seconds = time.time() - start
        report.results.sort(key=lambda r: r["case"])
        shutil.rmtree(root, ignore_errors=True)
    return report
