"""OFT: a block-diagonal orthogonal transform of the weight, each block a Cayley transform.

``Q_k = B_k − B_kᵀ`` (``oft_blocks``: ``(n, b, b)``, LyCORIS's layout and meaning), optionally
clamped (COFT: ``‖Q‖_F ≤ constraint · D`` over all blocks), ``R_k = (I − Q_k)(I + Q_k)⁻¹`` (or its
Cayley-Neumann series), ``M = blockdiag(R_1..R_n)``.

* ``rotation_side="output"`` (LyCORIS, kohya, AUTOMATIC1111, ComfyUI): ``W' = M · W`` with ``D = out``.
  Unfused forward: ``y' = (y − bias)·Mᵀ + bias``, a block rotation of the output channels (convs too).
* ``rotation_side="input"`` (PEFT): ``W' = W · M`` with ``D = in·kh·kw``. Linear and 1×1 convs rotate
  the input channels; a k×k conv rotates its weight (cost ``out·D·b``), which is exact for any input.
* ``rescale`` adds a per-output-channel scale: ``W' = diag(rescale) · (...)``.

With the user's multiplier ``s`` the layer applies ``W + s·(W' − W)``.

PEFT (``OFT``, PEFT ≥ 0.16's OFTv2): ``oft_R.weight`` ``(n, b(b−1)/2)``, the strict upper triangle of
``Q_p`` per block, is our input-side ``oft_blocks`` ``B = Q/2`` with ``Q = −Q_p`` (exact Cayley) or
``Q = Q_p`` (Cayley–Neumann): :func:`oft_blocks_from_peft`. PEFT's ``coft`` (a clamp per block) is
applied once when reading (:func:`peft_coft_project`); our COFT (over all blocks together), ``rescale``
and LyCORIS's legacy ``oft_diag`` have no PEFT form.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, replace

import torch

from ..base.config import AdapterConfig, check_choice
from ..base.operators import BlockDiagonal, Chain, Diagonal
from ..base.registry import Algorithm, NotSplittable, register
from ..base.rows import blocks_of, put_rows, same_tensors, take_rows
from ..base.settings import Settings
from . import peft
from .common import ROTATION_SIDES, block_layout, cayley, clamp_norm, normal_, rotated_dim, skew


def rotation_blocks(raw: torch.Tensor, constraint: float = 0.0, neumann_terms: int = 0) -> torch.Tensor:
    """``(n, b, b)`` orthogonal blocks ``(I − Q)(I + Q)⁻¹`` with ``Q = clamp(B − Bᵀ)``."""
    return cayley(clamp_norm(skew(raw), constraint), neumann_terms)


def compact(chain, group: int) -> BlockDiagonal:
    """A chain of stages that each act within contiguous groups of ``group`` indices, as one
    block-diagonal operator with ``group × group`` blocks (built by pushing a stacked identity through
    the stages: cost ``m · group · D · b``), so the forward is a single block rotation."""
    dim = chain.size
    n = dim // group
    eye = torch.eye(group, dtype=chain.stages[0].blocks.dtype, device=chain.stages[0].blocks.device)
    probe = eye.repeat(1, n)                       # row r: unit vector at g·group + r for every group g
    rows = chain.apply(probe)                       # rows of Mᵀ restricted to each group
    return BlockDiagonal(rows.view(group, n, group).permute(1, 2, 0), orthogonal=chain.orthogonal)


def rotation_operators(blocks, side: str, rescale=None, perms=None, group: int | None = None,
                       orthogonal: bool = True):
    """``(input_op, output_op)`` for rotation blocks on ``side`` and an optional output rescale.
    ``orthogonal``: the blocks are exactly orthogonal (exact Cayley), see :mod:`lycoris_lite.base.operators`.

    ``blocks`` is ``(n, b, b)`` (one stage) or a list of stages with matching ``perms`` that all act
    within contiguous groups of ``group`` indices (butterfly stages), compacted into one operator. Stages
    ``S_0..S_{m-1}`` compose as ``W' = S_{m-1}⋯S_0·W`` on the output side and ``W' = W·S_0⋯S_{m-1}`` on
    the input side (the mirror image; PEFT's order, so its multi-stage BOFT maps stage for stage).
    """
    stages = ([BlockDiagonal(blocks, orthogonal=orthogonal)] if perms is None
              else [BlockDiagonal(bk, p, orthogonal) for bk, p in zip(blocks, perms)])
    if side == "input":
        stages = stages[::-1]
    rotation = stages[0] if len(stages) == 1 else compact(Chain(stages), group)
    scale_op = Diagonal(rescale) if rescale is not None else None
    if side == "output":
        return None, rotation if scale_op is None else Chain([rotation, scale_op])
    return rotation, scale_op


@dataclass
class RotationConfig(AdapterConfig):
    """Fields OFT and BOFT share: ``r`` (number of blocks, PEFT's meaning, when > 0; else derived from
    ``block_size``), ``constraint`` (COFT radius per rotated dimension, as LyCORIS stores it in
    ``alpha``; 0 = none), ``rescale`` (per-output-channel scale), ``rotation_side``."""

    r: int = 0
    constraint: float = 0.0
    rescale: bool = False
    rotation_side: str = "output"

    def validate(self):
        check_choice("rotation_side", self.rotation_side, ROTATION_SIDES)
        if self.constraint < 0:
            raise ValueError("constraint must be >= 0")


@dataclass
class OFTConfig(RotationConfig):
    """OFT: ``block_size``, ``use_cayley_neumann`` + ``num_cayley_neumann_terms``, and the
    :class:`RotationConfig` fields."""

    aliases = {"oft_block_size": "block_size"}
    block_size: int = 32
    use_cayley_neumann: bool = False
    num_cayley_neumann_terms: int = 5

    def validate(self):
        super().validate()
        if self.r == 0 and self.block_size < 1:
            raise ValueError("OFT needs block_size >= 1 or r (number of blocks) >= 1")
        if self.use_cayley_neumann and self.num_cayley_neumann_terms < 2:
            raise ValueError("num_cayley_neumann_terms must be >= 2")


@dataclass(frozen=True, kw_only=True)
class RotationSettings(Settings):
    """Per-layer settings OFT and BOFT share:

    * ``side``: the rotated side, ``"output"`` (``W' = M·W``) or ``"input"`` (``W' = W·M``);
    * ``dim``: the rotated dimension ``D`` (``out``, or ``in·kh·kw``);
    * ``block_num`` · ``block_size`` = ``D``: the number and size of the rotation's diagonal blocks;
    * ``radius``: the COFT bound on ``‖Q‖_F`` over all blocks (the config's ``constraint · D``; 0: none);
    * ``rescale``: the adapter has a per-output-channel scale ``rescale``;
    * ``conv``: the layer is a Conv2d (files hold ``rescale`` as ``(out, 1, 1, 1)``).
    """

    side: str
    dim: int
    block_num: int
    block_size: int
    radius: float = 0.0
    rescale: bool = False
    conv: bool = False


@dataclass(frozen=True, kw_only=True)
class OFTSettings(RotationSettings):
    """OFT's per-layer settings: the :class:`RotationSettings` fields, and

    * ``neumann_terms``: the rotation is the Cayley–Neumann series with that many terms (0: exact Cayley);
    * ``rotation_given``: ``oft_blocks`` hold the rotation itself (LyCORIS 2.0's ``oft_diag``), not ``B``.
    """

    neumann_terms: int = 0
    rotation_given: bool = False


def rescale_from_file(params: dict) -> dict:
    """LyCORIS stores ``rescale`` as ``(out, 1[, 1, 1])``; we keep ``(out,)``."""
    if "rescale" in params:
        params = {**params, "rescale": params["rescale"].reshape(-1)}
    return params


def rescale_to_file(params: dict, settings: RotationSettings) -> dict:
    if "rescale" in params:
        ones = (1, 1, 1) if settings.conv else (1,)
        params = {**params, "rescale": params["rescale"].reshape(-1, *ones)}
    return params


def bake_clamp(raw: torch.Tensor, radius: float) -> torch.Tensor:
    """``raw`` scaled as the COFT clamp scales ``Q = skew(raw)`` (:func:`~lycoris_lite.algos.common.clamp_norm`,
    over every block and stage): the same rotation with no clamp after."""
    return raw * torch.clamp(radius / (torch.linalg.vector_norm(skew(raw)) + 1e-8), max=1.0)


def split_shared_rotation(params: dict, settings, parts: list) -> list:
    """Per-module forms of an input-side rotation on a fused matrix (``W'_F = W_F·M``, so
    ``W'_T = W_T·M``): every module takes the same rotation, and its rows of an output ``rescale``."""
    if settings.side != "input":
        raise NotSplittable("split_shared_rotation is for input-side rotations")
    return [(settings, {**params, **({"rescale": take_rows(params["rescale"], rows)} if "rescale" in params else {})})
            for _, rows in parts]


def join_shared_rotation(spec, parts: list, what: str) -> tuple:
    """The inverse of :func:`split_shared_rotation`: modules with the same input-side rotation (bit for
    bit) and settings are one rotation of the fused matrix (their rescale rows put together)."""
    first = parts[0][2]
    keys = [k for k in parts[0][3] if k != "rescale"]
    if (first.side != "input" or any(s != first for _, _, s, _ in parts)
            or not same_tensors([t for *_, t in parts], keys)):
        raise NotSplittable(f"{what} adapters on the modules are not one input-side rotation shared by all of "
                            "them, which is the only form a fused matrix can hold exactly")
    if sum(stop - start for _, rows, _, _ in parts for start, stop in rows) != spec.out_features:
        raise NotSplittable(f"a {what} rotation must cover every row of the fused matrix (a module lacks it)")
    tensors = {k: parts[0][3][k] for k in keys}
    if "rescale" in parts[0][3]:
        tensors["rescale"] = put_rows([(rows, t["rescale"]) for _, rows, _, t in parts], spec.out_features)
    return first, tensors


def require_output_side(settings):
    if settings.side != "output":
        raise ValueError("kohya/LyCORIS files (and AUTOMATIC1111, ComfyUI) rotate the output side; an "
                         "input-side OFT/BOFT adapter can be saved in the peft format instead")


def rotation_settings(config, spec, name, what="block_size") -> dict:
    """The :class:`RotationSettings` fields of a config on a layer, as keyword arguments."""
    dim = rotated_dim(spec, config.rotation_side)
    n, b = block_layout(dim, config.block_size, config.r, name, what)
    return {"side": config.rotation_side, "dim": dim, "block_num": n, "block_size": b,
            "radius": float(config.constraint) * dim, "rescale": bool(config.rescale), "conv": spec.is_conv}


def init_rotation(shape, spec, settings, init_weights, generator):
    params = {"oft_blocks": torch.zeros(shape)}
    if init_weights is False:
        normal_(params["oft_blocks"], 0.1, generator)
    if settings.rescale:
        params["rescale"] = torch.ones(spec.out_features)
        if init_weights is False:
            normal_(params["rescale"], 0.1, generator, mean=1.0)
    return params


def rotation_network_dim_alpha(config: dict) -> tuple:
    """LyCORIS's ``network_dim`` / ``network_alpha`` of OFT and BOFT: the number of blocks when given,
    else the block size; the COFT constraint."""
    return config.get("r") or config.get("block_size"), config.get("constraint", 0.0)


# ---- PEFT's layout -----------------------------------------------------------------------------------
def skew_from_peft_vector(vec: torch.Tensor, block_size: int) -> torch.Tensor:
    """PEFT's skew matrix: ``U[rows, cols] = vec`` on the strict upper triangle (``triu_indices``
    order), ``Q_p = U − Uᵀ``. ``vec``: ``(n, b(b−1)/2)`` -> ``(n, b, b)``."""
    rows, cols = torch.triu_indices(block_size, block_size, 1)
    upper = torch.zeros(vec.shape[0], block_size, block_size, dtype=vec.dtype, device=vec.device)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(1, 2)


def peft_vector_from_skew(q: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`skew_from_peft_vector`: the strict upper triangle of each block."""
    b = q.shape[-1]
    rows, cols = torch.triu_indices(b, b, 1)
    return q[:, rows, cols]


def oft_blocks_from_peft(vec: torch.Tensor, block_size: int, cayley_neumann: bool) -> torch.Tensor:
    """Our input-side ``oft_blocks`` ``B`` for PEFT's ``oft_R.weight`` vector.

    PEFT rotates the input, ``x ← x·blockdiag(R_p)``, so ``W'_f = W_f · blockdiag(R_p)ᵀ``; ours
    (``rotation_side="input"``) is ``W'_f = W_f · blockdiag(R)``, hence we need ``R = R_pᵀ``.

    * exact Cayley: ``R_p = (I − Q_p)(I + Q_p)⁻¹`` so ``R_pᵀ = (I + Q_p)(I − Q_p)⁻¹``, which is our
      ``(I − Q)(I + Q)⁻¹`` with ``Q = −Q_p``.
    * Cayley–Neumann: PEFT's series is ``I + 2Q_p + 2Q_p² + … + Q_p^{n−1}`` (a truncation of
      ``(I + Q_p)(I − Q_p)⁻¹``, i.e. of the transpose of its own exact transform); its transpose is
      the same series in ``Q_pᵀ = −Q_p``, which is ours (``I − 2Q + 2Q² − …``) with ``Q = +Q_p``.

    ``Q = B − Bᵀ``, so ``B = Q/2`` gives any wanted skew ``Q`` (exactly: ``Q/2 − (−Q/2) = Q`` in
    floating point). The sign flip between PEFT's exact and Neumann variants is PEFT's (its two
    variants approximate transposed rotations); ours are consistent.
    """
    q_p = skew_from_peft_vector(vec, block_size)
    q = q_p if cayley_neumann else -q_p
    return q / 2


def oft_blocks_to_peft(blocks: torch.Tensor, cayley_neumann: bool) -> torch.Tensor:
    """PEFT's ``oft_R.weight`` for our input-side ``oft_blocks``: the inverse of
    :func:`oft_blocks_from_peft` (``Q_p = ∓(B − Bᵀ)``, upper triangle)."""
    q = blocks - blocks.transpose(-1, -2)
    return peft_vector_from_skew(q if cayley_neumann else -q)


def oft_block_size_from_vector(length: int) -> int:
    """``b`` with ``b(b−1)/2 = length`` (``ValueError`` if there is none)."""
    b = (1 + math.isqrt(1 + 8 * length)) // 2
    if b * (b - 1) // 2 != length:
        raise ValueError(f"an OFT vector of length {length} is not the upper triangle of a square block")
    return b


def peft_coft_project(vec: torch.Tensor, block_size: int, eps: float) -> torch.Tensor:
    """PEFT's COFT projection (``OFTRotationModule._project_batch``), which PEFT applies to its parameter
    in place before every use: each block's skew matrix is pulled onto the Frobenius ball of radius
    ``eps/√n``. Idempotent, so applying it once at load gives PEFT's forward."""
    q = skew_from_peft_vector(vec, block_size)
    radius = eps / math.sqrt(q.shape[0])
    norm = torch.linalg.matrix_norm(q, keepdim=True)
    q = torch.where(norm <= radius, q, radius * (q / norm))
    return peft_vector_from_skew(q)


@register
class OFT(Algorithm):
    name = "oft"
    config_class = OFTConfig
    settings_class = OFTSettings
    multiplicative = True
    detect_keys = ("oft_blocks",)
    peft_type = "OFT"
    peft_keys = ("oft_R.weight",)
    peft_fields = {"oft_block_size": int, "num_cayley_neumann_terms": int, "eps": float}
    peft_unsupported = {
        "oft_r": "OFT from PEFT < 0.14 (retrain with PEFT >= 0.16, whose OFTv2 layout is oft_R.weight)",
        "oft_s": "OFT from PEFT < 0.14 (retrain with PEFT >= 0.16, whose OFTv2 layout is oft_R.weight)",
    }
    file_keys = frozenset({"oft_blocks", "oft_diag", "rescale", *peft_keys, *peft_unsupported})
    lycoris_name = "diag-oft"
    lycoris_args = {"constraint": "constraint", "rescale": "rescaled", "block_size": "block_size",
                    "rotation_side": "rotation_side"}

    @classmethod
    def bake_constraint(cls, params, settings):
        """The COFT clamp applied to ``oft_blocks`` (``Q`` is linear in them), radius 0."""
        if settings.radius <= 0 or settings.rotation_given:
            return settings, params
        return replace(settings, radius=0.0), {**params, "oft_blocks": bake_clamp(params["oft_blocks"], settings.radius)}

    @classmethod
    def split_rows(cls, params, spec, settings, parts):
        """Output side (``W'_F = M·W_F``): a module whose rows begin and end on block boundaries takes
        its blocks (and rescale rows); the COFT clamp, a bound on all blocks together, is applied to the
        blocks first (and the parts carry none). A block straddling a boundary mixes rows of two modules,
        which no per-module adapter holds. Input side: every module shares the rotation."""
        if settings.side == "input":
            return split_shared_rotation(params, settings, parts)
        b = settings.block_size
        settings, params = cls.bake_constraint(params, settings)
        blocks = params["oft_blocks"]
        out = []
        for tspec, rows in parts:
            index = blocks_of(rows, b)
            if index is None:
                cut = next(x for seg in rows for x in seg if x % b)
                raise NotSplittable(f"its rotation blocks are {b} rows and a module boundary falls at row {cut}, "
                                    "inside one: that block mixes rows of two modules")
            tensors = {"oft_blocks": take_rows(blocks, index)}
            if "rescale" in params:
                tensors["rescale"] = take_rows(params["rescale"], rows)
            n = tspec.out_features // b
            out.append((replace(settings, dim=tspec.out_features, block_num=n, radius=0.0), tensors))
        return out

    @classmethod
    def join_rows(cls, spec, parts):
        """Output side, the same block size and no COFT clamp, every row covered: the blocks in place.
        Input side: :func:`join_shared_rotation`."""
        first = parts[0][2]
        if first.side == "input":
            return join_shared_rotation(spec, parts, "OFT")
        b = first.block_size
        same = all(replace(s, dim=first.dim, block_num=first.block_num) == first for _, _, s, _ in parts)
        if not same or first.radius > 0:
            raise NotSplittable("OFT adapters on the modules differ in block size, side or form, or carry a COFT "
                                "clamp (a bound per module is not one bound on the fused matrix)")
        index = [blocks_of(rows, b) for _, rows, _, _ in parts]
        if any(i is None for i in index) or sum(stop - start for _, rows, _, _ in parts for start, stop in rows) != spec.out_features:
            raise NotSplittable(f"the modules do not cover the fused matrix's rows in whole {b}-row blocks")
        tensors = {"oft_blocks": put_rows([(i, t["oft_blocks"]) for i, (*_, t) in zip(index, parts)],
                                          spec.out_features // b)}
        if first.rescale:
            tensors["rescale"] = put_rows([(rows, t["rescale"]) for _, rows, _, t in parts], spec.out_features)
        return replace(first, dim=spec.out_features, block_num=spec.out_features // b), tensors

    @classmethod
    def describe_size(cls, tensors):
        blocks = next((tensors[k] for k in ("oft_blocks", "oft_diag", "oft_R.weight") if k in tensors), None)
        if blocks is None:
            return "?"
        return f"block {blocks.shape[-1]}" if blocks.dim() == 3 else f"{blocks.shape[0]} blocks"

    @classmethod
    def network_dim_alpha(cls, config):
        return rotation_network_dim_alpha(config)

    @classmethod
    def resolve(cls, config, spec, name):
        return OFTSettings(**rotation_settings(config, spec, name),
                           neumann_terms=config.num_cayley_neumann_terms if config.use_cayley_neumann else 0)

    @classmethod
    def init_params(cls, spec, settings, init_weights, generator):
        b = settings.block_size
        return init_rotation((settings.block_num, b, b), spec, settings, init_weights, generator)

    @classmethod
    def matches(cls, tensors):
        return "oft_diag" in tensors or ("oft_blocks" in tensors and tensors["oft_blocks"].dim() == 3)

    @classmethod
    def from_kohya(cls, spec, file_tensors, alpha, name, side=None):
        """A legacy (LyCORIS 2.0) ``oft_diag`` stores the final rotation, not its parameter."""
        if "oft_diag" not in file_tensors:
            return super().from_kohya(spec, rescale_from_file(file_tensors), alpha, name, side)
        params = {"oft_blocks": file_tensors["oft_diag"]}
        settings = cls.settings_from_tensors(spec, params, 0.0, name, side)
        return replace(settings, rotation_given=True), params

    @classmethod
    def to_kohya(cls, params, settings):
        if settings.rotation_given:
            return {"oft_diag": params["oft_blocks"]}, None
        require_output_side(settings)
        return rescale_to_file(params, settings), settings.radius / settings.dim

    @classmethod
    def settings_from_tensors(cls, spec, tensors, alpha, name, side=None, neumann_terms=0):
        """LyCORIS/kohya files rotate the output side; ``alpha`` is the COFT constraint.
        ``neumann_terms``: the rotation is the Cayley–Neumann series (PEFT's ``use_cayley_neumann``)."""
        side = side or "output"
        blocks = tensors["oft_blocks"]
        dim = rotated_dim(spec, side)
        n, b = blocks.shape[0], blocks.shape[-1]
        if blocks.shape[1] != b or n * b != dim:
            raise ValueError(f"layer {name!r}: OFT blocks {tuple(blocks.shape)} do not fit the {side} dimension {dim}")
        return OFTSettings(side=side, dim=dim, block_num=n, block_size=b, radius=float(alpha or 0.0) * dim,
                           rescale="rescale" in tensors, neumann_terms=neumann_terms, conv=spec.is_conv)

    @classmethod
    def check_peft_config(cls, config, component):
        super().check_peft_config(config, component)
        if config.get("use_cayley_neumann", True):
            version = str(config.get("peft_version") or "0.0.0").partition("@")[0]
            parts = tuple(int(p) for p in re.findall(r"\d+", version)[:2]) or (0,)
            if parts < (0, 18):
                warnings.warn(f"{component}: this OFT adapter uses the Cayley–Neumann series and was saved by PEFT "
                              f"{version} (< 0.18), whose series differs slightly; it is read with the current one, "
                              "as PEFT does", stacklevel=4)

    @classmethod
    def from_peft(cls, spec, tensors, config, names):
        name = names[0]
        vec = tensors["oft_R.weight"]
        if vec.dim() != 2:
            raise ValueError(f"layer {name!r}: oft_R.weight has shape {tuple(vec.shape)}, expected (blocks, b(b-1)/2)")
        dim = spec.flat_in
        b = oft_block_size_from_vector(vec.shape[1]) if vec.shape[1] else 1
        shared = bool(config.get("block_share"))
        if dim % b or (shared and vec.shape[0] != 1) or (not shared and vec.shape[0] * b != dim):
            raise ValueError(f"layer {name!r}: oft_R.weight {tuple(vec.shape)} (block size {b}) does not fit "
                             f"the input dimension {dim}")
        if config.get("coft"):
            vec = peft_coft_project(vec, b, float(config.get("eps", 6e-5)))
        neumann = bool(config.get("use_cayley_neumann", True))
        blocks = oft_blocks_from_peft(vec, b, neumann)
        if shared:
            blocks = blocks.expand(dim // b, b, b).clone()
        params = {"oft_blocks": blocks}
        terms = int(config.get("num_cayley_neumann_terms", 5)) if neumann else 0
        return cls.settings_from_tensors(spec, params, None, name, "input", neumann_terms=terms), params

    @classmethod
    def to_peft(cls, layers, specs, component):
        for path, e in layers.items():
            s = e.settings
            peft.require_input_side(component, path, s, cls.name)
            if s.rotation_given:
                raise ValueError(f"{component}: layer {path!r} holds a legacy LyCORIS rotation (oft_diag); not PEFT")
            if "rescale" in e.tensors:
                raise ValueError(f"{component}: layer {path!r} has an OFT rescale, which PEFT's OFT does not have")
            if s.radius > 0:
                raise ValueError(f"{component}: layer {path!r} uses a COFT constraint over all blocks together; PEFT's "
                                 "coft clamps each block, so it cannot be written exactly")
        terms = peft.one_value({e.settings.neumann_terms for e in layers.values()}, "Cayley–Neumann setting",
                               component)
        tensors = {p: {"oft_R.weight": oft_blocks_to_peft(e.tensors["oft_blocks"], terms > 0)} for p, e in layers.items()}
        return tensors, {**peft.blocks_config(component, layers, "oft_block_size", "r"), "use_cayley_neumann": terms > 0,
                         "num_cayley_neumann_terms": terms if terms > 0 else 5, "coft": False, "eps": 6e-5,
                         "block_share": False, "module_dropout": 0.0, "fan_in_fan_out": False, "init_weights": True}

    @classmethod
    def peft_config_fields(cls, config, layers):
        g = config.get
        return {"r": g("r", 0) or 0, "block_size": g("oft_block_size", 32) or 0, "rotation_side": "input",
                "use_cayley_neumann": bool(g("use_cayley_neumann", True)),
                "num_cayley_neumann_terms": max(int(g("num_cayley_neumann_terms", 5)), 2)}

    @classmethod
    def transform(cls, params, spec, settings):
        given = bool(settings.rotation_given)
        if given:
            # AUTOMATIC1111/LyCORIS apply a given block X as einsum("k n m, k n ... -> k m ..."): M = Xᵀ
            blocks = params["oft_blocks"].transpose(-1, -2)
        else:
            blocks = rotation_blocks(params["oft_blocks"], settings.radius, settings.neumann_terms)
        exact = not given and not settings.neumann_terms
        return rotation_operators(blocks, settings.side, params.get("rescale"), orthogonal=exact)
