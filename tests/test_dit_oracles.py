"""Independent oracles on a transformer pipeline (tiny Flux.1): diffusers' own ``load_lora_weights`` on
our diffusers-format file renders what our load renders; PEFT's LoRA, LoHa, LoKr and OFT adapters, made
and saved by PEFT on the transformer, load as PEFT folders and reproduce PEFT's forward; LyCORIS's
LoCon, LoHa, LoKr and diag-OFT files from ``create_lycoris`` on the transformer reproduce LyCORIS's forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lycoris_lite
from lycoris_lite import PRESETS, LoRAConfig, controller_for, models, save_adapter
from lycoris_lite.io.files import load_adapter

peft = pytest.importorskip("peft")

TARGETS = ["to_q", "to_k", "to_v", "proj_mlp"]


def transformer_inputs(transformer) -> dict:
    """One seeded forward's inputs for a tiny Flux transformer: 16 image and 8 text tokens."""
    g, config = torch.Generator().manual_seed(0), transformer.config
    return dict(hidden_states=torch.randn(1, 16, config.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, 8, config.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
                guidance=torch.tensor([3.5]) if config.guidance_embeds else None)


def render(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_diffusers_load_lora_weights_renders_what_our_load_renders(tmp_path):
    pipe = models.build_tiny_flux_pipeline()
    ctrl = controller_for(pipe.transformer)
    ctrl.add_adapter("a", LoRAConfig(r=4, alpha=2.0, target_modules=PRESETS["flux-attn-mlp"], init_weights=False),
                     generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in ctrl.trainable_parameters(["a"]):
            p.mul_(8.0)
    path = tmp_path / "a.safetensors"
    save_adapter({"transformer": pipe.transformer}, "a", path, format="diffusers")
    ctrl.unload()
    base = render(pipe)
    ours = lycoris_lite.enable(models.build_tiny_flux_pipeline())
    ours.load_adapter(path, "a", scale=0.7)
    theirs = models.build_tiny_flux_pipeline()
    theirs.load_lora_weights(str(path), adapter_name="a")
    theirs.set_adapters(["a"], [0.7])
    got, expected = render(ours), render(theirs)
    assert np.abs(got - base).max() > 0.1
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def _peft_config(kind: str):
    common = dict(target_modules=TARGETS, init_weights=False)
    if kind == "lora":
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    if kind == "loha":
        return peft.LoHaConfig(r=4, alpha=8, **common)
    if kind == "lokr":
        return peft.LoKrConfig(r=4, alpha=8, **common)
    return peft.OFTConfig(r=0, oft_block_size=8, **common)


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr", "oft"])
def test_peft_folders_on_the_transformer_reproduce_peft_forward(tmp_path, kind):
    transformer = models.build_tiny_flux_pipeline().transformer
    torch.manual_seed(0)  # PEFT's random init
    model = peft.get_peft_model(transformer, _peft_config(kind))
    inputs = transformer_inputs(transformer)
    with torch.no_grad():
        expected = model(**inputs).sample
    model.save_pretrained(tmp_path / "peft")
    fresh = models.build_tiny_flux_pipeline().transformer
    with torch.no_grad():
        base = fresh(**inputs).sample
    load_adapter({"transformer": fresh}, tmp_path / "peft", "p")
    with torch.no_grad():
        got = fresh(**inputs).sample
    assert (expected - base).abs().max() > 1e-4
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("algo, kwargs, ours_algo", [("locon", {}, "lora"), ("loha", {}, "loha"),
                                                     ("lokr", {"factor": 4}, "lokr"), ("diag-oft", {}, "oft")])
def test_lycoris_generic_wrapper_files_on_the_transformer_reproduce_their_forward(tmp_path, algo, kwargs, ours_algo):
    """``lycoris.create_lycoris`` on the diffusers transformer (SimpleTuner's way): ``lycoris_<path>``
    modules, weights randomised, saved with their writer; our load gives their forward (never their
    merge: LoHa/LoKr ``merge_to`` applies the scale twice, see tests/test_lycoris_files.py)."""
    pytest.importorskip("lycoris")
    from tests.test_lycoris_files import _generic, lycoris_presets_kept, randomise

    names = [r"(single_)?transformer_blocks\.\d+\..*(to_q|to_k|to_v|proj_mlp)$"]
    with lycoris_presets_kept():
        pipe = models.build_tiny_flux_pipeline()
        inputs = transformer_inputs(pipe.transformer)
        with torch.no_grad():
            base = pipe.transformer(**inputs).sample
        net = _generic(pipe.transformer, algo, [], names, dim=4 if algo != "diag-oft" else 8, **kwargs)
        randomise(net, 0.3)
        path = tmp_path / f"{algo}.safetensors"
        net.save_weights(str(path), torch.float32, None)
        with torch.no_grad():
            theirs = pipe.transformer(**inputs).sample
    fresh = models.build_tiny_flux_pipeline().transformer
    info = load_adapter({"transformer": fresh}, path, "theirs")
    with torch.no_grad():
        ours = fresh(**inputs).sample
    assert info.algorithms == {ours_algo: len(net.loras)}
    assert (theirs - base).abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
