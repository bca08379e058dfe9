"""Adapter arithmetic (``lycoris_lite.tools.arithmetic``): PEFT's ``add_weighted_adapter`` on LoRA, every
type; the ΔW-space extension to every registered algorithm and to mixes; bad input.

DARE draws random masks. PEFT draws them with ``torch.bernoulli`` on the global RNG, which its
``add_weighted_adapter`` also consumes when it initialises the new adapter; so the comparison gives
both sides the same mask stream: PEFT's ``torch.bernoulli`` is patched, for the duration of its call,
to draw from a generator seeded like the one passed to ours. Both draw one mask per task tensor in the
same order (layers, then A's before B's, adapters in order), so the results must be identical; the
statistics of the masks are checked on their own.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lycoris_lite import ALGORITHMS, LoRAConfig, controller_for
from lycoris_lite.base.registry import get_algorithm
from lycoris_lite.tools.arithmetic import COMBINATION_TYPES, combine_adapters, combine_tensors
from lycoris_lite.tools.extract import adapter_delta
from tests.reference import transformed_weight
from tests.test_contract import SMALL

pytestmark = pytest.mark.usefixtures("one_thread")

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import merge_utils  # noqa: E402

TARGETS = ["lin", "conv", "pw"]
SAME_RANK = {"x1": (4, 8.0), "x2": (4, 2.0), "x3": (4, 5.0)}  # (PEFT warns about names inside "lora_")
OTHER_RANKS = {"y1": (2, 3.0), "y2": (6, 6.0)}
WEIGHTS = [0.7, -0.4, 1.2]
DENSITY = {t: 0.5 for t in COMBINATION_TYPES if t.startswith(("ties", "dare", "magnitude"))}


class Net(nn.Module):
    """A Linear, a 3×3 conv and a 1×1 conv (PEFT computes each one's ΔW its own way)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 10)
        self.conv = nn.Conv2d(6, 8, 3, padding=1)
        self.pw = nn.Conv2d(8, 6, 1)


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def pair():
    """``(PEFT model, our model)`` with the same random LoRAs (PEFT's init_lora_weights=False)."""
    torch.manual_seed(0)
    base = Net()
    ours = copy.deepcopy(base)
    peft_model = None
    for i, (name, (r, alpha)) in enumerate({**SAME_RANK, **OTHER_RANKS}.items()):
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)
        torch.manual_seed(i + 1)
        if peft_model is None:
            peft_model = get_peft_model(base, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
    ctrl = controller_for(ours)
    for name, (r, alpha) in {**SAME_RANK, **OTHER_RANKS}.items():
        tensors = {p: {"lora_down": layer.lora_A[name].weight.detach().clone(),
                       "lora_up": layer.lora_B[name].weight.detach().clone()} for p, layer in peft_layers(peft_model).items()}
        ctrl.add_adapter(name, LoRAConfig(r=r, alpha=alpha, target_modules=TARGETS), tensors=tensors)
    return peft_model, ours


def peft_layers(peft_model) -> dict[str, LoraLayer]:
    return {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def add_weighted(ctrl, *args, **kwargs):
    """``add_weighted_adapter`` on the model ``ctrl`` manages (what ``AdapterModel.add_weighted_adapter`` runs)."""
    return combine_adapters({"model": ctrl.model}, *args, **kwargs)


def run_both(pair, names, weights, new, combination_type, seed=0, **kwargs):
    """PEFT's and our ``add_weighted_adapter`` with the same arguments and the same DARE mask stream."""
    peft_model, ours = pair
    bernoulli = torch.bernoulli
    peft_generator = torch.Generator().manual_seed(seed)
    torch.bernoulli = lambda p, *args, **kw: bernoulli(p, generator=peft_generator)
    try:
        peft_model.add_weighted_adapter(names, weights, new, combination_type=combination_type, **kwargs)
    finally:
        torch.bernoulli = bernoulli
    return combine_adapters({"model": ours}, names, weights, new, combination_type, **kwargs,
                            generator=torch.Generator().manual_seed(seed))


def compare(pair, new):
    """Our adapter ``new`` against PEFT's, layer by layer: the factors, and the weight change. (PEFT
    computes a 3×3 conv's ΔW with a convolution, we with a matmul: float rounding apart.)"""
    peft_model, ours = pair
    layers = dict(controller_for(ours).layers())
    for path, peft_layer in peft_layers(peft_model).items():
        a, b = peft_layer.lora_A[new].weight.detach(), peft_layer.lora_B[new].weight.detach()
        slot = layers[path].adapters[new]
        assert slot.settings.scale == peft_layer.scaling[new] == 1.0
        down, up = slot.tensors()["lora_down"], slot.tensors()["lora_up"]
        assert down.shape == a.shape and up.shape == b.shape, path
        assert rel(down, a) < 1e-5 and rel(up, b) < 1e-5, path  # a flipped singular vector would give ~2
        assert rel(up.flatten(1) @ down.flatten(1), b.flatten(1) @ a.flatten(1)) < 1e-5, path


@pytest.mark.parametrize("combination_type", COMBINATION_TYPES)
def test_every_combination_type_matches_peft(pair, combination_type):
    """Three rank-4 LoRAs with different alphas, a negative weight; factor-space types give PEFT's
    factors, the ``svd`` family PEFT's truncated SVD (identical factors: the same ΔW, the same LAPACK
    call), ``cat`` PEFT's concatenation."""
    result = run_both(pair, list(SAME_RANK), WEIGHTS, f"m_{combination_type}", combination_type,
                      density=DENSITY.get(combination_type))
    assert result.combination_type == combination_type
    want = 12 if combination_type == "cat" else 4
    assert result.ranks == {"model": {p: want for p in TARGETS}}
    compare(pair, f"m_{combination_type}")


@pytest.mark.parametrize("combination_type,kwargs", [
    ("cat", {}), ("svd", {}), ("svd", {"svd_rank": 3, "svd_clamp": 0.9, "svd_full_matrices": True}),
    ("dare_ties_svd", {"density": 0.3, "majority_sign_method": "frequency", "svd_rank": 5}),
], ids=["cat", "svd-default-rank", "svd-rank3-clamp", "dare_ties_svd-frequency"])
def test_different_ranks_match_peft(pair, combination_type, kwargs):
    """Ranks 2 and 6: ``cat`` gives rank 8, ``svd`` PEFT's default rank (the largest, 6) or ``svd_rank``;
    the quantile clamp acts on PEFT's ``U·S`` and ``Vᵀ``."""
    new = f"r_{combination_type}_{len(kwargs)}"
    result = run_both(pair, list(OTHER_RANKS), [1.3, -0.6], new, combination_type, seed=3, **kwargs)
    want = {"cat": 8}.get(combination_type, kwargs.get("svd_rank", 6))
    assert set(result.ranks["model"].values()) == {want}
    compare(pair, new)


def test_ties_with_frequency_sign_matches_peft(pair):
    run_both(pair, list(SAME_RANK), WEIGHTS, "ties_freq", "dare_ties", seed=7, density=0.6, majority_sign_method="frequency")
    compare(pair, "ties_freq")


def test_one_lora_adapter_is_combined_linearly_as_peft_does(pair):
    result = run_both(pair, ["x2"], [-0.5], "single", "svd", svd_rank=1)
    assert result.combination_type == "linear" and set(result.ranks["model"].values()) == {4}
    compare(pair, "single")
    layer = dict(controller_for(pair[1]).layers())["conv"]
    assert rel(adapter_delta(layer, "single"), -0.5 * adapter_delta(layer, "x2")) < 1e-6


def test_dare_masks_keep_the_density_and_rescale():
    """The keep rate is ``density`` (within 4σ), the kept entries are divided by it, the mask follows
    the generator, and density 1 draws nothing."""
    t = torch.ones(200, 200)
    out = combine_tensors([t], [1.0], "dare_linear", density=0.3, generator=torch.Generator().manual_seed(0))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / t.numel())
    assert torch.equal(out[kept], torch.full_like(out[kept], 1 / 0.3))
    again = combine_tensors([t], [1.0], "dare_linear", density=0.3, generator=torch.Generator().manual_seed(0))
    other = combine_tensors([t], [1.0], "dare_linear", density=0.3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and not torch.equal(out, other)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert torch.equal(combine_tensors([t, 2 * t], [1.0, 0.5], "dare_ties", density=1.0, generator=g), 2 * t / 2 * 1.0)
    assert torch.equal(g.get_state(), state)


# ---- every algorithm, in ΔW space ------------------------------------------------------------------------
def two_adapters(algos, seed=0):
    """``(model, ctrl)``: a Linear and a strided 3×3 conv carrying one random adapter per entry of
    ``algos`` (``{name: algo}``), with SMALL settings from the contract tests."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 48), nn.Conv2d(24, 48, 3, stride=2, padding=1))
    ctrl = controller_for(model)
    for i, (name, algo) in enumerate(algos.items()):
        cfg = get_algorithm(algo).config_class(**SMALL[algo], target_modules=["0", "1"], init_weights=False)
        ctrl.add_adapter(name, cfg, generator=torch.Generator().manual_seed(seed + 10 * i + 1))
    return model, ctrl


def reference_delta(layer, name) -> torch.Tensor:
    """float64 ``W' − W`` of one adapter from the independent dense references."""
    slot = layer.adapters[name]
    w = layer.weight.detach().double()
    return transformed_weight(slot.algorithm.name, w, slot.tensors(), slot.settings) - w


def combined(layer, name) -> torch.Tensor:
    return adapter_delta(layer, name).double()


def optimal(approximation: torch.Tensor, matrix: torch.Tensor, r: int) -> bool:
    """Whether ``approximation`` has rank ≤ r and the Eckart-Young error ``√(Σ_{i>r} s_i²)`` of ``matrix``
    (the best rank-r subspace itself is ill-conditioned when ``s_r ≈ s_{r+1}``; its error is not)."""
    s = torch.linalg.svdvals(matrix.flatten(1))
    best = float(s[r:].norm() / s.norm())
    rank = int((torch.linalg.svdvals(approximation.flatten(1)) > 1e-6 * s[0]).sum())
    return rank <= r and abs(rel(approximation, matrix) - best) < 1e-5


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_every_algorithm_combines_in_delta_space(algo):
    """``cat`` (and ``linear`` for all but LoRA, which follows PEFT above) is exactly ``Σ w_i ΔW_i``
    against the float64 references; ``svd`` a best rank-3 approximation of it; ``ties`` and
    ``dare_ties`` PEFT's own rules applied to the ΔW's (same mask stream)."""
    model, ctrl = two_adapters({"a": algo, "b": algo})
    weights = [0.7, -0.4]
    add_weighted(ctrl, ["a", "b"], weights, "cat", "cat")
    add_weighted(ctrl, ["a", "b"], weights, "svd", "svd", svd_rank=3)
    add_weighted(ctrl, ["a", "b"], weights, "ties", "ties", density=0.4)
    add_weighted(ctrl, ["a", "b"], weights, "dare", "dare_ties", density=0.4, generator=torch.Generator().manual_seed(5))
    if algo != "lora":
        add_weighted(ctrl, ["a", "b"], weights, "linear", "linear")
    g = torch.Generator().manual_seed(5)
    for path, layer in ctrl.layers():
        want = sum(w * reference_delta(layer, n) for w, n in zip(weights, ["a", "b"]))
        assert rel(combined(layer, "cat"), want) < 1e-5, path
        if algo != "lora":
            assert rel(combined(layer, "linear"), want) < 1e-5, path
        assert layer.adapters["svd"].settings.r == 3
        assert optimal(combined(layer, "svd"), want, 3), path
        deltas = [adapter_delta(layer, n) for n in ("a", "b")]
        if algo != "lora":  # LoRA's ties work on the factors (PEFT), checked against PEFT above
            ties = merge_utils.ties(deltas, torch.tensor(weights), 0.4, "total")
            assert rel(combined(layer, "ties"), ties) < 1e-5, path
            bernoulli = torch.bernoulli
            torch.bernoulli = lambda p, *args, **kw: bernoulli(p, generator=g)
            try:
                dare = merge_utils.dare_ties(deltas, torch.tensor(weights), 0.4, "total")
            finally:
                torch.bernoulli = bernoulli
            assert rel(combined(layer, "dare"), dare) < 1e-5, path


def test_a_mix_of_algorithms_orthogonal_ones_included():
    """LoRA + LoKr + OFT + HRA on the same layers: ``cat`` is exact and renders the dense sum,
    ``svd`` needs a rank and then gives the best approximation, the same-shape types refuse."""
    algos = {"lora": "lora", "lokr": "lokr", "oft": "oft", "hra": "hra"}
    model, ctrl = two_adapters(algos)
    weights = [0.5, 1.5, 0.8, -0.3]
    add_weighted(ctrl, list(algos), weights, "exact", "cat")
    with pytest.raises(ValueError, match="needs svd_rank"):
        add_weighted(ctrl, list(algos), weights, "small", "svd")
    add_weighted(ctrl, list(algos), weights, "small", "magnitude_prune_svd", svd_rank=5, density=1.0)
    with pytest.raises(ValueError, match="one algorithm with the same shapes"):
        add_weighted(ctrl, list(algos), weights, "bad", "linear")
    for path, layer in ctrl.layers():
        want = sum(w * reference_delta(layer, n) for w, n in zip(weights, algos))
        assert rel(combined(layer, "exact"), want) < 1e-5
        assert optimal(combined(layer, "small"), want, 5)
    ctrl.set_adapter("exact")  # the unfused forward of the combined adapter
    x, img = torch.randn(3, 24), torch.randn(2, 24, 9, 9)
    dense = {p: layer.weight.double() + sum(w * reference_delta(layer, n) for w, n in zip(weights, algos))
             for p, layer in ctrl.layers()}
    with torch.no_grad():
        assert rel(model[0](x), torch.nn.functional.linear(x.double(), dense["0"], model[0].bias.double())) < 1e-5
        want = torch.nn.functional.conv2d(img.double(), dense["1"], model[1].bias.double(), stride=2, padding=1)
        assert rel(model[1](img), want) < 1e-5


def test_components_are_combined_together_and_all_or_nothing():
    """``combine_adapters`` over a UNet and a text encoder: the adapter lands on each component that
    carries an input (``b`` is on the UNet only); a failure on the second component changes nothing."""
    unet, _ = two_adapters({"a": "lora", "b": "loha"})
    te, te_ctrl = two_adapters({"a": "lora"}, seed=1)
    components = {"unet": unet, "text_encoder": te}
    result = combine_adapters(components, ["a", "b"], [1.0, 0.5], "ab", "svd", svd_rank=2)
    assert set(result.ranks) == {"unet", "text_encoder"}
    te_layer = dict(te_ctrl.layers())["0"]
    assert optimal(combined(te_layer, "ab"), adapter_delta(te_layer, "a").double(), 2)

    te_ctrl.add_adapter("c", LoRAConfig(r=2, target_modules=["0", "1"], init_weights=False))  # rank 2 vs a's 4
    before = {c: sorted(controller_for(m).configs) for c, m in components.items()}
    states = {c: state_of(m) for c, m in components.items()}
    with pytest.raises(ValueError, match="on text_encoder.0"):
        combine_adapters(components, ["a", "c"], [1.0, 1.0], "ac", "linear")  # fine on the UNet (no c there)
    assert {c: sorted(controller_for(m).configs) for c, m in components.items()} == before
    assert all(torch.equal(v, states[c][k]) for c, m in components.items() for k, v in m.state_dict().items())
    combine_adapters(components, ["a", "c"], [1.0, 1.0], "ac", "cat")
    assert {c: sorted(controller_for(m).configs) for c, m in components.items()} == {
        c: sorted(names + ["ac"]) for c, names in before.items()}


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


BAD = [
    ({"combination_type": "average"}, "unknown combination_type"),
    ({"combination_type": "ties"}, "needs a density"),
    ({"combination_type": "ties", "density": 0.0}, r"density must be a number in \(0, 1\]"),
    ({"combination_type": "dare_linear", "density": 1.5}, r"density must be a number in \(0, 1\]"),
    ({"combination_type": "magnitude_prune", "density": -0.2}, r"density must be a number in \(0, 1\]"),
    ({"combination_type": "dare_ties_svd", "density": float("nan")}, r"density must be a number in \(0, 1\]"),
    ({"combination_type": "svd", "density": 0.5}, "density is used by"),
    ({"combination_type": "ties", "density": 0.5, "majority_sign_method": "mean"}, "majority_sign_method"),
    ({"adapters": ["a", "zzz"]}, "unknown adapter"),
    ({"adapter_name": "a"}, "already exists"),
    ({"adapter_name": "x.y"}, "without dots"),
    ({"weights": [1.0]}, "2 adapters but 1 weights"),
    ({"weights": [1.0, float("inf")]}, "finite"),
    ({"svd_rank": 0}, "svd_rank must be a positive integer"),
    ({"svd_clamp": 1.5}, "svd_clamp"),
    ({"adapters": ["a", "r2"], "combination_type": "linear"}, "one algorithm with the same shapes"),
    ({"adapters": ["a", "loha"], "combination_type": "dare_ties", "density": 0.5}, "one algorithm with the same shapes"),
    ({"adapters": ["a", "loha"], "combination_type": "svd"}, "needs svd_rank"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m.split()[0] + f"-{i}" for i, (_, m) in enumerate(BAD)])
def test_bad_input_is_refused_and_changes_nothing(change, message):
    model, ctrl = two_adapters({"a": "lora", "b": "lora", "loha": "loha"})
    ctrl.add_adapter("r2", LoRAConfig(r=2, target_modules=["0", "1"], init_weights=False))
    args = {"adapters": ["a", "b"], "weights": [1.0, 0.5], "adapter_name": "new", "combination_type": "svd", **change}
    before, configs = state_of(model), dict(ctrl.configs)
    with pytest.raises(ValueError, match=message):
        add_weighted(ctrl, args.pop("adapters"), args.pop("weights"), args.pop("adapter_name"), **args)
    assert ctrl.configs == configs
    after = state_of(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
