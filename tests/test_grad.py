"""Gradients of the unfused forward, generated from the registry.

The training forward takes routes with hand-written backward passes that keep less for backward and
recompute the rest (:mod:`lycoris_lite.algos.common` ``factored_route``/``recompute_in_backward``, the
orthogonal output rotation in :mod:`lycoris_lite.base.operators`). For every algorithm × layer kind ×
option set of the contract tests, in float64:

* the gradients of the adapter tensors and of the input equal autograd's gradients of the plain
  formula ``op(x, W_eff)`` (the weight path, which fusing uses), at multiplier 1 and at 0.7;
* ``torch.autograd.gradcheck`` (finite differences) passes on a small layer (not for DoRA, whose gradient
  treats the norm as a constant by design).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lycoris_lite import AdapterModel
from lycoris_lite.base.registry import get_algorithm
from tests.reference import relative_error
from tests.test_contract import CASES, IDS, SMALL, make

pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(model, x, scale):
    lay = model.model[0]
    model.set_scale("default", scale)
    params = list(lay.adapters["default"].parameters())
    y = model(x)
    upstream = torch.randn_like(y)
    ours = torch.autograd.grad(y, params + [x], upstream)
    plain = lay.spec.op(x, lay.effective_weight(["default"]), lay.bias)
    reference = torch.autograd.grad(plain, params + [x], upstream)
    return ours, reference


@pytest.mark.parametrize("algo,layer,options", CASES, ids=IDS)
def test_gradients_equal_autograd_of_the_plain_formula(algo, layer, options):
    model, x = make(algo, layer, **options)
    x.requires_grad_(True)
    for scale in (1.0, 0.7):
        ours, reference = _grads(model, x, scale)
        for got, want in zip(ours, reference):
            assert relative_error(got, want) <= 1e-9, (scale, got.shape)


TINY = {
    "linear": (lambda: nn.Linear(8, 16), (2, 3, 8)),
    "linear-nobias": (lambda: nn.Linear(8, 16, bias=False), (2, 3, 8)),
    "conv3x3": (lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1), (1, 8, 5, 5)),
}


# the contract settings, plus ranks small enough for LoHa's Khatri-Rao route and LoKr's low-rank w2 on TINY.
# Not DoRA: its gradient treats the norm ‖W + ΔW‖ as a constant (DoRA paper §4.3, as PEFT does), which finite
# differences do not; it is checked against autograd of the plain formula above and PEFT's in test_dora.py.
GRADCHECK = [(algo, {}) for algo in sorted(SMALL)] + [("loha", {"r": 1}), ("lokr", {"r": 1})]


@pytest.mark.parametrize("layer", sorted(TINY))
@pytest.mark.parametrize("algo,options", GRADCHECK, ids=[f"{a}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}"
                                                         for a, o in GRADCHECK])
def test_gradcheck(algo, options, layer):
    """Finite differences agree with the training forward's backward (every custom Function)."""
    torch.manual_seed(0)
    factory, shape = TINY[layer]
    base = nn.Sequential(factory()).double()
    cfg = get_algorithm(algo).config_class(**{**SMALL[algo], **options}, target_modules=["0"], init_weights=False)
    model = AdapterModel(base, cfg)
    prefix = "model.0.adapters.default."
    names = [k for k, _ in model.named_parameters() if k.startswith(prefix)]
    values = [model.get_parameter(k).detach().clone().requires_grad_(True) for k in names]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)

    def forward(x, *values):
        return torch.func.functional_call(model, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(forward, (x, *values), fast_mode=True)


def test_cayley_backward_equals_autograd_of_the_solve():
    """The exact Cayley transform (OFT, BOFT) keeps only its output for backward; its gradient equals
    autograd's through ``linalg.solve`` and finite differences, for skew-symmetric and general ``Q``."""
    from lycoris_lite.algos.common import cayley

    torch.manual_seed(0)
    raw = 0.3 * torch.randn(3, 6, 6, dtype=torch.float64)
    eye = torch.eye(6, dtype=torch.float64)
    for q in (raw - raw.mT, raw):
        q = q.detach().requires_grad_(True)
        upstream = torch.randn(3, 6, 6, dtype=torch.float64)
        ours = torch.autograd.grad(cayley(q), q, upstream)[0]
        reference = torch.autograd.grad(torch.linalg.solve(eye + q, eye - q, left=False), q, upstream)[0]
        assert relative_error(ours, reference) <= 1e-12
        assert torch.autograd.gradcheck(cayley, (q,))


FOLDED = {  # (layer, input shape, config): the adapters that train alone through common.folded_route
    "loha-linear": (lambda: nn.Linear(24, 32), (2, 5, 24), "loha", {"r": 2, "alpha": 3.0}),
    "loha-conv1x1": (lambda: nn.Conv2d(24, 32, 1), (2, 24, 3, 3), "loha", {"r": 2, "alpha": 3.0}),
    "lokr-linear-lowrank-w2": (lambda: nn.Linear(24, 32), (2, 5, 24), "lokr", {"r": 1, "alpha": 2.0, "factor": 4}),  # not folded
    "lokr-conv3x3": (lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1), (2, 8, 5, 5), "lokr", {"r": 2, "alpha": 1.0, "factor": 4}),
}


