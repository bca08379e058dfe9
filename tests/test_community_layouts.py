"""Community file layouts of transformer models: original (BFL / Stability / Wan / Tongyi) module names,
fused projections split exactly for every algorithm, written back fused.

Each synthetic file is built from the layouts' documented names (sd-scripts / musubi-tuner
``lora_unet_<original>``, ComfyUI ``diffusion_model.<original>``, xlabs ``processor.qkv_lora1``) with
an adapter on the *fused* original matrix. The reference is independent: the fused matrix is put
together from the diffusers modules' weights, the adapter applied to it in float64 with
``tests/reference.py`` (dense maths), and each diffusers module must compute its rows of the result.
"""

from __future__ import annotations

import pytest
import torch

from lycoris_lite import controller_for, models
from lycoris_lite.base.layer_kind import LayerSpec
from lycoris_lite.base.registry import get_algorithm
from lycoris_lite.io.files import load_adapter, read_adapter, save_adapter
from lycoris_lite.io.formats.original import original_modules
from reference import relative_error, transformed_weight

BUILDERS = {"flux": models.build_tiny_flux_pipeline, "flux2": models.build_tiny_flux2_pipeline,
            "sd3": models.build_tiny_sd3_pipeline, "z-image": models.build_tiny_z_image_pipeline,
            "wan": models.build_tiny_wan_pipeline, "qwen-image": models.build_tiny_qwen_image_pipeline}
#: per family: original modules a file adapts (fused ones first)
MODULES = {"flux": ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_attn.qkv", "single_blocks.0.linear1",
                    "final_layer.adaLN_modulation.1", "double_blocks.0.img_attn.proj", "img_in"],
           "flux2": ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "single_blocks.0.linear1",
                     "final_layer.adaLN_modulation.1", "double_blocks.0.img_mlp.0"],
           "sd3": ["joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.context_block.attn.qkv",
                   "final_layer.adaLN_modulation.1", "joint_blocks.0.x_block.mlp.fc1"],
           "z-image": ["layers.0.attention.qkv", "noise_refiner.0.attention.qkv", "layers.0.attention.out",
                       "layers.0.feed_forward.w1"],
           "wan": ["blocks.0.self_attn.q", "blocks.0.cross_attn.o", "blocks.1.ffn.0"],
           "qwen-image": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.img_mod.1"]}


_PIPES: dict = {}


def _pipe(family):
    """One tiny pipeline per family for the whole module (each test deletes what it loads)."""
    if family not in _PIPES:
        _PIPES[family] = BUILDERS[family]()
    return _PIPES[family]


