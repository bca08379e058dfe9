"""diffusers LoRA files and PEFT adapter folders: against diffusers' and PEFT's own loaders and writers.

* diffusers: files written by ``save_lora_weights`` (PEFT and ``lora.down`` spellings, with and without
  ``lora_adapter_metadata``) render what ``pipe.load_lora_weights`` renders; ours written as diffusers
  load in ``load_lora_weights`` and render the same; the old attention-processor spelling reads.
* PEFT: ``save_pretrained`` folders of all six methods (UNet + text encoder, per-component subfolders)
  give PEFT's outputs; ours written as PEFT load in ``PeftModel.from_pretrained`` with the same outputs;
  round trips are exact.
* bad input changes nothing.
"""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

peft = pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")

import peft.tuners.boft.layer as peft_boft_layer  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from peft import get_peft_model_state_dict  # noqa: E402

from lycoris_lite import BOFTConfig, HRAConfig, LoHaConfig, LoKrConfig, LoRAConfig, OFTConfig, controller_for  # noqa: E402
from lycoris_lite.algos.boft import peft_butterfly_perm
from lycoris_lite.algos.oft import peft_coft_project
from lycoris_lite.core.layer import AdapterLayer
from lycoris_lite.io.files import detect_format, load_adapter, save_adapter  # noqa: E402
from lycoris_lite.io.formats import peft_format  # noqa: E402
from lycoris_lite.io.formats.safe_io import read_state_dict  # noqa: E402
from lycoris_lite.models import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline  # noqa: E402

TOL = 1e-5
PROMPT = "a photo of sks dog"
# a few layers of each kind: linear (self/cross attention), 1×1 conv (proj_in), 3×3 convs
UNET_TARGETS = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
                "down_blocks.1.attentions.0.proj_in", "down_blocks.1.resnets.0.conv1", "up_blocks.1.resnets.2.conv1"]
TE_TARGETS = ["q_proj", "fc1"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's BOFT CUDA-extension fallback, transformers' load reports
        yield


def render(pipe):
    return pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images


def unload(pipe):
    for c in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, c, None)
        ctrl = controller_for(model, create=False) if model is not None else None
        if ctrl is not None:
            ctrl.unload()


def snapshot(models: dict):
    return {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in models.items()}


def unchanged(models: dict, before) -> bool:
    now = snapshot(models)
    return all(now[c].keys() == before[c].keys() and all(torch.equal(now[c][k], before[c][k]) for k in before[c])
               for c in before) and not any(isinstance(mod, AdapterLayer) for m in models.values() for mod in m.modules()) \
        and all(controller_for(m, create=False) is None for m in models.values())


@pytest.fixture(scope="module")
def sd():
    return build_tiny_sd_pipeline()


def peft_lora_layers(pipe) -> dict:
    """``{component: number of PEFT LoRA layers}`` diffusers injected."""
    from peft.tuners.lora import LoraLayer

    return {c: sum(isinstance(m, LoraLayer) for m in getattr(pipe, c).modules()) for c in ("unet", "text_encoder")}


# ---- diffusers files ------------------------------------------------------------------------------------
def diffusers_lora_file(folder, spelling: str):
    """A file written by diffusers itself: PEFT LoRA on the UNet and text encoder (random, alpha ≠ r, a
    rank and alpha pattern, rsLoRA on the text encoder), saved with ``save_lora_weights``."""
    from peft import LoraConfig

    pipe = build_tiny_sd_pipeline()
    # the old spellings are attention-processor LoRAs (diffusers reads a file whose first key is a
    # lora_A key as PEFT-spelled throughout, so the two spellings are not mixed in one UNet part)
    extra = ["proj_in", "conv1"] if spelling == "peft" else []
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=2, rank_pattern={"conv1": 2, "attn2.to_q": 2}, alpha_pattern={"to_k": 5},
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"] + extra, init_lora_weights=False))
    pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "v_proj", "fc1"],
                                             init_lora_weights=False))
    unet_sd, te_sd = get_peft_model_state_dict(pipe.unet), get_peft_model_state_dict(pipe.text_encoder)
    if spelling == "peft":
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd,
            unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
            text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict())
    else:
        # "lora.down"/"lora_linear_layer.down" spelling, no metadata: diffusers and we both use scale 1
        from diffusers.utils import convert_state_dict_to_diffusers

        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(unet_sd),
                                                  text_encoder_lora_layers=convert_state_dict_to_diffusers(te_sd))
    return folder / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("spelling", ["peft", "lora.down"])
