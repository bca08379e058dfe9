"""BOFT: ``M = B_{m−1} ⋯ B_0`` with ``B_i = P_iᵀ · blockdiag(R_i) · P_i`` (butterfly stages).

On the input side the stages mirror: ``W' = W·B_0⋯B_{m−1}`` (PEFT's order).

``oft_blocks``: ``(m, n, b, b)`` (LyCORIS's 4-D layout and meaning): ``Q = B − Bᵀ`` (COFT clamp over
all stages together), ``R = (I + Q)(I − Q)⁻¹`` (LyCORIS's BOFT convention, the transpose of its OFT's).
``P_i`` is LyCORIS's butterfly permutation with ``k = 2^i · b/2``: index ``j`` of the rotated vector is
``perm_i = arange(D).unflatten(0, (-1, 2, k)).transpose(1, 2).flatten()`` (pairs ``(j, j + k)`` become
neighbours). ``m`` stages need ``D % (2^{m−1} · b) == 0`` and ``b`` even.

Rotation side, rescale and the user's multiplier work as in OFT (``W + s·(W' − W)``; AUTOMATIC1111's
convention; LyCORIS and ComfyUI interpolate each stage instead, equal at ``s = 1``). The unfused forward
applies the ``m`` stages to activations (``m`` gathers and block rotations); the dense ``D × D``
permutation products that make PEFT's BOFT slow are never formed.

PEFT (``BOFT``): ``boft_R`` ``(m, N, b, b)`` is our input-side ``oft_blocks`` through the butterfly
permutations (:func:`boft_blocks_from_peft`), ``boft_s`` ``(out, 1)`` linear / ``(1, out)`` conv our
``rescale``; our COFT constraint has no PEFT form.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from ..base.registry import Algorithm, NotSplittable, register
from . import peft
from .common import block_layout, cayley, clamp_norm, rotated_dim, skew
from .oft import (RotationConfig, RotationSettings, bake_clamp, init_rotation, join_shared_rotation,
                  require_output_side, rescale_from_file, rescale_to_file, rotation_network_dim_alpha,
                  rotation_operators, split_shared_rotation)


@lru_cache(maxsize=256)
def butterfly_perm(dim: int, block_size: int, stage: int) -> torch.Tensor:
    """LyCORIS's stage-``stage`` butterfly permutation of ``dim`` indices."""
    k = (2**stage) * block_size // 2
    return torch.arange(dim).unflatten(0, (-1, 2, k)).transpose(1, 2).flatten()


def butterfly_blocks(raw: torch.Tensor, constraint: float = 0.0) -> torch.Tensor:
    """``(m, n, b, b)`` orthogonal blocks ``(I + Q)(I − Q)⁻¹`` with ``Q = clamp(B − Bᵀ)``."""
    return cayley(-clamp_norm(skew(raw), constraint))


# ---- PEFT's layout -----------------------------------------------------------------------------------
def peft_butterfly_perm(dim: int, block_num: int, block_size: int, stages: int, stage: int) -> torch.Tensor:
    """PEFT's stage-``stage`` permutation indices ``idx`` (its ``boft_P[stage]`` is ``perm2mat(idx)``,
    ``P[j, idx[j]] = 1``): ``BOFTLayer.block_butterfly_perm(dim, N / 2^stage, b / 2, m − 1)``."""
    if stages <= 1:
        return torch.arange(dim)
    blocks = int(block_num / (2**stage))
    r = int(block_size / 2)
    if blocks * r * 2 > dim:
        raise ValueError("Invalid number of blocks!")
    size = dim // blocks
    step = size / r
    order = torch.arange(size)
    sorted_order = torch.empty(size, dtype=torch.long)
    sequence = torch.cat((torch.arange(0, step, 2), torch.arange(1, step, 2)))
    for i, pos in enumerate(sequence):
        sorted_order[int(i * r): int(i * r + r)] = order[int(pos * r): int(pos * r + r)]
    indices = torch.arange(dim)
    for start in range(0, dim, size):
        indices[start:start + size] = indices[start:start + size][sorted_order]
    return indices


