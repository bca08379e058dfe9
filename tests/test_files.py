"""kohya/LyCORIS files: round trips, name spellings, and bad input that changes nothing."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lycoris_lite import ALGORITHMS, PRESETS, controller_for
from lycoris_lite.core.layer import AdapterLayer
from lycoris_lite.base.registry import get_algorithm
from lycoris_lite.io.files import load_adapter, save_adapter
from lycoris_lite.io.formats.names import diffusers_to_sgm
from lycoris_lite.io.formats.safe_io import AdapterFileError, read_state_dict
from lycoris_lite.models import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline

SETTINGS = {"lora": {"r": 4}, "loha": {"r": 4, "alpha": 16}, "lokr": {"r": 4}, "oft": {"block_size": 4, "rescale": True},
            "boft": {"block_size": 4, "butterfly_factor": 2, "constraint": 0.01}, "hra": {"r": 4}}


def render(pipe):
    generator = torch.Generator().manual_seed(0)
    return pipe("a photo of sks dog", num_inference_steps=2, generator=generator, output_type="np").images


def components(pipe):
    return [c for c in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]


def attach(pipe, algo, name="a"):
    cls = get_algorithm(algo).config_class
    for c in components(pipe):
        targets = PRESETS["unet-full"] if c == "unet" else PRESETS["text-encoder"]
        controller_for(getattr(pipe, c)).add_adapter(name, cls(**SETTINGS[algo], target_modules=targets, init_weights=False), activate=True)


def unload(pipe):
    for c in components(pipe):
        ctrl = controller_for(getattr(pipe, c), create=False)
        if ctrl is not None:
            ctrl.unload()


def state_of(pipe):
    return {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in components(pipe)}


def unchanged(pipe, before):
    now = state_of(pipe)
    return all(now[c].keys() == before[c].keys() and all(torch.equal(now[c][k], before[c][k]) for k in before[c]) for c in before) \
        and not any(isinstance(m, AdapterLayer) for c in components(pipe) for m in getattr(pipe, c).modules())


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_sd_pipeline()


@pytest.fixture(scope="module")
def xl():
    return build_tiny_sdxl_pipeline()


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_round_trip_renders_the_same(pipe, algo, dtype, tmp_path):
    attach(pipe, algo)
    expected = render(pipe)
    path = save_adapter(pipe, "a", tmp_path / f"{algo}.safetensors", dtype=dtype)
    unload(pipe)
    info = load_adapter(pipe, path)
    try:
        assert info.name == algo and info.algorithms == {algo: sum(info.components.values())}
        assert set(info.components) == {"unet", "text_encoder"}
        tol = 0 if dtype is None else 2e-2
        assert np.abs(render(pipe) - expected).max() <= tol
        meta = read_state_dict(path)[1]
        assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["lycoris_lite.algorithms"]) == info.algorithms
    finally:
        unload(pipe)


def test_kohya_names_are_written_the_community_way(pipe, xl, tmp_path):
    attach(pipe, "lora")
    state = read_state_dict(save_adapter(pipe, "a", tmp_path / "sd.safetensors"))[0]
    unload(pipe)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in state
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in state
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in state
    attach(xl, "lora")
    xl_state = read_state_dict(save_adapter(xl, "a", tmp_path / "xl.safetensors"))[0]
    expected = render(xl)
    unload(xl)
    # SDXL: kohya's SGM names; two text encoders
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.") for k in xl_state)
    assert any(k.startswith("lora_te1_text_model_") for k in xl_state) and any(k.startswith("lora_te2_text_model_") for k in xl_state)
    load_adapter(xl, tmp_path / "xl.safetensors")
    try:
        assert np.array_equal(render(xl), expected)
    finally:
        unload(xl)


def test_every_spelling_of_a_module_loads(pipe, tmp_path):
    """Diffusers names, SGM names, lycoris_ prefixes and text-encoder names without text_model."""
    attach(pipe, "lokr")
    expected = render(pipe)
    state = read_state_dict(save_adapter(pipe, "a", tmp_path / "x.safetensors"))[0]
    unload(pipe)
    up = [False, True, True, True]
    renamed = {}
    for key, value in state.items():
        module, suffix = key.split(".", 1)
        if module.startswith("lora_unet_down_blocks_0_attentions_0_"):
            path = module[len("lora_unet_"):].replace("_attentions_0_", ".attentions.0.").replace("down_blocks_0", "down_blocks.0")
            rest = path.split(".attentions.0.", 1)[1]
            module = "lora_unet_" + diffusers_to_sgm("down_blocks.0.attentions.0." + rest.replace("transformer_blocks_0_", "transformer_blocks.0."), 2, up).replace(".", "_")
        elif module.startswith("lora_unet_mid_block_"):
            module = "lycoris_" + module[len("lora_unet_"):]
        elif module.startswith("lora_te_text_model_"):
            module = "lora_te_" + module[len("lora_te_text_model_"):]
        renamed[f"{module}.{suffix}"] = value
    assert renamed.keys() != state.keys()
    assert any(k.startswith("lora_unet_input_blocks_1_1_") for k in renamed)
    load_adapter(pipe, renamed, "b")
    try:
        assert np.array_equal(render(pipe), expected)
    finally:
        unload(pipe)


def test_strict_and_non_strict_unknown_keys(pipe, tmp_path):
    attach(pipe, "lora")
    state = read_state_dict(save_adapter(pipe, "a", tmp_path / "x.safetensors"))[0]
    unload(pipe)
    state["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(4, 8)
    state["lora_unet_conv_in.bias_indices"] = torch.zeros(3)
    before = state_of(pipe)
    with pytest.raises(ValueError, match="not_a_layer"):
        load_adapter(pipe, state, "b")
    assert unchanged(pipe, before)
    info = load_adapter(pipe, state, "b", strict=False)
    try:
        assert "lora_unet_not_a_layer.lora_down.weight" in info.skipped_keys
    finally:
        unload(pipe)


def test_wrong_family_names_both_and_changes_nothing(pipe, xl, tmp_path):
    attach(xl, "lora")
    path = save_adapter(xl, "a", tmp_path / "xl.safetensors")
    unload(xl)
    before = state_of(pipe)
    with pytest.raises(ValueError, match="this adapter is for SDXL: lora_te2_ keys"):
        load_adapter(pipe, path)
    assert unchanged(pipe, before)


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_family_is_read_from_the_cross_attention_width_of_every_algorithm(algo):
    """A UNet-only file of any algorithm that says its input width tells SD 1.x / 2.x / SDXL apart
    (``Algorithm.input_width`` on a cross-attention ``to_k``); output-side rotations say nothing."""
    from types import SimpleNamespace

    from lycoris_lite import AdapterModel
    from lycoris_lite.io.formats import kohya

    for width, family in kohya.FAMILY_WIDTHS.items():
        model = AdapterModel(torch.nn.Sequential(torch.nn.Linear(width, 320, bias=False)),
                             get_algorithm(algo).config_class(**SETTINGS[algo], target_modules=["0"], init_weights=False))
        slot = model.model[0].adapters["default"]
        tensors, alpha = slot.algorithm.to_kohya(slot.tensors(), slot.settings)
        module = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
        state = {f"{module}.{k}": v for k, v in tensors.items()}
        found, evidence = kohya.file_family(state)
        if get_algorithm(algo).multiplicative and algo != "hra":  # OFT/BOFT rotate the output side
            assert found is None
            continue
        assert (found, evidence) == (family, f"{width}-wide cross-attention")
        other = next(w for w in kohya.FAMILY_WIDTHS if w != width)
        model_of_other_family = {"unet": SimpleNamespace(config=SimpleNamespace(cross_attention_dim=other))}
        with pytest.raises(kohya.FamilyMismatch, match=f"for {family}: {width}-wide.*the model is "):
            kohya.check_family(state, model_of_other_family)


def test_all_or_nothing_across_components(pipe, tmp_path):
    """A bad text-encoder part stops the UNet part from being attached too."""
    attach(pipe, "lora")
    state = read_state_dict(save_adapter(pipe, "a", tmp_path / "x.safetensors"))[0]
    unload(pipe)
    key = next(k for k in state if k.startswith("lora_te_") and k.endswith("lora_up.weight"))
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    before = state_of(pipe)
    with pytest.raises(ValueError, match="shape"):
        load_adapter(pipe, state, "b")
    assert unchanged(pipe, before)


def corrupt_files(tmp_path, good):
    raw = good.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    first = next(k for k in header if k != "__metadata__")
    lying = dict(header)
    lying[first] = dict(header[first], shape=[4096, 4096])
    lie_bytes = json.dumps(lying).encode()
    cases = {
        "truncated": raw[: len(raw) // 2],
        "empty": b"",
        "header_too_long": struct.pack("<Q", 10**12) + raw[8:],
        "not_json": struct.pack("<Q", 10) + b"\x00" * 10 + raw[18:],
        "lying_shape": struct.pack("<Q", len(lie_bytes)) + lie_bytes + raw[8 + length:],
        "pickle_in_disguise": b"\x80\x04\x95" + raw[3:],
    }
    out = {}
    for name, data in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(data)
        out[name] = p
    return out


def test_corrupt_files_give_clear_errors_and_change_nothing(pipe, tmp_path):
    attach(pipe, "hra")
    good = save_adapter(pipe, "a", tmp_path / "good.safetensors")
    unload(pipe)
    before = state_of(pipe)
    for name, path in corrupt_files(tmp_path, good).items():
        with pytest.raises(AdapterFileError):
            load_adapter(pipe, path)
        assert unchanged(pipe, before), name


def test_pickles_are_refused_unless_allowed(pipe, tmp_path):
    attach(pipe, "lora")
    state = read_state_dict(save_adapter(pipe, "a", tmp_path / "x.safetensors"))[0]
    expected = render(pipe)
    unload(pipe)
    torch.save(state, tmp_path / "x.ckpt")
    before = state_of(pipe)
    with pytest.raises(AdapterFileError, match="pickle"):
        load_adapter(pipe, tmp_path / "x.ckpt")
    assert unchanged(pipe, before)
    load_adapter(pipe, tmp_path / "x.ckpt", allow_pickle=True)
    try:
        assert np.array_equal(render(pipe), expected)
    finally:
        unload(pipe)


def test_nan_weights_are_refused(pipe, tmp_path):
    attach(pipe, "loha")
    state = read_state_dict(save_adapter(pipe, "a", tmp_path / "x.safetensors"))[0]
    unload(pipe)
    key = next(k for k in state if k.endswith("hada_w1_a"))
    state[key] = state[key].clone()
    state[key][0, 0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    before = state_of(pipe)
    with pytest.raises(ValueError, match="NaN"):
        load_adapter(pipe, tmp_path / "nan.safetensors")
    assert unchanged(pipe, before)


def test_input_side_oft_cannot_be_written_as_kohya(pipe, tmp_path):
    controller_for(pipe.unet).add_adapter("a", get_algorithm("oft").config_class(block_size=4, rotation_side="input", target_modules=["to_q"]))
    try:
        with pytest.raises(ValueError, match="output side"):
            save_adapter(pipe, "a", tmp_path / "x.safetensors")
        assert not (tmp_path / "x.safetensors").exists()
    finally:
        unload(pipe)


def test_legacy_oft_diag_loads_as_the_given_rotation(pipe, tmp_path):
    attach(pipe, "oft")
    # the equivalent legacy file stores the final rotation R_ly = Mᵀ per block (no rescale in 2.0.x)
    for c in ("unet", "text_encoder"):
        for _, layer in controller_for(getattr(pipe, c)).layers():
            slot = layer.adapters["a"]
            with torch.no_grad():
                slot.rescale.fill_(1.0)
    expected = render(pipe)
    state = read_state_dict(save_adapter(pipe, "a", tmp_path / "x.safetensors"))[0]
    unload(pipe)
    from lycoris_lite.algos.oft import rotation_blocks

    legacy = {}
    for key, value in state.items():
        module, suffix = key.split(".", 1)
        if suffix == "oft_blocks":
            legacy[f"{module}.oft_diag"] = rotation_blocks(value).transpose(-1, -2).contiguous()
    load_adapter(pipe, legacy, "legacy")
    try:
        assert np.abs(render(pipe) - expected).max() < 1e-5
    finally:
        unload(pipe)
