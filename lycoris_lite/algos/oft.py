"""OFT: a block-diagonal orthogonal transform of the weight, each block a Cayley transform.

``Q_k = B_k − B_kᵀ`` (``oft_blocks``: ``(n, b, b)``, LyCORIS's layout and meaning), optionally
clamped (COFT: ``‖Q‖_F ≤ constraint · D`` over all blocks), ``R_k = (I − Q_k)(I + Q_k)⁻¹`` (or its
Cayley-Neumann series), ``M = blockdiag(R_1..R_n)``.

* ``rotation_side="output"`` (LyCORIS, kohya, AUTOMATIC1111, ComfyUI): ``W' = M · W`` with ``D = out``.
  Unmerged forward: ``y' = (y − bias)·Mᵀ + bias``, a block rotation of the output channels (convs too).
* ``rotation_side="input"`` (PEFT): ``W' = W · M`` with ``D = in·kh·kw``. Linear and 1×1 convs rotate
  the input channels; a k×k conv rotates its weight (cost ``out·D·b``), which is exact for any input.
* ``rescale`` adds a per-output-channel scale: ``W' = diag(rescale) · (...)``.

With the user's multiplier ``s`` the layer applies ``W + s·(W' − W)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base.config import AdapterConfig, check_choice
from ..base.operators import BlockDiagonal, Chain, Diagonal
from ..base.registry import Algorithm, register
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


def rescale_from_file(params: dict) -> dict:
    """LyCORIS stores ``rescale`` as ``(out, 1[, 1, 1])``; we keep ``(out,)``."""
    if "rescale" in params:
        params = {**params, "rescale": params["rescale"].reshape(-1)}
    return params


def rescale_to_file(params: dict, settings: dict) -> dict:
    if "rescale" in params:
        ones = (1, 1, 1) if settings.get("conv") else (1,)
        params = {**params, "rescale": params["rescale"].reshape(-1, *ones)}
    return params


def require_output_side(settings):
    if settings["side"] != "output":
        raise ValueError("kohya/LyCORIS files (and AUTOMATIC1111, ComfyUI) rotate the output side; an "
                         "input-side OFT/BOFT adapter can be saved in the peft format instead")


def rotation_settings(config, spec, name, what="block_size"):
    dim = rotated_dim(spec, config.rotation_side)
    n, b = block_layout(dim, config.block_size, config.r, name, what)
    return {"side": config.rotation_side, "dim": dim, "block_num": n, "block_size": b,
            "radius": float(config.constraint) * dim, "rescale": bool(config.rescale), "conv": spec.is_conv}


def init_rotation(shape, spec, settings, init_weights, generator):
    params = {"oft_blocks": torch.zeros(shape)}
    if init_weights is False:
        normal_(params["oft_blocks"], 0.1, generator)
    if settings["rescale"]:
        params["rescale"] = torch.ones(spec.out_features)
        if init_weights is False:
            normal_(params["rescale"], 0.1, generator, mean=1.0)
    return params


@register
class OFT(Algorithm):
    name = "oft"
    config_class = OFTConfig
    multiplicative = True
    detect_keys = ("oft_blocks",)

    @classmethod
    def resolve(cls, config, spec, name):
        settings = rotation_settings(config, spec, name)
        settings["neumann_terms"] = config.num_cayley_neumann_terms if config.use_cayley_neumann else 0
        return settings

    @classmethod
    def init_params(cls, spec, settings, init_weights, generator):
        b = settings["block_size"]
        return init_rotation((settings["block_num"], b, b), spec, settings, init_weights, generator)

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
        return {**settings, "rotation_given": True}, params

    @classmethod
    def to_kohya(cls, params, settings):
        if settings.get("rotation_given"):
            return {"oft_diag": params["oft_blocks"]}, None
        require_output_side(settings)
        return rescale_to_file(params, settings), settings["radius"] / settings["dim"]

    @classmethod
    def settings_from_tensors(cls, spec, tensors, alpha, name, side=None):
        """LyCORIS/kohya files rotate the output side; ``alpha`` is the COFT constraint."""
        side = side or "output"
        blocks = tensors["oft_blocks"]
        dim = rotated_dim(spec, side)
        n, b = blocks.shape[0], blocks.shape[-1]
        if blocks.shape[1] != b or n * b != dim:
            raise ValueError(f"layer {name!r}: OFT blocks {tuple(blocks.shape)} do not fit the {side} dimension {dim}")
        return {"side": side, "dim": dim, "block_num": n, "block_size": b,
                "radius": float(alpha or 0.0) * dim, "rescale": "rescale" in tensors, "neumann_terms": 0,
                "conv": spec.is_conv}

    @classmethod
    def transform(cls, params, spec, settings):
        given = bool(settings.get("rotation_given"))
        if given:
            # AUTOMATIC1111/LyCORIS apply a given block X as einsum("k n m, k n ... -> k m ..."): M = Xᵀ
            blocks = params["oft_blocks"].transpose(-1, -2)
        else:
            blocks = rotation_blocks(params["oft_blocks"], settings["radius"], settings["neumann_terms"])
        exact = not given and not settings["neumann_terms"]
        return rotation_operators(blocks, settings["side"], params.get("rescale"), orthogonal=exact)
