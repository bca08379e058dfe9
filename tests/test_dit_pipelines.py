"""Transformer (DiT) pipelines: every algorithm of the registry (and DoRA) on the tiny Flux.1, Flux
Kontext, Flux.2, SD3, Qwen-Image, Z-Image, Wan 2.1 and Wan 2.2 pipelines, by their diffusers module paths.

Per family and algorithm (rotations on either side, LoRA with DoRA): an adapter with random
non-identity weights is made on the transformer(s) from the family's ``attn-mlp`` preset; saved in every
format that holds it (kohya/LyCORIS, PEFT, diffusers; the others refuse it and write nothing); each file
loaded into a second pipeline built with the same seed renders what the original adapter rendered at the
same scale (also through the pipeline's own
``*attention_kwargs={"scale": …}``); two stacked adapters fuse and unfuse bit-exactly; unloading gives
back the base render and every tensor. Then: the presets against the tiny models' module paths, Wan 2.2's
two experts at their own weights, an adapter on SD3's T5 (``text_encoder_3``), and a Flux file refused
on Wan.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import lycoris_lite  # noqa: E402
from lycoris_lite.io.formats.original import has_original_names
from lycoris_lite import ALGORITHMS, PRESETS, controller_for, models  # noqa: E402
from lycoris_lite.base.layer_kind import LayerSpec  # noqa: E402
from lycoris_lite.core.layer import AdapterLayer  # noqa: E402
from lycoris_lite.core.targets import base_module_at, find_targets  # noqa: E402
from lycoris_lite.integrations.pipeline import SCALE_KWARGS  # noqa: E402
from lycoris_lite.io import files  # noqa: E402
from lycoris_lite.io.formats import kohya  # noqa: E402
from lycoris_lite.io.inspect import describe  # noqa: E402
from lycoris_lite.io.formats.safe_io import read_state_dict, write_state_dict  # noqa: E402
from tests.pipeline_checks import SETTINGS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

#: tiny pipeline -> (its presets' stem, extra call arguments)
FAMILIES = {
    "tiny-flux": ("flux", {}),
    "tiny-flux-kontext": ("flux", {"max_area": 32 * 32}),
    "tiny-flux2": ("flux2", {}),
    "tiny-sd3": ("sd3", {}),
    "tiny-qwen-image": ("qwen-image", {}),
    "tiny-z-image": ("z-image", {}),
    "tiny-wan": ("wan", {"num_frames": 5}),
    "tiny-wan22": ("wan", {"num_frames": 5}),
}


def _sides(algo) -> tuple:
    fields = {f.name for f in dataclasses.fields(algo.config_class)}
    return ("output", "input") if "rotation_side" in fields else (None,)


#: ``(algorithm, DoRA, rotation side)``: every registered algorithm, rotations on either side (kohya files
#: rotate the output side, PEFT the input side), and LoRA with DoRA
VARIANTS = [(name, False, side) for name, algo in ALGORITHMS.items() for side in _sides(algo)] + [("lora", True, None)]
SCALE = 0.8
TOL = 2e-5  # renders of the same adapter read back from a file (float32; safetensors' unaligned tensors)


def render(pipe, name: str, **kwargs) -> np.ndarray:
    out = pipe(prompt="a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0), **FAMILIES[name][1], **kwargs)
    return np.asarray(out.frames if hasattr(out, "frames") else out.images)


def build(name: str):
    pipe = lycoris_lite.enable(models.TINY_PIPELINES[name](seed=0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def transformers_of(pipe) -> list[str]:
    return [c for c in ("transformer", "transformer_2") if getattr(pipe, c, None) is not None]


def state_of(pipe) -> dict[str, dict[str, torch.Tensor]]:
    return {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in files.components_of(pipe).items()}


def same_state(pipe, before) -> bool:
    now = state_of(pipe)
    return all(now[c].keys() == before[c].keys() and all(torch.equal(now[c][k], before[c][k]) for k in before[c])
               for c in before)


def config_for(algo: str, dora: bool, targets, side: str | None = None):
    """The algorithm's config (the shared test settings) with random non-identity weights."""
    settings = {**SETTINGS.get(algo, {}), **({"rotation_side": side} if side else {}),
                **({"use_dora": True} if dora else {})}
    return ALGORITHMS[algo].config_class(**settings, target_modules=targets, init_weights=False)


