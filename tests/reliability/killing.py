"""Processes SIGKILLed mid-write: adapter saves, training-checkpoint writes and whole DreamBooth runs.
Whatever is visible afterwards must be one complete version, never a partial or mixed one."""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file

from lycoris_lite.integrations.training import checkpoint
from lycoris_lite.io.formats.safe_io import write_state_dict

from .file_bytes import load_tensors, split_safetensors
from .memory import MiB
from .subjects import SETTINGS, TRAINER, make_adapter, trainer_args, child_env


def _content(file: Path):
    """What a file holds, compared by meaning: a safetensors file's metadata and each tensor's dtype,
    shape and bytes (safetensors writes its metadata map in a random order), a JSON file's value, or
    the raw bytes (also of anything that does not parse)."""
    blob = file.read_bytes()
    try:
        if file.suffix == ".safetensors":
            header, data = split_safetensors(blob)
            tensors = {k: (v["dtype"], tuple(v["shape"]), data[v["data_offsets"][0]:v["data_offsets"][1]])
                       for k, v in header.items() if k != "__metadata__"}
            if sum(len(t[2]) for t in tensors.values()) != len(data):
                return ("unreadable", blob)
            return (header.get("__metadata__"), tensors)
        if file.suffix == ".json":
            return json.loads(blob)
    except (ValueError, KeyError, TypeError, struct.error):
        return ("unreadable", blob)
    return blob


def _snapshot(path: Path) -> dict | None:
    """The content of the file at ``path``, or of every (non-hidden) file under the folder ``path``."""
    if path.is_file():
        return {"": _content(path)}
    if path.is_dir():
        return {str(p.relative_to(path)): _content(p) for p in sorted(path.rglob("*"))
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)}
    return None


def _temporaries(folder: Path) -> list[Path]:
    """Hidden entries in ``folder``: what a killed writer leaves beside its target."""
    return [p for p in folder.glob(".*")]


