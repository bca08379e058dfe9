"""Adapters on quantized base layers: bitsandbytes NF4 and int8, torchao int8 and float8, GGUF Q8_0 and
Q4_0, float8 storage (diffusers' layerwise casting), for every algorithm.

The oracle: the same adapter on a float layer whose weight is the quantized layer's weight dequantized
(the float path is tested against float64 references elsewhere). The base outputs differ only by the
backend's own kernel, so the adapter's *effect* (output with it minus output without it) must agree.
Each backend is an optional extra: its tests are skipped, naming it, where it is not installed.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings

import pytest
import torch
from torch import nn

from lycoris_lite import controller_for
from lycoris_lite.base.registry import ALGORITHMS
from lycoris_lite.core.quantized import quantized_weight
from lycoris_lite.tools.quantize import quantize_base

warnings.filterwarnings("ignore", message=".*kernels.*")


def _needs(package: str):
    return pytest.mark.skipif(importlib.util.find_spec(package) is None, reason=f"{package} is not installed")


def _bnb(kind: str, lin: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=True, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=True, compute_dtype=torch.float32,
                                  quant_type=kind)
    layer.load_state_dict(lin.state_dict())
    return layer.to("cpu")  # quantizes, as diffusers' bnb loader's placement does


def _torchao(kind: str, lin: nn.Linear) -> nn.Module:
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    holder = nn.Sequential(copy.deepcopy(lin))
    quantize_(holder, Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig())
    return holder[0]


def _gguf(kind: str, lin: nn.Linear) -> nn.Module:
    """A ``GGUFLinear`` as diffusers' GGUF loader builds it (``_replace_with_gguf_linear``), its weight
    quantized by the ``gguf`` package."""
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    qtype = getattr(gguf.GGMLQuantizationType, kind)
    layer = GGUFLinear(lin.in_features, lin.out_features, bias=True, compute_dtype=torch.float32)
    data = gguf.quants.quantize(lin.weight.detach().numpy(), qtype)
    layer.weight = GGUFParameter(torch.from_numpy(data), quant_type=qtype)
    layer.bias = nn.Parameter(lin.bias.detach().clone())
    return layer


def _float8(kind: str, lin: nn.Linear) -> nn.Module:
    from diffusers.hooks import apply_layerwise_casting

    layer = copy.deepcopy(lin)
    apply_layerwise_casting(layer, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    return layer


BACKENDS = {
    "bnb-nf4": (_bnb, "nf4", "bitsandbytes"), "bnb-fp4": (_bnb, "fp4", "bitsandbytes"),
    "bnb-int8": (_bnb, "int8", "bitsandbytes"), "torchao-int8": (_torchao, "int8", "torchao"),
    "torchao-fp8": (_torchao, "fp8", "torchao"), "gguf-q8_0": (_gguf, "Q8_0", "gguf"),
    "gguf-q4_0": (_gguf, "Q4_0", "gguf"), "float8-storage": (_float8, None, "diffusers"),
}
CONFIGS = {"lora": dict(r=4, alpha=2.0), "lora+dora": dict(r=4, use_dora=True), "loha": dict(r=4),
           "lokr": dict(r=4, factor=4), "oft": dict(block_size=8), "oft-input": dict(block_size=8, rotation_side="input"),
           "boft": dict(block_size=4), "hra": dict(r=4)}


def quantized(backend: str, lin: nn.Linear) -> nn.Module:
    build, kind, package = BACKENDS[backend]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")
    return build(kind, lin)


def _config(case: str):
    algo = ALGORITHMS[case.split("+")[0].split("-")[0]]
    return algo.config_class(target_modules=["0", "2"], init_weights=False, **CONFIGS[case])


def _randomise(ctrl, name: str, g: torch.Generator) -> None:
    with torch.no_grad():
        for _, layer in ctrl.layers():
            for p in layer.adapters[name].parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _copy_adapter(src, dst, name: str) -> None:
    with torch.no_grad():
        for (path, layer), (_, other) in zip(src.layers(), dst.layers()):
            for key, p in other.adapters[name].named_parameters():
                p.copy_(dict(layer.adapters[name].named_parameters())[key])


def _stack(backend: str, seed: int = 0):
    """A two-linear stack (64 -> 32 -> 16, ReLU between) quantized by ``backend``, and its float twin
    whose weights are the quantized ones dequantized."""
    torch.manual_seed(seed)
    lins = [nn.Linear(64, 32), nn.Linear(32, 16)]
    q = nn.Sequential(quantized(backend, lins[0]), nn.ReLU(), quantized(backend, lins[1]))
    twin = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    with torch.no_grad():
        for i in (0, 2):
            twin[i].weight.copy_(quantized_weight(q[i]).dequantize(q[i]))
            twin[i].bias.copy_(q[i].bias.detach().float())
    return q, twin


def _bits(layer: nn.Module) -> tuple[type, bytes]:
    w = layer.weight
    data = w.dequantize() if type(w).__module__.startswith("torchao") else w.data
    return type(w), data.detach().contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("case", list(CONFIGS))
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_every_algorithm_runs_unfused_on_the_quantized_layer(backend, case):
    q, twin = _stack(backend)
    before = {i: _bits(q[i]) for i in (0, 2)}
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_q, base_f = q(x), twin(x)
    ctrl, ftrl = controller_for(q), controller_for(twin)
    ctrl.add_adapter("a", _config(case))
    ftrl.add_adapter("a", _config(case))
    _randomise(ctrl, "a", torch.Generator().manual_seed(2))
    _copy_adapter(ctrl, ftrl, "a")
    ctrl.set_adapters("a")
    ftrl.set_adapters("a")
    with torch.no_grad():
        effect_q, effect_f = q(x) - base_q, twin(x) - base_f
    assert effect_f.abs().max() > 1e-3
    # the base kernels differ by their own rounding; the adapter's effect agrees
    tolerance = 2e-2 if backend in ("bnb-int8", "torchao-int8", "gguf-q4_0", "bnb-fp4", "bnb-nf4") and case == "lora+dora" else 2e-3
    assert float((effect_q - effect_f).abs().max() / effect_f.abs().max()) < tolerance
    for i in (0, 2):  # still quantized, same bits, no float copy kept
        layer = dict(ctrl.layers())[str(i)]
        assert layer.quant is not None and layer._backup is None
        assert _bits(layer.base_module) == before[i]
    ctrl.unload()
    assert _bits(q[0]) == before[0] and _bits(q[2]) == before[2]
    assert type(q[0]).__name__ != "AdapterLayer"
    with torch.no_grad():
        assert torch.equal(q(x), base_q)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_stacked_adapters_at_weights(backend):
    """Two adapters stacked at weights on the quantized layers, as on float ones."""
    q, twin = _stack(backend)
    ctrl, ftrl = controller_for(q), controller_for(twin)
    for name, seed in (("lokr", 3), ("oft", 4)):
        ctrl.add_adapter(name, _config(name))
        ftrl.add_adapter(name, _config(name))
        _randomise(ctrl, name, torch.Generator().manual_seed(seed))
        _copy_adapter(ctrl, ftrl, name)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base_q, base_f = q(x), twin(x)
        for weights in ([0.5, 1.0], [1.0, -0.5]):
            ctrl.set_adapters(["lokr", "oft"], weights)
            ftrl.set_adapters(["lokr", "oft"], weights)
            effect_q, effect_f = q(x) - base_q, twin(x) - base_f
            assert float((effect_q - effect_f).abs().max() / effect_f.abs().max()) < 2e-3


@pytest.mark.parametrize("case", ["lora", "loha", "lokr", "oft", "boft", "hra"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_few_training_steps(backend, case):
    """A few optimizer steps of each algorithm on the quantized base: the loss falls, gradients reach
    the adapter only, the quantized weights keep their bits."""
    q, _ = _stack(backend)
    before = _bits(q[0])
    ctrl = controller_for(q)
    ctrl.add_adapter("lokr", _config(case))
    _randomise(ctrl, "lokr", torch.Generator().manual_seed(3))
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    target = torch.randn(16, 16, generator=torch.Generator().manual_seed(6))
    ctrl.set_adapters("lokr")
    params = [p for _, layer in ctrl.layers() for p in layer.adapters["lokr"].parameters()]
    assert params and all(p.requires_grad for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(q(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for p in q.parameters() if not any(p is a for a in params))
    assert _bits(dict(ctrl.layers())["0"].base_module) == before


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "float8-storage"])
def test_fuse_is_refused_with_the_reason_and_changes_nothing(backend):
    q, _ = _stack(backend)
    ctrl = controller_for(q)
    ctrl.add_adapter("a", _config("lora"))
    _randomise(ctrl, "a", torch.Generator().manual_seed(7))
    ctrl.set_adapters("a")
    x = torch.randn(3, 64)
    with torch.no_grad():
        before = q(x)
    bits = _bits(dict(ctrl.layers())["0"].base_module)
    with pytest.raises(ValueError, match="quantized: fusing would dequantize"):
        ctrl.merge_adapter(["a"])
    assert ctrl.merged_adapters == [] or not ctrl.merged_adapters
    assert _bits(dict(ctrl.layers())["0"].base_module) == bits
    with torch.no_grad():
        assert torch.equal(q(x), before)


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers is not installed")
def test_float8_storage_fuses_through_float32_and_unfuses_bit_for_bit():
    """float8 storage: fusing computes ``W + s·ΔW`` in float32 and casts back (the cast is the one
    rounding: stated and bounded here); 1000 fuse/unfuse cycles leave the original float8 bits."""
    q, twin = _stack("float8-storage")
    ctrl, ftrl = controller_for(q), controller_for(twin)
    ctrl.add_adapter("a", _config("lokr"))
    ftrl.add_adapter("a", _config("lokr"))
    _randomise(ctrl, "a", torch.Generator().manual_seed(8))
    _copy_adapter(ctrl, ftrl, "a")
    ctrl.set_adapters("a")
    ftrl.set_adapters("a")
    layer = dict(ctrl.layers())["0"]
    original = layer.weight.detach().clone()
    ctrl.merge_adapter(["a"])
    fused = layer.weight.detach()
    assert fused.dtype == torch.float8_e4m3fn
    exact = layer.effective_weight(["a"])  # float32
    # e4m3 keeps 3 mantissa bits: the cast's error is at most half a unit in the last place (2^-4 relative)
    assert float(((fused.float() - exact).abs() / exact.abs().clamp_min(2 ** -6)).max()) <= 2 ** -4 + 1e-6
    ctrl.unmerge_adapter()
    for _ in range(1000):
        ctrl.merge_adapter(["a"])
        ctrl.unmerge_adapter()
    assert torch.equal(layer.weight.detach().view(torch.uint8), original.view(torch.uint8))


@_needs("bitsandbytes")
@_needs("torchao")
@pytest.mark.parametrize("kind", ["nf4", "int8", "fp8"])
def test_quantize_base_then_load_a_file_onto_the_pipeline(kind, tmp_path):
    """``quantize_base`` on the tiny SD UNet (what diffusers' quantizers produce), then a kohya LoKr file
    made on the float UNet loads with ``pipe.load_adapter`` and renders like the float pipeline with the
    adapter (up to the base quantization's own effect); unload leaves the quantized UNet as it was."""
    import numpy as np

    import lycoris_lite
    from lycoris_lite import LoKrConfig
    from lycoris_lite.io.files import save_adapter
    from lycoris_lite.models import build_tiny_sd_pipeline

    maker = build_tiny_sd_pipeline()
    ctrl = controller_for(maker.unet)
    ctrl.add_adapter("s", LoKrConfig(r=4, factor=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_weights=False))
    _randomise(ctrl, "s", torch.Generator().manual_seed(9))
    path = save_adapter(maker.unet, "s", tmp_path / "s.safetensors")

    pipe = lycoris_lite.enable(build_tiny_sd_pipeline())
    assert quantize_base(pipe.unet, kind) > 0
    kinds = {type(m.weight).__name__ for m in pipe.unet.modules() if isinstance(m, nn.Linear)}
    assert kinds <= {"Params4bit", "Int8Tensor", "Float8Tensor"}

    def render():
        pipe.set_progress_bar_config(disable=True)
        return pipe(prompt="a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    base = render()
    name = pipe.load_adapter(path, scale=1.0)
    adapted = render()
    assert np.abs(adapted - base).max() > 1e-3
    with pytest.raises(ValueError, match="quantized"):
        pipe.fuse_adapters()
    # hotswap another file with the same layers: the render follows the new weights
    with torch.no_grad():  # ΔW = kron(w1, w2): negate w1 alone
        for _, layer in ctrl.layers():
            for key, p in layer.adapters["s"].named_parameters():
                if key.startswith("lokr_w1"):
                    p.mul_(-1.0)
    other = save_adapter(maker.unet, "s", tmp_path / "other.safetensors")
    pipe.load_adapter(other, adapter_name=name, hotswap=True)
    swapped = render()
    assert np.abs(swapped - adapted).max() > 1e-4
    pipe.unload_adapters()
    np.testing.assert_array_equal(render(), base)
    fresh = lycoris_lite.enable(build_tiny_sd_pipeline())
    quantize_base(fresh.unet, kind)
    fresh.load_adapter(other, scale=1.0)
    fresh.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(fresh(prompt="a red circle", num_inference_steps=2, height=64, width=64,
                                     output_type="np", generator=torch.Generator().manual_seed(0)).images,
                               swapped, atol=1e-5)


def test_missing_backend_is_named():
    from lycoris_lite.tools import quantize

    with pytest.raises(ValueError, match="unknown base quantization"):
        quantize.require_backend("int3")
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ImportError, match=r"lycoris-lite\[bitsandbytes\]"):
            quantize.require_backend("nf4")


@_needs("bitsandbytes")
@pytest.mark.parametrize("case", ["lora", "lokr-straddling", "oft-straddling"])
def test_community_file_on_a_quantized_flux_transformer(case):
    """A Flux file in sd-scripts' original names (fused qkv / linear1) on a transformer quantized to NF4:
    the split adapters (row views, dense fused views from the dequantized weights) match the same file on
    the float transformer whose weights are the dequantized ones."""
    from test_community_layouts import _file

    import lycoris_lite
    from lycoris_lite.io.files import load_adapter
    from lycoris_lite.models import build_tiny_flux_pipeline

    q = build_tiny_flux_pipeline()
    quantize_base(q.transformer, "nf4")
    twin = build_tiny_flux_pipeline()
    with torch.no_grad():
        for name, module in q.transformer.named_modules():
            if quantized_weight(module) is not None:
                twin.transformer.get_submodule(name).weight.copy_(quantized_weight(module).dequantize(module))
    state, expected = _file("flux", twin.transformer, case, "kohya", torch.Generator().manual_seed(0))
    lycoris_lite.enable(q)
    g = torch.Generator().manual_seed(1)
    xs = {path: torch.randn(3, w.shape[1], generator=g) for path, w in expected.items()}
    with torch.no_grad():
        base_q = {p: q.transformer.get_submodule(p)(x) for p, x in xs.items()}
        base_f = {p: twin.transformer.get_submodule(p)(x) for p, x in xs.items()}
    load_adapter(q, state, "a")
    load_adapter(twin, state, "a")
    with torch.no_grad():
        for path, x in xs.items():
            effect_q = q.transformer.get_submodule(path)(x) - base_q[path]
            effect_f = twin.transformer.get_submodule(path)(x) - base_f[path]
            assert float((effect_q - effect_f).abs().max() / effect_f.abs().max()) < 2e-3, path


def _z_image_gguf(folder, qtype_name: str):
    """The tiny Z-Image transformer written as a GGUF file in its original (Tongyi) names, the fused
    ``attention.qkv`` included (the inverse of diffusers' ``convert_z_image_transformer_checkpoint_to_diffusers``,
    checked here against it), 2-D weights quantized to ``qtype_name``, then loaded the way users load
    GGUF files: ``from_single_file(…, quantization_config=GGUFQuantizationConfig(…))``."""
    import gguf
    from diffusers import GGUFQuantizationConfig, ZImageTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    from lycoris_lite.models import build_tiny_z_image_pipeline

    model = build_tiny_z_image_pipeline().transformer
    state = {k: v.detach() for k, v in model.state_dict().items()}
    renames = (("all_final_layer.2-1.", "final_layer."), ("all_x_embedder.2-1.", "x_embedder."),
               (".attention.to_out.0.", ".attention.out."), (".attention.norm_k.", ".attention.k_norm."),
               (".attention.norm_q.", ".attention.q_norm."))
    original = {}
    for key, value in state.items():
        if any(f".attention.to_{p}." in key for p in "qkv"):
            if key.endswith(".to_q.weight"):
                stem = key[: -len(".to_q.weight")]
                original[stem + ".qkv.weight"] = torch.cat([state[f"{stem}.to_{p}.weight"] for p in "qkv"])
            continue
        for old, new in renames:
            key = key.replace(old, new)
        original[key] = value
    back = convert_z_image_transformer_checkpoint_to_diffusers(dict(original))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    model.save_pretrained(folder / "transformer")
    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    writer = gguf.GGUFWriter(str(folder / "z.gguf"), "z_image")
    for key, value in original.items():
        array = value.float().numpy()
        if array.ndim == 2 and array.shape[1] % 32 == 0:
            writer.add_tensor(key, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(key, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return ZImageTransformer2DModel.from_single_file(
        str(folder / "z.gguf"), config=str(folder / "transformer"),
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))


@_needs("gguf")
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("case", ["lora", "loha", "lokr-straddling", "oft", "oft-straddling", "hra"])
def test_gguf_file_loaded_by_diffusers_takes_a_community_adapter(tmp_path, qtype, case):
    """A real GGUF file (``gguf.GGUFWriter``) through diffusers' GGUF loader, then a file in sd-scripts'
    original Z-Image names (fused qkv split onto the GGUF layers): each module's adapter effect equals the
    same file's on a float model holding the dequantized weights; the GGUF layers keep their bits."""
    from test_community_layouts import _file

    from lycoris_lite.io.files import load_adapter
    from lycoris_lite.models import build_tiny_z_image_pipeline

    model = _z_image_gguf(tmp_path, qtype)
    ggufs = {n: m for n, m in model.named_modules() if type(m).__name__ == "GGUFLinear"}
    assert ggufs
    twin = build_tiny_z_image_pipeline().transformer
    with torch.no_grad():
        for name, module in ggufs.items():
            twin.get_submodule(name).weight.copy_(quantized_weight(module).dequantize(module))
    before = {n: _bits(m) for n, m in ggufs.items()}
    state, expected = _file("z-image", twin, case, "kohya", torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    xs = {path: torch.randn(3, w.shape[1], generator=g) for path, w in expected.items()}
    with torch.no_grad():
        base_q = {p: model.get_submodule(p)(x) for p, x in xs.items()}
        base_f = {p: twin.get_submodule(p)(x) for p, x in xs.items()}
    load_adapter({"transformer": model}, state, "a")
    load_adapter({"transformer": twin}, state, "a")
    with torch.no_grad():
        for path, x in xs.items():
            effect_q = model.get_submodule(path)(x) - base_q[path]
            effect_f = twin.get_submodule(path)(x) - base_f[path]
            assert float((effect_q - effect_f).abs().max() / effect_f.abs().max()) < 2e-3, path
    assert {n: _bits(dict(controller_for(model).layers())[n].base_module) if n in dict(controller_for(model).layers())
            else _bits(m) for n, m in ggufs.items()} == before