def fitting(model, config) -> list[str]:
    """The layers ``config`` targets whose shapes its settings fit (a tiny model's odd widths, such as
    Z-Image's 85-wide feed-forward, take no 4-blocks rotation)."""
    algo = ALGORITHMS[config.algo]
    out = []
    for path in find_targets(model, config):
        try:
            algo.resolve(config, LayerSpec.from_module(base_module_at(model, path), path), path)
        except ValueError:
            continue
        out.append(path)
    return out


def make_adapter(pipe, stem: str, algo: str, dora: bool, side: str | None = None, seed: int = 0,
                 name: str = "made") -> None:
    """Adapter ``name`` on every transformer of ``pipe`` (the layers of the family's attn-mlp preset that
    fit the settings), active at SCALE."""
    generator = torch.Generator().manual_seed(seed)
    for c in transformers_of(pipe):
        model = getattr(pipe, c)
        config = config_for(algo, dora, PRESETS[f"{stem}-attn-mlp"], side)
        targets = fitting(model, config)
        assert len(targets) >= len(find_targets(model, config)) // 2, "most of the preset should fit"
        ctrl = controller_for(model)
        ctrl.add_adapter(name, config.replace(target_modules=targets), generator=generator)
        ctrl.set_adapters(name, SCALE)


def drop_made(pipe) -> None:
    for c in files.components_of(pipe).values():
        ctrl = controller_for(c, create=False)
        if ctrl is not None:
            ctrl.unload()


def scale_kwarg(pipe) -> str:
    """The ``*attention_kwargs`` argument this pipeline's call takes."""
    params = inspect.signature(type(pipe)._lycoris_enabled_from.__call__).parameters  # the class enable() extended
    return next(k for k in SCALE_KWARGS if k in params)


def save_every_format(pipe, name: str, folder: Path) -> dict[str, Path]:
    """``{format: path}`` of the formats that hold adapter ``name``; the others must refuse it with a
    ``ValueError`` and write nothing."""
    saved = {}
    for fmt in files.FORMATS:
        target = folder / fmt / ("" if fmt == "peft" else "a.safetensors")
        try:
            saved[fmt] = files.save_adapter(pipe, name, target, format=fmt)
        except ValueError:
            assert not target.exists(), f"{fmt}: a refused save wrote {target}"
    return saved


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """``(name, maker pipeline, user pipeline, base render, base state)``: both built at seed 0; the
    maker makes adapters with its controllers, the user loads them from files."""
    name = request.param
    maker, user = build(name), build(name)
    return name, maker, user, render(user, name), state_of(user)


@pytest.fixture(autouse=True)
def clean(request):
    yield
    if "family" in request.fixturenames:
        _, maker, user, _, _ = request.getfixturevalue("family")
        drop_made(maker)
        user.unload_adapters()


# ---- every algorithm on every family ------------------------------------------------------------------
@pytest.mark.parametrize("algo,dora,side", VARIANTS,
                         ids=[f"{a}{'+dora' if d else ''}{f'-{s}' if s else ''}" for a, d, s in VARIANTS])
