"""DoRA (weight-decomposed LoRA/LoHa/LoKr): golden checks against PEFT and LyCORIS, and files.

The layer-level contract (activation path = weight path, fuse/unfuse bit-exact, scale 0 is the base,
gradients = autograd of the plain formula) runs for DoRA variants in ``test_contract.py`` and
``test_grad.py``; here:

* PEFT ``LoraConfig(use_dora=True)`` on Linear / Conv 1×1 / Conv 3×3 (float64, magnitudes perturbed so the
  decomposition matters): same forward, same fused weight, same gradients (both treat the norm as a
  constant), and PEFT's magnitude init equals ours;
* LyCORIS ``weight_decompose=True`` (LoCon, LoHa, LoKr) on both axes: their forward = ours at multiplier 1
  (at other multipliers they scale differently, see :mod:`lycoris_lite.algos.dora`);
* files: LyCORIS-written kohya files with ``dora_wd`` (both axes) load with their outputs; ours load in
  LyCORIS with ours; PEFT folders with ``use_dora`` both ways; what PEFT cannot hold is refused clearly.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lycoris_lite import AdapterModel, LoHaConfig, LoKrConfig, LoRAConfig, controller_for
from lycoris_lite.algos import dora
from lycoris_lite.io.files import load_adapter, save_adapter
from lycoris_lite.base.layer_kind import LayerSpec
from lycoris_lite.models import build_tiny_sd_pipeline
from tests.golden_mapping import load_into, lycoris_tensors, make_base
from tests.reference import relative_error

peft = pytest.importorskip("peft")
lycoris = pytest.importorskip("lycoris")

from lycoris.modules import LoConModule, LohaModule, LokrModule  # noqa: E402

logging.getLogger("LyCORIS").setLevel(logging.ERROR)
pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
KINDS = ("linear", "conv1x1", "conv3x3")


def make_input(kind: str) -> torch.Tensor:
    return torch.randn(5, 24, dtype=F64) if kind == "linear" else torch.randn(2, 12, 9, 9, dtype=F64)


def ours_on(base: nn.Module, cfg) -> AdapterModel:
    return AdapterModel(nn.Sequential(copy.deepcopy(base)), cfg.replace(target_modules=["0"], init_weights=False))


# ---- PEFT -------------------------------------------------------------------------------------------------
def peft_dora(base: nn.Module, init: bool = False):
    cfg = peft.LoraConfig(r=3, lora_alpha=5, use_dora=True, target_modules=["0"], init_lora_weights=init)
    model = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)), cfg)
    layer = model.base_model.model[0]
    if not init:
        magnitude = layer.lora_magnitude_vector["default"].weight
        with torch.no_grad():  # PEFT starts at m = ‖W + ΔW‖ (the decomposition is then a no-op): perturb m
            magnitude.mul_(1 + 0.2 * torch.randn_like(magnitude))
    return model, layer


def peft_to_ours(layer, spec_layer) -> dict:
    magnitude = layer.lora_magnitude_vector["default"].weight.detach()
    return {"lora_down": layer.lora_A["default"].weight, "lora_up": layer.lora_B["default"].weight,
            "dora_scale": magnitude.reshape(dora.magnitude_shape(spec_layer.spec, "output"))}


@pytest.mark.parametrize("kind", KINDS)
def test_matches_peft_use_dora(kind):
    torch.manual_seed(0)
    base = make_base(kind)
    x = make_input(kind)
    theirs, layer = peft_dora(base)
    ours = ours_on(base, LoRAConfig(r=3, alpha=5, use_dora=True))
    lay = ours.model[0]
    load_into(lay, peft_to_ours(layer, lay))

    y_theirs, y_ours = theirs(x), ours(x)
    assert relative_error(y_theirs, base(x)) > 1e-2
    assert relative_error(y_ours, y_theirs) <= 1e-10
    # the same gradients: both keep the norm ‖W + ΔW‖ out of autograd (DoRA paper §4.3)
    upstream = torch.randn_like(y_ours)
    p_theirs = [layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_magnitude_vector["default"].weight]
    p_ours = [lay.adapters["default"].lora_down, lay.adapters["default"].lora_up, lay.adapters["default"].dora_scale]
    for p in p_ours:
        p.requires_grad_(True)
    g_theirs = torch.autograd.grad(y_theirs, p_theirs, upstream)
    g_ours = torch.autograd.grad(y_ours, p_ours, upstream)
    for a, b in zip(g_ours, g_theirs):
        assert relative_error(a.reshape(b.shape), b) <= 1e-10
    # fused weights (PEFT's merge_and_unload)
    fused = copy.deepcopy(theirs).merge_and_unload()[0].weight
    assert relative_error(lay.fused_weight(["default"]), fused) <= 1e-10


@pytest.mark.parametrize("kind", KINDS)
def test_magnitude_init_matches_peft(kind):
    """A new DoRA adapter starts at ``m = ‖W‖`` (``ΔW = 0``): PEFT's init, the identity."""
    torch.manual_seed(0)
    base = make_base(kind)
    _, layer = peft_dora(base, init=True)
    ours = AdapterModel(nn.Sequential(copy.deepcopy(base)), LoRAConfig(r=3, use_dora=True, target_modules=["0"]))
    lay = ours.model[0]
    assert relative_error(lay.adapters["default"].dora_scale.reshape(-1),
                          layer.lora_magnitude_vector["default"].weight.reshape(-1)) <= 1e-14
    x = make_input(kind)
    assert relative_error(ours(x), base(x)) <= 1e-14


