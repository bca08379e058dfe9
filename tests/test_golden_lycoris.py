"""Golden tests against the real LyCORIS package (``lycoris-lora``): same tensors, same layer.

For each LyCORIS module (LoCon with and without Tucker, LoHa, LoKr, Diag-OFT, BOFT) on a Linear, a
1×1 Conv2d and a 3×3 Conv2d (stride 2, padding 1, 9×9 input) we build their module, give it random
non-zero weights, copy its state dict into ours (same key names, ``.weight`` dropped, see
:mod:`tests.golden_mapping`) and compare **their forward** with ours, at multiplier 1 and 0.5
(additive algorithms, and OFT without rescale), and at 1 only for BOFT (documented below).

Their merge is not the reference: LyCORIS's LoHa/LoKr ``get_diff_weight`` multiplies by
``alpha/r`` a second time (``formats-and-math-lycoris.md`` §2.5 #1), which
:func:`test_lycoris_merge_applies_scale_twice` pins down.

Precision: additive algorithms run in float64 on both sides (≤ 1e-10). LyCORIS's OFT/BOFT take the
Cayley inverse in float32 (``(I − Q).float().inverse()`` in ``get_r``; a float64 module raises a
dtype error), so their modules run in float32 and ours in float64 on the same (float32) values; the
comparison is at 2e-6, the float32 rounding of their side.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from tests.golden_mapping import make_base as golden_make_base
import torch.nn.functional as F
from torch import nn

lycoris = pytest.importorskip("lycoris")

from lycoris.modules import ButterflyOFTModule, DiagOFTModule, LoConModule, LohaModule, LokrModule  # noqa: E402

from lycoris_lite import AdapterModel, BOFTConfig, LoHaConfig, LoKrConfig, LoRAConfig, OFTConfig  # noqa: E402
from lycoris_lite.algos.boft import butterfly_blocks, butterfly_perm  # noqa: E402
from lycoris_lite.base.operators import BlockDiagonal, dense  # noqa: E402

try:  # tests/ as a package or as a rootdir on sys.path
    from .golden_mapping import load_into, lycoris_tensors
except ImportError:
    from golden_mapping import load_into, lycoris_tensors

logging.getLogger("LyCORIS").setLevel(logging.WARNING)

F32, F64 = torch.float32, torch.float64
TOL64 = 1e-10
TOL32 = 2e-6


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(F64), b.to(F64)
    return ((a - b).norm() / b.norm()).item()


# ---- layers -----------------------------------------------------------------------------------------
# out 32 (Linear) / 16 (Conv) are block size x power of two, as LyCORIS's BOFT needs
def make_base(kind: str, dtype) -> nn.Module:
    return golden_make_base(kind, dtype, linear_out=32)


def make_input(kind: str, dtype) -> torch.Tensor:
    if kind == "linear":
        return torch.randn(5, 24, dtype=dtype)
    return torch.randn(2, 12, 9, 9, dtype=dtype)


def build_theirs(cls, base: nn.Module, kwargs: dict, std: float, dtype, multiplier: float = 1.0, bypass=False):
    """Their module on ``base`` with every tensor random (their inits zero one factor)."""
    module = cls("lycoris_golden", base, multiplier, bypass_mode=bypass, **kwargs).to(dtype)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "rescale":
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, std)
    return module


def build_ours(cfg, base: nn.Module, tensors: dict, multiplier: float = 1.0) -> AdapterModel:
    ours = AdapterModel(nn.Sequential(copy.deepcopy(base).to(F64)), cfg.replace(target_modules=["0"], init_weights=False))
    load_into(ours.model[0], tensors)
    ours.set_scale("default", multiplier)
    return ours


# ---- the matrix ---------------------------------------------------------------------------------------
LAYERS = ("linear", "conv1x1", "conv3x3")
HALF = (1.0, 0.5)
# (id, their class, their kwargs, our config, layers, multipliers, bypass modes, weight std)
ADDITIVE = [
    ("locon", LoConModule, dict(lora_dim=4, alpha=3), LoRAConfig(r=4, alpha=3), LAYERS, 0.3),
    ("locon-tucker", LoConModule, dict(lora_dim=4, alpha=3, use_tucker=True), LoRAConfig(r=4, alpha=3, use_tucker=True),
     ("conv3x3",), 0.3),
    ("locon-rslora", LoConModule, dict(lora_dim=4, alpha=3, rs_lora=True), LoRAConfig(r=4, alpha=3, use_rslora=True),
     ("linear", "conv3x3"), 0.3),
    ("loha", LohaModule, dict(lora_dim=4, alpha=3), LoHaConfig(r=4, alpha=3), LAYERS, 0.5),
    ("loha-tucker", LohaModule, dict(lora_dim=4, alpha=3, use_tucker=True), LoHaConfig(r=4, alpha=3, use_tucker=True),
     ("conv3x3",), 0.5),
    # Linear 24->32: out (4, 8), in (4, 6); Conv 12->16: out (4, 4), in (3, 4)
    ("lokr", LokrModule, dict(lora_dim=1, alpha=3), LoKrConfig(r=1, alpha=3), LAYERS, 0.5),
    ("lokr-factor2", LokrModule, dict(lora_dim=2, alpha=3, factor=2), LoKrConfig(r=2, alpha=3, factor=2), LAYERS, 0.5),
    ("lokr-decompose-both", LokrModule, dict(lora_dim=1, alpha=3, decompose_both=True),
     LoKrConfig(r=1, alpha=3, decompose_both=True), LAYERS, 0.5),
    # both factors full: alpha is ignored (scale 1) by LyCORIS and by us
    ("lokr-full-matrix", LokrModule, dict(lora_dim=4, alpha=3, full_matrix=True),
     LoKrConfig(r=4, alpha=3, full_matrix=True), LAYERS, 0.5),
    ("lokr-large-rank", LokrModule, dict(lora_dim=8, alpha=3), LoKrConfig(r=8, alpha=3), LAYERS, 0.5),
    ("lokr-tucker", LokrModule, dict(lora_dim=1, alpha=3, use_tucker=True), LoKrConfig(r=1, alpha=3, use_tucker=True),
     ("conv3x3",), 0.5),
]
ADDITIVE_PARAMS = [
    pytest.param(case, kind, mult, bypass, id=f"{case[0]}-{kind}-m{mult}{'-bypass' if bypass else ''}")
    for case in ADDITIVE for kind in case[4] for mult in HALF for bypass in (False, True)
]


@pytest.mark.parametrize("case,kind,multiplier,bypass", ADDITIVE_PARAMS)
def test_additive_matches_lycoris(case, kind, multiplier, bypass):
    """LoCon / LoHa / LoKr: their forward (weight-rebuild mode, and bypass mode, which LyCORIS
    uses for quantised layers) equals ours, float64, at multiplier 1 and 0.5."""
    case_id, cls, kwargs, cfg, _, std = case
    torch.manual_seed(1)
    base = make_base(kind, F64)
    x = make_input(kind, F64)
    theirs = build_theirs(cls, base, kwargs, std, F64, multiplier, bypass)
    ours = build_ours(cfg, base, lycoris_tensors(theirs), multiplier)
    with torch.no_grad():
        y_base = base(x)
        y_theirs = theirs(x)
        y_ours = ours(x)
    assert rel(y_theirs, y_base) > 1e-2  # the adapter does something
    assert rel(y_ours, y_theirs) < TOL64
    settings = ours.model[0].adapters["default"].settings
    if case_id in ("lokr-full-matrix", "lokr-large-rank"):
        # both Kronecker factors full: alpha=3 is ignored, scale 1 on both sides
        assert not hasattr(theirs, "lokr_w1_a") and not hasattr(theirs, "lokr_w2_a")
        assert theirs.scale == 1.0 and settings.scale == 1.0
    else:
        assert settings.scale == pytest.approx(theirs.scale)


# ---- the merge bug --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ("linear", "conv3x3"))
@pytest.mark.parametrize("cls,kwargs,cfg,bug", [
    pytest.param(LohaModule, dict(lora_dim=4, alpha=3), LoHaConfig(r=4, alpha=3), True, id="loha"),
    pytest.param(LokrModule, dict(lora_dim=1, alpha=3), LoKrConfig(r=1, alpha=3), True, id="lokr"),
    pytest.param(LoConModule, dict(lora_dim=4, alpha=3), LoRAConfig(r=4, alpha=3), False, id="locon-control"),
])
def test_lycoris_merge_applies_scale_twice(cls, kwargs, cfg, bug, kind):
    """LyCORIS bug (formats-and-math-lycoris.md §2.5 #1): ``LohaModule``/``LokrModule.get_weight``
    already multiplies by ``self.scale`` (alpha/r) and ``get_diff_weight`` multiplies by
    ``self.scale * multiplier`` again, so ``merge_to`` / ``get_merged_weight`` (and
    ``lycoris.utils.merge``) apply ``s²·ΔW`` while ``forward`` applies ``s·ΔW``. With alpha ≠ r their
    merged layer therefore differs from their own forward by exactly the factor ``s`` on the
    delta; our fused weight equals their forward. LoCon (control) merges correctly."""
    torch.manual_seed(2)
    base = make_base(kind, F64)
    x = make_input(kind, F64)
    theirs = build_theirs(cls, base, kwargs, 0.5, F64)
    s = theirs.scale
    assert s != 1.0
    ours = build_ours(cfg, base, lycoris_tensors(theirs))
    with torch.no_grad():
        y_base = base(x)
        y_forward = theirs(x)
        w_ours = ours.model[0].fused_weight(["default"])
        theirs.merge_to(1.0)  # writes their merged weight into `base`
        y_merged = base(x)
        base_layer_ours = copy.deepcopy(base).to(F64)
        base_layer_ours.weight.copy_(w_ours)
        y_ours_fused = base_layer_ours(x)
    delta_forward = y_forward - y_base
    delta_merged = y_merged - y_base
    assert rel(delta_forward, y_base) > 1e-2
    assert rel(y_ours_fused, y_forward) < TOL64  # ours: fused == their forward
    if bug:
        assert rel(delta_merged, s * delta_forward) < TOL64  # theirs: s² instead of s
        assert rel(delta_merged, delta_forward) > 0.1
    else:
        assert rel(delta_merged, delta_forward) < TOL64


# ---- OFT / BOFT -----------------------------------------------------------------------------------------
ROTATION = [
    ("oft", DiagOFTModule, dict(lora_dim=4), OFTConfig(block_size=4), HALF),
    ("oft-constraint", DiagOFTModule, dict(lora_dim=4, constraint=0.015), OFTConfig(block_size=4, constraint=0.015), HALF),
    # their rescale is not interpolated by the multiplier (see test_oft_rescale_multiplier): m=1 only
    ("oft-rescale", DiagOFTModule, dict(lora_dim=4, rescaled=True), OFTConfig(block_size=4, rescale=True), (1.0,)),
    ("oft-constraint-rescale", DiagOFTModule, dict(lora_dim=4, constraint=0.015, rescaled=True),
     OFTConfig(block_size=4, constraint=0.015, rescale=True), (1.0,)),
    # BOFT: LyCORIS interpolates each butterfly stage, we the whole transform: m=1 only
    ("boft", ButterflyOFTModule, dict(lora_dim=4), BOFTConfig(block_size=4), (1.0,)),
    ("boft-constraint-rescale", ButterflyOFTModule, dict(lora_dim=4, constraint=0.015, rescaled=True),
     BOFTConfig(block_size=4, constraint=0.015, rescale=True), (1.0,)),
]
ROTATION_PARAMS = [
    pytest.param(case, kind, mult, id=f"{case[0]}-{kind}-m{mult}")
    for case in ROTATION for kind in LAYERS for mult in case[4]
]


@pytest.mark.parametrize("case,kind,multiplier", ROTATION_PARAMS)
def test_rotation_matches_lycoris(case, kind, multiplier):
    """Diag-OFT and BOFT (output side, LyCORIS's layout: identity mapping of ``oft_blocks``,
    ``alpha`` = constraint, ``rescale`` flattened)."""
    case_id, cls, kwargs, cfg, _ = case
    torch.manual_seed(3)
    base = make_base(kind, F32)
    x = make_input(kind, F32)
    theirs = build_theirs(cls, base, kwargs, 0.1, F32, multiplier)
    tensors = lycoris_tensors(theirs)
    if cls is ButterflyOFTModule:
        stages, _, b, _ = tensors["oft_blocks"].shape
        assert stages >= 3  # a real butterfly: out 32 -> b=4, 8 blocks, 4 stages; out 16 -> 3 stages
        cfg = cfg.replace(block_size=b, butterfly_factor=stages)
    else:
        assert tensors["oft_blocks"].shape[1:] == (4, 4)
    ours = build_ours(cfg, base, tensors, multiplier)
    settings = ours.model[0].adapters["default"].settings
    if "constraint" in kwargs:
        # the COFT clamp is active (their radius alpha·out_dim == ours constraint·D)
        q = tensors["oft_blocks"] - tensors["oft_blocks"].transpose(-1, -2)
        assert settings.radius == pytest.approx(theirs.constraint)
        assert q.norm() > 2 * settings.radius
    with torch.no_grad():
        y_base = base(x)
        y_theirs = theirs(x)
        y_ours = ours(x.to(F64))
    assert rel(y_theirs, y_base) > 1e-2
    assert rel(y_ours, y_theirs) < TOL32


def test_oft_rescale_multiplier():
    """With ``rescale`` and a multiplier ``s ≠ 1`` LyCORIS's Diag-OFT (``make_weight``) interpolates
    only the rotation and applies the rescale in full, ``W' = rescale ⊙ (W + s(RᵀW − W))`` (so at
    ``s = 0`` the layer is still rescaled); ours interpolates the whole transform,
    ``W + s(rescale ⊙ RᵀW − W)`` (AUTOMATIC1111's convention; ``s = 0`` is the base layer). Both
    formulas are checked, and shown to differ."""
    torch.manual_seed(4)
    s = 0.5
    base = make_base("linear", F32)
    x = make_input("linear", F32)
    theirs = build_theirs(DiagOFTModule, base, dict(lora_dim=4, rescaled=True), 0.1, F32, s)
    tensors = lycoris_tensors(theirs)
    ours = build_ours(OFTConfig(block_size=4, rescale=True), base, tensors, s)
    rotation_only = build_ours(OFTConfig(block_size=4), base, {"oft_blocks": tensors["oft_blocks"]})
    w = base.weight.detach().to(F64)
    rescale = tensors["rescale"].to(F64)[:, None]
    with torch.no_grad():
        w_rot = rotation_only.model[0].fused_weight(["default"])  # RᵀW (blockwise)
        y_theirs = theirs(x)
        y_ours = ours(x.to(F64))
        x64, b64 = x.to(F64), base.bias.detach().to(F64)
        assert rel(y_theirs, F.linear(x64, rescale * (w + s * (w_rot - w)), b64)) < TOL32
        assert rel(y_ours, F.linear(x64, w + s * (rescale * w_rot - w), b64)) < TOL64
        assert rel(y_ours, y_theirs) > 1e-3


def test_boft_multiplier_per_stage():
    """Multiplier ``s ≠ 1`` on BOFT: LyCORIS interpolates every butterfly stage,
    ``W' = Π_i (s·B_i + (1 − s)·I) · W``; we interpolate the whole transform,
    ``W' = W + s·(B_{m−1}⋯B_0·W − W)`` (AUTOMATIC1111's convention). Equal at ``s = 1`` (tested
    above), different otherwise: both formulas are checked here from the same stage matrices."""
    torch.manual_seed(5)
    s = 0.5
    base = make_base("linear", F32)
    x = make_input("linear", F32)
    theirs = build_theirs(ButterflyOFTModule, base, dict(lora_dim=4), 0.1, F32, s)
    tensors = lycoris_tensors(theirs)
    m, _, b, _ = tensors["oft_blocks"].shape
    ours = build_ours(BOFTConfig(block_size=b, butterfly_factor=m), base, tensors, s)
    rot = butterfly_blocks(tensors["oft_blocks"].to(F64))
    stages = [dense(BlockDiagonal(rot[i], butterfly_perm(32, b, i))) for i in range(m)]
    eye = torch.eye(32, dtype=F64)
    per_stage, whole = eye, eye
    for st in stages:  # stage 0 acts first on W
        per_stage = (s * st + (1 - s) * eye) @ per_stage
        whole = st @ whole
    w = base.weight.detach().to(F64)
    x64, b64 = x.to(F64), base.bias.detach().to(F64)
    with torch.no_grad():
        y_theirs = theirs(x)
        y_ours = ours(x.to(F64))
    assert rel(y_theirs, F.linear(x64, per_stage @ w, b64)) < TOL32
    assert rel(y_ours, F.linear(x64, w + s * (whole @ w - w), b64)) < TOL64
    assert rel(y_ours, y_theirs) > 1e-3