def test_adapter_round_trip_stack_fuse_unload(family, algo, dora, side, tmp_path):
    name, maker, user, base, base_state = family
    stem = FAMILIES[name][0]
    make_adapter(maker, stem, algo, dora, side)
    made = render(maker, name)
    assert np.abs(made - base).max() > 1e-3, "the adapter should change the render"
    paths = save_every_format(maker, "made", tmp_path)
    drop_made(maker)
    has_peft = ALGORITHMS[algo].peft_type is not None
    assert "kohya" in paths or side == "input"  # kohya/LyCORIS files rotate the output side
    assert "peft" in paths or not has_peft or side == "output"  # PEFT rotates the input side
    assert ("diffusers" in paths) == (algo == "lora" and not dora)

    for fmt, path in paths.items():
        loaded = user.load_adapter(path, adapter_name=fmt, scale=SCALE)
        assert sorted(user.list_adapters()[loaded]["components"]) == transformers_of(user)
        np.testing.assert_allclose(render(user, name), made, atol=TOL, err_msg=fmt)
        user.delete_adapters(loaded)
    if "kohya" in paths:
        state, _ = read_state_dict(paths["kohya"])
        # original names (sd-scripts' lora_unet_double_blocks_0_img_attn_qkv) where the family has them and
        # every fused module joins exactly, else the diffusers paths under lycoris_ (a warning says why)
        original = has_original_names(user.transformer)
        modules = {k.split(".", 1)[0] for k in state}
        assert all(m.startswith(("lycoris_", "lora_transformer_2_")) or (original and m.startswith("lora_unet_"))
                   for m in modules), sorted(modules)[:4]

    # the pipeline call's own scale argument
    source = next(iter(paths.values()))
    first = user.load_adapter(source, adapter_name="first")
    np.testing.assert_allclose(render(user, name, **{scale_kwarg(user): {"scale": SCALE}}), made, atol=TOL)

    # a second adapter stacked on the first, fused and unfused
    make_adapter(maker, stem, algo, dora, side, seed=1, name="second")
    fmt = next(iter(paths))
    second = user.load_adapter(files.save_adapter(maker, "second", tmp_path / "second" / Path(source).name,
                                                  format=fmt), "second")
    drop_made(maker)
    user.set_adapters([first, second], [0.5, 0.7])
    stacked = render(user, name)
    assert np.abs(stacked - made).max() > 1e-4
    before = state_of(user)
    user.fuse_adapters()
    assert user.fused_adapters == [first, second]
    np.testing.assert_allclose(render(user, name), stacked, atol=1e-4)
    user.unfuse_adapters()
    assert same_state(user, before), "unfuse_adapters must give back every tensor bit for bit"

    user.unload_adapters()
    assert same_state(user, base_state)
    assert not any(isinstance(m, AdapterLayer) for m in user.transformer.modules())
    np.testing.assert_array_equal(render(user, name), base)


# ---- presets ---------------------------------------------------------------------------------------------
PRESET_FAMILIES = {"flux": "tiny-flux", "flux2": "tiny-flux2", "sd3": "tiny-sd3", "qwen-image": "tiny-qwen-image",
                   "z-image": "tiny-z-image", "wan": "tiny-wan"}


@pytest.mark.parametrize("stem", list(PRESET_FAMILIES))
def test_presets_name_the_tiny_models_layers(stem):
    """Each family's presets select layers of its tiny model, nested (attn ⊂ attn-mlp ⊂ all), and every
    name (or regex alternative) in them matches a module."""
    transformer = models.TINY_PIPELINES[PRESET_FAMILIES[stem]](seed=0).transformer
    names = [n for n, _ in transformer.named_modules() if n]
    chosen = {}
    for kind in ("attn", "attn-mlp", "all"):
        preset = PRESETS[f"{stem}-{kind}"]
        chosen[kind] = set(find_targets(transformer, lycoris_lite.LoRAConfig(target_modules=preset)))
        parts = preset.split("|") if isinstance(preset, str) else preset
        for part in parts:
            hit = (lambda n: re.fullmatch(part, n)) if isinstance(preset, str) else (
                lambda n: n == part or n.endswith("." + part))
            assert any(hit(n) for n in names), f"{stem}-{kind}: {part!r} matches nothing"
    assert chosen["attn"] < chosen["attn-mlp"] < chosen["all"]
    assert not any(re.fullmatch(r"proj_out|norm_out\.linear|x_embedder|context_embedder", n) for n in chosen["all"])