@pytest.mark.parametrize("case", sorted(FOLDED))
def test_the_folded_route_of_a_lone_training_adapter_has_every_gradient_of_the_plain_formula(case, monkeypatch):
    """One LoHa (linear, 1×1) or LoKr (conv) training alone on a layer runs ``op(x, W + ΔW)`` forward and
    its activation route's backward (:func:`lycoris_lite.algos.common.folded_route`); a LoKr on a linear
    layer keeps its route both ways (the full Kronecker product is never built there). Either way the
    output is the weight path's (to rounding), and the gradients of the adapter, the input, and a base
    weight and bias left trainable are autograd's of the plain formula."""
    from lycoris_lite.algos import common

    calls = []
    real = common.folded_route
    monkeypatch.setattr(common, "folded_route", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    factory, shape, algo, settings = FOLDED[case]
    base = nn.Sequential(factory()).double()
    model = AdapterModel(base, get_algorithm(algo).config_class(**settings, target_modules=["0"], init_weights=False))
    lay = model.model[0]
    lay.weight.requires_grad_(True)
    lay.bias.requires_grad_(True)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    for scale in (1.0, -0.6):
        model.set_scale("default", scale)
        wanted = list(lay.adapters["default"].parameters()) + [x, lay.weight, lay.bias]
        y = model(x)
        slot = lay.adapters["default"]
        delta = slot.algorithm.delta_weight(slot.tensors(), lay.spec, slot.settings)
        plain = lay.spec.op(x, lay.weight + scale * delta, lay.bias)
        assert relative_error(y, plain) <= 1e-14
        upstream = torch.randn_like(y)
        for got, want in zip(torch.autograd.grad(y, wanted, upstream), torch.autograd.grad(plain, wanted, upstream)):
            assert relative_error(got, want) <= 1e-12, got.shape
    folded = 0 if case.startswith("lokr-linear") else 2
    assert len(calls) == folded
    with torch.no_grad():  # inference: never this route
        model(x)
    assert len(calls) == folded


def test_every_operator_acts_on_a_conv_channel_axis_as_its_dense_matrix():
    """``apply_channels_first`` (a conv's ``(N, D, H, W)`` activations, axis left in place) and ``apply``
    (channels last) equal the dense matrix ``M`` and ``Mᵀ`` for every operator kind, and carry gradients."""
    from lycoris_lite.base.operators import BlockDiagonal, Chain, Diagonal, LowRankUpdate, Scaled, dense

    torch.manual_seed(0)
    d = 12
    ops = [BlockDiagonal(torch.randn(3, 4, 4, dtype=torch.float64)),
           BlockDiagonal(torch.randn(3, 4, 4, dtype=torch.float64), perm=torch.randperm(d)),
           LowRankUpdate(torch.randn(d, 2, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)),
           Diagonal(torch.randn(d, dtype=torch.float64))]
    ops += [Chain(ops[:3]), Scaled(ops[1], 0.3)]
    h = torch.randn(2, d, 3, 5, dtype=torch.float64, requires_grad=True)
    for op in ops:
        m = dense(op)
        for transpose in (False, True):
            want = torch.einsum("cj,njhw->nchw", m.T if transpose else m, h)
            got = op.apply_channels_first(h, transpose)
            assert relative_error(got, want) <= 1e-13, (type(op).__name__, transpose)
            assert relative_error(op.apply(h.movedim(1, -1), transpose).movedim(-1, 1), want) <= 1e-13
            upstream = torch.randn_like(got)
            assert relative_error(torch.autograd.grad(got, h, upstream)[0], torch.autograd.grad(want, h, upstream)[0]) <= 1e-13


@pytest.mark.parametrize("algo,layer,options", CASES, ids=IDS)
def test_gradients_under_bf16_autocast(algo, layer, options):
    """``--mixed_precision bf16``: a half-precision input (the previous layer's output) under CPU autocast,
    the adapter in float32. The hand-written backward passes run without autocast; they compute in the
    adapter's dtype, and every gradient comes back in its tensor's dtype, near the float32 gradients
    (bf16 keeps 8 bits of mantissa: within 6 % of the largest gradient entry)."""
    model, x = make(algo, layer, dtype=torch.float32, **options)
    params = list(model.model[0].adapters["default"].parameters())
    upstream = torch.randn_like(model(x), generator=torch.Generator().manual_seed(1))
    exact = torch.autograd.grad(model(x), params, upstream)
    half = x.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(half)
    got = torch.autograd.grad(y, params + [half], upstream.to(y.dtype))
    assert got[-1].dtype == torch.bfloat16
    for g, want, p in zip(got, exact, params):
        assert g.dtype == p.dtype == torch.float32
        assert (g - want).abs().max() <= 0.06 * want.abs().max() + 1e-6, (p.shape, (g - want).abs().max())
