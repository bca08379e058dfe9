"""``lycoris_lite.enable(pipe)``: pipe.load_adapter and friends on the tiny SD 1.5 and SDXL pipelines.

Images are rendered with fixed seeds and ``output_type="np"``; diffusers' own LoRA loader is the oracle
for plain LoRA files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

import lycoris_lite
import lycoris_lite.integrations.pipeline
from lycoris_lite import PRESETS, HRAConfig, HRAModel, controller_for
from lycoris_lite.core.layer import AdapterLayer
from lycoris_lite.io.files import save_adapter
from lycoris_lite.io.formats.safe_io import read_state_dict
from lycoris_lite.models import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline
from tests.pipeline_checks import make_file, parts, render, state_of

ROOT = Path(__file__).resolve().parents[1]


def untouched(pipe, before) -> bool:
    now = state_of(pipe)
    return all(now[c].keys() == before[c].keys() and all(torch.equal(now[c][k], before[c][k]) for k in before[c])
               for c in before) and not any(isinstance(m, AdapterLayer) for c in parts(pipe)
                                            for m in getattr(pipe, c).modules())


@pytest.fixture(scope="module")
def pipe():
    return lycoris_lite.enable(build_tiny_sd_pipeline())


@pytest.fixture(scope="module")
def base(pipe):
    return render(pipe)


@pytest.fixture(scope="module")
def adapters(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    return {
        "lora": make_file(pipe, folder / "style.safetensors", "lora", amplify=3.0),
        "lora_attn": make_file(pipe, folder / "attn.safetensors", "lora", "unet-attn", seed=1, amplify=3.0),
        "lora_diffusers": make_file(pipe, folder / "diff.safetensors", "lora", "unet-attn-ff", seed=2, fmt="diffusers",
                                    amplify=3.0),
        "lokr": make_file(pipe, folder / "subject.safetensors", "lokr", seed=3),
        "oft": make_file(pipe, folder / "rot.safetensors", "oft", "unet-attn-ff", seed=4),
        "hra": make_file(pipe, folder / "refl.safetensors", "hra", seed=5),
        "loha": make_file(pipe, folder / "hada.safetensors", "loha", seed=6),
    }


@pytest.fixture(autouse=True)
def clean(request):
    yield
    if "pipe" in request.fixturenames:
        request.getfixturevalue("pipe").unload_adapters()


# ---- enable --------------------------------------------------------------------------------------
def test_enable_changes_only_this_instance(pipe, tmp_path):
    other = build_tiny_sd_pipeline()
    assert not hasattr(other, "fuse_adapters") and not hasattr(StableDiffusionPipeline, "fuse_adapters")
    assert type(pipe).__name__ == "StableDiffusionPipeline" and isinstance(pipe, StableDiffusionPipeline)
    assert lycoris_lite.enable(pipe) is pipe
    pipe.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


# ---- diffusers' own loader as the oracle ------------------------------------------------------------
@pytest.mark.parametrize("which", ["lora", "lora_diffusers"])
def test_lora_files_render_as_diffusers_renders_them(pipe, adapters, which):
    reference = build_tiny_sd_pipeline()
    reference.load_lora_weights(str(adapters[which]), adapter_name="x")
    name = pipe.load_adapter(adapters[which])
    assert name == adapters[which].stem
    for scale in (1.0, 0.5):
        reference.set_adapters(["x"], [scale])
        pipe.set_adapters([name], scale)
        ours, theirs = render(pipe), render(reference)
        assert np.abs(ours - theirs).max() <= 1e-5, (which, scale)
    assert np.abs(ours - render(build_tiny_sd_pipeline())).max() > 1e-2  # the adapter does something


def test_block_wise_weights_match_diffusers_and_touch_only_the_named_blocks(pipe, adapters, base):
    """On an attention-only LoRA our block-wise weights mean what diffusers' mean. The weights are powers
    of two: we scale ``up`` before the matmul and PEFT scales the activations after it, which round
    differently for weights like 0.3, and this random tiny UNet amplifies last-bit differences to ~1e-3."""
    weights = {"unet": {"down": 0.25, "up": {"block_1": [0.0, 2.0, 0.5]}}, "text_encoder": 0.5}
    reference = build_tiny_sd_pipeline()
    reference.load_lora_weights(str(adapters["lora_attn"]), adapter_name="x")
    reference.set_adapters(["x"], [weights])
    name = pipe.load_adapter(adapters["lora_attn"])
    pipe.set_adapters(name, weights)
    assert np.abs(render(pipe) - render(reference)).max() <= 1e-5
    scales = {ln: layer.adapters[name].scale for ln, layer in controller_for(pipe.unet).layers()}
    for ln, s in scales.items():
        if ln.startswith("down_blocks."):
            assert s == 0.25, ln
        elif ln.startswith("up_blocks.1.attentions."):
            assert s == [0.0, 2.0, 0.5][int(ln.split(".")[3])], ln
        else:
            assert s == 1.0, ln
    assert {layer.adapters[name].scale for _, layer in controller_for(pipe.text_encoder).layers()} == {0.5}


def test_block_lists_and_bad_block_weights(pipe, adapters):
    name = pipe.load_adapter(adapters["lora"], unet_scale={"down": [0.1, 0.2, 0.3, 0.4], "mid": 0.5})
    for ln, layer in controller_for(pipe.unet).layers():
        expected = [0.1, 0.2, 0.3, 0.4][int(ln.split(".")[1])] if ln.startswith("down_blocks.") else \
            0.5 if ln.startswith("mid_block.") else 1.0
        assert layer.adapters[name].scale == expected, ln
    for bad, match in [({"unet": {"side": 1.0}}, "unknown UNet part"), ({"vae": 1.0}, "unknown component"),
                       ({"unet": {"down": [1.0] * 9}}, "9 down block weights"),
                       ({"unet": {"up": {"block_7": 1.0}}}, "no layers in up_blocks.7"),
                       (float("nan"), "finite"), ("high", "finite")]:
        with pytest.raises(ValueError, match=match):
            pipe.set_adapters(name, bad)
    assert controller_for(pipe.unet).layers().__next__()[1].adapters[name].scale == 0.1  # unchanged


# ---- the HRA example and every algorithm ------------------------------------------------------------
def test_hra_example_and_load_adapter_render_identically(pipe, tmp_path):
    unet, text_encoder = pipe.unet, pipe.text_encoder
    pipe.unet = HRAModel(unet, HRAConfig(r=4, target_modules=PRESETS["unet-attn"], init_weights=False), "hra")
    pipe.text_encoder = HRAModel(text_encoder, HRAConfig(r=4, target_modules=PRESETS["text-encoder"], init_weights=False), "hra")
    try:
        expected = render(pipe)
        save_adapter(pipe, "hra", tmp_path / "hra.safetensors")
    finally:
        pipe.unet, pipe.text_encoder = pipe.unet.unload(), pipe.text_encoder.unload()
    pipe.load_adapter(tmp_path / "hra.safetensors")
    assert np.array_equal(render(pipe), expected)


def test_a_stack_mixes_algorithms_each_at_its_own_weight(pipe, adapters, base):
    names = [pipe.load_adapter(adapters[a]) for a in ("lora", "lokr", "oft")]
    assert pipe.get_active_adapters() == names
    pipe.set_adapters(names, [0.8, 1.2, 0.6])
    stacked = render(pipe)
    listing = pipe.list_adapters()
    assert [listing[n]["algorithm"] for n in names] == ["lora", "lokr", "oft"]
    assert listing["style"]["rank"] == 4 and listing["style"]["weight"]["unet"] == 0.8
    assert all(listing[n]["active"] and not listing[n]["fused"] for n in names)
    # the same stack built layer by layer with the controllers, composed in load order
    pipe.unload_adapters()
    for n, a, w in zip(names, ("lora", "lokr", "oft"), [0.8, 1.2, 0.6]):
        lycoris_lite.io.files.load_adapter(pipe, adapters[a], n, scale=w)
    for c in ("unet", "text_encoder"):
        controller_for(getattr(pipe, c)).set_adapter(names)
    assert np.array_equal(render(pipe), stacked)
    for c in ("unet", "text_encoder"):
        controller_for(getattr(pipe, c)).unload()
    # dropping one adapter from the stack equals never loading it
    for n, a in zip(names, ("lora", "lokr", "oft")):
        pipe.load_adapter(adapters[a], n)
    pipe.set_adapters(["style", "rot"], [0.8, 0.6])
    without = render(pipe)
    pipe.unload_adapters()
    pipe.load_adapter(adapters["lora"], "style", 0.8)
    pipe.load_adapter(adapters["oft"], "rot", 0.6)
    assert np.abs(render(pipe) - without).max() <= 1e-6
    assert np.abs(without - stacked).max() > 1e-3


@pytest.mark.parametrize("algo", ["loha", "lokr", "oft", "hra"])
def test_fused_equals_unfused_and_unload_is_bit_exact(pipe, adapters, base, algo):
    before = state_of(pipe)
    pipe.load_adapter(adapters["lora"], scale=0.7)
    pipe.load_adapter(adapters[algo], scale=1.3)
    unfused = render(pipe)
    assert np.abs(unfused - base).max() > 1e-3
    pipe.fuse_adapters()
    assert set(pipe.fused_adapters) == {"style", adapters[algo].stem}
    assert all(v["fused"] for v in pipe.list_adapters().values())
    assert np.abs(render(pipe) - unfused).max() <= 1e-5
    with pytest.raises(ValueError, match="fused"):
        pipe.set_adapters(["style", adapters[algo].stem], [0.5, 1.3])
    pipe.unfuse_adapters()
    assert np.array_equal(render(pipe), unfused)
    pipe.fuse_adapters()
    pipe.unload_adapters()
    assert untouched(pipe, before)
    assert np.array_equal(render(pipe), base)
    assert pipe.list_adapters() == {} and pipe.get_active_adapters() == []


def test_disable_enable_delete_and_per_call_scale(pipe, adapters, base):
    name = pipe.load_adapter(adapters["loha"])
    full = render(pipe)
    pipe.disable_adapters()
    assert np.array_equal(render(pipe), base)
    pipe.enable_adapters()
    assert np.array_equal(render(pipe), full)
    pipe.set_adapters(name, 0.5)
    half = render(pipe)
    pipe.set_adapters(name, 1.0)
    assert np.abs(render(pipe, cross_attention_kwargs={"scale": 0.5}) - half).max() <= 1e-6
    assert np.array_equal(render(pipe), full)  # the per-call scale is undone
    pipe.load_adapter(adapters["lora"])
    pipe.delete_adapters([name])
    assert list(pipe.list_adapters()) == ["style"] and pipe.get_active_adapters() == ["style"]
    pipe.set_adapters([], None)
    assert np.array_equal(render(pipe), base)


def test_save_adapter_keeps_metadata_and_round_trips(pipe, adapters, tmp_path):
    name = pipe.load_adapter(adapters["lokr"], "subject")
    pipe.__dict__["_lycoris_state"].adapters[name].metadata["ss_tag_frequency"] = json.dumps({"sks": {"sks dog": 3}})
    expected = render(pipe)
    path = pipe.save_adapter(name, tmp_path / "again.safetensors")
    assert json.loads(read_state_dict(path)[1]["ss_tag_frequency"]) == {"sks": {"sks dog": 3}}
    pipe.unload_adapters()
    pipe.load_adapter(path)
    assert np.abs(render(pipe) - expected).max() <= 1e-5


# ---- bad input changes nothing ---------------------------------------------------------------------------
def test_unknown_names_raise(pipe, adapters):
    name = pipe.load_adapter(adapters["lora"])
    for call in (lambda: pipe.set_adapters(["nope"]), lambda: pipe.delete_adapters("nope"),
                 lambda: pipe.fuse_adapters(["nope"]), lambda: pipe.save_adapter("nope", "/tmp/x.safetensors")):
        with pytest.raises(ValueError, match="unknown adapter"):
            call()
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_adapter(adapters["lora"])
    with pytest.raises(FileNotFoundError):
        pipe.load_adapter("/does/not/exist.safetensors")
    assert pipe.get_active_adapters() == [name]


def test_fusing_nan_weights_raises_and_changes_nothing(pipe, adapters):
    pipe.load_adapter(adapters["lora"])
    name = pipe.load_adapter(adapters["hra"])
    unfused = render(pipe)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    last = [layer for _, layer in controller_for(pipe.text_encoder).layers()][-1]
    with torch.no_grad():
        next(iter(last.adapters[name].parameters()))[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pipe.fuse_adapters()
    assert pipe.fused_adapters == []
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    with torch.no_grad():
        next(iter(last.adapters[name].parameters()))[0, 0] = 0.0
    assert np.abs(render(pipe) - unfused).max() < 1e-2  # rendering still works (one weight changed)


# ---- SDXL --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def xl():
    return lycoris_lite.enable(build_tiny_sdxl_pipeline())


def test_sdxl_kohya_files_with_sgm_names_load_and_render(xl, pipe, tmp_path):
    path = make_file(xl, tmp_path / "xl.safetensors", "lokr")
    state = read_state_dict(path)[0]
    assert any(k.startswith("lora_unet_input_blocks_4_1_") for k in state)
    assert any(k.startswith("lora_te2_") for k in state)
    base = render(xl)
    try:
        name = xl.load_adapter(path, scale=0.8)
        assert set(xl.list_adapters()[name]["components"]) == {"unet", "text_encoder", "text_encoder_2"}
        assert np.abs(render(xl) - base).max() > 1e-3
    finally:
        xl.unload_adapters()
    assert np.array_equal(render(xl), base)
    # into SD 1.5: the error names both families, and the pipeline is untouched
    before = state_of(pipe)
    with pytest.raises(ValueError, match=r"this adapter is for SDXL.*one text encoder|for SDXL.*the model is SD"):
        pipe.load_adapter(path)
    assert untouched(pipe, before) and pipe.list_adapters() == {}


# ---- hotswap -----------------------------------------------------------------------------------------
def test_hotswap_replaces_weights_in_place(pipe, adapters, tmp_path):
    other = make_file(pipe, tmp_path / "other.safetensors", "lora", seed=11, amplify=3.0)
    pipe.load_adapter(other, "slot")
    expected = render(pipe)
    pipe.unload_adapters()
    name = pipe.load_adapter(adapters["lora"], "slot")
    layer = next(layer for _, layer in controller_for(pipe.unet).layers())
    before_params = [p.data_ptr() for p in layer.adapters[name].parameters()]
    pipe.load_adapter(other, "slot", hotswap=True)
    assert [p.data_ptr() for p in layer.adapters[name].parameters()] == before_params
    assert np.array_equal(render(pipe), expected)
    attn_only = adapters["lora_attn"]
    for source, match in [(attn_only, "other layers"), (adapters["lokr"], "other layers|holds lora")]:
        with pytest.raises(ValueError, match=match):
            pipe.load_adapter(source, "slot", hotswap=True)
    with pytest.raises(ValueError, match="none named"):
        pipe.load_adapter(other, "fresh", hotswap=True)
    assert np.array_equal(render(pipe), expected)


def test_hotswap_does_not_recompile_a_compiled_unet(tmp_path, one_thread):
    """A ``torch.compile``d UNet keeps its graph across a hotswap (a recompile would raise here)."""
    import torch._dynamo

    small = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 block_out_channels=(8, 16), layers_per_block=1)
    pipe = build_tiny_sd_pipeline()
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(**{**lycoris_lite.models.tiny_unet_config(), **small})
    pipe = lycoris_lite.enable(pipe)
    first = make_file(pipe, tmp_path / "a.safetensors", "lora", "unet-attn", text_encoder=False, seed=1, amplify=3.0)
    second = make_file(pipe, tmp_path / "b.safetensors", "lora", "unet-attn", text_encoder=False, seed=2, amplify=3.0)
    pipe.load_adapter(second, "s")
    expected = render(pipe)
    pipe.unload_adapters()
    pipe.load_adapter(first, "s")
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    pipe.unet = torch.compile(pipe.unet, backend=counting_backend)
    try:
        render(pipe)
        compiled = len(graphs)
        assert compiled >= 1
        pipe.load_adapter(second, "s", hotswap=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert np.array_equal(render(pipe), expected)
        assert len(graphs) == compiled
    finally:
        torch._dynamo.reset()


# ---- the community pipeline and the sample script ------------------------------------------------------
def test_community_pipeline_loads_with_custom_pipeline_and_has_the_methods(pipe, adapters, tmp_path):
    from diffusers import DiffusionPipeline

    folder = tmp_path / "tiny"
    build_tiny_sd_pipeline(path=folder)
    community = DiffusionPipeline.from_pretrained(
        folder, custom_pipeline=str(ROOT / "pipelines" / "lycoris_stable_diffusion.py"), trust_remote_code=True)
    assert type(community).__name__ == "LycorisStableDiffusionPipeline"
    assert isinstance(community, lycoris_lite.integrations.pipeline.LycorisPipelineMixin)
    name = community.load_adapter(adapters["oft"], scale=0.7)
    expected_name = pipe.load_adapter(adapters["oft"], scale=0.7)
    assert name == expected_name
    # the same weights; diffusers' from_pretrained leaves tensors at addresses that CPU kernels round
    # differently for (last-bit differences), hence a tolerance rather than equality
    assert np.abs(render(community) - render(pipe)).max() <= 1e-5


def test_sample_script_renders_a_stack(adapters, tmp_path):
    out = tmp_path / "out.png"
    result = subprocess.run([sys.executable, str(ROOT / "samples" / "load_adapter.py"), "--model", "tiny-sd",
                             "--adapter", f"{adapters['lora']}:0.5", "--adapter", str(adapters["hra"]),
                             "--steps", "2", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "'style': 'lora'" in result.stdout and "'refl': 'hra'" in result.stdout
    from PIL import Image

    assert Image.open(out).size == (64, 64)


def test_combine_adapters_adds_a_lora_to_the_stack(pipe, adapters, base):
    pipe.load_adapter(adapters["lora"])
    pipe.load_adapter(adapters["lokr"])
    pipe.set_adapters(["style", "subject"], [0.6, 0.9])
    stacked = render(pipe)
    name = pipe.combine_adapters(["style", "subject"], [0.6, 0.9], "mix", "svd", svd_rank=64)
    assert pipe.list_adapters()[name]["algorithm"] == "lora" and pipe.get_active_adapters()[-1] == "mix"
    pipe.set_adapters(["mix"])
    # rank 64 holds every layer's ΔW of these tiny layers exactly, so the combination renders the stack
    assert np.abs(render(pipe) - stacked).max() <= 1e-4
    with pytest.raises(ValueError, match="unknown adapter"):
        pipe.combine_adapters(["nope"], [1.0], "other")