# ---- LyCORIS ----------------------------------------------------------------------------------------------
LYCO = [
    ("locon", LoConModule, dict(lora_dim=4, alpha=3), LoRAConfig(r=4, alpha=3)),
    ("loha", LohaModule, dict(lora_dim=2, alpha=3), LoHaConfig(r=2, alpha=3)),
    ("lokr", LokrModule, dict(lora_dim=1, alpha=3, factor=2), LoKrConfig(r=1, alpha=3, factor=2)),
]


@pytest.mark.parametrize("axis", dora.AXES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", LYCO, ids=[c[0] for c in LYCO])
def test_matches_lycoris_weight_decompose(case, kind, axis):
    _, cls, kwargs, cfg = case
    torch.manual_seed(1)
    base = make_base(kind, linear_out=32)
    x = make_input(kind)
    theirs = cls("lycoris_golden", base, 1.0, weight_decompose=True, wd_on_out=axis == "output", **kwargs).to(F64)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(p * (1 + 0.3 * torch.randn_like(p)) if name == "dora_scale" else 0.4 * torch.randn_like(p))
    tensors = lycoris_tensors(theirs)
    assert tensors["dora_scale"].shape == dora.magnitude_shape(LayerSpec.from_module(base), axis)
    ours = ours_on(base, cfg.replace(use_dora=True, dora_axis=axis))
    load_into(ours.model[0], tensors)
    with torch.no_grad():
        y_theirs, y_ours, y_base = theirs(x), ours(x), base(x)
        assert relative_error(y_theirs, y_base) > 1e-2
        assert relative_error(y_ours, y_theirs) <= 1e-10
        # at multiplier 0.5 ours is W + ½(D(W) − W); LyCORIS keeps ΔW whole and halves the gain instead
        ours.set_scale("default", 0.5)
        theirs.multiplier = 0.5
        half = ours(x)
        assert relative_error(half, 0.5 * (y_base + y_ours)) <= 1e-10
        assert relative_error(half, theirs(x)) > 1e-3


# ---- kohya / LyCORIS files ----------------------------------------------------------------------------------
def probe(pipe):
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 6, 32, generator=g)
    ids = torch.randint(0, 900, (1, 7), generator=g)
    with torch.no_grad():
        return pipe.unet(x, 10, context).sample, pipe.text_encoder(ids).last_hidden_state


def assert_close(ours, theirs, base, tol=1e-5):
    for o, t, b in zip(ours, theirs, base):
        assert relative_error(t, b) > 1e-3
        assert relative_error(o, t) < tol


@pytest.fixture(scope="module")
def tiny_base():
    return probe(build_tiny_sd_pipeline())


UNET_PRESET = "\n".join([
    "enable_conv = true", "unet_target_module = []",
    "unet_target_name = ['" + r"(down_blocks\.1|mid_block)\..*(to_q|to_v|proj_in|ff\.net\.2|conv1|conv_shortcut)$" + "']",
    'text_encoder_target_module = ["CLIPAttention"]', "text_encoder_target_name = []",
])