# ---- family specifics --------------------------------------------------------------------------------------
def test_wan22_experts_take_their_own_weights(tmp_path):
    """A LoKr on both experts, saved and loaded, at ``{"transformer": 1.0, "transformer_2": 0.5}`` renders
    what the original adapter rendered at those weights; each expert has its own file names."""
    maker, user = build("tiny-wan22"), build("tiny-wan22")
    make_adapter(maker, "wan", "lokr", False)
    controller_for(maker.transformer).set_adapters("made", 1.0)
    controller_for(maker.transformer_2).set_adapters("made", 0.5)
    expected = render(maker, "tiny-wan22")
    controller_for(maker.transformer_2).set_adapters("made", 1.0)
    assert np.abs(render(maker, "tiny-wan22") - expected).max() > 1e-4, "the second expert's weight must matter"
    path = files.save_adapter(maker, "made", tmp_path / "wan22.safetensors")
    peft = files.save_adapter(maker, "made", tmp_path / "peft", format="peft")
    assert sorted(p.name for p in peft.iterdir()) == ["transformer", "transformer_2"]
    state, _ = read_state_dict(path)
    prefixes = {re.match(r"(lora_unet_|lora_transformer_2_)", k)[1] for k in state}
    assert prefixes == {"lora_unet_", "lora_transformer_2_"}  # musubi-tuner's Wan names; the second expert's own
    for source in (path, peft):
        name = user.load_adapter(source, adapter_name="a")
        user.set_adapters(name, {"transformer": 1.0, "transformer_2": 0.5})
        np.testing.assert_allclose(render(user, "tiny-wan22"), expected, atol=TOL)
        user.delete_adapters(name)


def test_sd3_text_encoder_3(tmp_path):
    """An adapter on SD3's T5 (``text_encoder_3``) and transformer: ``lora_te3_`` names and a
    ``text_encoder_3/`` PEFT folder, read back to the same render."""
    maker, user = build("tiny-sd3"), build("tiny-sd3")
    base = render(user, "tiny-sd3")
    generator = torch.Generator().manual_seed(0)
    t5 = ["SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o", "DenseReluDense.wo"]
    for component, targets in (("transformer", PRESETS["sd3-attn"]), ("text_encoder_3", t5)):
        ctrl = controller_for(getattr(maker, component))
        ctrl.add_adapter("made", config_for("loha", False, targets), generator=generator)
        ctrl.set_adapters("made", 1.0)
    made = render(maker, "tiny-sd3")
    kohya_file = files.save_adapter(maker, "made", tmp_path / "sd3.safetensors")
    peft = files.save_adapter(maker, "made", tmp_path / "peft", format="peft")
    state, _ = read_state_dict(kohya_file)
    assert any(k.startswith("lora_te3_encoder_block_0_layer_0_SelfAttention_q.") for k in state)
    assert sorted(p.name for p in peft.iterdir()) == ["text_encoder_3", "transformer"]
    controller_for(maker.transformer).unload()
    te_only = render(maker, "tiny-sd3")
    assert np.abs(te_only - base).max() > 1e-4, "the T5 adapter alone must change the render"
    for source in (kohya_file, peft):
        name = user.load_adapter(source, adapter_name="a")
        assert sorted(user.list_adapters()[name]["components"]) == ["text_encoder_3", "transformer"]
        np.testing.assert_allclose(render(user, "tiny-sd3"), made, atol=TOL)
        user.set_adapters(name, {"transformer": 0.0})
        np.testing.assert_allclose(render(user, "tiny-sd3"), te_only, atol=TOL)
        user.delete_adapters(name)


