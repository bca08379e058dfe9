"""Every load reports its coverage: which of the file's modules were applied to which model modules,
and what matched nothing. Strict by default; ``strict=False`` applies what matches and lists the rest;
a load that applies nothing is always refused (loads that silently do nothing: diffusers #11659,
ComfyUI "lora key not loaded" #10973)."""

from __future__ import annotations

import io

import pytest
import torch

import lycoris_lite
from lycoris_lite import LoRAConfig, controller_for
from lycoris_lite.integrations import cli
from lycoris_lite.io.files import load_adapter, save_adapter
from lycoris_lite.io.formats.names import build_name_map
from lycoris_lite.io.formats.safe_io import read_state_dict, write_state_dict
from lycoris_lite.models import build_tiny_sd_pipeline

TARGETS = ["to_q", "to_v"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``(pipe, good file, file with a foreign module, file with only foreign modules)``."""
    pipe = build_tiny_sd_pipeline()
    ctrl = controller_for(pipe.unet)
    ctrl.add_adapter("a", LoRAConfig(r=2, target_modules=TARGETS, init_weights=False),
                     generator=torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("coverage")
    good = folder / "good.safetensors"
    save_adapter({"unet": pipe.unet}, "a", good)
    ctrl.unload()
    state, metadata = read_state_dict(good)
    foreign = {"lora_unet_no_such_block_to_q.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_no_such_block_to_q.lora_up.weight": torch.zeros(8, 2),
               "lora_unet_no_such_block_to_q.alpha": torch.tensor(2.0)}
    extra = folder / "extra.safetensors"
    write_state_dict(extra, {**{k: v.clone() for k, v in state.items()}, **foreign}, metadata)
    only_foreign = folder / "only_foreign.safetensors"
    write_state_dict(only_foreign, foreign, {})
    return pipe, good, extra, only_foreign


def test_coverage_maps_every_model_module_to_the_file_module_applied_to_it(files):
    pipe, good, extra, only_foreign = files
    info = load_adapter({"unet": pipe.unet}, good, "cov")
    try:
        to_file = build_name_map({"unet": pipe.unet})["unet"].to_file
        applied = info.coverage["unet"]
        assert len(applied) == info.components["unet"] > 0
        assert all(to_file[path] == name for path, name in applied.items())
        assert all(path.endswith(tuple(TARGETS)) for path in applied)
        assert info.skipped_keys == [] and info.coverage_line() == f"{len(applied)} module(s) applied (unet {len(applied)})"
    finally:
        controller_for(pipe.unet).delete_adapter("cov")


def test_strict_refuses_a_module_matching_nothing_and_strict_false_applies_the_rest_and_lists_it(files):
    pipe, good, extra, only_foreign = files
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(ValueError, match="no_such_block"):
        load_adapter({"unet": pipe.unet}, extra, "cov")
    assert controller_for(pipe.unet, create=False) is None or "cov" not in controller_for(pipe.unet).configs
    info = load_adapter({"unet": pipe.unet}, extra, "cov", strict=False)
    try:
        assert sorted(info.skipped_keys) == sorted(f"lora_unet_no_such_block_to_q.{k}" for k in
                                                   ("lora_down.weight", "lora_up.weight", "alpha"))
        assert "1 skipped, matching no layer: ['lora_unet_no_such_block_to_q']" in info.coverage_line()
        assert info.components["unet"] == len(info.coverage["unet"])
    finally:
        controller_for(pipe.unet).delete_adapter("cov")
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


def test_a_load_that_applies_nothing_is_refused_even_with_strict_false(files):
    pipe, good, extra, only_foreign = files
    for strict in (True, False):
        with pytest.raises(ValueError, match="no_such_block|no adapter tensors"):
            load_adapter({"unet": pipe.unet}, only_foreign, "none", strict=strict)


def test_the_pipeline_keeps_each_adapters_coverage(files):
    _, good, extra, only_foreign = files
    pipe = lycoris_lite.enable(build_tiny_sd_pipeline())
    pipe.load_adapter(extra, "x", strict=False)
    listed = pipe.list_adapters()["x"]
    assert listed["coverage"]["unet"] and all(name.startswith("lora_unet_") for name in listed["coverage"]["unet"].values())
    assert len(listed["skipped_keys"]) == 3
    pipe.load_adapter(good, "x", hotswap=True)
    listed = pipe.list_adapters()["x"]
    assert listed["skipped_keys"] == [] and listed["coverage"]["unet"]


def test_inspect_with_a_model_prints_the_coverage(files):
    _, good, extra, only_foreign = files
    out = io.StringIO()
    assert cli.main(["inspect", str(extra), "--model", "tiny-sd"], out=out) == 0
    text = out.getvalue()
    assert "on tiny-sd:" in text and "skipped, matching no layer: ['lora_unet_no_such_block_to_q']" in text
