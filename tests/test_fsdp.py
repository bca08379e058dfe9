"""An adapter on a model sharded with FSDP2 (``fully_shard``), on two CPU processes (gloo): it trains
data-parallel, every process saves it whole (the shards gathered), and the file loads onto an unsharded
model to the sharded model's outputs and to the adapter one process trains on the whole batch.

accelerate applies FSDP only on accelerator devices (on a CPU machine its launcher falls back to plain
multi-process data parallelism), so the trainer's sharded runs are a GPU configuration (README); this
test runs the sharded-state path of the library itself with torch's own FSDP2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import fsdp_worker
from lycoris_lite.io.files import load_adapter

ROOT = Path(__file__).resolve().parents[1]


def test_fsdp2_sharded_adapter_saves_whole_and_reloads(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_addr", "127.0.0.1", "--master_port", str(port),
                             str(ROOT / "tests" / "fsdp_worker.py"), str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # one adapter, whole on both

    # the file on an unsharded model gives the sharded model's output
    fresh = fsdp_worker.models.build_tiny_flux_pipeline().transformer
    load_adapter({"transformer": fresh}, tmp_path / "rank0.safetensors", "a")
    with torch.no_grad():
        reloaded = fresh(**fsdp_worker.inputs(fresh, 1, seed=99)).sample
    torch.testing.assert_close(reloaded, torch.load(tmp_path / "sharded_output.pt"), atol=1e-5, rtol=1e-4)

    # and the adapter of one unsharded process on the whole batches (FSDP averages the two halves' grads)
    transformer, ctrl = fsdp_worker.build()
    fsdp_worker.train(transformer, ctrl, [fsdp_worker.inputs(transformer, 4, seed=step) for step in range(2)])
    with torch.no_grad():
        single = transformer(**fsdp_worker.inputs(transformer, 1, seed=99)).sample
    torch.testing.assert_close(reloaded, single, atol=1e-4, rtol=1e-3)