def test_diffusers_written_file_renders_like_load_lora_weights(sd, spelling, tmp_path):
    path = diffusers_lora_file(tmp_path, spelling)
    keys = list(load_file(str(path)))
    assert any(".lora.down.weight" in k for k in keys) == (spelling == "lora.down")
    ref = build_tiny_sd_pipeline()
    ref.load_lora_weights(str(tmp_path), adapter_name="x")
    expected = render(ref)
    if spelling == "peft":
        ref.set_adapters("x", 0.5)
        expected_half = render(ref)
        assert np.abs(expected - expected_half).max() > 1e-2  # the LoRA matters

    info = load_adapter(sd, tmp_path)  # the folder; the file path works the same
    try:
        assert info.format == "diffusers" and info.components == peft_lora_layers(ref)  # every layer diffusers loads
        assert np.abs(render(sd) - expected).max() <= TOL
        if spelling == "peft":
            for c in ("unet", "text_encoder"):
                controller_for(getattr(sd, c)).set_scale(info.name, 0.5)
            assert np.abs(render(sd) - expected_half).max() <= TOL
    finally:
        unload(sd)


def test_old_attention_processor_spelling(sd, tmp_path):
    """``attn1.processor.to_q_lora.down.weight`` (UNet) and ``self_attn.to_q_lora.down.weight`` with the
    ``text_model.`` level (text encoder) read as the same LoRA as the PEFT spelling."""
    path = diffusers_lora_file(tmp_path, "lora.down")
    state = load_file(str(path))
    old = {}
    for key, value in state.items():
        for leaf in ("to_q", "to_k", "to_v", "to_out.0"):
            for role in ("down", "up"):
                new = f".processor.{leaf.replace('.0', '')}_lora.{role}.weight"
                key = key.replace(f".{leaf}.lora.{role}.weight", new) if key.startswith("unet.") else key
        if key.startswith("text_encoder."):
            key = "text_encoder.text_model." + key[len("text_encoder."):]
            for proj in ("q", "v"):
                key = key.replace(f"self_attn.{proj}_proj.lora_linear_layer.", f"self_attn.to_{proj}_lora.")
        old[key] = value
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight" in old
    assert "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight" in old
    models = {"unet": sd.unet, "text_encoder": sd.text_encoder}
    try:
        load_adapter(sd, state, "new")
        load_adapter(sd, old, "old")
        for m in models.values():
            ctrl = controller_for(m)
            assert_same_adapter(ctrl, "new", ctrl, "old")
    finally:
        unload(sd)


def assert_same_adapter(ctrl_a, name_a, ctrl_b, name_b, skew_only=False):
    """The same layers, tensors (bitwise) and per-layer settings. ``skew_only``: OFT blocks ``B`` are
    compared by what the layer uses, ``Q = B − Bᵀ`` (PEFT stores only that)."""
    a, b = ctrl_a.adapter_tensors(name_a), ctrl_b.adapter_tensors(name_b)
    if skew_only:
        a, b = ({p: {k: v - v.transpose(-1, -2) if k == "oft_blocks" else v for k, v in t.items()} for p, t in x.items()}
                for x in (a, b))
    assert a.keys() == b.keys() and a
    assert all(a[p].keys() == b[p].keys() and all(torch.equal(a[p][k], b[p][k]) for k in a[p]) for p in a)
    assert ctrl_a.adapter_settings(name_a) == ctrl_b.adapter_settings(name_b)


def attach_lora(pipe, name="a"):
    """Our LoRA with alpha ≠ r, per-layer ranks/alphas, rsLoRA on the text encoder, convs included."""
    controller_for(pipe.unet).add_adapter(name, LoRAConfig(
        r=4, alpha=3, rank_pattern={"conv1": 2}, alpha_pattern={"to_v": 7.5}, init_weights=False,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "downsamplers.0.conv"]),
        generator=torch.Generator().manual_seed(0), activate=True)
    for c in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, c, None) is not None:
            controller_for(getattr(pipe, c)).add_adapter(name, LoRAConfig(
                r=4, alpha=2, use_rslora=True, target_modules=["q_proj", "out_proj", "fc2"], init_weights=False),
                generator=torch.Generator().manual_seed(1), activate=True)