def peft_perm_indices(perm_matrix: torch.Tensor) -> torch.Tensor:
    """PEFT's ``boft_P[i]`` is ``perm2mat(idx)`` with ``P[j, idx[j]] = 1``: returns ``idx``."""
    return perm_matrix.argmax(dim=1)


def _boft_block_maps(stages: int, block_num: int, block_size: int, perms=None):
    """Per stage ``(blk, loc)``: our block ``k`` is PEFT's block ``blk[k]`` with its rows/columns
    ``loc[k]`` (see :func:`boft_blocks_from_peft`)."""
    dim = block_num * block_size
    maps = []
    for i in range(stages):
        if perms is None:
            idx = peft_butterfly_perm(dim, block_num, block_size, stages, i)
        elif isinstance(perms, torch.Tensor) and perms.dim() == 3:
            idx = peft_perm_indices(perms[i])
        else:
            idx = torch.as_tensor(perms[i])
        sigma = idx.cpu()[butterfly_perm(dim, block_size, i)].reshape(block_num, block_size)
        blk = sigma[:, 0] // block_size
        if not bool((sigma // block_size == blk[:, None]).all()) or len(set(blk.tolist())) != block_num:
            raise ValueError(f"stage {i}: PEFT's and our butterfly blocks do not line up")
        maps.append((blk, sigma % block_size))
    return maps


def boft_blocks_from_peft(boft_r: torch.Tensor, perms=None) -> torch.Tensor:
    """Our input-side ``oft_blocks`` ``(m, n, b, b)`` for PEFT's ``boft_R``, stage ``i`` of ours from
    stage ``i`` of PEFT. ``perms``: PEFT's ``boft_P`` matrices ``(m, D, D)`` or index vectors; ``None``
    computes them as PEFT does (:func:`peft_butterfly_perm`).

    PEFT: ``B_i = P_i · blockdiag(R_i) · P_iᵀ`` with ``R_i = (I − Q_i)(I + Q_i)⁻¹``,
    ``Q_i = ½(A_i − A_iᵀ)`` (``A = boft_R``), and ``(P v)_j = v[idx[j]]``, i.e.
    ``B_i[j, k] = blockdiag(R_i)[idx[j], idx[k]]``; the input is rotated ``x ← x·B`` so the weight
    sees ``B_iᵀ``.

    Ours: stage ``i`` is ``S_i = P'ᵀ · blockdiag(R'_i) · P'`` with our butterfly permutation
    ``perm_i`` (``(P' v)_a = v[perm_i[a]]``), ``R' = (I + Q')(I − Q')⁻¹``, ``Q' = B' − B'ᵀ``, so
    ``blockdiag(R'_i)[a, c] = S_i[perm_i[a], perm_i[c]]``. Setting ``S_i = B_iᵀ`` gives
    ``blockdiag(R'_i)[a, c] = blockdiag(R_iᵀ)[σ(a), σ(c)]`` with ``σ = idx_i ∘ perm_i``. This is block
    diagonal exactly when ``σ`` maps each of our blocks into one of PEFT's (checked here), and
    ``R_iᵀ = (I + Q_i)(I − Q_i)⁻¹`` is our ``R'`` of ``Q_i``; a Cayley transform commutes with a
    permutation similarity, so ``Q'_i = Q_i[σ][:, σ]`` blockwise and ``B' = ½·A_bd[σ][:, σ]``
    (``B' − B'ᵀ = ½(A − Aᵀ)[σ][:, σ]``, bitwise PEFT's ``0.5·(A − Aᵀ)`` permuted).

    With one stage (PEFT's CPU fallback) ``idx`` is the identity and ``σ`` is our stage-0
    permutation, which interleaves the two halves of every block (``b = 6``: ``[0, 3, 1, 4, 2, 5]``),
    so the blocks are conjugated by that in-block permutation.
    """
    m, n, b, _ = boft_r.shape
    out = torch.empty_like(boft_r)
    for i, (blk, loc) in enumerate(_boft_block_maps(m, n, b, perms)):
        out[i] = boft_r[i][blk[:, None, None], loc[:, :, None], loc[:, None, :]] / 2
    return out


def boft_blocks_to_peft(blocks: torch.Tensor, perms=None) -> torch.Tensor:
    """PEFT's ``boft_R`` for our input-side ``oft_blocks``: the inverse of :func:`boft_blocks_from_peft`
    (``A_bd[σ(a), σ(c)] = 2·B'_bd[a, c]``; exact both ways)."""
    m, n, b, _ = blocks.shape
    out = torch.empty_like(blocks)
    for i, (blk, loc) in enumerate(_boft_block_maps(m, n, b, perms)):
        out[i][blk[:, None, None], loc[:, :, None], loc[:, None, :]] = blocks[i] * 2
    return out


def boft_rescale_from_peft(boft_s: torch.Tensor) -> torch.Tensor:
    """PEFT ``boft_s``: ``(out, 1)`` (Linear) or ``(1, out)`` (Conv2d), scaling output rows ->
    our ``rescale`` ``(out,)``."""
    return boft_s.detach().flatten()


def boft_rescale_to_peft(rescale: torch.Tensor, spec) -> torch.Tensor:
    return rescale.reshape(1, -1) if spec.is_conv else rescale.reshape(-1, 1)


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


@dataclass(frozen=True, kw_only=True)
class BOFTSettings(RotationSettings):
    """BOFT's per-layer settings: the :class:`~lycoris_lite.algos.oft.RotationSettings` fields (the
    blocks of each stage), and ``stages``: the number ``m`` of butterfly stages."""

    stages: int


@register
class BOFT(Algorithm):
    name = "boft"
    config_class = BOFTConfig
    settings_class = BOFTSettings
    multiplicative = True
    detect_keys = ("oft_blocks",)  # told apart from OFT by ndim (4 here, 3 for OFT)
    peft_type = "BOFT"
    peft_keys = ("boft_R", "boft_s")
    file_keys = frozenset({"oft_blocks", "rescale", *peft_keys})
    lycoris_args = {"constraint": "constraint", "rescale": "rescaled", "block_size": "block_size",
                    "butterfly_factor": "butterfly_factor", "rotation_side": "rotation_side"}

    @classmethod
    def bake_constraint(cls, params, settings):
        """The COFT clamp (over every stage's blocks) applied to ``oft_blocks``, radius 0."""
        if settings.radius <= 0:
            return settings, params
        return replace(settings, radius=0.0), {**params, "oft_blocks": bake_clamp(params["oft_blocks"], settings.radius)}

    @classmethod
    def split_rows(cls, params, spec, settings, parts):
        """Input side: every module shares the rotation. Output side: the butterfly stages mix rows across
        blocks (over ``b·2^(m−1)`` rows), so no per-module BOFT is exact in general."""
        if settings.side == "input":
            return split_shared_rotation(params, settings, parts)
        raise NotSplittable(f"its butterfly stages mix output rows across {settings.block_size * 2 ** (settings.stages - 1)}-row "
                            "groups, so a module's rows depend on its neighbours' weights")

    @classmethod
    def join_rows(cls, spec, parts):
        return join_shared_rotation(spec, parts, "BOFT")

    @classmethod
    def describe_size(cls, tensors):
        blocks = tensors.get("oft_blocks", tensors.get("boft_R"))
        return "?" if blocks is None or blocks.dim() != 4 else f"block {blocks.shape[-1]} × {blocks.shape[0]} stages"

    @classmethod
    def network_dim_alpha(cls, config):
        return rotation_network_dim_alpha(config)

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
        return BOFTSettings(side=config.rotation_side, dim=dim, block_num=n, block_size=b, stages=m,
                            radius=float(config.constraint) * dim, rescale=bool(config.rescale), conv=spec.is_conv)

    @classmethod
    def init_params(cls, spec, settings, init_weights, generator):
        b = settings.block_size
        shape = (settings.stages, settings.block_num, b, b)
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
        return BOFTSettings(side=side, dim=dim, block_num=n, block_size=b, stages=m,
                            radius=float(alpha or 0.0) * dim, rescale="rescale" in tensors, conv=spec.is_conv)

    @classmethod
    def from_kohya(cls, spec, file_tensors, alpha, name, side=None):
        return super().from_kohya(spec, rescale_from_file(file_tensors), alpha, name, side)

    @classmethod
    def to_kohya(cls, params, settings):
        require_output_side(settings)
        return rescale_to_file(params, settings), settings.radius / settings.dim

    @classmethod
    def from_peft(cls, spec, tensors, config, names):
        name = names[0]
        boft_r, boft_s = tensors["boft_R"], tensors["boft_s"]
        if boft_r.dim() != 4 or boft_r.shape[2] != boft_r.shape[3]:
            raise ValueError(f"layer {name!r}: boft_R has shape {tuple(boft_r.shape)}, expected (m, N, b, b)")
        m, n, b, _ = boft_r.shape
        if n * b != spec.flat_in:
            raise ValueError(f"layer {name!r}: BOFT blocks {tuple(boft_r.shape)} do not fit the input dimension {spec.flat_in}")
        if b % 2:
            raise ValueError(f"layer {name!r}: BOFT with an odd block size ({b}) is not supported (ours needs even blocks)")
        if spec.flat_in % (2 ** (m - 1) * b):
            raise ValueError(f"layer {name!r}: {m} butterfly stages of {b}-blocks do not fit the input dimension {spec.flat_in}")
        params = {"oft_blocks": boft_blocks_from_peft(boft_r)}
        rescale = boft_rescale_from_peft(boft_s)
        if rescale.numel() != spec.out_features:
            raise ValueError(f"layer {name!r}: boft_s has {rescale.numel()} entries, the layer {spec.out_features} outputs")
        if not bool((rescale == 1).all()):
            params["rescale"] = rescale
        return cls.settings_from_tensors(spec, params, None, name, "input"), params

    @classmethod
    def to_peft(cls, layers, specs, component):
        tensors = {}
        for path, e in layers.items():
            peft.require_input_side(component, path, e.settings, cls.name)
            if e.settings.radius > 0:
                raise ValueError(f"{component}: layer {path!r} uses a COFT constraint, which PEFT's BOFT does not have")
            rescale = e.tensors.get("rescale")
            if rescale is None:
                rescale = torch.ones(specs[path].out_features, dtype=e.tensors["oft_blocks"].dtype)
            tensors[path] = {"boft_R": boft_blocks_to_peft(e.tensors["oft_blocks"]),
                             "boft_s": boft_rescale_to_peft(rescale, specs[path])}
        stages = peft.one_value({e.settings.stages for e in layers.values()}, "butterfly factor", component)
        return tensors, {**peft.blocks_config(component, layers, "boft_block_size", "boft_block_num"),
                         "boft_n_butterfly_factor": stages, "boft_dropout": 0.0, "fan_in_fan_out": False,
                         "init_weights": True}

    @classmethod
    def peft_config_fields(cls, config, layers):
        first = next(iter(layers.values())).settings
        return {"block_size": first.block_size, "butterfly_factor": first.stages, "rotation_side": "input",
                "rescale": any("rescale" in e.tensors for e in layers.values())}

    @classmethod
    def transform(cls, params, spec, settings):
        blocks = butterfly_blocks(params["oft_blocks"], settings.radius)
        dim, b = settings.dim, settings.block_size
        perms = [butterfly_perm(dim, b, i).to(blocks.device) for i in range(blocks.shape[0])]
        group = (2 ** (blocks.shape[0] - 1)) * b  # stage i acts within contiguous groups of 2^i·b
        return rotation_operators(list(blocks.unbind(0)), settings.side, params.get("rescale"), perms, group)