def file_tensors(case: str, out: int, inp: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One module's tensors (file keys) of a synthetic adapter of kind ``case`` on an ``out × inp`` matrix."""
    def rnd(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    if case in ("lora", "lora-dora"):
        t = {"lora_down.weight": rnd(4, inp), "lora_up.weight": rnd(out, 4), "alpha": torch.tensor(2.0)}
        if case == "lora-dora":
            t["dora_scale"] = 1 + rnd(out, 1)
        return t
    if case == "loha":
        return {"hada_w1_a": rnd(out, 3), "hada_w1_b": rnd(3, inp), "hada_w2_a": rnd(out, 3),
                "hada_w2_b": rnd(3, inp), "alpha": torch.tensor(3.0)}
    if case == "lokr-aligned":  # kron blocks of 16 rows: every module boundary (multiples of 16) falls between
        return {"lokr_w1": rnd(out // 16, 4, scale=1.0), "lokr_w2": rnd(16, inp // 4)}
    if case in ("lokr-straddling", "lokr-dora"):  # blocks of out/8 rows (12 for a 96-row qkv): boundaries inside
        b = out // 8
        t = {"lokr_w1": rnd(8, 4, scale=1.0), "lokr_w2_a": rnd(b, 2), "lokr_w2_b": rnd(2, inp // 4),
             "alpha": torch.tensor(1.0)}
        if case == "lokr-dora":
            t["dora_scale"] = 1 + rnd(out, 1)
        return t
    if case == "oft":  # 16-row blocks with a COFT clamp that bites (alpha · out < ‖Q‖)
        return {"oft_blocks": rnd(out // 16, 16, 16), "alpha": torch.tensor(1e-3)}
    if case == "oft-straddling":  # blocks of out/4 rows (24 for a 96-row qkv): a block spans two modules
        return {"oft_blocks": rnd(4, out // 4, out // 4), "rescale": 1 + rnd(out, 1)}
    if case == "boft":  # output side: the butterfly mixes rows across modules
        return {"oft_blocks": rnd(2, out // 8, 8, 8), "alpha": torch.tensor(1e-2)}
    if case == "hra":  # input side (PEFT's): every module shares the reflections
        return {"hra_u": rnd(inp, 4, scale=1.0)}
    if case == "hra-output":  # reflections of the output rows: each mixes every module's rows
        return {"hra_u": rnd(out, 4, scale=1.0)}
    raise KeyError(case)


LAYOUTS = {"kohya": "sd-scripts / musubi-tuner (lora_unet_ + original names)",
           "comfyui": "ComfyUI (diffusion_model. + original names)"}
CASES = ["lora", "lora-dora", "loha", "lokr-aligned", "lokr-straddling", "lokr-dora", "oft", "oft-straddling",
         "boft", "hra", "hra-output"]


def _fused_weight(model, om) -> torch.Tensor:
    w = torch.zeros(om.out_features, om.in_features, dtype=torch.float64)
    for part in om.parts:
        weight = model.get_submodule(part.path).weight.detach().double()
        offset = 0
        for start, stop in part.rows:
            w[start:stop] = weight[offset:offset + stop - start]
            offset += stop - start
    return w


def _expected(model, om, case, tensors) -> dict[str, torch.Tensor]:
    """Each diffusers module's rows of the adapted fused matrix (float64, from the maths)."""
    algo_name = "lokr" if case.startswith("lokr") else case.split("-")[0]
    algo = get_algorithm(algo_name)
    spec = LayerSpec("linear", om.out_features, om.in_features)
    alpha = tensors.get("alpha")
    settings, params = algo.from_kohya(spec, {k: v for k, v in tensors.items() if k != "alpha"},
                                       None if alpha is None else float(alpha), om.name)
    adapted = transformed_weight(algo_name, _fused_weight(model, om), params, settings)
    out = {}
    for part in om.parts:
        out[part.path] = torch.cat([adapted[start:stop] for start, stop in part.rows])
    return out


def _check_modules(model, expected: dict[str, torch.Tensor]) -> None:
    """The unfused forward and the fused weight of every module against the expected weights."""
    ctrl = controller_for(model)
    g = torch.Generator().manual_seed(1)
    for path, weight in expected.items():
        module = model.get_submodule(path)
        x = torch.randn(3, weight.shape[1], generator=g)
        bias = module.base_layer.bias if hasattr(module, "base_layer") else module.bias
        want = x.double() @ weight.T + (bias.detach().double() if bias is not None else 0)
        assert relative_error(module(x), want) < 2e-5, path
    name = next(iter(ctrl.configs))
    ctrl.merge_adapter([name])
    for path, weight in expected.items():
        base = model.get_submodule(path)
        base = getattr(base, "base_layer", base)
        assert relative_error(base.weight, weight) < 2e-5, path
    ctrl.unmerge_adapter()


def _file(family, model, case, layout, g):
    state, expected = {}, {}
    for name in MODULES[family]:
        om = original_modules(model)[name]
        if om.out_features % (16 if case in ("oft", "lokr-aligned", "boft") else 8) or om.in_features % 4:
            continue  # the synthetic factors need these divisors
        if case == "hra-output" and om.out_features == om.in_features:
            continue  # a square module's hra_u reads as input-side (PEFT's) without the file's side metadata
        tensors = file_tensors(case, om.out_features, om.in_features, g)
        expected.update(_expected(model, om, case, tensors))
        for key, value in tensors.items():
            if layout == "kohya":
                state[f"lora_unet_{name.replace('.', '_')}.{key}"] = value
            else:  # ComfyUI: original dotted names, PEFT's lora_A/lora_B spelling for LoRA
                key = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(key, key)
                state[f"diffusion_model.{name}.{key}"] = value
    return state, expected


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("case", CASES)
def test_original_names_load_exactly(family, case):
    pipe = _pipe(family)
    g = torch.Generator().manual_seed(hash((family, case)) % 2**31)
    for layout, label in LAYOUTS.items():
        state, expected = _file(family, pipe.transformer, case, layout, g)
        loaded = load_adapter(pipe, state, "a")
        assert sum(loaded.components.values()) == len(expected)
        if family != "qwen-image":  # its original names are diffusers' own
            assert loaded.layout == label
        _check_modules(pipe.transformer, expected)
        controller_for(pipe.transformer).delete_adapter("a")


@pytest.mark.parametrize("family", ["flux", "sd3", "z-image", "wan"])
@pytest.mark.parametrize("case", CASES)
def test_write_read_round_trip_in_original_names(family, case, tmp_path):
    """A file in original names loads split and is written back fused, tensor for tensor (kohya and
    ComfyUI spellings), and the written file loads to the same modules."""
    from safetensors.torch import load_file

    pipe = _pipe(family)
    g = torch.Generator().manual_seed(7)
    state, expected = _file(family, pipe.transformer, case, "kohya", g)
    load_adapter(pipe, state, "a")
    try:
        for fmt in ("kohya", "comfyui"):
            path = save_adapter(pipe, "a", tmp_path / f"{fmt}.safetensors", format=fmt, layout="original")
            written = load_file(path)
            written = {(k if fmt == "kohya" else _kohya_key(k)): v for k, v in written.items()}
            # an alpha where the file had none is the rank (LoKr with both factors full: scale 1 either way)
            assert set(state) <= set(written) and all(k.endswith(".alpha") for k in set(written) - set(state)), fmt
            for key, want in state.items():
                value = written[key]
                if case == "oft":
                    continue  # the COFT clamp is applied once when split (blocks scaled, no clamp after): checked below
                if key.endswith("alpha"):
                    assert float(value) == pytest.approx(float(want)), key
                else:
                    assert torch.equal(value, want.to(value.dtype)), key
            read = read_adapter(pipe, path, "b")
            assert {p for layers in read.plans.values() for p in layers} == set(expected)
    finally:
        controller_for(pipe.transformer).delete_adapter("a")
    loaded = load_adapter(pipe, tmp_path / "comfyui.safetensors", "c")
    try:
        _check_modules(pipe.transformer, expected)
    finally:
        controller_for(pipe.transformer).delete_adapter("c")
    assert loaded.layout == "ComfyUI (diffusion_model. + original names)"


def _kohya_key(key: str) -> str:
    """A ComfyUI key (``diffusion_model.<original>.<tensor key>``) in sd-scripts' spelling."""
    from lycoris_lite.base.registry import file_key_roots
    from lycoris_lite.io.formats.names import split_key

    module, tensor = split_key(key, file_key_roots())
    return "lora_unet_" + module.removeprefix("diffusion_model.").replace(".", "_") + "." + tensor


# ---- what has no exact per-module form is refused, and the model is left as it was ----------------------
@pytest.mark.parametrize("tensors,reason", [
    ({"lora_down.weight": torch.randn(4, 32), "lora_up.weight": torch.randn(96, 4) * 0.1,
      "dora_scale": torch.ones(1, 32)}, "input axis"),                              # DoRA normalised per column
], ids=["dora-input-axis"])
def test_no_exact_form_is_refused_and_changes_nothing(tensors, reason):
    pipe = _pipe("flux")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    state = {f"lora_unet_double_blocks_0_img_attn_qkv.{k}": v for k, v in tensors.items()}
    with pytest.raises(ValueError, match=reason) as info:
        load_adapter(pipe, state, "bad")
    assert "not loaded approximately" in str(info.value)
    assert controller_for(pipe.transformer, create=False) is None or not controller_for(pipe.transformer).configs
    after = pipe.transformer.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_unresolved_original_names_are_reported():
    pipe = _pipe("flux")
    g = torch.Generator().manual_seed(3)
    state = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(4, 32, generator=g),
             "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(96, 4, generator=g),
             "diffusion_model.double_blocks.9.img_attn.qkv.lora_A.weight": torch.randn(4, 32, generator=g),
             "diffusion_model.double_blocks.9.img_attn.qkv.lora_B.weight": torch.randn(96, 4, generator=g)}
    with pytest.raises(ValueError, match=r"double_blocks\.9\.img_attn\.qkv"):
        load_adapter(pipe, state, "a")
    loaded = load_adapter(pipe, state, "a", strict=False)
    try:
        assert loaded.components == {"transformer": 3}
        assert sorted(loaded.skipped_keys) == sorted(k for k in state if ".9." in k)
    finally:
        controller_for(pipe.transformer).delete_adapter("a")


def test_xlabs_layout():
    """xlabs' ``processor.qkv_lora1`` (image stream), ``qkv_lora2`` (text), ``proj_lora1``; a single
    block's ``qkv_lora`` is ``linear1``'s Q/K/V rows only (the MLP rows are untouched)."""
    pipe = _pipe("flux")
    model = pipe.transformer
    g = torch.Generator().manual_seed(4)
    r = 4
    state = {}
    ups = {}
    for name, out, inp in (("double_blocks.0.processor.qkv_lora1", 96, 32), ("double_blocks.0.processor.qkv_lora2", 96, 32),
                           ("double_blocks.1.processor.proj_lora1", 32, 32), ("single_blocks.0.processor.qkv_lora", 96, 32)):
        state[f"{name}.down.weight"] = torch.randn(r, inp, generator=g)
        state[f"{name}.up.weight"] = ups[name] = torch.randn(out, r, generator=g) * 0.1
    originals = original_modules(model)
    expected = {}
    for name, original in (("double_blocks.0.processor.qkv_lora1", "double_blocks.0.img_attn.qkv"),
                           ("double_blocks.0.processor.qkv_lora2", "double_blocks.0.txt_attn.qkv"),
                           ("double_blocks.1.processor.proj_lora1", "double_blocks.1.img_attn.proj"),
                           ("single_blocks.0.processor.qkv_lora", "single_blocks.0.linear1")):
        om = originals[original]
        up = torch.zeros(om.out_features, r)
        up[:ups[name].shape[0]] = ups[name]
        tensors = {"lora_down.weight": state[f"{name}.down.weight"], "lora_up.weight": up}
        expected.update({k: v for k, v in _expected(model, om, "lora", tensors).items()
                         if not k.endswith("proj_mlp")})
    loaded = load_adapter(pipe, state, "x")
    try:
        assert loaded.layout == "xlabs"
        assert "single_transformer_blocks.0.proj_mlp" in loaded.coverage["transformer"]  # its rows: zero
        _check_modules(model, expected)
    finally:
        controller_for(model).delete_adapter("x")


def test_transformer_prefixed_lycoris_keys():
    """ai-toolkit / SimpleTuner spell LyCORIS adapters on diffusers paths under ``transformer.``."""
    pipe = _pipe("flux")
    g = torch.Generator().manual_seed(5)
    state = {"transformer.transformer_blocks.0.attn.to_q.lokr_w1": torch.randn(4, 4, generator=g),
             "transformer.transformer_blocks.0.attn.to_q.lokr_w2": torch.randn(8, 8, generator=g) * 0.1,
             "transformer.single_transformer_blocks.0.proj_mlp.hada_w1_a": torch.randn(128, 2, generator=g),
             "transformer.single_transformer_blocks.0.proj_mlp.hada_w1_b": torch.randn(2, 32, generator=g),
             "transformer.single_transformer_blocks.0.proj_mlp.hada_w2_a": torch.randn(128, 2, generator=g),
             "transformer.single_transformer_blocks.0.proj_mlp.hada_w2_b": torch.randn(2, 32, generator=g)}
    loaded = load_adapter(pipe, state, "t")
    try:
        assert loaded.algorithms == {"lokr": 1, "loha": 1}
        assert loaded.layout.startswith("diffusers names under transformer.")
    finally:
        controller_for(pipe.transformer).delete_adapter("t")


# ---- writing separately trained modules in original names --------------------------------------------
def test_separate_loras_join_block_diagonal_and_others_refuse(tmp_path):
    """Q, K and V LoRAs of different ranks and alphas become one block-diagonal LoRA of rank Σr on the
    fused qkv, exactly; LoHa adapters trained per module have no exact fused LoHa: layout='original'
    refuses with the reason, the default writes diffusers names with a warning."""
    from lycoris_lite import LoHaConfig, LoRAConfig

    pipe = _pipe("flux")
    model = pipe.transformer
    ctrl = controller_for(model)
    targets = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"]
    ctrl.add_adapter("j", LoRAConfig(r=4, alpha=2.0, target_modules=targets, init_weights=False,
                                     rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 8.0}))
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for path, layer in ctrl.layers():
            for p in layer.adapters["j"].parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ctrl.set_adapters("j")
    want = {t: model.get_submodule(t)(torch.eye(32)).detach() for t in targets}
    path = save_adapter(model, "j", tmp_path / "j.safetensors", format="kohya", layout="original")
    ctrl.delete_adapter("j")
    from safetensors.torch import load_file
    written = load_file(path)
    assert written["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (10, 32)
    load_adapter(model, path, "j2")
    try:
        for t in targets:
            assert relative_error(model.get_submodule(t)(torch.eye(32)), want[t]) < 1e-6, t
    finally:
        ctrl.delete_adapter("j2")

    ctrl.add_adapter("h", LoHaConfig(r=2, target_modules=targets, init_weights=False))
    try:
        with pytest.raises(ValueError, match="no exact loha on the fused original module"):
            save_adapter(model, "h", tmp_path / "h.safetensors", layout="original")
        assert not (tmp_path / "h.safetensors").exists()
        with pytest.warns(UserWarning, match="diffusers module names"):
            path = save_adapter(model, "h", tmp_path / "h.safetensors")
        assert all(k.startswith("lycoris_") for k in load_file(path))
    finally:
        ctrl.delete_adapter("h")


# ---- diffusers' own converters as the oracle, where diffusers reads the layout (LoRA) ----------------
FLUX_DOUBLE = ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_attn.qkv", "double_blocks.0.img_attn.proj"]
FLUX2 = ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "single_blocks.0.linear1",
         "double_blocks.0.img_mlp.0"]
#: (family, layout, alpha keys, modules) that diffusers 0.42's load_lora_weights reads. Not here, and why
#: (the README's interoperability table): Flux ``single_blocks.linear1`` (diffusers splits it at the
#: full-size 3072/12288 widths), Flux and SD3 ComfyUI files and SD3 kohya files (diffusers loads them and
#: adapts nothing), Flux.2 and Z-Image ComfyUI files with ``.alpha`` keys, Wan's ``lora_unet_`` files
#: (KeyError), final ``adaLN_modulation`` layers (dropped).
DIFFUSERS_READS = [("flux", "kohya", True, FLUX_DOUBLE), ("flux2", "kohya", True, FLUX2),
                   ("flux2", "comfyui", False, FLUX2), ("z-image", "kohya", True, MODULES["z-image"]),
                   ("wan", "comfyui", True, MODULES["wan"]), ("qwen-image", "kohya", True, MODULES["qwen-image"]),
                   ("qwen-image", "comfyui", True, MODULES["qwen-image"])]


@pytest.mark.parametrize("family,layout,alpha,modules", DIFFUSERS_READS,
                         ids=[f"{f}-{lay}{'' if a else '-no-alpha'}" for f, lay, a, _ in DIFFUSERS_READS])
def test_lora_matches_diffusers_load_lora_weights(family, layout, alpha, modules, monkeypatch):
    monkeypatch.setitem(MODULES, family, modules)
    ours = _pipe(family)
    state, expected = _file(family, ours.transformer, "lora", layout, torch.Generator().manual_seed(8))
    if not alpha:
        state = {k: v for k, v in state.items() if not k.endswith(".alpha")}
    theirs = BUILDERS[family]()
    theirs.load_lora_weights({k: v.clone() for k, v in state.items()}, adapter_name="d")
    load_adapter(ours, state, "a")
    try:
        g = torch.Generator().manual_seed(9)
        for path, weight in expected.items():
            assert hasattr(theirs.transformer.get_submodule(path), "lora_A"), f"diffusers left {path} alone"
            x = torch.randn(3, weight.shape[1], generator=g)
            assert relative_error(ours.transformer.get_submodule(path)(x),
                                  theirs.transformer.get_submodule(path)(x)) < 1e-6, path
    finally:
        controller_for(ours.transformer).delete_adapter("a")


# ---- inspect names layout, family, algorithms and coverage -------------------------------------------
@pytest.mark.parametrize("family,layout,case,names,family_name", [
    ("flux", "kohya", "lora", "sd-scripts / musubi-tuner (lora_unet_ + original names)", "Flux.1"),
    ("flux", "comfyui", "lokr-straddling", "ComfyUI (diffusion_model. + original names)", "Flux.1"),
    ("sd3", "kohya", "loha", "sd-scripts / musubi-tuner (lora_unet_ + original names)", "SD3"),
    ("wan", "comfyui", "lora", "ComfyUI (diffusion_model. + original names)", "Wan"),
    ("z-image", "kohya", "lokr-aligned", "sd-scripts / musubi-tuner (lora_unet_ + original names)", "Z-Image"),
])
def test_inspect_names_layout_family_algorithms_and_coverage(family, layout, case, names, family_name, tmp_path):
    from safetensors.torch import save_file

    from lycoris_lite.integrations import cli
    from lycoris_lite.io.inspect import describe

    pipe = _pipe(family)
    state, expected = _file(family, pipe.transformer, case, layout, torch.Generator().manual_seed(10))
    if family == "flux":  # a Flux.1-only module tells Flux.1 from Flux.2
        om = original_modules(pipe.transformer)["double_blocks.0.img_mod.lin"]
        for key, value in file_tensors("lora" if case == "lora" else "lokr-straddling", om.out_features,
                                       om.in_features, torch.Generator().manual_seed(11)).items():
            state[("lora_unet_double_blocks_0_img_mod_lin." if layout == "kohya"
                   else "diffusion_model.double_blocks.0.img_mod.lin.") + key] = value
    path = tmp_path / "a.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    info = describe(str(path))
    assert info["layout"] == names
    assert info["family"] == family_name
    assert list(info["components"]) == ["transformer"]
    assert list(info["algorithms"]) == ["lokr" if case.startswith("lokr") else case]
    import io
    out = io.StringIO()
    model = {"flux": "tiny-flux", "sd3": "tiny-sd3", "wan": "tiny-wan", "z-image": "tiny-z-image"}[family]
    assert cli.main(["inspect", str(path), "--model", model], out=out) == 0
    text = out.getvalue()
    assert "match no layer" not in text and "skipped" not in text
    assert ("split exactly onto" in text) == (family != "wan")  # Wan's original names are renames only


def test_bake_constraint_writes_a_file_every_tool_reads_alike(tmp_path):
    """An OFT with a COFT clamp that bites: ``bake_constraint=True`` writes the clamped blocks and alpha 0
    (ComfyUI takes alpha as the bound itself, AUTOMATIC1111 and LyCORIS as ``alpha · out``: with 0 all
    three apply no clamp), and the file computes the same weights."""
    from safetensors.torch import load_file

    from lycoris_lite import OFTConfig

    pipe = _pipe("flux")
    model = pipe.transformer
    ctrl = controller_for(model)
    targets = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"]
    ctrl.add_adapter("o", OFTConfig(block_size=8, constraint=1e-3, target_modules=targets, init_weights=False))
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for _, layer in ctrl.layers():
            for p in layer.adapters["o"].parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    ctrl.set_adapters("o")
    x = torch.randn(4, 32, generator=g)
    want = {t: model.get_submodule(t)(x).detach() for t in targets}
    try:
        with pytest.warns(UserWarning, match="a bound per module is not one bound on the fused matrix"):
            plain = load_file(save_adapter(model, "o", tmp_path / "plain.safetensors"))
        baked_path = save_adapter(model, "o", tmp_path / "baked.safetensors", bake_constraint=True)
    finally:
        ctrl.delete_adapter("o")
    baked = load_file(baked_path)
    # per-module clamps do not join into one on the fused qkv; baked, they do (sd-scripts' names)
    q, key = "lycoris_transformer_blocks_0_attn_to_q", "lora_unet_double_blocks_0_img_attn_qkv"
    assert float(plain[f"{q}.alpha"]) == pytest.approx(1e-3) and float(baked[f"{key}.alpha"]) == 0.0
    assert baked[f"{key}.oft_blocks"][:4].norm() < plain[f"{q}.oft_blocks"].norm()  # the clamp is in the blocks
    load_adapter(model, baked_path, "b")
    try:
        for t in targets:
            assert relative_error(model.get_submodule(t)(x), want[t]) < 1e-5, t
    finally:
        ctrl.delete_adapter("b")


@pytest.mark.parametrize("family,converter", [("flux2", "convert_flux2_transformer_checkpoint_to_diffusers"),
                                              ("z-image", "convert_z_image_transformer_checkpoint_to_diffusers"),
                                              ("wan", "convert_wan_transformer_to_diffusers")])
def test_name_tables_match_diffusers_single_file_converters(family, converter):
    """diffusers' own single-file converters (original checkpoint -> diffusers model) as the oracle of
    the name tables: every original module's weight is a probe whose value is its source row (and module),
    and each diffusers module must receive exactly the rows our table gives it."""
    from diffusers.loaders import single_file_utils

    model = _pipe(family).transformer
    originals = {name: om for name, om in original_modules(model).items() if name != om.parts[0].path
                 or not om.is_rename}
    probes = {f"{name}.weight": (torch.arange(om.out_features, dtype=torch.float64) + 10_000 * i)[:, None]
              for i, (name, om) in enumerate(originals.items())}
    converted = getattr(single_file_utils, converter)(dict(probes))
    want = {}
    for name, om in originals.items():
        probe = probes[f"{name}.weight"]
        for part in om.parts:
            want[f"{part.path}.weight"] = torch.cat([probe[start:stop] for start, stop in part.rows])
    assert set(converted) == set(want)
    for key, value in want.items():
        assert torch.equal(converted[key], value), key


class _Probes(dict):
    """A checkpoint of probe weights; the biases and norms a converter also pops are zeros of a size
    every split in it accepts (Flux's ``linear1`` split at 3072·3 + 12288 rows)."""

    def pop(self, key, *default):
        return super().pop(key) if key in self else torch.zeros(21504, 1, dtype=torch.float64)

    def __getitem__(self, key):
        return super().__getitem__(key) if key in self else torch.zeros(21504, 1, dtype=torch.float64)


@pytest.mark.parametrize("cls,converter,config", [
    ("FluxTransformer2DModel", "convert_flux_transformer_checkpoint_to_diffusers",
     dict(num_layers=1, num_single_layers=1, guidance_embeds=True)),
    ("SD3Transformer2DModel", "convert_sd3_transformer_checkpoint_to_diffusers", dict(num_layers=2))])
def test_name_tables_match_full_size_converters(cls, converter, config):
    """Flux.1's and SD3's converters fix their widths (Flux: 3072), so the check runs on full-width models
    built on the meta device (no memory), with probe weights of one column."""
    import diffusers
    from diffusers.loaders import single_file_utils

    with torch.device("meta"):
        model = getattr(diffusers, cls)(**config)
    originals = {name: om for name, om in original_modules(model).items() if name != om.parts[0].path
                 or not om.is_rename}
    probes = {f"{name}.weight": (torch.arange(om.out_features, dtype=torch.float64) + 100_000 * i)[:, None]
              for i, (name, om) in enumerate(originals.items())}
    converted = getattr(single_file_utils, converter)(_Probes(probes))
    for name, om in originals.items():
        probe = probes[f"{name}.weight"]
        for part in om.parts:
            want = torch.cat([probe[start:stop] for start, stop in part.rows])
            assert torch.equal(converted[f"{part.path}.weight"], want), (name, part.path)