def test_ours_as_diffusers_renders_the_same_in_diffusers(sd, tmp_path):
    attach_lora(sd)
    try:
        expected = render(sd)
        path = save_adapter(sd, "a", tmp_path, format="diffusers")
    finally:
        unload(sd)
    assert path == tmp_path / "pytorch_lora_weights.safetensors"
    state, meta = read_state_dict(path)
    assert detect_format(state) == "diffusers"
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in state
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["unet.r"] == 4 and config["unet.lora_alpha"] == 3 and config["text_encoder.use_rslora"] is True
    ref = build_tiny_sd_pipeline()
    ref.load_lora_weights(str(tmp_path), adapter_name="ours")
    assert peft_lora_layers(ref) == {"unet": len(config["unet.target_modules"]), "text_encoder": 6}
    assert np.abs(render(ref) - expected).max() <= TOL
    ref.set_adapters("ours", 0.0)
    assert np.abs(render(ref) - expected).max() > 1e-2  # the LoRA matters
    # ours -> diffusers -> ours is exact
    attach_lora(sd)
    try:
        info = load_adapter(sd, path, "back")
        assert info.algorithms == {"lora": sum(info.components.values())}
        for c in ("unet", "text_encoder"):
            ctrl = controller_for(getattr(sd, c))
            assert_same_adapter(ctrl, "a", ctrl, "back")
    finally:
        unload(sd)


def test_sdxl_text_encoders_both_ways(tmp_path):
    """SDXL: ``text_encoder`` (no ``text_model`` level in transformers 5) and ``text_encoder_2``
    (``CLIPTextModelWithProjection``, which keeps it); compared on the components' outputs."""
    ours = build_tiny_sdxl_pipeline()
    attach_lora(ours)
    ids = torch.randint(0, 1000, (1, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = {c: getattr(ours, c)(ids).last_hidden_state for c in ("text_encoder", "text_encoder_2")}
    save_adapter(ours, "a", tmp_path, format="diffusers")
    state = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("text_encoder_2.text_model.encoder.") for k in state)
    ref = build_tiny_sdxl_pipeline()
    ref.load_lora_weights(str(tmp_path), adapter_name="ours")
    fresh = build_tiny_sdxl_pipeline()
    load_adapter(fresh, tmp_path)
    with torch.no_grad():
        for c in ("text_encoder", "text_encoder_2"):
            assert (getattr(ref, c)(ids).last_hidden_state - expected[c]).abs().max() <= TOL
            assert torch.equal(getattr(fresh, c)(ids).last_hidden_state, expected[c])
    for c in ("unet", "text_encoder", "text_encoder_2"):
        assert {p for p, _ in controller_for(getattr(fresh, c)).layers()} == {p for p, _ in controller_for(getattr(ours, c)).layers()}


def test_model_level_diffusers_file(base, tmp_path):
    """``unet.save_lora_adapter`` writes keys without the ``unet.`` prefix and bare LoraConfig metadata."""
    from peft import LoraConfig

    theirs = fresh(base)["unet"]
    theirs.add_adapter(LoraConfig(r=2, lora_alpha=6, target_modules=["to_q", "conv1"], init_lora_weights=False))
    theirs.save_lora_adapter(str(tmp_path))
    keys = list(load_file(str(tmp_path / "pytorch_lora_weights.safetensors")))
    assert keys[0].startswith("down_blocks.")
    ours = fresh(base)
    info = load_adapter(ours, tmp_path / "pytorch_lora_weights.safetensors")
    assert info.components == {"unet": len(keys) // 2} and info.name == tmp_path.name.replace(".", "_")
    assert max_diff(outputs(ours, base), outputs({"unet": theirs, "text_encoder": ours["text_encoder"]}, base)) <= TOL


def test_only_lora_is_written_as_diffusers(sd, tmp_path):
    controller_for(sd.unet).add_adapter("h", LoHaConfig(r=2, target_modules=["to_q"]))
    try:
        with pytest.raises(ValueError, match=r"LoRA only.*LOHA.*(extract|conver)"):
            save_adapter(sd, "h", tmp_path, format="diffusers")
    finally:
        unload(sd)
    assert not any(tmp_path.iterdir())


# ---- PEFT folders ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(sd):
    """The tiny UNet and text encoder, and fixed inputs."""
    g = torch.Generator().manual_seed(0)
    inputs = {"unet": (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]), torch.randn(1, 77, 32, generator=g)),
              "text_encoder": torch.randint(0, 1000, (1, 77), generator=g)}
    models = {"unet": sd.unet, "text_encoder": sd.text_encoder}
    inputs["outputs"] = outputs(models, (models, inputs))
    return models, inputs


