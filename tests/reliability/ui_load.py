"""The web UI under load: ``ui/app.py`` in its own process, concurrent ``gradio_client`` sessions, each
image compared with its session's image rendered alone."""

from __future__ import annotations

import contextlib
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from .subjects import UI_APP, UI_SLOTS, child_env


#: one stack per client (the example adapters ``ui/app.py`` writes for the tiny model), in slot order
UI_STACKS = [
    [("outline", 0.8)],
    [("swap", 0.6), ("outline", 1.0)],
    [("zoom", -1.0), ("night", 1.0)],
    [("snow", 1.2), ("swap", 0.5), ("zoom", 0.7)],
    [("night", 0.4), ("snow", 0.9)],
    [("outline", 0.3), ("zoom", 1.1), ("night", -0.5)],
    [("snow", 0.6)],
    [("swap", 1.0), ("snow", -0.8), ("outline", 0.5)],
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ui_server(folder: Path, timeout: float = 300.0):
    """``python ui/app.py`` on the tiny model, on a free loopback port, in its own process: yields the URL."""
    import httpx

    port = _free_port()
    log = open(folder / "ui-server.log", "w")
    env = child_env(GRADIO_TEMP_DIR=str(folder / "gradio"), GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen([sys.executable, str(UI_APP), "--model", "tiny-sd", "--adapters", str(folder / "adapters"),
                             "--port", str(port), "--slots", str(UI_SLOTS), "--max-loaded", "16"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the UI exited ({proc.returncode}); see {folder / 'ui-server.log'}")
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise TimeoutError("the UI did not start")
            time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _slots(stack) -> list:
    values = []
    for i in range(UI_SLOTS):
        name, weight = stack[i] if i < len(stack) else (None, 1.0)
        values += [True, name, weight, None, None, None]
    return values


def _generate_args(seed: int, steps: int) -> list:
    return ["a photo of sks dog", "", seed, steps, 7, 64, 64, 1, "Default"]


def _image(result) -> "object":
    from PIL import Image

    return np.asarray(Image.open(result[0][0]["image"]).convert("RGB"))


def ui_load(folder: Path, clients: int = 8, generations: int = 25, steps: int = 2, time_limit: float = 900.0,
            request_timeout: float = 300.0) -> dict:
    """``clients`` gradio_client sessions on the UI (its own process, loopback), each with its own stack
    (:data:`UI_STACKS`) and seed: first each session's image alone (one session at a time), then all
    sessions at once, ``generations`` requests each; every image must equal its session's image alone.
    Latency is per request, from ``predict`` to its answer."""
    from gradio_client import Client

    folder.mkdir(parents=True, exist_ok=True)
    with ui_server(folder) as (url, proc):
        sessions = [Client(url, verbose=False, download_files=str(folder / f"downloads-{i}")) for i in range(clients)]
        try:
            alone = []
            for i, client in enumerate(sessions):
                client.predict(*_slots(UI_STACKS[i % len(UI_STACKS)]), api_name="/set_stack")
                alone.append(_image(client.predict(*_generate_args(100 + i, steps), api_name="/generate")))
            distinct = len({a.tobytes() for a in alone})
            latencies, mismatches, errors = [], Counter(), []
            deadline = time.time() + time_limit
            lock = threading.Lock()

            def work(i: int) -> None:
                client = sessions[i]
                for _ in range(generations):
                    if time.time() > deadline:
                        with lock:
                            errors.append(f"client {i}: out of time")
                        return
                    t0 = time.perf_counter()
                    try:
                        job = client.submit(*_generate_args(100 + i, steps), api_name="/generate")
                        image = _image(job.result(timeout=request_timeout))
                    except Exception as exc:  # noqa: BLE001 - a failed request is the figure
                        with lock:
                            errors.append(f"client {i}: {type(exc).__name__}: {str(exc)[:200]}")
                        continue
                    elapsed = time.perf_counter() - t0
                    with lock:
                        latencies.append(elapsed)
                        if not np.array_equal(image, alone[i]):
                            mismatches[i] += 1

            start = time.time()
            threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.time() - start
        finally:
            for client in sessions:
                client.close()
        alive = proc.poll() is None
    latencies.sort()
    q = (lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))]) if latencies else (lambda p: None)
    return {"clients": clients, "generations_each": generations, "steps": steps, "requests_served": len(latencies),
            "mismatches": sum(mismatches.values()), "errors": len(errors), "error_examples": errors[:5],
            "p50_seconds": round(q(0.5), 3) if latencies else None, "p95_seconds": round(q(0.95), 3) if latencies else None,
            "mean_seconds": round(statistics.fmean(latencies), 3) if latencies else None,
            "throughput_per_second": round(len(latencies) / wall, 2), "wall_seconds": round(wall, 1),
            "distinct_reference_images": distinct, "server_alive_after": alive}