@pytest.mark.parametrize("algo,dim,alpha,extra,wd_on_output", [
    pytest.param("locon", 4, 2, {}, True, id="locon-output"),
    pytest.param("locon", 4, 2, {}, False, id="locon-input-legacy"),
    pytest.param("loha", 2, 2, {}, True, id="loha-output"),
    pytest.param("lokr", 2, 1, {"factor": 2}, True, id="lokr-output"),
])
def test_their_kohya_dora_files_load(tmp_path, tiny_base, algo, dim, alpha, extra, wd_on_output):
    import lycoris.kohya as lykohya

    from tests.test_lycoris_files import lycoris_presets_kept, randomise

    preset = tmp_path / "preset.toml"
    preset.write_text(UNET_PRESET)
    with lycoris_presets_kept():
        pipe = build_tiny_sd_pipeline()
        net = lykohya.create_network(1.0, dim, alpha, None, pipe.text_encoder, pipe.unet, algo=algo, preset=str(preset),
                                     dora_wd=True, wd_on_output=wd_on_output, **extra)
        net.apply_to(pipe.text_encoder, pipe.unet, True, True)
        randomise(net, 0.2)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.endswith("dora_scale"):
                    p.abs_().add_(0.5)
        path = tmp_path / "theirs.safetensors"
        net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
        theirs = probe(pipe)
    state = load_file(str(path))
    shapes = {tuple(v.shape)[:2] for k, v in state.items() if k.endswith("dora_scale")}
    assert shapes and all((s[1] == 1) == wd_on_output for s in shapes)
    ours = build_tiny_sd_pipeline()
    info = load_adapter(ours, path)
    assert not info.skipped_keys
    assert set(info.components) == {"unet", "text_encoder"}
    axes = {s.dora for c in (ours.unet, ours.text_encoder) for s in controller_for(c).adapter_settings(info.name).values()}
    assert axes == {"output" if wd_on_output else "input"}
    config = controller_for(ours.unet).configs[info.name]
    assert config.use_dora and config.dora_axis == ("output" if wd_on_output else "input")
    assert_close(probe(ours), theirs, tiny_base)


@pytest.mark.parametrize("cfg", [
    pytest.param(LoRAConfig(r=4, alpha=2, use_dora=True), id="lora"),
    pytest.param(LoRAConfig(r=4, alpha=2, use_dora=True, dora_axis="input"), id="lora-input"),
    pytest.param(LoHaConfig(r=2, alpha=2, use_dora=True), id="loha"),
    pytest.param(LoKrConfig(r=2, alpha=2, factor=2, use_dora=True), id="lokr"),
])
def test_our_kohya_dora_files_load_in_lycoris(tmp_path, tiny_base, cfg):
    import lycoris.kohya as lykohya

    from tests.test_lycoris_files import TE_MODULES, UNET_NAMES, _TextModel, lycoris_presets_kept

    pipe = build_tiny_sd_pipeline()
    for component, targets in ((pipe.unet, ["to_q", "to_v", "proj_in", "ff.net.2", "conv1"]),
                               (pipe.text_encoder, ["q_proj", "fc1"])):
        controller_for(component).add_adapter("d", cfg.replace(target_modules=targets, init_weights=False),
                                              generator=torch.Generator().manual_seed(4), activate=True)
    ours = probe(pipe)
    path = save_adapter(pipe, "d", tmp_path / "ours.safetensors")
    with safe_open(str(path), "pt") as f:
        network_args = json.loads(f.metadata()["ss_network_args"])
    assert network_args["dora_wd"] == "True" and network_args["wd_on_output"] == str(cfg.dora_axis == "output")
    with lycoris_presets_kept():
        lykohya.LycorisNetworkKohya.apply_preset({"unet_target_module": [], "unet_target_name": UNET_NAMES,
                                                  "text_encoder_target_module": TE_MODULES})
        theirs_pipe = build_tiny_sd_pipeline()
        holder = _TextModel(theirs_pipe.text_encoder)
        if cfg.dora_axis == "input":
            # LyCORIS bug: make_module_from_state_dict builds every DoRA module with wd_on_out=True, so it
            # cannot read the (1, in) magnitudes of its own older files (nor ours) back
            with pytest.raises(RuntimeError, match="broadcast"):
                lykohya.create_network_from_weights(1.0, str(path), None, holder, theirs_pipe.unet, for_inference=True)
        else:
            net, _ = lykohya.create_network_from_weights(1.0, str(path), None, holder, theirs_pipe.unet,
                                                         for_inference=True)
            assert all(m.wd for m in net.unet_loras + net.text_encoder_loras)
            net.apply_to(holder, theirs_pipe.unet, True, True)
            assert_close(ours, probe(theirs_pipe), tiny_base)
    back = build_tiny_sd_pipeline()
    load_adapter(back, path, "back")
    assert_close(probe(back), ours, tiny_base, tol=1e-6)


