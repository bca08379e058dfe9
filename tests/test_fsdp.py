"""Sharded training with FSDP2 on two CPU processes (gloo).

* The library: an adapter on a model sharded with torch's ``fully_shard`` trains data-parallel, every
  process saves it whole (the shards gathered), and the file loads onto an unsharded model to the sharded
  model's outputs and to the adapter one process trains on the whole batch.
* The trainer through accelerate's FSDP2 (``pipelines/accelerate_fsdp.yaml``, the config README shows):
  accelerate applies FSDP on accelerator devices only, so the processes start through
  ``tests/accelerate_fsdp_cpu.py``, which makes accelerate's one device decision for the CPU; everything
  after it (the plugin from the config, ``prepare``'s ``fully_shard`` per block) is accelerate's own.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

import fsdp_worker
from lycoris_lite.io.files import load_adapter
from test_train_dreambooth import SCRIPT, run
from test_train_transformers import transformer_args

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}


def free_port() -> int:
    """A free port for a rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_fsdp2_sharded_adapter_saves_whole_and_reloads(tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                             str(ROOT / "tests" / "fsdp_worker.py"), str(tmp_path)],
                            env=ENV, capture_output=True, text=True, timeout=300)
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


def sharded_command(argv: list[str]) -> list[str]:
    """The trainer under ``accelerate launch --config_file pipelines/accelerate_fsdp.yaml`` on 2 CPU processes
    (float32: the comparisons below are of float32 runs)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "pipelines" / "accelerate_fsdp.yaml"), "--mixed_precision", "no", "--num_processes", "2",
            "--main_process_port", str(free_port()), str(ROOT / "tests" / "accelerate_fsdp_cpu.py"), str(SCRIPT),
            *[str(a) for a in argv]]


def test_trainer_sharded_by_accelerate_fsdp2_resumes_after_sigkill_and_equals_one_process(tmp_path):
    """LoKr on tiny Flux, the transformer sharded per block across 2 processes (batch 1 each).

    * Killed (SIGKILL, every process) after its checkpoint at step 4 and resumed sharded from step 2, it
      writes at step 4 the killed run's own (uninterrupted) checkpoint adapter, bit for bit.
    * Its final adapter equals that of one unsharded process accumulating 2 batches of 1 (the same global
      batch; the draws are functions of the sample position) within 1e-6 (absolute, on tensors up to 4):
      the runs differ only in float32 reduction order (the gradient norm summed per shard, FSDP's
      reduce-scatter), while a lost gradient half, a skipped clip (``max_grad_norm`` 0.01 clips every
      step) or lost Adam moments move parameters by ~lr = 1e-3.
    """
    steps = dict(algo="lokr", rank=4, factor=4, max_train_steps=8, checkpointing_steps=2, max_grad_norm=0.01,
                 gradient_checkpointing=True)
    out = tmp_path / "sharded"
    launcher = subprocess.Popen(sharded_command(transformer_args(out, "tiny-flux", **steps)), env=ENV, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoint-4").is_dir() and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    for proc in [*psutil.Process(launcher.pid).children(recursive=True), psutil.Process(launcher.pid)]:
        proc.send_signal(signal.SIGKILL)  # the workers first: they write
    launcher.wait()
    file = "dreambooth_lokr.safetensors"
    assert (out / "checkpoint-4").is_dir() and not (out / file).exists(), "the run ended before it was killed"
    uninterrupted = load_file(out / "checkpoint-4" / file)
    # the optimizer state gathered whole, keyed by parameter name
    moments = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)["state"]
    assert moments["transformer_blocks.0.attn.to_q.adapters.dreambooth.lokr_w1"]["exp_avg"].shape == (4, 4)

    result = subprocess.run(sharded_command(transformer_args(
        out, "tiny-flux", resume_from_checkpoint="checkpoint-2", validation_prompt="sks duck", validation_steps=1000,
        num_inference_steps=2, num_validation_images=1, **steps)),
        env=ENV, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es), sharded (FSDP2)" in result.stdout and "resumed from" in result.stdout
    resumed = load_file(out / "checkpoint-4" / file)
    assert set(resumed) == set(uninterrupted) and all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert (out / "validation" / "step_8" / "0.png").is_file()  # rendered by both processes, written by one

    assert run(transformer_args(tmp_path / "one", "tiny-flux", gradient_accumulation_steps=2, **steps)) == 0
    a, b = load_file(tmp_path / "one" / file), load_file(out / file)
    assert set(a) == set(b) and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6

    # its checkpoint does not resume unsharded (the optimizer state's layout differs): refused, nothing written
    elsewhere = tmp_path / "unsharded"
    assert run(transformer_args(elsewhere, "tiny-flux", resume_from_checkpoint=out / "checkpoint-2", **steps)) == 2
    assert not elsewhere.exists()


def test_sharded_runs_refuse_what_fsdp_cannot_do_before_writing(tmp_path, monkeypatch, capsys):
    """The trainer as accelerate's FSDP would make it (``sharding.is_sharded``): FSDP1, a trained text
    encoder, class images still to render and an unsharded run's checkpoint stop it with the reason before
    anything is written; the options whose extras may be missing here go through ``sharding.check``."""
    from accelerate import Accelerator

    from lycoris_lite.integrations.training import options, sharding
    from test_train_dreambooth import base_args

    monkeypatch.setattr(sharding, "is_sharded", lambda accelerator: True)
    monkeypatch.setattr(Accelerator, "is_fsdp2", property(lambda self: False))
    out = tmp_path / "out"
    assert run(base_args(out)) == 2
    assert "fsdp_version: 2" in capsys.readouterr().err
    monkeypatch.setattr(Accelerator, "is_fsdp2", property(lambda self: True))
    assert run(base_args(out, train_text_encoder=True)) == 2
    assert "one model with its optimizer" in capsys.readouterr().err
    assert run(base_args(out, with_prior_preservation=True, class_data_dir=tmp_path / "class",
                         class_prompt="a photo of a duck", num_class_images=2)) == 2
    assert "holds 0 of the 2 class images" in capsys.readouterr().err
    assert not out.exists()

    accelerator = type("Sharded", (), {"distributed_type": "FSDP", "is_fsdp2": True, "num_processes": 2})()
    for option, value in {"base_quantization": "nf4", "use_8bit_adam": True, "regularization_weight": 0.1}.items():
        args = options.parse_args([str(a) for a in base_args(out)])
        setattr(args, option, value)
        with pytest.raises(sharding.TrainingInputError, match=f"--{option} with FSDP"):
            sharding.check(accelerator, args)
    unsharded = type("Checkpoint", (), {"path": "checkpoint-2", "optimizer": {"param_groups": [{"params": [0, 1]}]}})
    with pytest.raises(sharding.TrainingInputError, match="written by an unsharded run"):
        sharding.check(accelerator, options.parse_args([str(a) for a in base_args(out)]), unsharded)

    # an FSDP config on a CPU machine: accelerate runs it data-parallel, and the trainer says so
    monkeypatch.undo()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    data_parallel = type("DataParallel", (), {"distributed_type": "MULTI_CPU", "num_processes": 2})()
    with pytest.warns(UserWarning, match="FSDP on accelerator devices only"):
        assert sharding.check(data_parallel, options.parse_args([str(a) for a in base_args(out)])) is False