def _fork_writer(write, first: int) -> int:
    """Fork a child that calls ``write(first)``, ``write(first + 1)``, … until it is killed; its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            torch.set_num_threads(1)
            i = first
            while True:
                write(i)
                i += 1
        finally:
            os._exit(1)
    return pid


def kill_during_writes(write, versions: list, target: Path, kills: int, seed: int = 0, max_delay: float | None = None,
                       verify=None, time_limit: float = 600.0) -> dict:
    """SIGKILL a process that writes ``target`` over and over, at random moments, ``kills`` times.

    ``write(version)`` writes one complete version of ``target``; the killed process (a fork of this
    one) writes ``versions[0], versions[1], versions[0], …`` without pause. Before the first kill
    ``target`` holds ``versions[0]``. After each kill the content of ``target`` (:func:`_content`) must
    equal one of the versions' (each version written once beforehand to learn them); ``verify(target)`` may check
    more (e.g. that the file loads). The delay before each kill is uniform in ``[0, max_delay]``
    (default: three times the time one write takes), so kills land in every phase of a write:
    converting, writing the bytes, flushing, renaming. Hidden temporaries a kill leaves beside
    ``target`` are counted; the library removes them at the next write, which the end checks."""
    rng = random.Random(seed)
    expected = []
    for v in versions:
        write(v)
        expected.append(_snapshot(target))
    t0 = time.perf_counter()
    write(versions[0])
    one_write = time.perf_counter() - t0
    max_delay = max_delay if max_delay is not None else 3 * one_write
    found, most_temporaries, problems, done = Counter(), 0, [], 0
    start = time.time()
    for k in range(kills):
        if time.time() - start > time_limit:
            break
        pid = _fork_writer(lambda i: write(versions[i % len(versions)]), 1)
        time.sleep(rng.uniform(0, max_delay))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        done += 1
        now = _snapshot(target)
        match = next((i for i, e in enumerate(expected) if e == now), None)
        if match is None:
            problems.append(f"kill {k}: {target.name} is neither version "
                            f"({'missing' if now is None else sorted(now)})")
        else:
            found[match] += 1
        if verify is not None and match is not None:
            try:
                verify(target)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"kill {k}: {target.name} does not load: {exc}")
        most_temporaries = max(most_temporaries, len(_temporaries(target.parent)))
    write(versions[0])  # a later save removes what killed writers left
    return {"kills": done, "versions_found": {f"v{i}": found[i] for i in range(len(versions))},
            "partial_or_mixed": len(problems), "problems": problems[:10],
            "most_temporaries_at_once": most_temporaries,
            "temporaries_after_next_save": len(_temporaries(target.parent)),
            "write_seconds": round(one_write, 3), "max_delay_seconds": round(max_delay, 3)}


def adapter_versions(pipe, folder: Path, fmt: str = "kohya", big_metadata: int = 4 * MiB) -> tuple[list, Path]:
    """Two adapters on ``pipe`` (different algorithms, ranks and values) and the file that takes turns
    holding them; a large ``ss_tag_frequency`` makes the bytes-writing phase long enough to be hit."""
    folder.mkdir(parents=True, exist_ok=True)
    algos = ("lora", "lokr") if fmt == "kohya" else ("lora", "lora")
    settings = [{"r": 4}, {"r": 8} if fmt != "kohya" else SETTINGS["lokr"]]
    paths = [make_adapter(pipe, folder / f"v{i}" / ("v.safetensors" if fmt != "peft" else "v"), algo, fmt,
                          seed=50 + i, settings=s, targets="unet-attn-ff")
             for i, (algo, s) in enumerate(zip(algos, settings))]
    for i, path in enumerate(paths):
        pipe.load_adapter(path, f"v{i}")
    metadata = {"ss_tag_frequency": json.dumps({"tags": "x" * big_metadata})}
    target = folder / ("adapter.safetensors" if fmt != "peft" else "adapter")
    return [(f"v{i}", metadata) for i in range(2)], target


def killed_training(folder: Path, kills: int = 3, steps: int = 24, every: int = 2, algo: str = "lora",
                    seed: int = 0, time_limit: float = 1500.0, log=None) -> dict:
    """A DreamBooth run SIGKILLed ``kills`` times at random moments (each time after a random checkpoint
    of the ones still to come has been written, leaving room for the kills after it, plus a random delay
    of up to one checkpoint interval, as measured in the uninterrupted run, so a kill lands anywhere in a
    step or a checkpoint write), resumed
    with ``--resume_from_checkpoint latest`` each time (without ``--seed``: it comes back from the
    checkpoint), against the same run uninterrupted. float32; the figure is the largest difference
    between the two adapters' tensors."""
    rng = random.Random(seed)
    options = dict(max_train_steps=steps, checkpointing_steps=every, checkpoints_total_limit=2, algo=algo,
                   train_batch_size=1)
    name = f"dreambooth_{algo}.safetensors"
    start = time.time()
    reference = folder / "reference"
    t0 = time.time()
    folder.mkdir(parents=True, exist_ok=True)
    errors = open(folder / "reference.log", "w+b")
    proc = subprocess.Popen([sys.executable, str(TRAINER), *trainer_args(reference, **options)], env=child_env(),
                            stdout=errors, stderr=errors)
    seen = {}  # checkpoint step -> when it appeared: the interval between checkpoints bounds the delays
    while proc.poll() is None:
        if time.time() - start > time_limit:
            proc.kill()
            raise TimeoutError("killed_training ran out of time")
        now = time.time()
        for p in reference.glob("checkpoint-*"):
            seen.setdefault(int(p.name.split("-")[1]), now)
        time.sleep(0.01)
    with errors:
        errors.seek(0)
        if proc.returncode:
            raise RuntimeError(f"the uninterrupted run failed: {errors.read().decode()[-2000:]}")
    run_seconds = time.time() - t0
    times = [seen[s] for s in sorted(seen)]
    interval = statistics.median(b - a for a, b in zip(times, times[1:])) if len(times) > 2 else run_seconds / steps
    out = folder / "killed"
    killed_at, partial = [], []
    for k in range(kills + 1):
        resume = {"resume_from_checkpoint": "latest", "seed": None} if k else {}
        proc = subprocess.Popen([sys.executable, str(TRAINER), *trainer_args(out, **options, **resume)],
                                env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if k == kills:
            proc.wait(timeout=max(60.0, time_limit - (time.time() - start)))
            break
        done = [int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")] if out.exists() else []
        # a kill lands at most one checkpoint past its target: two intervals of room for each later kill
        first, last = max(done, default=0) + every, steps - 2 * every * (kills - k)
        target = rng.randrange(first, last + 1, every) if first <= last else first
        while not (out / f"checkpoint-{target}").is_dir() and proc.poll() is None:
            if time.time() - start > time_limit:
                proc.kill()
                raise TimeoutError("killed_training ran out of time")
            time.sleep(0.02)
        time.sleep(rng.uniform(0, interval))
        proc.kill()
        proc.wait()
        if proc.returncode != -signal.SIGKILL:
            raise RuntimeError(f"the run ended (status {proc.returncode}) before it could be killed")
        latest = max((int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")), default=0)
        killed_at.append(latest)
        for p in out.rglob("*.safetensors"):  # every visible file is complete
            if not any(part.startswith(".") for part in p.relative_to(out).parts):
                try:
                    load_file(str(p))
                except Exception as exc:  # noqa: BLE001
                    partial.append(f"{p.relative_to(out)}: {exc}")
        if log:
            log(f"  training: kill {k + 1} after checkpoint-{latest}")
    a, b = load_file(str(reference / name)), load_file(str(out / name))
    worst = max(float((a[key] - b[key]).abs().max()) for key in a) if a.keys() == b.keys() else float("inf")
    return {"steps": steps, "checkpoint_every": every, "algo": algo, "kills": len(killed_at),
            "killed_after_checkpoints": killed_at, "max_difference": worst, "same_keys": a.keys() == b.keys(),
            "partial_files_seen": partial, "hidden_leftovers": sorted(str(p.relative_to(out)) for p in out.rglob(".*")),
            "uninterrupted_run_seconds": round(run_seconds, 1), "checkpoint_interval_seconds": round(interval, 3),
            "seconds": round(time.time() - start, 1)}


def checkpoint_kill_writes(folder: Path, kills: int, seed: int = 0, size: int = 1 << 20,
                           time_limit: float = 600.0) -> dict:
    """A process writing training checkpoints (``lycoris_lite.integrations.training.checkpoint.save``: adapter state,
    optimizer, scheduler, state.json and the adapter file, keeping the newest two) SIGKILLed at random
    moments, ``kills`` times. After each kill every ``checkpoint-N`` folder must load and hold exactly
    step N's content, and ``latest()`` must name a complete one; the next process resumes from it."""
    rng = random.Random(seed)
    out = folder / "checkpoints"

    def content(step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(step)
        return {"unet.layer.lora_down": torch.randn(size // 8, 2, generator=g),
                "unet.layer.lora_up": torch.full((size // 8, 2), float(step))}

    def write(step: int) -> None:
        param = torch.nn.Parameter(torch.zeros(4))
        optimizer = torch.optim.AdamW([param], lr=0.1)
        param.grad = torch.full((4,), float(step))
        optimizer.step()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        state = content(step)
        checkpoint.save(out, step, adapter_state=state, optimizer_state=optimizer.state_dict(),
                        scheduler=scheduler, state={"seed": 0}, total_limit=2,
                        extra=lambda f: save_tensors_file(f / "adapter.safetensors", state))

    write(1)  # warm-up (imports)
    t0 = time.perf_counter()
    write(1)
    one = time.perf_counter() - t0
    step, problems, done, found = 2, [], 0, Counter()
    start = time.time()
    for k in range(kills):
        if time.time() - start > time_limit:
            break
        pid = _fork_writer(write, step)
        time.sleep(rng.uniform(0, 3 * one))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        done += 1
        visible = sorted(p for p in out.glob("checkpoint-*"))
        complete = dict((p, s) for s, p in checkpoint.checkpoints(out))
        for p in visible:
            if p not in complete:
                problems.append(f"kill {k}: {p.name} has no state.json (a partial checkpoint)")
                continue
            try:
                loaded = checkpoint.load(p)
                expected = content(complete[p])
                same = loaded.step == complete[p] and loaded.adapter_state.keys() == expected.keys() and all(
                    torch.equal(loaded.adapter_state[key], expected[key]) for key in expected)
                adapter, _ = load_tensors((p / "adapter.safetensors").read_bytes())
                same = same and all(torch.equal(adapter[key], expected[key]) for key in expected)
                if not same:
                    problems.append(f"kill {k}: {p.name} holds other content than step {complete[p]}")
            except Exception as exc:  # noqa: BLE001
                problems.append(f"kill {k}: {p.name} does not load: {exc}")
        latest = checkpoint.latest(out)
        if latest is None:
            problems.append(f"kill {k}: no complete checkpoint")
        else:
            found["newest"] += 1
            step = int(latest.name.split("-")[1]) + 1
    checkpoint.remove_temporaries(out)
    return {"kills": done, "problems": len(problems), "examples": problems[:5], "write_seconds": round(one, 3),
            "checkpoints_written": step - 1, "hidden_leftovers_after_cleanup": len(list(out.rglob(".*")))}


def save_tensors_file(path: Path, state: dict[str, torch.Tensor]) -> None:
    write_state_dict(path, state)