def fresh(base):
    models, _ = base
    assert controller_for(models["unet"], create=False) is None
    return {c: copy.deepcopy(m) for c, m in models.items()}


def outputs(models, base) -> dict:
    _, inputs = base
    x, t, ehs = inputs["unet"]
    with torch.no_grad():
        out = {"unet": models["unet"](x, t, encoder_hidden_states=ehs).sample}
        if "text_encoder" in models:
            out["text_encoder"] = models["text_encoder"](inputs["text_encoder"]).last_hidden_state
    return out


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[c] - b[c]).abs().max().item() for c in a)


def peft_outputs(peft_models: dict, base, merged: bool) -> dict:
    """PEFT's outputs; ``merged``: through its merged weights (PEFT's OFT Conv2d forward is wrong for
    inputs larger than the kernel and fails on small ones, peft-tuners.md §6.1; its merge is right)."""
    models = {c: copy.deepcopy(m).merge_and_unload() if merged and c == "unet" else m for c, m in peft_models.items()}
    return outputs(models, base)


# PEFT configs per algorithm: (UNet, text encoder)
def peft_configs(algo):
    P = peft
    u, t = UNET_TARGETS, TE_TARGETS
    return {
        "lora": (P.LoraConfig(r=4, lora_alpha=2, rank_pattern={"conv1": 2}, target_modules=u, init_lora_weights=False),
                 P.LoraConfig(r=2, lora_alpha=3, use_rslora=True, target_modules=t, init_lora_weights=False)),
        "loha": (P.LoHaConfig(r=4, alpha=2, use_effective_conv2d=True, target_modules=u, init_weights=False),
                 P.LoHaConfig(r=2, alpha=3, alpha_pattern={"fc1": 1.5}, target_modules=t, init_weights=False)),
        # r=2: small layers get two full Kronecker factors (PEFT's scale alpha/r still applies to them)
        "lokr": (P.LoKrConfig(r=2, alpha=3, use_effective_conv2d=True, target_modules=u, init_weights=False),
                 P.LoKrConfig(r=1, alpha=1, decompose_both=True, target_modules=t, init_weights=False)),
        "oft": (P.OFTConfig(r=0, oft_block_size=4, use_cayley_neumann=False, target_modules=u, init_weights=False),
                P.OFTConfig(r=0, oft_block_size=8, coft=True, eps=0.05, target_modules=t, init_weights=False)),
        # on CPU PEFT uses one butterfly stage whatever is asked (no CUDA extension)
        "boft": (P.BOFTConfig(boft_block_size=4, target_modules=u, init_weights=False),
                 P.BOFTConfig(boft_block_size=0, boft_block_num=4, target_modules=t, init_weights=False)),
        "hra": (P.HRAConfig(r=4, target_modules=u, init_weights=False),
                P.HRAConfig(r=2, apply_GS=True, target_modules=t, init_weights=False)),
    }[algo]


ALGOS = ["lora", "loha", "lokr", "oft", "boft", "hra"]


