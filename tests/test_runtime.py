"""What users do to a model with adapters: cast it, move it, offload it, compile it, write its tensors in
place. Every test is generated from the registry (each algorithm, with its variants where they take
another code path), always with non-identity adapter weights.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from lycoris_lite import ALGORITHMS, AdapterModel, LoRAConfig
from lycoris_lite.base.registry import get_algorithm
from lycoris_lite.core.layer import AdapterLayer
from tests.test_contract import SMALL, VARIANTS

HALF = [torch.float16, torch.bfloat16]
# one variant per code path the forward takes differently (DoRA stages, two-sided rotations, Tucker)
PATHS = [(a, {}) for a in SMALL] + [
    ("lora", {"use_dora": True}), ("lokr", {"use_dora": True, "dora_axis": "input"}), ("oft", {"rotation_side": "input",
                                                                                              "rescale": True}),
    ("hra", {"rotation_side": "output"}), ("loha", {"use_tucker": True, "alpha": 1024.0}),
]
PATH_IDS = [f"{a}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for a, o in PATHS]


class Net(nn.Module):
    """A conv (3×3), then two linear layers: every layer kind in one forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(24, 48, 3, padding=1)
        self.proj = nn.Linear(48, 48)
        self.out = nn.Linear(48, 24)

    def forward(self, x):
        h = self.conv(x).flatten(2).transpose(1, 2)
        return self.out(torch.nn.functional.gelu(self.proj(h)))


def build(algo: str, options: dict | None = None, seed: int = 0, name: str = "default") -> tuple[AdapterModel, torch.Tensor]:
    torch.manual_seed(seed)
    net = Net()
    config = get_algorithm(algo).config_class(**{**SMALL[algo], **(options or {})},
                                              target_modules=["conv", "proj", "out"], init_weights=False)
    model = AdapterModel(net, config, name)
    return model, torch.randn(2, 24, 5, 5)


