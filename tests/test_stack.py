"""The stack: one immutable value per model (``controller.stack``) and per pipeline, checked whole, then
applied in one place; the layers' active lists and the slots' scales are only its layout."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from lycoris_lite import AdapterModel, LoRAConfig, OFTConfig
from lycoris_lite.core.layer import AdapterLayer
from lycoris_lite.core.stack import LayerWeights, Stack


def model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    m = AdapterModel(net, LoRAConfig(r=2, target_modules=["0", "1"], init_weights=False), "a")
    m.add_adapter("b", OFTConfig(block_size=4, target_modules=["1"], init_weights=False))
    return m


def layout(m):
    """What the layers hold: active lists, on/off and every slot's scale."""
    return {n: (list(layer.active), layer.disabled, {k: s.scale for k, s in layer.adapters.items()})
            for n, layer in m.model.named_modules() if isinstance(layer, AdapterLayer)}


def test_a_stack_is_an_immutable_checked_value():
    stack = Stack(["a", "b"], {"a": 0.5, "b": LayerWeights(1.0, {"1": 0.25})})
    with pytest.raises(dataclasses.FrozenInstanceError):
        stack.enabled = False
    with pytest.raises(TypeError):
        stack.weights["a"] = LayerWeights(2.0)
    assert stack.weight("a", "0") == 0.5 and stack.weight("b", "1") == 0.25 and stack.weight("b", "0") == 1.0
    assert stack.weight("unknown", "0") == 1.0
    for bad in (float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="finite number"):
            Stack(["a"], {"a": bad})
    with pytest.raises(ValueError, match="repeat"):
        Stack(["a", "a"])
    assert stack.without(["a"]) == Stack(["b"], {"b": LayerWeights(1.0, {"1": 0.25})})
    import copy
    import pickle

    assert copy.deepcopy(stack) == stack and pickle.loads(pickle.dumps(stack)) == stack  # copy.deepcopy(pipe) works


def test_the_layers_are_the_stack_laid_out_and_a_refused_stack_changes_nothing():
    m = model()
    ctrl = m.controller
    ctrl.set_adapters(["b", "a"], [0.5, 0.75])
    assert ctrl.stack.names == ("b", "a") and ctrl.active == ["b", "a"]
    assert layout(m) == {"0": (["a"], False, {"a": 0.75}), "1": (["b", "a"], False, {"a": 0.75, "b": 0.5})}
    ctrl.set_scale("a", 0.1, layers=["1"])  # per layer
    assert ctrl.stack.weight("a", "1") == 0.1 and ctrl.stack.weight("a", "0") == 0.75
    before = (ctrl.stack, layout(m))
    for bad in (Stack(["a", "nope"]), Stack(["a"], {"b": LayerWeights(1.0, {"0": 2.0})})):  # unknown; not on layer 0
        with pytest.raises(ValueError):
            ctrl.apply_stack(bad)
        assert (ctrl.stack, layout(m)) == before
    with ctrl.disable_adapter():
        assert all(disabled for _, disabled, _ in layout(m).values()) and not ctrl.enabled
    assert (ctrl.stack, layout(m)) == before


def test_a_fused_adapter_keeps_its_weight_until_unfused():
    m = model()
    ctrl = m.controller
    ctrl.set_adapters(["a"], 0.5)
    ctrl.merge_adapter()
    before = (ctrl.stack, layout(m))
    with pytest.raises(ValueError, match="fused"):
        ctrl.set_scale("a", 0.7)
    with pytest.raises(ValueError, match="fused"):
        ctrl.apply_stack(ctrl.stack.with_weights({"a": 0.7}))
    assert (ctrl.stack, layout(m)) == before
    ctrl.unmerge_adapter()
    ctrl.set_scale("a", 0.7)
    assert ctrl.stack.weight("a", "0") == 0.7


def test_pipeline_stack_changes_are_all_or_nothing(tmp_path):
    """A load whose block-wise weight does not fit, or a stack that drops a fused adapter, is refused
    with nothing attached and every component's stack as it was."""
    from lycoris_lite import enable
    from lycoris_lite.models import build_tiny_sd_pipeline
    from tests.pipeline_checks import make_file

    pipe = enable(build_tiny_sd_pipeline())
    first = make_file(pipe, tmp_path / "first.safetensors", algo="lora")
    second = make_file(pipe, tmp_path / "second.safetensors", algo="loha", seed=1)
    pipe.load_adapter(first, scale=0.5)
    stacks = {c: getattr(pipe, c).__dict__["_lycoris_controller"].stack for c in ("unet", "text_encoder")}
    with pytest.raises(ValueError, match="block weights"):
        pipe.load_adapter(second, unet_scale={"down": [1.0] * 9})
    assert list(pipe.list_adapters()) == ["first"]
    assert not any("second" in layer.adapters for layer in pipe.unet.modules() if isinstance(layer, AdapterLayer))
    assert {c: getattr(pipe, c).__dict__["_lycoris_controller"].stack for c in stacks} == stacks
    pipe.load_adapter(second)
    pipe.fuse_adapters(["first"])
    before = (pipe.get_active_adapters(), {c: getattr(pipe, c).__dict__["_lycoris_controller"].stack for c in stacks})
    with pytest.raises(ValueError, match="fused"):
        pipe.set_adapters(["second"])
    assert (pipe.get_active_adapters(), {c: getattr(pipe, c).__dict__["_lycoris_controller"].stack
                                         for c in stacks}) == before
    assert pipe.list_adapters()["first"]["weight"] == {"unet": 0.5, "text_encoder": 0.5}
