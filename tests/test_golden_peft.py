"""Golden tests against Hugging Face PEFT: the same adapter tensors give the same layer.

For each PEFT tuner (LoRA, LoHa, LoKr, OFT, BOFT, HRA) on a Linear, a 1×1 Conv2d and a 3×3 Conv2d
(stride 2, padding 1, 9×9 input, so the kernel slides over real positions), in float64: build PEFT's
adapter with random (non-identity) weights, build ours with the same settings, copy PEFT's tensors
across with the explicit mappings of :mod:`tests.golden_mapping`, then check

* our unfused forward == PEFT's unmerged forward (relative error ≤ 1e-10),
* our fused weight == PEFT's merged weight, and our fused layer gives the same output,
* the adapter really changes the layer (output differs from the base layer's).

Where PEFT has a bug (see ``shared/reference/peft-tuners.md`` §6) the test asserts that we follow
the maths and PEFT does not, and says why. PEFT 0.22 fixed those bugs (:data:`PEFT_FIXES_022`): with
it the same tests check PEFT as a direct oracle, and say where its fix differs from ours.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from packaging.version import Version

from tests.golden_mapping import make_base as golden_make_base
import torch.nn.functional as F
from torch import nn

peft = pytest.importorskip("peft")

import peft.tuners.boft.layer as peft_boft_layer  # noqa: E402

from lycoris_lite import (  # noqa: E402
    AdapterModel,
    BOFTConfig,
    HRAConfig,
    LoHaConfig,
    LoKrConfig,
    LoRAConfig,
    OFTConfig,
)
from lycoris_lite.algos.boft import butterfly_blocks, butterfly_perm  # noqa: E402
from lycoris_lite.base.operators import BlockDiagonal, Chain, dense  # noqa: E402

try:  # tests/ as a package or as a rootdir on sys.path
    from .golden_mapping import load_into, peft_tensors, skew_from_peft_vector
except ImportError:
    from golden_mapping import load_into, peft_tensors, skew_from_peft_vector

F64 = torch.float64
TOL = 1e-10

# PEFT 0.22 fixed the three bugs that the "PEFT bugs" tests below document: (a) OFT's Conv2d forward
# rotates the weight (``OFTRotationModule.rotate``) instead of unfolding/folding the input, (b) OFT's
# merge walks the adapters in reverse, so that it composes as the unmerged forward does, (c) HRA's
# Gram–Schmidt is ``torch.linalg.qr`` (no NaN, always orthogonal). Before 0.22 the tests assert the bug,
# from 0.22 on that PEFT agrees with us (or, for (b) and (c), exactly how it differs).
PEFT_FIXES_022 = Version(peft.__version__) >= Version("0.22")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---- layers -----------------------------------------------------------------------------------------
def make_base(kind: str) -> nn.Module:
    return golden_make_base(kind)


def make_input(kind: str) -> torch.Tensor:
    if kind == "linear":
        return torch.randn(5, 24, dtype=F64)
    return torch.randn(2, 12, 9, 9, dtype=F64)  # larger than the 3×3 kernel: 5×5 outputs


def conv_or_linear(base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The base layer's op with another weight (the exact reference for a fused weight)."""
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, base.bias)
    return F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation)


def build_peft(peft_cfg, base: nn.Module, names=("default",)) -> nn.Module:
    model = nn.Sequential(copy.deepcopy(base))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BOFT's "Failed to load the CUDA extension", HRA odd-r, ...
        for name in names:
            model = peft.inject_adapter_in_model(copy.deepcopy(peft_cfg), model, adapter_name=name)
    return model.to(F64)


def build_ours(cfg, base: nn.Module, name: str = "default") -> AdapterModel:
    return AdapterModel(nn.Sequential(copy.deepcopy(base)), cfg.replace(target_modules=["0"], init_weights=False), name)