def test_a_flux_file_is_refused_on_wan(tmp_path):
    """Our files name the model they were saved from; a foreign file (no such metadata) fails on its
    names, and the error names the model's family. Nothing is attached."""
    flux, wan = build("tiny-flux"), build("tiny-wan")
    controller_for(flux.transformer).add_adapter("made", config_for("lokr", False, PRESETS["flux-attn"]))
    controller_for(flux.text_encoder).add_adapter("made", config_for("lokr", False, ["q_proj", "v_proj"]))
    before = state_of(wan)
    for fmt in ("kohya", "peft"):
        path = files.save_adapter(flux, "made", tmp_path / fmt / ("a.safetensors" if fmt == "kohya" else ""),
                                  format=fmt)
        with pytest.raises(kohya.FamilyMismatch, match=r"for Flux\.1 .*FluxTransformer2DModel.*the model is Wan "
                                                       r".*WanTransformer3DModel"):
            wan.load_adapter(path)
    state, metadata = read_state_dict(tmp_path / "kohya" / "a.safetensors")
    assert json.loads(metadata[files.MODEL_CLASSES_KEY]) == {"transformer": "FluxTransformer2DModel",
                                                             "text_encoder": "CLIPTextModel"}
    for fmt in ("kohya/a.safetensors", "peft"):
        assert describe(str(tmp_path / fmt))["family"] == "Flux.1"
    with pytest.raises(ValueError, match=r"match no layer of this model \(Wan: its transformer is a "
                                         r"WanTransformer3DModel\)"):
        wan.load_adapter(state, "foreign")
    assert same_state(wan, before) and not wan.list_adapters()


def test_diffusers_keys_with_peft_prefixes_read(tmp_path):
    """``transformer.base_model.model.<path>.lora_A.weight`` (a PEFT model's state dict saved under its
    component) reads as the plain diffusers keys do."""
    maker, user = build("tiny-flux"), build("tiny-flux")
    make_adapter(maker, "flux", "lora", False)
    made = render(maker, "tiny-flux")
    state, metadata = read_state_dict(files.save_adapter(maker, "made", tmp_path / "a.safetensors", format="diffusers"))
    prefixed = {k.replace("transformer.", "transformer.base_model.model.", 1): v for k, v in state.items()}
    assert files.detect_format(prefixed) == "diffusers"
    # the scale is in the header's LoraConfig: the same metadata goes with the keys
    user.load_adapter(write_state_dict(tmp_path / "prefixed.safetensors", prefixed, metadata), scale=SCALE)
    np.testing.assert_allclose(render(user, "tiny-flux"), made, atol=TOL)


def test_enable_refuses_a_pipeline_without_a_denoiser():
    from types import SimpleNamespace

    with pytest.raises(TypeError, match="no unet or transformer or transformer_2"):
        lycoris_lite.enable(SimpleNamespace(vae=torch.nn.Linear(2, 2)))


def test_a_bare_module_is_a_transformer_unless_it_is_a_unet():
    flux = models.build_tiny_flux_pipeline()
    assert list(files.components_of(flux.transformer)) == ["transformer"]
    assert list(files.components_of(torch.nn.Linear(2, 2))) == ["transformer"]
    assert list(files.components_of(models.build_tiny_unet())) == ["unet"]


def test_kohya_names_of_a_transformer_pipeline():
    """The scheme of :mod:`lycoris_lite.io.formats.names` on Flux: ``lycoris_`` is the transformer's,
    CLIP keeps ``text_model_``, and the T5 reads as ``lora_te2_`` and (sd-scripts, ComfyUI) ``lora_te3_``."""
    from lycoris_lite.io.formats.names import build_name_map, file_name_lookup

    flux = models.build_tiny_flux_pipeline()
    names = build_name_map(files.components_of(flux))
    assert names["transformer"].to_file["transformer_blocks.0.attn.to_q"] == "lycoris_transformer_blocks_0_attn_to_q"
    lookup = file_name_lookup(names)
    to_q = "transformer_blocks.0.attn.to_q"
    assert lookup["lora_transformer_transformer_blocks_0_attn_to_q"] == ("transformer", to_q)
    assert names["text_encoder"].to_file["encoder.layers.0.self_attn.q_proj"] == \
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    t5 = "encoder.block.0.layer.0.SelfAttention.q"
    assert names["text_encoder_2"].to_file[t5] == "lora_te2_encoder_block_0_layer_0_SelfAttention_q"
    assert lookup["lora_te3_encoder_block_0_layer_0_SelfAttention_q"] == ("text_encoder_2", t5)
    assert not any(isinstance(v, list) for v in lookup.values())