def adapter_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor an adapter layer holds besides the base weight and bias: adapter parameters,
    multipliers, kept originals."""
    found = []
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            for slot in module.adapters.values():
                found += list(slot.parameters()) + list(slot.buffers())
            if module._backup is not None:
                found.append(module._backup)
    return found


def test_paths_cover_every_algorithm():
    assert {a for a, _ in PATHS} == set(ALGORITHMS) == set(VARIANTS)


# ---- casting and moving after attaching --------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("algo,options", PATHS, ids=PATH_IDS)
def test_cast_after_attaching_keeps_adapters_in_float32(algo, options, dtype):
    """``model.to(half)`` after attaching: the base takes the half dtype, every adapter tensor stays
    float32 (never rounded through half: back in float32 they are bit for bit what they were), and the
    forward (inference and training) runs and equals the float32 adapter on the half-rounded base."""
    model, x = build(algo, options)
    before = {id(t): t.detach().clone() for t in adapter_tensors(model)}
    params = model.controller.trainable_parameters()
    originals = [p.detach().clone() for p in params]
    model.model.to(dtype)
    assert model.model.proj.weight.dtype == dtype
    assert all(t.dtype == torch.float32 for t in adapter_tensors(model))
    out = model(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().square().mean().backward()  # training in half precision: the adapter gets float32 grads
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    with torch.no_grad():
        inference = model(x.to(dtype))
    reference, _ = build(algo, options)  # same seed: same base and adapter
    for (_, mine), (_, theirs) in zip(model.model.named_parameters(), reference.model.named_parameters()):
        if mine.dtype == dtype:  # the reference's base rounded as the cast rounded it
            theirs.data = theirs.data.to(dtype).float()
    expected = reference(x.to(dtype).float())
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert (inference.float() - expected).abs().max() <= tol * expected.abs().max()
    model.model.float()
    assert all(torch.equal(p, o) for p, o in zip(params, originals))
    assert all(torch.equal(t, before[id(t)]) for t in adapter_tensors(model) if id(t) in before)


@pytest.mark.parametrize("algo", list(SMALL))
def test_fuse_then_cast_unfuse_restores_the_original_in_the_new_dtype(algo):
    """Fused, then ``.to(bfloat16)``: the kept originals follow; disabling while fused runs the base;
    unfusing puts back exactly ``original.to(bfloat16)``."""
    model, x = build(algo)
    originals = {n: p.detach().clone() for n, p in model.model.named_parameters() if not n.count(".adapters.")}
    model.merge_adapter()
    model.model.to(torch.bfloat16)
    assert all(t.dtype in (torch.float32, torch.bfloat16) for t in adapter_tensors(model))
    with model.disable_adapter():
        disabled = model(x.to(torch.bfloat16))
    model.unmerge_adapter()
    for n, p in model.model.named_parameters():
        if n in originals:
            assert p.dtype == torch.bfloat16 and torch.equal(p, originals[n].to(torch.bfloat16)), n
    with model.disable_adapter():
        assert torch.equal(disabled, model(x.to(torch.bfloat16)))


def test_to_meta_leaves_nothing_behind():
    """``.to("meta")`` with adapters attached and fused: every adapter tensor and kept original goes too."""
    model, _ = build("lora")
    model.add_adapter("oft", get_algorithm("oft").config_class(block_size=4, target_modules=["proj"], init_weights=False))
    model.set_adapter(["default", "oft"])
    model.merge_adapter()
    model.model.to("meta")
    held = adapter_tensors(model)
    assert held and all(t.is_meta for t in held)


def test_half_and_float_round_trip_keeps_adapter_bits():
    """``.half()`` then ``.float()``: adapters never pass through half precision."""
    model, x = build("loha")
    expected = model(x)
    model.model.half()
    model.model.float()
    layer = model.model.proj
    assert layer.weight.dtype == torch.float32
    assert not torch.equal(model(x), expected)  # the base went through half...
    for module in model.model.modules():  # ...the adapters did not
        if isinstance(module, AdapterLayer):
            assert module.adapters["default"].multiplier.dtype == torch.float32


# ---- in-place writes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("algo,options", PATHS, ids=PATH_IDS)
def test_writes_through_data_are_seen_by_the_next_forward(algo, options):
    """EMA ``copy_to`` writes parameters through ``.data`` (no version bump): the next forward uses the
    new values, inference and training alike (nothing is remembered between calls)."""
    model, x = build(algo, options)
    other, _ = build(algo, options, seed=1)
    with torch.no_grad():
        model(x)  # a forward before the write
    for (_, mine), (_, theirs) in zip(model.controller.adapter_tensors("default").items(),
                                      other.controller.adapter_tensors("default").items()):
        for key in mine:
            mine[key].data.copy_(theirs[key])
    mine_base = dict(model.model.named_parameters())
    for n, p in other.model.named_parameters():
        if ".adapters." not in n:
            mine_base[n].data.copy_(p)
    with torch.no_grad():
        assert torch.equal(model(x), other(x))
    assert torch.equal(model(x), other(x))


@pytest.mark.parametrize("algo,options", PATHS, ids=PATH_IDS)
def test_an_inactive_adapter_holds_its_parameters_only(algo, options):
    """After forwards (inference and training) and deactivation, a layer and its slots hold no tensor
    but the parameters, the multiplier and the base weight: nothing is kept between calls."""
    model, x = build(algo, options)
    model.add_adapter("other", LoRAConfig(r=2, target_modules=["proj"], init_weights=False))
    with torch.no_grad():
        model(x)
    model(x).square().mean().backward()
    model.set_adapter("other")
    with torch.no_grad():
        model(x)
    for module in model.model.modules():
        if isinstance(module, AdapterLayer):
            assert module._backup is None
            for slot in module.adapters.values():
                stray = [k for k, v in vars(slot).items() if isinstance(v, torch.Tensor) or
                         (isinstance(v, (tuple, list)) and any(isinstance(i, torch.Tensor) for i in v))]
                assert stray == [] and set(slot._buffers) == {"multiplier"}


# ---- torch.compile -------------------------------------------------------------------------------------
def _compiled(net, backend="aot_eager"):
    torch._dynamo.reset()
    counters.clear()
    return torch.compile(net, backend=backend)


def _graph_breaks() -> int:
    return sum(counters["graph_break"].values())


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
@pytest.mark.parametrize("algo,options", PATHS, ids=PATH_IDS)
def test_inference_compiles_whole_and_weight_changes_never_recompile(algo, options):
    """Each algorithm alone and stacked with a LoRA: one graph, no break; changing the weights (not to
    0) reuses it; the compiled forward equals the eager one bit for bit."""
    model, x = build(algo, options)
    model.add_adapter("lora", LoRAConfig(r=2, target_modules=["conv", "proj", "out"], init_weights=False))
    compiled = _compiled(model.model)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # dynamo's note on lru_cache (BOFT's permutations)
        for stack in (["default"], ["default", "lora"]):
            graphs = None
            for weight in (1.0, 0.5, -0.3):
                model.set_adapters(stack, weight)
                got = compiled(x)
                assert torch.equal(got, model.model(x))
                graphs = _graphs() if graphs is None else graphs
                assert _graphs() == graphs, f"recompiled for weight {weight} of {stack}"
    assert _graph_breaks() == 0, dict(counters["graph_break"])


@pytest.mark.slow
@pytest.mark.parametrize("algo,options", PATHS, ids=PATH_IDS)
def test_training_compiles_without_graph_breaks(algo, options):
    """A compiled training step gives the eager gradients, with no graph break (the memory-saving
    custom backward passes that call autograd themselves hand over to autograd of the same formula
    under compile)."""
    model, x = build(algo, options)
    params = model.controller.trainable_parameters()
    compiled = _compiled(model.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled(x).square().mean().backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    model.model(x).square().mean().backward()
    for g, p in zip(grads, params):
        assert (g - p.grad).abs().max() <= 1e-5 * (p.grad.abs().max() + 1e-12)
    assert _graph_breaks() == 0, dict(counters["graph_break"])
    assert _graphs() == 1


# ---- offload -------------------------------------------------------------------------------------------
def test_sequential_offload_after_attaching_loads_the_adapters():
    """accelerate's ``cpu_offload`` (what ``enable_sequential_cpu_offload`` runs) after attaching: every
    weight, adapters included, is on the meta device between calls and brought in by the hooks; the
    output is the one without offload, and weight changes still apply."""
    accelerate = pytest.importorskip("accelerate")
    model, x = build("lokr")
    model.add_adapter("oft", get_algorithm("oft").config_class(block_size=4, target_modules=["proj"], init_weights=False))
    model.set_adapter(["default", "oft"])
    with torch.no_grad():
        expected = model(x)
        model.set_adapters(["default", "oft"], 0.5)
        half = model(x)
        model.set_adapters(["default", "oft"], 1.0)
    accelerate.cpu_offload(model.model, execution_device=torch.device("cpu"))
    assert model.model.proj.adapters["oft"].oft_blocks.is_meta
    with torch.no_grad():
        assert torch.equal(model(x), expected)
        model.set_adapters(["default", "oft"], 0.5)
        assert torch.equal(model(x), half)


def test_attaching_to_an_offloaded_model_is_refused_before_anything_changes():
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    net = Net()
    accelerate.cpu_offload(net, execution_device=torch.device("cpu"))
    names = [n for n, _ in net.named_modules()]
    with pytest.raises(RuntimeError, match="offload"):
        AdapterModel(net, LoRAConfig(r=2, target_modules=["proj", "out"]))
    assert [n for n, _ in net.named_modules()] == names
    assert not any(isinstance(m, AdapterLayer) for m in net.modules())


# ---- on a pipeline -------------------------------------------------------------------------------------
#: a tiny UNet of two levels (one cross-attention block down and up), for the compile tests
TWO_LEVELS = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(8, 16), layers_per_block=1)


def _pipeline_with_files(tmp_path, algos, text_encoder=True, unet=None):
    """The tiny SD pipeline (its UNet built with the ``unet`` config overrides) and one file per algorithm."""
    lycoris_lite = pytest.importorskip("lycoris_lite")
    from diffusers import UNet2DConditionModel

    from lycoris_lite.models import build_tiny_sd_pipeline, tiny_unet_config
    from tests.pipeline_checks import make_file

    pipe = build_tiny_sd_pipeline()
    if unet:
        torch.manual_seed(0)
        pipe.unet = UNet2DConditionModel(**{**tiny_unet_config(), **unet}).eval()
    pipe = lycoris_lite.enable(pipe)
    files = [make_file(pipe, tmp_path / f"{a}_{i}.safetensors", algo=a, seed=i, text_encoder=text_encoder)
             for i, a in enumerate(algos)]
    return pipe, files


def _unet_call(pipe, seed=0):
    """One UNet call at fixed inputs (the text encoder left out: what adapters on the denoiser change)."""
    g = torch.Generator().manual_seed(seed)
    dtype = pipe.unet.dtype
    sample = torch.randn(1, 4, 8, 8, generator=g).to(dtype)
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g).to(dtype)
    with torch.no_grad():
        return pipe.unet(sample, 10, context).sample


def test_pipeline_cast_after_loading_runs_and_unfuses_exactly(tmp_path):
    """``load_adapter`` (LoRA, LoKr, OFT), then ``pipe.to(torch.bfloat16)``: the UNet runs with the
    adapters (not the base), fused is the unfused result to bfloat16 rounding, disabling while fused runs
    the kept originals (which followed the cast), and unfusing restores exactly the bfloat16 weights."""
    pipe, files = _pipeline_with_files(tmp_path, ["lora", "lokr", "oft"], text_encoder=False)
    for f in files:
        pipe.load_adapter(f, scale=0.7)
    pipe.to(torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    out = _unet_call(pipe).float()
    pipe.disable_adapters()
    base = _unet_call(pipe).float()
    pipe.enable_adapters()
    assert torch.isfinite(out).all() and (out - base).abs().max() > 0.05 * base.abs().max()
    weights = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if ".adapters." not in n}
    pipe.fuse_adapters()
    fused = _unet_call(pipe).float()
    assert (fused - out).abs().max() < 0.05 * out.abs().max()
    pipe.disable_adapters()
    assert torch.equal(_unet_call(pipe).float(), base)
    pipe.enable_adapters()
    pipe.unfuse_adapters()
    assert all(torch.equal(p, weights[n]) for n, p in pipe.unet.named_parameters() if n in weights)


@pytest.mark.slow
def test_compiled_unet_keeps_its_graph_across_weights_and_hotswaps(tmp_path):
    """``torch.compile(pipe.unet)``: set_adapters weight changes and a ``hotswap=True`` load of a
    same-shaped file with another alpha reuse the graph; outputs equal the eager UNet's. On a two-level
    tiny UNet (the four-level one takes dynamo 40 s to trace; the layers and adapter paths are the same)."""
    from safetensors.torch import load_file, save_file

    pipe, files = _pipeline_with_files(tmp_path, ["loha", "loha"], text_encoder=False, unet=TWO_LEVELS)
    other = load_file(files[1])
    save_file({k: v * 3 if k.endswith(".alpha") else v for k, v in other.items()}, files[1])
    name = pipe.load_adapter(files[0], adapter_name="style")
    eager = pipe.unet
    pipe.unet = _compiled(eager)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = _unet_call(pipe)
        graphs = _graphs()
        pipe.set_adapters([name], 0.4)
        second = _unet_call(pipe)
        pipe.load_adapter(files[1], adapter_name="style", hotswap=True)
        third = _unet_call(pipe)
    assert _graphs() == graphs and _graph_breaks() == 0
    assert not torch.equal(first, second) and not torch.equal(second, third)
    pipe.unet = eager
    assert torch.equal(third, _unet_call(pipe))


def test_group_offloading_before_and_after_loading(tmp_path):
    """diffusers' group offloading (to disk, so an offloaded weight holds garbage until the hooks bring
    it in): loading before it works at block and leaf level; loading after it is done by taking the
    hooks off and putting them back (offload to memory) or refused clearly, changing nothing (to disk)."""
    pytest.importorskip("diffusers.hooks.group_offloading")
    pipe, files = _pipeline_with_files(tmp_path, ["lora"], text_encoder=False)
    pipe.load_adapter(files[0])
    expected = _unet_call(pipe)
    pipe.delete_adapters(pipe.get_active_adapters())
    for level, when in (("block_level", "before"), ("leaf_level", "before"), ("leaf_level", "after")):
        fresh, _ = _pipeline_with_files(tmp_path / level / when, [], text_encoder=False)
        if when == "before":
            fresh.load_adapter(files[0])
        kwargs = {"num_blocks_per_group": 1} if level == "block_level" else {}
        fresh.unet.enable_group_offload(torch.device("cpu"), offload_type=level,
                                        offload_to_disk_path=str(tmp_path / level / when / "offload")
                                        if when == "before" else None, **kwargs)
        if when == "after":
            fresh.load_adapter(files[0])
        # to rounding: tensors read back from the offload files sit at other alignments, where MKL's GEMMs
        # round differently
        assert torch.allclose(_unet_call(fresh), expected, rtol=1e-4, atol=1e-5), (level, when)
    disk, _ = _pipeline_with_files(tmp_path / "disk", [], text_encoder=False)
    disk.unet.enable_group_offload(torch.device("cpu"), offload_type="leaf_level",
                                   offload_to_disk_path=str(tmp_path / "disk" / "offload"))
    with pytest.raises(RuntimeError, match="group-offloaded to disk"):
        disk.load_adapter(files[0])
    assert disk.list_adapters() == {} and not any(isinstance(m, AdapterLayer) for m in disk.unet.modules())


@pytest.mark.slow
@pytest.mark.skipif(not __import__("shutil").which("g++"), reason="inductor needs a C++ compiler on the CPU")
def test_inductor_compiles_a_mixed_stack_once():
    """The default backend (inductor, generated C++ on the CPU) on a stack of every kind of forward path
    (a low-rank route, a folded ΔW, a rotation): no graph break, one graph across weight changes, and
    the eager result to float32 rounding."""
    model, x = build("loha")
    model.add_adapter("oft", get_algorithm("oft").config_class(block_size=4, target_modules=["proj", "conv"],
                                                               init_weights=False))
    model.add_adapter("lora", LoRAConfig(r=2, target_modules=["conv", "proj", "out"], init_weights=False))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model.model)
    with torch.no_grad():
        for weight in (1.0, 0.6):
            model.set_adapters(["default", "oft", "lora"], weight)
            expected = model.model(x)
            assert torch.allclose(compiled(x), expected, rtol=1e-4, atol=1e-5)
    assert _graph_breaks() == 0 and _graphs() == 1