def peft_merged_weight(peft_model: nn.Module, names=None) -> torch.Tensor:
    layer = copy.deepcopy(peft_model[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.merge(adapter_names=names)
    return layer.get_base_layer().weight.detach().clone()


def P(cls, **kwargs):
    """A PEFT config targeting the layer ``"0"`` of ``nn.Sequential(layer)``."""
    return cls(target_modules=["0"], **kwargs)


# ---- the matrix ---------------------------------------------------------------------------------------
# (case id, layer kinds, PEFT config, our config, extra options for the mapping)
LAYERS = ("linear", "conv1x1", "conv3x3")
CASES = [
    ("lora", LAYERS, P(peft.LoraConfig, r=4, lora_alpha=3, init_lora_weights=False), LoRAConfig(r=4, alpha=3), {}),
    ("lora-rslora", LAYERS, P(peft.LoraConfig, r=4, lora_alpha=3, use_rslora=True, init_lora_weights=False),
     LoRAConfig(r=4, alpha=3, use_rslora=True), {}),
    # PEFT's LoHa passes alpha/r as a float32 tensor (torch.tensor(self.scaling)): pick alpha/r exact
    # in float32 so that a 1e-10 comparison is fair
    ("loha", LAYERS, P(peft.LoHaConfig, r=4, alpha=3, init_weights=False), LoHaConfig(r=4, alpha=3), {}),
    ("loha-tucker", ("conv3x3",), P(peft.LoHaConfig, r=4, alpha=3, use_effective_conv2d=True, init_weights=False),
     LoHaConfig(r=4, alpha=3, use_tucker=True), {}),
    # Linear 24->40: (5, 8) x (4, 6); Conv 12->16: (4, 4) x (3, 4). r=1 keeps w2 low-rank, so PEFT's
    # scale (always alpha/r) and ours (alpha/r unless both factors are full) agree.
    ("lokr", LAYERS, P(peft.LoKrConfig, r=1, alpha=3, init_weights=False), LoKrConfig(r=1, alpha=3), {}),
    ("lokr-decompose-both", LAYERS, P(peft.LoKrConfig, r=1, alpha=3, decompose_both=True, init_weights=False),
     LoKrConfig(r=1, alpha=3, decompose_both=True), {}),
    ("lokr-factor4", ("linear",), P(peft.LoKrConfig, r=2, alpha=3, decompose_factor=4, init_weights=False),
     LoKrConfig(r=2, alpha=3, factor=4), {}),
    # both factors full: LyCORIS's rule gives scale 1, PEFT gives alpha/r, equal when alpha == r
    ("lokr-full-alpha-eq-r", LAYERS, P(peft.LoKrConfig, r=8, alpha=8, init_weights=False), LoKrConfig(r=8, alpha=8), {}),
    ("lokr-tucker", ("conv3x3",), P(peft.LoKrConfig, r=1, alpha=3, use_effective_conv2d=True, init_weights=False),
     LoKrConfig(r=1, alpha=3, use_tucker=True), {}),
    ("oft", LAYERS, P(peft.OFTConfig, r=0, oft_block_size=4, use_cayley_neumann=False, init_weights=False),
     OFTConfig(block_size=4, rotation_side="input"), {"cayley_neumann": False}),
    ("oft-neumann", LAYERS,
     P(peft.OFTConfig, r=0, oft_block_size=6, use_cayley_neumann=True, num_cayley_neumann_terms=5, init_weights=False),
     OFTConfig(block_size=6, rotation_side="input", use_cayley_neumann=True, num_cayley_neumann_terms=5),
     {"cayley_neumann": True}),
    # requested 2 butterfly factors: PEFT falls back to 1 on CPU (checked in the test)
    ("boft", LAYERS, P(peft.BOFTConfig, boft_block_size=6, boft_n_butterfly_factor=2, init_weights=False),
     BOFTConfig(block_size=6, butterfly_factor=1, rescale=True, rotation_side="input"), {}),
    ("hra", LAYERS, P(peft.HRAConfig, r=4, init_weights=False), HRAConfig(r=4, rotation_side="input"), {}),
    ("hra-odd-r", ("linear", "conv3x3"), P(peft.HRAConfig, r=3, init_weights=False),
     HRAConfig(r=3, rotation_side="input", init_weights=False), {}),
    ("hra-gs", LAYERS, P(peft.HRAConfig, r=4, apply_GS=True, init_weights=False),
     HRAConfig(r=4, apply_GS=True, rotation_side="input"), {}),
]
PARAMS = [pytest.param(case, kind, id=f"{case[0]}-{kind}") for case in CASES for kind in case[1]]
BOOST = {"loha": 3.0, "lokr": 2.0}


def algo_of(case_id: str) -> str:
    return case_id.split("-")[0]


@pytest.fixture(scope="module", autouse=True)
def _boft_cpu_fallback():
    """PEFT's BOFT caches whether its CUDA extension built; make sure no other test left a fake."""
    saved = peft_boft_layer._FBD_CUDA
    peft_boft_layer._FBD_CUDA = None
    yield
    peft_boft_layer._FBD_CUDA = saved


@pytest.mark.parametrize("case,kind", PARAMS)
def test_matches_peft(case, kind):
    case_id, _, peft_cfg, our_cfg, options = case
    algo = algo_of(case_id)
    torch.manual_seed(1)
    base = make_base(kind)
    x = make_input(kind)
    pm = build_peft(peft_cfg, base)
    player = pm[0]

    if algo == "boft":
        # without the CUDA extension PEFT silently drops to a single butterfly stage
        assert player.fbd_cuda_available is False
        assert player.boft_R["default"].shape[0] == 1, "PEFT's BOFT is expected to fall back to 1 stage on CPU"

    if algo in BOOST:
        # PEFT's kaiming init of every factor makes LoHa/LoKr deltas tiny: enlarge them so the
        # comparison is not dominated by the base layer
        with torch.no_grad():
            for p in player.parameters():
                if p is not player.get_base_layer().weight and p is not player.get_base_layer().bias:
                    p.mul_(BOOST[algo])

    ours = build_ours(our_cfg, base)
    layer = ours.model[0]
    load_into(layer, peft_tensors(player, algo, **options))

    with torch.no_grad():
        y_base = base(x)
        y_peft = pm(x)
        y_ours = ours(x)
        w_peft = peft_merged_weight(pm)
        w_ours = layer.fused_weight(["default"])

    # meaningful: the adapter moves the output well away from the base layer's
    assert rel(y_ours, y_base) > 1e-2
    assert rel(w_ours, base.weight) > 1e-2
    # fused weights agree, and our unfused forward is the exact layer with that weight
    assert rel(w_ours, w_peft) < TOL
    assert rel(y_ours, conv_or_linear(base, x, w_peft)) < TOL

    if algo == "oft" and kind == "conv3x3" and not PEFT_FIXES_022:
        # PEFT bug (a), see test_oft_conv_forward_bug: PEFT's own forward is not its merged weight
        assert rel(y_peft, conv_or_linear(base, x, w_peft)) > 1e-2
    else:
        assert rel(y_ours, y_peft) < TOL

    # fusing ours changes nothing in the output
    ours.merge_adapter()
    with torch.no_grad():
        assert rel(ours(x), y_ours) < TOL
        assert rel(layer.weight, w_peft) < TOL


# ---- OFT mapping details ------------------------------------------------------------------------------
def test_oft_mapping_sign_conventions():
    """PEFT's exact Cayley and its Cayley–Neumann series rotate in opposite directions for the same
    vector (the series truncates ``(I + Q)(I − Q)⁻¹``, the exact one is ``(I − Q)(I + Q)⁻¹``): with a
    small ``Q`` both approximate the same ``R`` only if the sign of ``Q`` is flipped, which is why
    :func:`oft_blocks_from_peft` flips it for one variant and not the other."""
    torch.manual_seed(0)
    vec = torch.randn(3, 6, dtype=F64) * 0.01
    q = skew_from_peft_vector(vec, 4)
    eye = torch.eye(4, dtype=F64)
    exact = torch.linalg.solve(eye + q, eye - q, left=False)
    series = eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q
    assert (series - exact.transpose(1, 2)).abs().max() < 1e-6
    assert (series - exact).abs().max() > 1e-2


# ---- PEFT bugs ------------------------------------------------------------------------------------------
def test_oft_conv_forward_bug():
    """PEFT bug (a), peft-tuners.md §6.1: OFTv2's Conv2d forward rotates k×k patches extracted with
    stride 1 / padding 0 and ``F.fold``-s them back (summing overlaps, with a reshape that is only in
    fold's layout when there is one patch), so for an input larger than the kernel it is not the
    convolution with its own merged weight. Ours (input side on a k×k conv rotates the weight) is
    exactly the conv with PEFT's merged weight, PEFT's forward is not.

    Fixed in PEFT 0.22: its Conv2d forward rotates the weight too (``W' = W Rᵀ`` through
    ``OFTRotationModule.rotate``, then the base layer's ``_conv_forward``, so stride and padding hold),
    which is its merged weight; PEFT's forward is then ours, and its identity init is the base conv."""
    torch.manual_seed(2)
    base = make_base("conv3x3")
    x = make_input("conv3x3")
    pm = build_peft(peft.OFTConfig(r=0, oft_block_size=4, use_cayley_neumann=False, init_weights=False,
                                   target_modules=["0"]), base)
    ours = build_ours(OFTConfig(block_size=4, rotation_side="input"), base)
    load_into(ours.model[0], peft_tensors(pm[0], "oft", cayley_neumann=False))
    with torch.no_grad():
        exact = conv_or_linear(base, x, peft_merged_weight(pm))
        assert rel(ours(x), exact) < TOL  # we are right
        pm_id = build_peft(peft.OFTConfig(r=0, oft_block_size=4, use_cayley_neumann=False, target_modules=["0"]), base)
        if PEFT_FIXES_022:
            # PEFT 0.22 is right as well: its forward is the conv with its merged weight, i.e. ours
            assert rel(pm(x), exact) < TOL
            assert rel(pm(x), ours(x)) < TOL
            # and a freshly initialised (identity) PEFT OFT leaves the conv as it is
            assert rel(pm_id(x), base(x)) < TOL
        else:
            assert rel(pm(x), exact) > 0.1  # PEFT is not
            # even a freshly initialised (identity) PEFT OFT changes a conv's output: the unfold/fold
            # round trip is not the identity for a 9×9 input
            assert rel(pm_id(x), base(x)) > 0.1


def test_oft_multi_adapter_order_bug():
    """PEFT bug (b), peft-tuners.md §6.2: with two active OFT adapters PEFT's unmerged forward
    rotates the input by ``R_a`` then ``R_b`` (``y = x R_a R_b Wᵀ``, i.e. ``W_eff = W R_bᵀ R_aᵀ``),
    while merging them one after the other gives ``W R_aᵀ R_bᵀ``. Block size 4 (≥ 3) rotations do not
    commute, so PEFT's forward and merge disagree.

    Ours uses one composition for both (``lycoris_lite/core/layer.py``: multiplicative adapters compose
    in the order they were added, ``W_eff = M_b(M_a(W))`` with ``M(W) = W·R`` on the input side),
    which is PEFT's sequential merge ``W R_aᵀ R_bᵀ`` for adapters added a, then b.

    PEFT 0.22 fixed it the other way round: its merge walks the adapter list backwards, so that it
    follows the forward, and both give ``W R_bᵀ R_aᵀ`` for the list ``[a, b]``, the opposite of our
    order. That is a convention, not a bug: PEFT lists the adapters in the order the input meets their
    rotations, we in the order they act on ``W``. PEFT with the list ``[b, a]`` is exactly ours (a, then b),
    forward and merge."""
    torch.manual_seed(3)
    base = make_base("linear")
    x = make_input("linear")
    cfg = peft.OFTConfig(r=0, oft_block_size=4, use_cayley_neumann=False, init_weights=False, target_modules=["0"])
    pm = build_peft(cfg, base, names=("a", "b"))
    pm[0].set_adapter(["a", "b"])
    assert pm[0].active_adapters == ["a", "b"]

    ours = build_ours(OFTConfig(block_size=4, rotation_side="input"), base, "a")
    ours.add_adapter("b", OFTConfig(block_size=4, rotation_side="input", target_modules=["0"], init_weights=False))
    ours.set_adapter(["a", "b"])
    layer = ours.model[0]
    load_into(layer, peft_tensors(pm[0], "oft", "a"), "a")
    load_into(layer, peft_tensors(pm[0], "oft", "b"), "b")

    with torch.no_grad():
        r_a = pm[0].get_delta_weight("a")
        r_b = pm[0].get_delta_weight("b")
        w_ab = base.weight @ r_a.T @ r_b.T  # R_a acts on W first: ours
        w_ba = base.weight @ r_b.T @ r_a.T  # R_b acts on W first: PEFT's forward, either version
        y_ours = ours(x)
        # ours: unfused forward == fused weight == W R_aᵀ R_bᵀ
        assert rel(layer.fused_weight(["a", "b"]), w_ab) < TOL
        assert rel(y_ours, conv_or_linear(base, x, w_ab)) < TOL
        # PEFT's unmerged forward rotates the input by R_a, then R_b: y = x R_a R_b Wᵀ, the other order
        y_peft = pm(x)
        assert rel(y_peft, conv_or_linear(base, x, w_ba)) < TOL
        assert rel(y_peft, y_ours) > 1e-3
        w_merged = peft_merged_weight(pm, ["a", "b"])
        if PEFT_FIXES_022:
            # merge b, then a: PEFT's merge is its forward
            assert rel(w_merged, w_ba) < TOL
            # and with the list reversed PEFT is ours, forward and merge
            pm[0].set_adapter(["b", "a"])
            assert pm[0].active_adapters == ["b", "a"]
            assert rel(peft_merged_weight(pm, ["b", "a"]), w_ab) < TOL
            assert rel(pm(x), y_ours) < TOL
        else:
            # merge a, then b: PEFT's merge is ours, not its forward
            assert rel(w_merged, w_ab) < TOL
        # the two single-adapter results differ from each other too (the test is not degenerate)
        assert rel(base.weight @ r_a.T, base.weight @ r_b.T) > 1e-2


def test_hra_gram_schmidt_symmetric_init_bug():
    """PEFT bug (c), peft-tuners.md §6.4: HRA's default init for even r repeats every column twice
    (so the plain reflection chain starts at the identity); with ``apply_GS=True`` the duplicate's
    Gram–Schmidt residual is (numerically) zero and PEFT divides by its norm: NaN when the residual
    is exactly zero, otherwise a normalised rounding error, so ``I − 2QQᵀ`` is not orthogonal.
    Ours drops a vanishing column, so the transform is the exact reflection ``I − 2QQᵀ`` built from
    the distinct columns, i.e. PEFT's GS transform with r/2 columns.

    PEFT 0.22 fixed it differently: its Gram–Schmidt is ``torch.linalg.qr``, whose ``Q`` is orthonormal
    whatever the input, so its transform is finite and orthogonal and its forward is its merge. But for
    a duplicate column QR normalises the rounding residual (or, where that is exactly zero, takes a
    direction of LAPACK's choosing), so ``Q`` has r orthonormal columns, r/2 of them not determined by
    the vectors: PEFT reflects r directions (``I − 2QQᵀ``, trace n − 2r), ours the r/2 that the vectors
    span (trace n − r). Both reflect the vectors themselves (``H u = −u``); the outputs differ, so PEFT
    is still no oracle for this case."""
    torch.manual_seed(4)
    base = make_base("linear")
    x = make_input("linear")
    eye = torch.eye(24, dtype=F64)

    def check(hra_u: torch.Tensor, expect_nan: bool):
        pm = build_peft(peft.HRAConfig(r=4, apply_GS=True, target_modules=["0"]), base)
        with torch.no_grad():
            pm[0].hra_u["default"].copy_(hra_u)
        ours = build_ours(HRAConfig(r=4, apply_GS=True, rotation_side="input"), base)
        load_into(ours.model[0], {"hra_u": hra_u})
        # reference: PEFT's (correct) GS transform on the two distinct columns
        ref = build_peft(peft.HRAConfig(r=2, apply_GS=True, target_modules=["0"]), base)
        with torch.no_grad():
            ref[0].hra_u["default"].copy_(hra_u[:, ::2])
            h_peft = pm[0].get_delta_weight("default")
            y_peft = pm(x)
            y_ours = ours(x)
            w_ours = ours.model[0].fused_weight(["default"])
            h_ref = ref[0].get_delta_weight("default")
        # ours: finite, orthogonal, the reflection of the distinct columns, and not the identity
        assert torch.isfinite(y_ours).all() and torch.isfinite(w_ours).all()
        assert rel(w_ours, base.weight @ h_ref) < TOL
        assert (h_ref.T @ h_ref - eye).abs().max() < 1e-12
        assert rel(y_ours, ref(x)) < TOL
        assert rel(y_ours, base(x)) > 1e-2
        if PEFT_FIXES_022:
            # PEFT: finite and orthogonal (whether the residual is rounding noise or exactly 0), its
            # forward is its merged weight, and it reflects the vectors as ours does ...
            assert torch.isfinite(h_peft).all() and torch.isfinite(y_peft).all()
            assert (h_peft.T @ h_peft - eye).abs().max() < 1e-12
            assert rel(y_peft, conv_or_linear(base, x, base.weight @ h_peft)) < TOL
            assert rel(h_peft @ hra_u, -hra_u) < TOL and rel(h_ref @ hra_u, -hra_u) < TOL
            # ... but also r/2 = 2 directions the vectors do not span: 4 reflected directions, not 2
            assert abs(torch.trace(h_peft).item() - (24 - 2 * 4)) < 1e-9
            assert abs(torch.trace(h_ref).item() - (24 - 2 * 2)) < 1e-9
            assert rel(y_peft, y_ours) > 1e-2
        # PEFT < 0.22: NaN, or a transform that is not orthogonal
        elif expect_nan:
            assert not torch.isfinite(h_peft).all() and not torch.isfinite(y_peft).all()
        else:
            assert (not torch.isfinite(h_peft).all()) or (h_peft.T @ h_peft - eye).abs().max() > 1e-3

    # PEFT's own default initialisation (kaiming half, repeat_interleave(2))
    pm_default = build_peft(peft.HRAConfig(r=4, apply_GS=True, target_modules=["0"]), base)
    u_default = pm_default[0].hra_u["default"].detach().clone()
    assert torch.equal(u_default[:, 0], u_default[:, 1]) and torch.equal(u_default[:, 2], u_default[:, 3])
    check(u_default, expect_nan=False)

    # the same symmetric structure with exactly representable norms: the residual is exactly 0 -> NaN
    # (before PEFT 0.22; QR then picks the missing direction itself)
    half = torch.zeros(24, 2, dtype=F64)
    half[:4, 0] = 1.0  # norm 2
    half[4:8, 1] = 1.0
    half[0, 1] = 1.0  # not orthogonal to the first column (norm √5)
    check(half.repeat_interleave(2, dim=1), expect_nan=True)

    # and our own default init for this config is finite and orthogonal as well
    mine = AdapterModel(nn.Sequential(copy.deepcopy(base)), HRAConfig(r=4, apply_GS=True, target_modules=["0"]))
    with torch.no_grad():
        w = mine.model[0].fused_weight(["default"])
    assert torch.isfinite(w).all()


# ---- BOFT with several butterfly stages ---------------------------------------------------------------
class _FakeBlockDiagExtension:
    """Stands in for PEFT's ``fbd_cuda`` extension (``forward(x)[0]`` = block-diagonal per stage) so
    that PEFT builds its multi-stage BOFT on CPU."""

    @staticmethod
    def forward(x):
        return [torch.stack([torch.block_diag(*stage.unbind(0)) for stage in x])]


def _peft_boft_multistage(base, stages: int, block_size: int):
    saved = peft_boft_layer._FBD_CUDA
    peft_boft_layer._FBD_CUDA = _FakeBlockDiagExtension()
    try:
        pm = build_peft(peft.BOFTConfig(boft_block_size=block_size, boft_n_butterfly_factor=stages,
                                        init_weights=False, target_modules=["0"]), base)
        assert pm[0].boft_R["default"].shape[0] == stages
        with torch.no_grad():
            pm[0].boft_s["default"].fill_(1.0)
            x = make_input("linear")
            y_peft = pm(x)
            w_peft = peft_merged_weight(pm)
    finally:
        peft_boft_layer._FBD_CUDA = saved
    return pm, x, y_peft, w_peft


def test_boft_multistage_stage_patterns_match_peft():
    """With several butterfly stages (PEFT on a machine where its CUDA extension builds) PEFT's
    stage-i blocks group the same indices as our stage-i blocks, so :func:`boft_blocks_from_peft`
    maps stage i to stage i; composed PEFT's way (stage 0 first on the rows of W), they rebuild
    PEFT's merged weight exactly."""
    torch.manual_seed(5)
    base = make_base("linear")
    pm, x, y_peft, w_peft = _peft_boft_multistage(base, 2, 6)
    mapped = peft_tensors(pm[0], "boft")["oft_blocks"]
    rot = butterfly_blocks(mapped)
    stages = [BlockDiagonal(rot[i], butterfly_perm(24, 6, i)) for i in range(2)]
    # W' = W · S_0 · S_1 (rows of W meet stage 0 first), as PEFT's W' = W (B_1 B_0)ᵀ = W B_0ᵀ B_1ᵀ
    m_peft_order = dense(stages[0]) @ dense(stages[1])
    assert rel(base.weight @ m_peft_order, w_peft) < TOL
    assert rel(F.linear(x, w_peft, base.bias), y_peft) < TOL
    # and the order matters (the test can tell the two compositions apart)
    assert rel(base.weight @ dense(Chain(stages)), w_peft) > 1e-3


def test_boft_multistage_input_side_matches_peft():
    torch.manual_seed(5)
    base = make_base("linear")
    pm, x, y_peft, w_peft = _peft_boft_multistage(base, 2, 6)
    ours = build_ours(BOFTConfig(block_size=6, butterfly_factor=2, rescale=True, rotation_side="input"), base)
    load_into(ours.model[0], peft_tensors(pm[0], "boft"))
    with torch.no_grad():
        assert rel(ours.model[0].fused_weight(["default"]), w_peft) < TOL
        assert rel(ours(x), y_peft) < TOL


# ---- LoKr factorisation ---------------------------------------------------------------------------------
def test_lokr_factor_above_sqrt_is_not_sorted_in_peft():
    """PEFT's LoKr ``factorization(dim, factor)`` returns ``(factor, dim // factor)`` unsorted, while
    LyCORIS (and we) sort the pair: for ``factor > √dim`` (here 12 with factor 4 -> PEFT (4, 3),
    LyCORIS/ours (3, 4)) PEFT's Kronecker factors have other shapes than ours for the same config,
    so such a PEFT LoKr cannot be loaded into ``LoKrConfig(factor=...)`` as is (our slot rejects the
    shapes). With ``factor ≤ √dim`` (all the cases above) the two agree."""
    from lycoris.functional import factorization as lycoris_factorization
    from peft.tuners.lokr.layer import factorization as peft_factorization

    from lycoris_lite.algos.common import factorization

    assert peft_factorization(12, 4) == (4, 3)
    assert factorization(12, 4) == lycoris_factorization(12, 4) == (3, 4)
    assert peft_factorization(24, 4) == factorization(24, 4) == (4, 6)

    base = nn.Conv2d(12, 16, 1).to(F64)
    pm = build_peft(P(peft.LoKrConfig, r=1, alpha=3, decompose_factor=4, init_weights=False), base)
    ours = build_ours(LoKrConfig(r=1, alpha=3, factor=4), base)
    assert tuple(pm[0].lokr_w1["default"].shape) == (4, 4)  # out 16 -> (4, 4), in 12 -> (4, 3)
    assert tuple(ours.model[0].adapters["default"].lokr_w1.shape) == (4, 3)  # in 12 -> (3, 4)
    with pytest.raises(AssertionError, match=r"lokr_w.*: ours \("):
        load_into(ours.model[0], peft_tensors(pm[0], "lokr"))
