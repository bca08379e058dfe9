"""BOFT: ``M = B_{m−1} ⋯ B_0`` with ``B_i = P_iᵀ · blockdiag(R_i) · P_i`` (butterfly stages).

On the input side the stages mirror: ``W' = W·B_0⋯B_{m−1}`` (PEFT's order).

``oft_blocks``: ``(m, n, b, b)`` (LyCORIS's 4-D layout and meaning): ``Q = B − Bᵀ`` (COFT clamp over
all stages together), ``R = (I + Q)(I − Q)⁻¹`` (LyCORIS's BOFT convention, the transpose of its OFT's).
``P_i`` is LyCORIS's butterfly permutation with ``k = 2^i · b/2``: index ``j`` of the rotated vector is
``perm_i = arange(D).unflatten(0, (-1, 2, k)).transpose(1, 2).flatten()`` (pairs ``(j, j + k)`` become
neighbours). ``m`` stages need ``D % (2^{m−1} · b) == 0`` and ``b`` even.

Rotation side, rescale and the user's multiplier work as in OFT (``W + s·(W' − W)``; AUTOMATIC1111's
convention; LyCORIS and ComfyUI interpolate each stage instead, equal at ``s = 1``). The unmerged forward
applies the ``m`` stages to activations (``m`` gathers and block rotations); the dense ``D × D``
permutation products that make PEFT's BOFT slow are never formed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..base.registry import Algorithm, register
from .common import block_layout, cayley, clamp_norm, rotated_dim, skew
from .oft import (RotationConfig, init_rotation, require_output_side, rescale_from_file, rescale_to_file,
                  rotation_operators)


@lru_cache(maxsize=256)
def butterfly_perm(dim: int, block_size: int, stage: int) -> torch.Tensor:
    """LyCORIS's stage-``stage`` butterfly permutation of ``dim`` indices."""
    k = (2**stage) * block_size // 2
    return torch.arange(dim).unflatten(0, (-1, 2, k)).transpose(1, 2).flatten()


def butterfly_blocks(raw: torch.Tensor, constraint: float = 0.0) -> torch.Tensor:
    """``(m, n, b, b)`` orthogonal blocks ``(I + Q)(I − Q)⁻¹`` with ``Q = clamp(B − Bᵀ)``."""
    return cayley(-clamp_norm(skew(raw), constraint))


@dataclass
class BOFTConfig(RotationConfig):
    """BOFT: ``block_size``, ``butterfly_factor`` (``m`` stages), and the :class:`RotationConfig` fields."""

    aliases = {"boft_block_size": "block_size", "boft_block_num": "r", "boft_n_butterfly_factor": "butterfly_factor"}
    block_size: int = 8
    butterfly_factor: int = 2

    def validate(self):
        super().validate()
        if self.butterfly_factor < 1:
            raise ValueError("butterfly_factor must be >= 1")
        if self.r == 0 and (self.block_size < 2 or self.block_size % 2):
            raise ValueError(f"BOFT block_size must be even and >= 2, got {self.block_size}")


@register
class BOFT(Algorithm):
    name = "boft"
    config_class = BOFTConfig
    multiplicative = True
    detect_keys = ("oft_blocks",)  # told apart from OFT by ndim (4 here, 3 for OFT)

    @classmethod
    def resolve(cls, config, spec, name):
        dim = rotated_dim(spec, config.rotation_side)
        n, b = block_layout(dim, config.block_size, config.r, name)
        m = config.butterfly_factor
        if b % 2 or dim % ((2 ** (m - 1)) * b):
            raise ValueError(
                f"layer {name!r}: BOFT with block size {b} and butterfly factor {m} needs an even block "
                f"size and {2 ** (m - 1) * b} to divide the rotated dimension {dim}"
            )
        return {"side": config.rotation_side, "dim": dim, "block_num": n, "block_size": b, "stages": m,
                "radius": float(config.constraint) * dim, "rescale": bool(config.rescale), "conv": spec.is_conv}

    @classmethod
    def init_params(cls, spec, settings, init_weights, generator):
        b = settings["block_size"]
        shape = (settings["stages"], settings["block_num"], b, b)
        return init_rotation(shape, spec, settings, init_weights, generator)

    @classmethod
    def matches(cls, tensors):
        return "oft_blocks" in tensors and tensors["oft_blocks"].dim() == 4

    @classmethod
    def settings_from_tensors(cls, spec, tensors, alpha, name, side=None):
        side = side or "output"
        m, n, b, b2 = tensors["oft_blocks"].shape
        dim = rotated_dim(spec, side)
        if b != b2 or n * b != dim or b % 2 or dim % ((2 ** (m - 1)) * b):
            raise ValueError(f"layer {name!r}: BOFT blocks {(m, n, b, b2)} do not fit the {side} dimension {dim}")
        return {"side": side, "dim": dim, "block_num": n, "block_size": b, "stages": m,
                "radius": float(alpha or 0.0) * dim, "rescale": "rescale" in tensors, "conv": spec.is_conv}

    @classmethod
    def from_kohya(cls, spec, file_tensors, alpha, name, side=None):
        return super().from_kohya(spec, rescale_from_file(file_tensors), alpha, name, side)

    @classmethod
    def to_kohya(cls, params, settings):
        require_output_side(settings)
        return rescale_to_file(params, settings), settings["radius"] / settings["dim"]

    @classmethod
    def transform(cls, params, spec, settings):
        blocks = butterfly_blocks(params["oft_blocks"], settings["radius"])
        dim, b = settings["dim"], settings["block_size"]
        perms = [butterfly_perm(dim, b, i).to(blocks.device) for i in range(blocks.shape[0])]
        group = (2 ** (blocks.shape[0] - 1)) * b  # stage i acts within contiguous groups of 2^i·b
        return rotation_operators(list(blocks.unbind(0)), settings["side"], params.get("rescale"), perms, group)