@pytest.mark.parametrize("algo", ALGOS)
def test_peft_folder_round_trips(base, algo, tmp_path):
    """PEFT ``save_pretrained`` (per-component subfolders) -> ours == PEFT; ours -> PEFT folder holds the
    same tensors, and ``PeftModel.from_pretrained`` on it == ours; ours -> PEFT -> ours is exact."""
    cfg_u, cfg_t = peft_configs(algo)
    originals = fresh(base)
    peft_models = {"unet": peft.get_peft_model(copy.deepcopy(originals["unet"]), cfg_u),
                   "text_encoder": peft.get_peft_model(copy.deepcopy(originals["text_encoder"]), cfg_t)}
    for c, m in peft_models.items():
        m.save_pretrained(str(tmp_path / "peft" / c))
    expected = peft_outputs(peft_models, base, merged=algo == "oft")
    base_out = base[1]["outputs"]
    assert min((expected[c] - base_out[c]).abs().max().item() for c in expected) > 1e-3  # the adapters matter

    ours = fresh(base)
    info = load_adapter(ours, tmp_path / "peft")
    assert info.format == "peft" and info.algorithms == {algo: sum(info.components.values())}
    assert info.components == {"unet": len(UNET_TARGETS), "text_encoder": 4}
    got = outputs(ours, base)
    assert max_diff(got, expected) <= TOL
    if algo == "lokr":  # PEFT's alpha/r on layers with two full factors (LyCORIS would use 1) is kept
        settings = controller_for(ours["unet"]).adapter_settings(info.name).values()
        assert any(not s.w1_low_rank and not s.w2_low_rank and s.scale == 1.5 for s in settings)

    save_adapter(ours, info.name, tmp_path / "ours", format="peft")
    for c in ("unet", "text_encoder"):
        theirs = load_file(str(tmp_path / "peft" / c / "adapter_model.safetensors"))
        mine = load_file(str(tmp_path / "ours" / c / "adapter_model.safetensors"))
        assert theirs.keys() == mine.keys()
        if algo == "oft" and c == "text_encoder":
            # COFT: PEFT projects its parameter before each use; we project once when loading and
            # write the projected vector (with coft off)
            assert json.loads((tmp_path / "ours" / c / "adapter_config.json").read_text())["coft"] is False
            assert all(torch.equal(mine[k], peft_coft_project(theirs[k], 8, 0.05)) for k in theirs)
            assert not any(torch.equal(theirs[k], mine[k]) for k in theirs)
        else:  # the mappings are exact both ways
            assert all(torch.equal(theirs[k], mine[k]) for k in theirs), c
    back = {c: peft.PeftModel.from_pretrained(copy.deepcopy(originals[c]), str(tmp_path / "ours" / c)) for c in originals}
    assert max_diff(peft_outputs(back, base, merged=algo == "oft"), got) <= TOL

    # ours -> PEFT -> ours is exact (same tensors and settings, hence the same outputs)
    again = fresh(base)
    load_adapter(again, tmp_path / "ours", "again")
    for c in ("unet", "text_encoder"):
        assert_same_adapter(controller_for(ours[c]), info.name, controller_for(again[c]), "again")


OURS = {
    "lora": LoRAConfig(r=4, alpha=3, rank_pattern={"conv1": 2}, alpha_pattern={"to_q": 6}),
    "loha": LoHaConfig(r=2, alpha=3, use_tucker=True),
    "lokr": LoKrConfig(r=2, alpha=3, factor=2, decompose_both=True),
    "oft": OFTConfig(block_size=4, rotation_side="input", use_cayley_neumann=True, num_cayley_neumann_terms=4),
    "boft": BOFTConfig(r=4, butterfly_factor=1, rotation_side="input", rescale=True),
    "hra": HRAConfig(r=3, rotation_side="input", apply_GS=False, init_weights=False),
}


