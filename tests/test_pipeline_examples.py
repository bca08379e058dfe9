"""The PEFT-style examples run on the tiny Stable Diffusion pipeline, and README's code runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lycoris_lite import ALGORITHMS, PRESETS, AdapterModel, HRAConfig, HRAModel
from lycoris_lite.core.layer import AdapterLayer
from lycoris_lite.base.registry import get_algorithm
from lycoris_lite.models import build_tiny_sd_pipeline

ROOT = Path(__file__).resolve().parents[1]
TE_TARGETS = ["k_proj", "q_proj", "v_proj", "out_proj", "fc1", "fc2"]
UNET_TARGETS = ["proj_in", "proj_out", "to_k", "to_q", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def render(pipe, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return pipe("a photo of sks dog", num_inference_steps=3, guidance_scale=6.0, generator=generator,
                output_type="np").images


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_sd_pipeline(seed=0)


def test_hra_example_runs_and_perturbed_weights_change_the_image(pipe):
    base = render(pipe)
    unet, text_encoder = pipe.unet, pipe.text_encoder
    config_te = HRAConfig(r=8, target_modules=TE_TARGETS, init_weights=True)
    config_unet = HRAConfig(r=8, target_modules=UNET_TARGETS, init_weights=True)
    try:
        pipe.text_encoder = HRAModel(pipe.text_encoder, config_te, "default")
        pipe.unet = HRAModel(pipe.unet, config_unet, "default")
        assert sum(isinstance(m, AdapterLayer) for m in pipe.unet.modules()) > 50
        identity = render(pipe)
        assert np.abs(identity - base).max() < 1e-4  # even r: the identity at start
        torch.manual_seed(1)
        with torch.no_grad():
            for p in pipe.unet.controller.trainable_parameters() + pipe.text_encoder.controller.trainable_parameters():
                p.add_(torch.randn_like(p))
        perturbed = render(pipe)
        assert np.abs(perturbed - base).max() > 1e-2
        pipe.unet.merge_adapter()
        pipe.text_encoder.merge_adapter()
        assert np.abs(render(pipe) - perturbed).max() < 1e-4
    finally:
        pipe.unet = pipe.unet.unload() if pipe.unet is not unet else unet
        pipe.text_encoder = pipe.text_encoder.unload() if pipe.text_encoder is not text_encoder else text_encoder
    assert np.array_equal(render(pipe), base)


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_every_algorithm_on_the_tiny_pipeline_fuses_and_unloads_exactly(pipe, algo):
    base = render(pipe)
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    settings = {"lora": {"r": 4}, "loha": {"r": 4, "alpha": 16}, "lokr": {"r": 4}, "oft": {"block_size": 4},
                "boft": {"block_size": 4, "butterfly_factor": 2}, "hra": {"r": 4}}[algo]
    cfg = get_algorithm(algo).config_class(**settings, target_modules=PRESETS["unet-full"], init_weights=False)
    unet = pipe.unet
    pipe.unet = AdapterModel(unet, cfg, algo)
    try:
        unfused = render(pipe)
        assert np.abs(unfused - base).max() > 1e-3
        pipe.unet.merge_adapter()
        assert np.abs(render(pipe) - unfused).max() < 2e-4
        with pytest.raises(RuntimeError, match="adapters attached"):
            unet.save_pretrained("/nonexistent")
    finally:
        pipe.unet = pipe.unet.unload()
    assert pipe.unet is unet
    assert all(torch.equal(v, state[k]) for k, v in pipe.unet.state_dict().items())
    assert np.array_equal(render(pipe), base)


def test_readme_python_example_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})


def test_typed_models_take_their_own_config_only_and_peft_spellings_port():
    """``LoRAModel`` … ``HRAModel`` refuse another algorithm's config (PEFT's classes are typed too), before
    touching the model; ``LoraConfig``/``LoraModel`` are the same classes as ours."""
    import lycoris_lite

    net = torch.nn.Sequential(torch.nn.Linear(8, 8))
    before = [type(m) for m in net.modules()]
    with pytest.raises(TypeError, match="HRAModel takes a HRAConfig, got LoRAConfig"):
        HRAModel(net, lycoris_lite.LoRAConfig(r=2, target_modules=["0"]))
    assert [type(m) for m in net.modules()] == before
    assert lycoris_lite.LoraConfig is lycoris_lite.LoRAConfig and lycoris_lite.LoraModel is lycoris_lite.LoRAModel
    model = lycoris_lite.LoraModel(net, lycoris_lite.LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    assert isinstance(model, AdapterModel) and model.peft_config["default"].alpha == 4
    for algo in ALGORITHMS:  # every algorithm has its typed model, named as PEFT names it
        config_class = get_algorithm(algo).config_class
        typed = getattr(lycoris_lite, config_class.__name__.removesuffix("Config") + "Model")
        assert typed.config_class is config_class
