"""The contract every registered algorithm keeps, generated from the registry.

Every algorithm × {Linear, Conv2d 1x1, Conv2d 3x3 stride 2 padding 1} × dtype, always with
non-identity adapter weights (``init_weights=False``) unless identity is what is tested.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from lycoris_lite import ALGORITHMS, AdapterModel
from lycoris_lite.algos.dora import DecomposableSettings
from lycoris_lite.base.registry import get_algorithm
from tests.reference import relative_error, transformed_weight

# small settings that fit every test layer (24 -> 48 channels); one entry per registered algorithm
SMALL = {
    "lora": {"r": 4, "alpha": 2.0},
    "loha": {"r": 4, "alpha": 64.0},
    "lokr": {"r": 2, "alpha": 1.0, "factor": 4},
    "oft": {"block_size": 4},
    "boft": {"block_size": 4, "butterfly_factor": 2},
    "hra": {"r": 4},
}
# variants that exercise each algorithm's options
VARIANTS = {
    "lora": [{"use_rslora": True}, {"use_tucker": True}, {"use_dora": True},
             {"use_dora": True, "dora_axis": "input", "use_tucker": True}],
    "loha": [{"use_tucker": True, "alpha": 1024.0}, {"r": 2, "alpha": 16.0},  # r=2: Khatri-Rao route while training
             {"use_dora": True, "r": 2, "alpha": 16.0}],
    "lokr": [{"decompose_both": True, "r": 1}, {"full_matrix": True, "alpha": 1e10}, {"use_tucker": True, "factor": 8, "alpha": 8.0},
             {"use_dora": True, "dora_axis": "input"}],
    "oft": [{"rotation_side": "input"}, {"use_cayley_neumann": True}, {"constraint": 0.02}, {"rescale": True}],
    "boft": [{"rotation_side": "input"}, {"rescale": True}, {"butterfly_factor": 1}],
    "hra": [{"rotation_side": "output"}, {"apply_GS": True}],
}
LAYERS = {
    "linear": (lambda: nn.Linear(24, 48), (3, 5, 24)),
    "conv1x1": (lambda: nn.Conv2d(24, 48, 1), (2, 24, 6, 6)),
    "conv3x3": (lambda: nn.Conv2d(24, 48, 3, stride=2, padding=1), (2, 24, 9, 9)),
}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}
CHANGED = {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 0.06}


def test_every_algorithm_has_test_settings():
    assert set(SMALL) == set(ALGORITHMS) == set(VARIANTS)


def make(algo, layer, dtype=torch.float64, init=False, **overrides):
    torch.manual_seed(0)
    factory, shape = LAYERS[layer]
    base = nn.Sequential(factory()).to(dtype)
    x = torch.randn(shape).to(dtype)
    cfg = get_algorithm(algo).config_class(**{**SMALL[algo], **overrides}, target_modules=["0"], init_weights=init)
    model = AdapterModel(base, cfg)
    return model, x


CASES = [(a, layer, {}) for a in SMALL for layer in LAYERS] + [
    (a, layer, v) for a, vs in VARIANTS.items() for v in vs for layer in LAYERS
]
IDS = [f"{a}-{layer}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for a, layer, o in CASES]


@pytest.mark.parametrize("algo,layer,options", CASES, ids=IDS)
def test_matches_float64_reference(algo, layer, options):
    """The weight path equals a dense formula written from the maths; the activation path equals
    the weight path."""
    model, x = make(algo, layer, **options)
    lay = model.model[0]
    slot = lay.adapters["default"]
    ref = transformed_weight(algo, lay.weight, slot.tensors(), slot.settings)
    ours = lay.effective_weight(["default"])
    assert relative_error(ours, ref) <= 1e-10
    assert relative_error(ref, lay.weight) > 1e-3  # the adapter really changes the layer
    fused_out = lay.spec.op(x, ref, lay.bias)
    assert relative_error(model(x), fused_out) <= 1e-10


@pytest.mark.parametrize("algo,layer,options", CASES, ids=IDS)
def test_settings_are_the_algorithms_frozen_dataclass(algo, layer, options):
    """A layer's settings are its algorithm's ``settings_class``: frozen and hashable, DoRA's fields on
    the decomposable ones (``dora_init`` consumed by attaching); a plan with other settings is refused."""
    model, _ = make(algo, layer, **options)
    cls, slot = get_algorithm(algo), model.model[0].adapters["default"]
    settings = slot.settings
    assert type(settings) is cls.settings_class and hash(settings) == hash(dataclasses.replace(settings))
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(settings, dataclasses.fields(settings)[0].name, None)
    assert isinstance(settings, DecomposableSettings) == cls.decomposable
    if cls.decomposable:
        assert settings.dora == (options.get("dora_axis", "output") if options.get("use_dora") else None)
        assert not settings.dora_init
    plan = {"0": (cls, dataclasses.asdict(settings), slot.tensors())}
    with pytest.raises(TypeError, match=f"must be a {cls.settings_class.__name__}"):
        model.controller.check_plan("other", plan)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("algo,layer,options", CASES, ids=IDS)
def test_layer_contract(algo, layer, options, dtype):
    tol = TOL[dtype]
    model, x = make(algo, layer, dtype=dtype, **options)
    lay = model.model[0]
    original = lay.weight.detach().clone()
    with model.disable_adapter():
        base_out = model(x)
    unfused = model(x)
    assert relative_error(unfused, base_out) > CHANGED[dtype], "non-identity adapter must change the output"

    # activation path equals the weight path (computed in float32 from the same weight)
    reference = lay.spec.op(x.float(), lay.effective_weight(["default"]), lay.bias.float())
    assert relative_error(unfused, reference) <= tol

    # fused equals unfused; disabled while fused equals the base bit for bit
    model.merge_adapter()
    assert relative_error(model(x), unfused) <= tol
    with model.disable_adapter():
        assert torch.equal(model(x), base_out)
    # unfuse is bit-exact, after several cycles
    for _ in range(3):
        model.unmerge_adapter()
        assert torch.equal(lay.weight, original)
        model.merge_adapter()
    model.unmerge_adapter()
    assert torch.equal(lay.weight, original)
    assert torch.equal(model(x), unfused)

    # scale 0 is the base, scale 1 the full adapter, negative scales fuse like they run
    model.set_scale("default", 0.0)
    assert torch.equal(model(x), base_out)
    model.set_scale("default", -0.5)
    neg = model(x)
    model.merge_adapter()
    assert relative_error(model(x), neg) <= tol
    model.unmerge_adapter()
    model.set_scale("default", 1.0)
    assert torch.equal(model(x), unfused)


@pytest.mark.parametrize("algo", sorted(SMALL))
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_identity_at_init(algo, layer):
    model, x = make(algo, layer, dtype=torch.float32, init=True)
    with model.disable_adapter():
        base_out = model(x)
    assert relative_error(model(x), base_out) <= 1e-6
    model.merge_adapter()
    assert relative_error(model(x), base_out) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_mixed_stack_fuses_to_its_unfused_output(dtype):
    """LoKr + OFT (block 4, non-commuting) + DoRA-LoRA + HRA + LoHa + BOFT + LoRA on one layer (the DoRA
    stage normalises the OFT-rotated weight)."""
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    for layer in LAYERS:
        model, x = make("lokr", layer, dtype=dtype)
        for name, algo, extra in (("oft", "oft", {}), ("dora", "lora", {"use_dora": True}), ("hra", "hra", {}),
                                  ("loha", "loha", {}), ("boft", "boft", {}), ("lora", "lora", {})):
            cfg = get_algorithm(algo).config_class(**SMALL[algo], **extra, target_modules=["0"], init_weights=False)
            model.add_adapter(name, cfg)
        names = ["default", "oft", "dora", "hra", "loha", "boft", "lora"]
        model.set_adapters(names, [0.7, 1.0, 0.8, -0.4, 0.5, 0.9, 1.3])
        lay = model.model[0]
        original = lay.weight.detach().clone()
        unfused = model(x)
        model.merge_adapter()
        assert relative_error(model(x), unfused) <= tol, layer
        for _ in range(5):
            model.unmerge_adapter()
            model.merge_adapter(safe_merge=True)
        model.unmerge_adapter()
        assert torch.equal(lay.weight, original)


def test_composition_order_is_insertion_order():
    """Two OFT adapters with 4x4 blocks do not commute: the order of adding them matters, and the
    fused weight follows the same order as the forward."""
    model, x = make("oft", "linear")
    model.add_adapter("second", get_algorithm("oft").config_class(block_size=4, target_modules=["0"], init_weights=False))
    model.set_adapter(["second", "default"])  # activation order does not change composition order
    lay = model.model[0]
    out = model(x)
    slots = lay.adapters
    w = transformed_weight("oft", lay.weight, slots["default"].tensors(), slots["default"].settings)
    w = transformed_weight("oft", w, slots["second"].tensors(), slots["second"].settings)
    assert relative_error(out, lay.spec.op(x, w, lay.bias)) <= 1e-10
    w_swapped = transformed_weight("oft", lay.weight, slots["second"].tensors(), slots["second"].settings)
    w_swapped = transformed_weight("oft", w_swapped, slots["default"].tensors(), slots["default"].settings)
    assert relative_error(out, lay.spec.op(x, w_swapped, lay.bias)) > 1e-6


def test_two_sided_transform_at_fractional_scale():
    """Input-side rotation with an output rescale is not one-sided: W + s(D·W·R − W) at s = 0.3."""
    model, x = make("oft", "linear", rotation_side="input", rescale=True)
    model.set_scale("default", 0.3)
    lay = model.model[0]
    slot = lay.adapters["default"]
    full = transformed_weight("oft", lay.weight, slot.tensors(), slot.settings)
    expected = lay.weight.double() + 0.3 * (full - lay.weight.double())
    assert relative_error(model(x), lay.spec.op(x, expected, lay.bias)) <= 1e-10
    model.merge_adapter()
    assert relative_error(lay.weight, expected) <= 1e-10


@pytest.mark.parametrize("algo", sorted(SMALL))
def test_state_dict_round_trip(algo):
    model, x = make(algo, "conv3x3")
    out = model(x)
    state = model.state_dict()
    assert any(".adapters.default." in k for k in state)
    fresh, _ = make(algo, "conv3x3", init=True)
    assert not torch.allclose(fresh(x), out)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), out)


@pytest.mark.parametrize("algo", sorted(SMALL))
def test_gradients_reach_only_adapter_parameters(algo):
    model, x = make(algo, "conv3x3", dtype=torch.float32)
    model(x).square().mean().backward()
    lay = model.model[0]
    assert lay.weight.grad is None and lay.bias.grad is None
    grads = [p.grad for p in lay.adapters["default"].parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("algo", sorted(SMALL))
def test_training_from_identity_moves_away_from_identity(algo):
    """From the identity init the gradient is non-zero: one optimiser step changes the output."""
    model, x = make(algo, "linear", dtype=torch.float32, init=True)
    params = model.controller.trainable_parameters()
    before = model(x).detach()
    opt = torch.optim.SGD(params, lr=0.1)
    target = torch.randn_like(before)
    (model(x) - target).square().mean().backward()
    opt.step()
    assert relative_error(model(x).detach(), before) > 1e-6
