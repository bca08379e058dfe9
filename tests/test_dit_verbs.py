"""The remaining verbs on transformer pipelines: ``hotswap=True`` (same layers, other weights and alpha),
``disable_adapters``/``enable_adapters``, ``combine_adapters`` on Wan 2.2's two experts, and
``delete_adapters`` back to the exact base."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import lycoris_lite
from lycoris_lite import PRESETS, LoKrConfig, LoRAConfig, controller_for, models
from lycoris_lite.io.files import save_adapter


def render(pipe, **kwargs) -> np.ndarray:
    out = pipe(prompt="a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0), **kwargs)
    return np.asarray(out.frames if hasattr(out, "frames") else out.images)


def make_file(pipe, components, config, seed, path):
    for c in components:
        controller_for(getattr(pipe, c)).add_adapter("tmp", config, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            for p in controller_for(getattr(pipe, c)).trainable_parameters(["tmp"]):
                p.mul_(4.0)
    save_adapter({c: getattr(pipe, c) for c in components}, "tmp", path)
    for c in components:
        controller_for(getattr(pipe, c)).unload()
    return path


def build(name):
    pipe = lycoris_lite.enable(models.TINY_PIPELINES[name](seed=0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("config", [LoRAConfig(r=4, alpha=2.0, target_modules=PRESETS["flux-attn-mlp"], init_weights=False),
                                    LoKrConfig(r=4, factor=4, target_modules=PRESETS["flux-attn-mlp"], init_weights=False)],
                         ids=["lora", "lokr"])
def test_hotswap_disable_enable_on_flux(tmp_path, config):
    maker = models.build_tiny_flux_pipeline()
    first = make_file(maker, ["transformer"], config, 1, tmp_path / "first.safetensors")
    other = dataclasses.replace(config, alpha=3.0)  # another alpha: the hotswap changes the scale too
    second = make_file(maker, ["transformer"], other, 2, tmp_path / "second.safetensors")
    pipe = build("tiny-flux")
    base = render(pipe)
    pipe.load_adapter(first, "a", scale=0.7)
    layers_before = {path: layer for path, layer in controller_for(pipe.transformer).layers()}
    pipe.load_adapter(second, "a", hotswap=True, scale=0.7)  # the call states its weight, as a load does
    assert {path: layer for path, layer in controller_for(pipe.transformer).layers()} == layers_before  # in place
    fresh = build("tiny-flux")
    fresh.load_adapter(second, "a", scale=0.7)
    np.testing.assert_array_equal(render(pipe), render(fresh))
    pipe.disable_adapters()
    np.testing.assert_array_equal(render(pipe), base)
    pipe.enable_adapters()
    np.testing.assert_array_equal(render(pipe), render(fresh))
    pipe.delete_adapters("a")
    np.testing.assert_array_equal(render(pipe), base)


def test_combine_adapters_on_both_wan22_experts(tmp_path):
    config = LoRAConfig(r=2, target_modules=PRESETS["wan-attn"], init_weights=False)
    maker = models.build_tiny_wan22_pipeline()
    files = [make_file(maker, ["transformer", "transformer_2"], config, s, tmp_path / f"{s}.safetensors") for s in (1, 2)]
    pipe = build("tiny-wan22")
    base = render(pipe, num_frames=5)
    for i, f in enumerate(files):
        pipe.load_adapter(f, f"s{i}")
    pipe.set_adapters(["s0", "s1"], [0.5, 0.5])
    stacked = render(pipe, num_frames=5)
    pipe.combine_adapters(["s0", "s1"], [0.5, 0.5], "both", combination_type="cat")
    assert set(pipe.list_adapters()["both"]["components"]) == {"transformer", "transformer_2"}
    pipe.set_adapters(["both"], [1.0])
    np.testing.assert_allclose(render(pipe, num_frames=5), stacked, atol=1e-5, rtol=0)  # cat: exact sum of the LoRAs
    assert np.abs(stacked - base).max() > 1e-4
    pipe.unload_adapters()
    np.testing.assert_array_equal(render(pipe, num_frames=5), base)