@pytest.mark.parametrize("algo", ALGOS)
def test_ours_as_peft_loads_in_peft(base, algo, tmp_path):
    """Adapters made by us (input side for the rotations) -> PEFT folder -> ``PeftModel.from_pretrained``
    gives our outputs; -> ours again is exact. A single model is written as a flat folder."""
    ours = fresh(base)
    cfg = OURS[algo].replace(target_modules=UNET_TARGETS, init_weights=False)
    controller_for(ours["unet"]).add_adapter("a", cfg, generator=torch.Generator().manual_seed(3), activate=True)
    del ours["text_encoder"]
    expected = outputs(ours, base)
    folder = save_adapter(ours["unet"], "a", tmp_path / "flat", format="peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == algo.upper() and sorted(config["target_modules"]) == sorted(UNET_TARGETS)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base[0]["unet"]), str(folder))
    assert max_diff(peft_outputs({"unet": theirs}, base, merged=algo == "oft"), expected) <= TOL
    again = copy.deepcopy(base[0]["unet"])
    load_adapter(again, folder, "b")
    assert_same_adapter(controller_for(ours["unet"]), "a", controller_for(again), "b", skew_only=algo == "oft")


def test_peft_butterfly_permutations_match_peft():
    layer = peft_boft_layer.BOFTLayer
    for dim, n, b, m in [(24, 4, 6, 2), (32, 8, 4, 3), (48, 6, 8, 2), (16, 4, 4, 1)]:
        for i in range(m):
            theirs = layer.block_butterfly_perm(None, dim, int(n / 2**i), b // 2, m - 1)
            assert torch.equal(peft_butterfly_perm(dim, n, b, m, i), theirs)


class _FakeBlockDiagExtension:
    """PEFT's ``fbd_cuda`` stand-in (block diagonal per stage), so PEFT builds multi-stage BOFT on CPU."""

    @staticmethod
    def forward(x):
        return [torch.stack([torch.block_diag(*stage.unbind(0)) for stage in x])]


def test_multistage_boft_folder(tmp_path):
    """PEFT's BOFT with 2 butterfly stages (as on a machine where its CUDA extension builds) both ways."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.Linear(16, 24))
    x = torch.randn(5, 24)
    saved = peft_boft_layer._FBD_CUDA
    peft_boft_layer._FBD_CUDA = _FakeBlockDiagExtension()
    try:
        pm = peft.get_peft_model(copy.deepcopy(model), peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2,
                                                                       target_modules=["0", "1"], init_weights=False))
        assert pm.base_model.model[0].boft_R["default"].shape[0] == 2
        with torch.no_grad():
            expected = pm(x)
        pm.save_pretrained(str(tmp_path / "peft"))
        ours = copy.deepcopy(model)
        load_adapter(ours, tmp_path / "peft", "b")
        with torch.no_grad():
            assert (ours(x) - expected).abs().max() <= TOL
        save_adapter(ours, "b", tmp_path / "ours", format="peft")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours"))
        with torch.no_grad():
            assert (back(x) - expected).abs().max() <= TOL
    finally:
        peft_boft_layer._FBD_CUDA = saved


def test_peft_lokr_with_full_factors_converts_to_kohya(tmp_path):
    """PEFT scales a LoKr with two full factors by alpha/r; LyCORIS-format readers use 1 there, so the
    kohya writer folds the scale into w1: PEFT -> ours -> kohya -> ours keeps PEFT's outputs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    x = torch.randn(3, 16)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoKrConfig(r=2, alpha=3, target_modules=["0"], init_weights=False))
    pm.save_pretrained(str(tmp_path / "peft"))
    ours = copy.deepcopy(model)
    load_adapter(ours, tmp_path / "peft", "a")
    save_adapter(ours, "a", tmp_path / "k.safetensors")
    assert "lycoris_0.lokr_w1" in load_file(str(tmp_path / "k.safetensors"))  # a module alone is a transformer
    again = copy.deepcopy(model)
    load_adapter(again, tmp_path / "k.safetensors", "b")
    with torch.no_grad():
        assert (again(x) - pm(x)).abs().max() <= TOL and (pm(x) - model(x)).abs().max() > 1e-2


def test_single_peft_folder_goes_to_the_unet_or_the_named_component(base, tmp_path):
    originals = fresh(base)
    te = peft.get_peft_model(copy.deepcopy(originals["text_encoder"]),
                             peft.LoraConfig(r=2, target_modules=TE_TARGETS, init_lora_weights=False))
    te.save_pretrained(str(tmp_path))
    ours = fresh(base)
    before = snapshot(ours)
    # by default a single folder is the UNet's: these text-encoder names are not in it
    with pytest.raises(ValueError, match=r"not in the unet.*encoder\.layers\.0\.mlp\.fc1"):
        load_adapter(ours, tmp_path)
    assert unchanged(ours, before)
    info = load_adapter(ours, tmp_path / "adapter_model.safetensors", component="text_encoder")
    assert info.components == {"text_encoder": 4} and info.name == tmp_path.name.replace(".", "_")
    with torch.no_grad():
        assert (outputs(ours, base)["text_encoder"] - te(base[1]["text_encoder"]).last_hidden_state).abs().max() <= TOL


# ---- bad input ------------------------------------------------------------------------------------------
def test_peft_config_for_other_module_names(base, tmp_path):
    """A PEFT adapter made for another model (an LLM's q_proj/v_proj): an error naming the modules."""
    keys = {f"base_model.model.model.layers.{i}.self_attn.{p}.lora_{ab}.weight": torch.randn(2, 8) if ab == "A" else torch.randn(8, 2)
            for i in range(2) for p in ("q_proj", "v_proj") for ab in "AB"}
    peft_format.write_folder(tmp_path, keys, {"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                              "target_modules": ["q_proj", "v_proj"]})
    ours = fresh(base)
    before = snapshot(ours)
    with pytest.raises(ValueError, match=r"target_modules=\['q_proj', 'v_proj'\].*model\.layers\.0\.self_attn\.q_proj"):
        load_adapter(ours, tmp_path)
    assert unchanged(ours, before)


def test_diffusers_file_whose_shapes_do_not_fit(sd, tmp_path):
    path = diffusers_lora_file(tmp_path, "peft")
    state, meta = read_state_dict(path)
    models = {"unet": sd.unet, "text_encoder": sd.text_encoder}
    before = snapshot(models)
    # a UNet LoRA of another width
    bad = dict(state)
    key = next(k for k in bad if k.startswith("unet.") and "attn1.to_q.lora_A" in k)
    bad[key] = torch.randn(bad[key].shape[0], bad[key].shape[1] * 2)
    save_file(bad, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="shape"):
        load_adapter(sd, tmp_path / "bad.safetensors")
    assert unchanged(models, before)
    # the UNet part is fine but a text-encoder tensor is not: nothing is attached anywhere
    bad = dict(state)
    key = next(k for k in bad if k.startswith("text_encoder.") and k.endswith("lora_B.weight"))
    bad[key] = torch.randn(bad[key].shape[0] + 1, bad[key].shape[1])
    with pytest.raises(ValueError, match="shape"):
        load_adapter(sd, bad, "b")
    assert unchanged(models, before)
    # metadata that contradicts the tensors
    meta2 = dict(meta, lora_adapter_metadata=meta["lora_adapter_metadata"].replace('"unet.r": 4', '"unet.r": 3'))
    save_file(state, str(tmp_path / "meta.safetensors"), metadata=meta2)
    with pytest.raises(ValueError, match="rank 3"):
        load_adapter(sd, tmp_path / "meta.safetensors")
    assert unchanged(models, before)


def test_unknown_formats_and_unwritable_adapters(sd, base, tmp_path):
    models = {"unet": sd.unet, "text_encoder": sd.text_encoder}
    before = snapshot(models)
    with pytest.raises(ValueError, match="unrecognised adapter format"):
        load_adapter(sd, {"model.diffusion.weight": torch.zeros(2, 2)}, "x")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "weird.safetensors"))
    with pytest.raises(ValueError, match="unrecognised adapter format"):
        load_adapter(sd, tmp_path / "weird.safetensors")
    with pytest.raises(ValueError, match="neither adapter_config.json"):
        load_adapter(sd, tmp_path)
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_adapter(sd, {"base_model.model.conv_in.lora_A.weight": torch.zeros(2, 4, 3, 3)}, "x")
    assert unchanged(models, before)
    with pytest.raises(ValueError, match="unknown format"):
        save_adapter(sd, "x", tmp_path / "x", format="comfy")

    ours = fresh(base)
    controller_for(ours["unet"]).add_adapter("o", OFTConfig(block_size=4, target_modules=UNET_TARGETS))  # output side
    with pytest.raises(ValueError, match="output-side OFT.*input side"):
        save_adapter(ours, "o", tmp_path / "o", format="peft")
    assert not (tmp_path / "o").exists()


def test_peft_folder_header_metadata_is_read(base, tmp_path):
    """The safetensors header of each part (trigger words, model spec, PEFT's ``format``) comes back on
    load; a value the parts disagree on is kept per part."""
    ours = fresh(base)
    for c, targets in (("unet", UNET_TARGETS), ("text_encoder", TE_TARGETS)):
        controller_for(ours[c]).add_adapter("a", LoRAConfig(r=2, target_modules=targets), activate=True)
    meta = {"ss_tag_frequency": json.dumps({"sks": {"sks dog": 3}}), "modelspec.title": "dog"}
    save_adapter(ours, "a", tmp_path / "p", format="peft", metadata=meta)
    te_file = tmp_path / "p" / "text_encoder" / "adapter_model.safetensors"
    save_file(load_file(str(te_file)), str(te_file), metadata={**meta, "format": "pt", "modelspec.title": "other"})
    info = load_adapter(fresh(base), tmp_path / "p", "b")
    assert info.metadata["ss_tag_frequency"] == meta["ss_tag_frequency"] and info.metadata["format"] == "pt"
    assert info.metadata["modelspec.title"] == "dog" and info.metadata["text_encoder.modelspec.title"] == "other"
    assert "lycoris_lite.peft_config.unet" in info.metadata
