"""The pipeline checks of ``tests/pipeline_checks.py`` (what ``benchmarks/gpu_check.py`` runs) on a CUDA
GPU, marked ``gpu`` and skipped without one: every check but compile for every algorithm in float16 and
bfloat16 (the adapter is loaded, then the pipeline cast), and torch.compile for LoRA. One test runs the
checks that pass on the CPU today in float32, so the harness the script uses runs in CI too."""

from __future__ import annotations

import pytest
import torch

from lycoris_lite import ALGORITHMS
from lycoris_lite.models import build_tiny_sd_pipeline
from tests import pipeline_checks as checks

pytestmark = pytest.mark.usefixtures("one_thread")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (benchmarks/gpu_check.py runs the same checks where one is lent)")
HALF = [pytest.param(torch.float16, id="float16"), pytest.param(torch.bfloat16, id="bfloat16")]


def test_cpu_smoke_checks_pass_in_float32_and_a_failing_check_is_reported(tmp_path, monkeypatch):
    monkeypatch.setitem(checks.CHECKS, "crashes", lambda case: 1 / 0)
    results = checks.run_checks(tmp_path, "cpu", [torch.float32], ["lora"],
                                ["crashes", *checks.CPU_SMOKE, "model_offload"])
    outcome = {r.check: r for r in results}
    assert list(outcome) == ["crashes", *checks.CPU_SMOKE, "model_offload"]
    crashed = outcome.pop("crashes")
    assert crashed.status == "FAIL" and crashed.message == "ZeroDivisionError: division by zero"
    assert outcome.pop("model_offload").status == "SKIP"  # CPU offload on the CPU means nothing
    assert all(r.status == "PASS" for r in outcome.values()), [r.line() for r in outcome.values()]
    numbers = {name: r.numbers for name, r in outcome.items()}
    assert numbers["cast_after_loading"]["max_abs_diff_vs_base"] >= checks.MIN_EFFECT
    assert numbers["fuse"]["max_abs_diff"] <= checks.TOLERANCE[torch.float32]
    assert numbers["unfuse_bitexact"]["moved_by_fuse"] > 0 and numbers["unfuse_bitexact"]["differing_after_unfuse"] == 0
    assert numbers["disable_enable_fused"]["disabled_vs_base"] <= checks.TOLERANCE[torch.float32]
    assert (tmp_path / "lora.safetensors").is_file()


@pytest.fixture(scope="module")
def source():
    return build_tiny_sd_pipeline()


@pytest.fixture(scope="module")
def adapter_file(source, tmp_path_factory):
    """``algo -> file``, each written on first use."""
    folder, made = tmp_path_factory.mktemp("adapters"), {}

    def file_for(algo: str):
        if algo not in made:
            made[algo] = checks.adapter_file(source, folder, algo)
        return made[algo]

    return file_for


def passes(check: str, case: checks.Case) -> dict:
    result = checks.run_check(check, case)
    assert result.status == "PASS", result.line()
    return result.numbers


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
@pytest.mark.parametrize("check", [name for name in checks.CHECKS if name != "compile"])
def test_check_on_gpu(source, adapter_file, check, algo, dtype):
    passes(check, checks.Case(source, adapter_file(algo), algo, "cuda", dtype))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", HALF)
def test_compile_on_gpu_switches_weights_without_graph_breaks_or_recompiles(source, adapter_file, dtype):
    numbers = passes("compile", checks.Case(source, adapter_file("lora"), "lora", "cuda", dtype))
    assert numbers["graph_breaks"] == 0 and numbers["recompiles_on_weight_change"] == 0