# ---- PEFT folders -----------------------------------------------------------------------------------------
UNET_TARGETS = ["to_q", "to_v", "proj_in", "conv1"]


def unet_outputs(unet):
    g = torch.Generator().manual_seed(0)
    x, ehs = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10]), encoder_hidden_states=ehs).sample


def test_peft_dora_folders_both_ways(tmp_path):
    unet = build_tiny_sd_pipeline().unet
    base_out = unet_outputs(unet)
    theirs = peft_dora_unet(unet)
    theirs.save_pretrained(str(tmp_path / "peft"))
    expected = unet_outputs(theirs)
    assert relative_error(expected, base_out) > 1e-3
    ours = copy.deepcopy(unet)
    info = load_adapter(ours, tmp_path / "peft")
    assert set(info.algorithms) == {"lora"}
    assert relative_error(unet_outputs(ours), expected) < 1e-5
    assert controller_for(ours).configs[info.name].use_dora

    folder = save_adapter(ours, info.name, tmp_path / "ours", format="peft")
    written, original = load_file(str(folder / "adapter_model.safetensors")), load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert written.keys() == original.keys() and all(torch.equal(written[k], original[k]) for k in original)
    assert json.loads((folder / "adapter_config.json").read_text())["use_dora"] is True
    back = peft.PeftModel.from_pretrained(copy.deepcopy(unet), str(folder))
    assert relative_error(unet_outputs(back), expected) < 1e-5


def peft_dora_unet(unet):
    cfg = peft.LoraConfig(r=4, lora_alpha=2, use_dora=True, target_modules=UNET_TARGETS, init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(unet), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("cfg,message", [
    pytest.param(LoRAConfig(r=2, use_dora=True, dora_axis="input"), "input axis", id="input-axis"),
    pytest.param(LoHaConfig(r=2, use_dora=True), "has no DoRA", id="loha"),
])
def test_what_peft_cannot_hold_is_refused(tmp_path, cfg, message):
    unet = build_tiny_sd_pipeline().unet
    controller_for(unet).add_adapter("d", cfg.replace(target_modules=UNET_TARGETS), activate=True)
    with pytest.raises(ValueError, match=message):
        save_adapter(unet, "d", tmp_path / "peft", format="peft")
    assert not (tmp_path / "peft").exists()


# ---- bad input ---------------------------------------------------------------------------------------------
def test_bad_dora_scale_shapes_and_owners_are_errors(tmp_path):
    pipe = build_tiny_sd_pipeline()
    controller_for(pipe.unet).add_adapter("d", LoRAConfig(r=2, use_dora=True, target_modules=["to_q"]), activate=True)
    path = save_adapter(pipe, "d", tmp_path / "d.safetensors")
    state = load_file(str(path))
    key = next(k for k in state if k.endswith("dora_scale"))
    fresh = build_tiny_sd_pipeline()
    before = {k: v.clone() for k, v in fresh.unet.state_dict().items()}
    bad = dict(state)
    bad[key] = state[key].reshape(1, -1)[:, :3]
    with pytest.raises(ValueError, match="dora_scale has shape"):
        load_adapter(fresh, bad, "bad")
    oft = {k.replace(".lora_down.weight", ".oft_blocks"): torch.zeros(2, 4, 4) for k in state if k.endswith("lora_down.weight")}
    oft.update({k: v for k, v in state.items() if k.endswith("dora_scale")})
    with pytest.raises(ValueError, match="DoRA applies to"):
        load_adapter(fresh, oft, "oft")
    assert controller_for(fresh.unet, create=False) is None
    assert all(torch.equal(before[k], v) for k, v in fresh.unet.state_dict().items())
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "ok.safetensors"))
    load_adapter(fresh, tmp_path / "ok.safetensors", "ok")


def test_diffusers_format_refuses_dora(tmp_path):
    unet = build_tiny_sd_pipeline().unet
    controller_for(unet).add_adapter("d", LoRAConfig(r=2, use_dora=True, target_modules=UNET_TARGETS), activate=True)
    with pytest.raises(ValueError, match="DoRA"):
        save_adapter(unet, "d", tmp_path / "d.safetensors", format="diffusers")
    assert not (tmp_path / "d.safetensors").exists()
