"""Block-wise adapter weights on transformers: by block index per block group (Flux
``transformer_blocks`` / ``single_transformer_blocks``, Wan ``blocks``), as a number, a list or a dict,
checked as the UNet form is, and meaning exactly the per-layer scales they name."""

from __future__ import annotations

import pytest
import torch

import lycoris_lite
from lycoris_lite import PRESETS, LoRAConfig, controller_for, models
from lycoris_lite.integrations.weights import normalize_weight, transformer_layer_scales
from lycoris_lite.io.files import save_adapter

LAYERS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_q", "single_transformer_blocks.0.proj_mlp",
          "single_transformer_blocks.1.proj_mlp", "proj_out", "x_embedder"]


def test_a_number_a_list_or_a_dict_per_group_and_everything_else_at_one():
    scales = transformer_layer_scales({"transformer_blocks": [0.5, 0.25], "single_transformer_blocks": {"1": 0.0}},
                                      LAYERS)
    assert scales == {"transformer_blocks.0.attn.to_q": 0.5, "transformer_blocks.1.attn.to_q": 0.25,
                      "single_transformer_blocks.0.proj_mlp": 1.0, "single_transformer_blocks.1.proj_mlp": 0.0,
                      "proj_out": 1.0, "x_embedder": 1.0}
    assert set(transformer_layer_scales({"single_transformer_blocks": 0.3}, LAYERS).values()) == {0.3, 1.0}
    assert transformer_layer_scales({"transformer_blocks": [2.0]}, LAYERS)["transformer_blocks.1.attn.to_q"] == 1.0


@pytest.mark.parametrize("groups, message", [
    ({"double_blocks": 1.0}, r"block group 'double_blocks': the adapter has no layers there; it has layers in "
                             r"\['single_transformer_blocks', 'transformer_blocks'\]"),
    ({"transformer_blocks": [1.0, 1.0, 1.0]}, r"3 transformer_blocks weights, but the adapter has layers in 2"),
    ({"transformer_blocks": {"7": 1.0}}, r"transformer_blocks.7: the adapter's last adapted block there is "
                                         r"transformer_blocks.1"),
])
def test_groups_and_blocks_the_adapter_does_not_have_are_refused_naming_them(groups, message):
    with pytest.raises(ValueError, match=message):
        transformer_layer_scales(groups, LAYERS)


@pytest.mark.parametrize("value, message", [
    ({}, "names no block group"),
    ({"transformer blocks": 1.0}, "block groups are the transformer's block lists"),
    ({"transformer_blocks": []}, "empty list"),
    ({"transformer_blocks": {"first": 1.0}}, "block keys are block indices"),
    ({"transformer_blocks": float("nan")}, "finite number"),
    ({"transformer_blocks": [1.0, "x"]}, "finite number"),
])
def test_malformed_block_weights_are_refused_before_anything_changes(value, message):
    with pytest.raises(ValueError, match=message):
        normalize_weight({"transformer": value}, ["transformer", "text_encoder"])


def test_block_weights_on_a_flux_pipeline_scale_exactly_the_layers_they_name(tmp_path):
    pipe = lycoris_lite.enable(models.build_tiny_flux_pipeline())
    controller_for(pipe.transformer).add_adapter("a", LoRAConfig(r=2, target_modules=PRESETS["flux-attn-mlp"],
                                                                 init_weights=False),
                                                 generator=torch.Generator().manual_seed(0))
    save_adapter({"transformer": pipe.transformer}, "a", tmp_path / "a.safetensors")
    controller_for(pipe.transformer).unload()
    pipe.load_adapter(tmp_path / "a.safetensors", "a")
    pipe.set_adapters(["a"], [{"transformer": {"transformer_blocks": [0.0, 0.5], "single_transformer_blocks": 2.0}}])
    ctrl = controller_for(pipe.transformer)
    got = {path: layer.adapters["a"].scale for path, layer in ctrl.layers() if "a" in layer.adapters}
    assert got and all(
        s == (0.0 if p.startswith("transformer_blocks.0.") else 0.5 if p.startswith("transformer_blocks.1.")
              else 2.0 if p.startswith("single_transformer_blocks.") else 1.0) for p, s in got.items())
    before = pipe.list_adapters()["a"]["weight"]
    with pytest.raises(ValueError, match="no layers there"):
        pipe.set_adapters(["a"], [{"transformer": {"blocks": 1.0}}])
    assert pipe.list_adapters()["a"]["weight"] == before  # a refusal changes nothing
    assert {path: layer.adapters["a"].scale for path, layer in ctrl.layers() if "a" in layer.adapters} == got
