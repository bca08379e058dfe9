"""Structured square matrices used by the multiplicative adapters (OFT, BOFT, HRA).

An operator ``M`` (``D x D``) acts on row vectors: ``apply(v) = v @ M.T`` (i.e. ``M`` applied to each
vector ``v`` along the last dimension) and ``apply(v, transpose=True) = v @ M``. Nothing here builds
``M`` densely except :func:`dense`, used by tests.

* :class:`BlockDiagonal` ``blockdiag(B_1..B_n)`` (``blocks``: ``(n, b, b)``), optionally conjugated by a
  permutation: ``M = Pᵀ · blockdiag · P`` with ``(P v)_j = v[perm[j]]`` (a butterfly stage).
* :class:`LowRankUpdate` ``M = I - U T Uᵀ`` (``U``: ``(D, r)``, ``T``: ``(r, r)``), the compact
  WY form of a product of Householder reflections.
* :class:`Diagonal` ``M = diag(d)``.
* :class:`Chain` ``M = S_k ⋯ S_1`` (``S_1`` applied first).
* :class:`Scaled` ``M_s = I + s (M - I)``: the user's multiplier on a multiplicative adapter, so that
  ``s = 0`` is the identity and ``s = 1`` the full transform; negative values extrapolate.
"""

from __future__ import annotations

import torch


class Operator:
    size: int

    def apply(self, v: torch.Tensor, transpose: bool = False) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def to(self, dtype: torch.dtype) -> "Operator":  # pragma: no cover
        raise NotImplementedError


class BlockDiagonal(Operator):
    def __init__(self, blocks: torch.Tensor, perm: torch.Tensor | None = None):
        self.blocks = blocks
        self.perm = perm
        self.inverse_perm = None if perm is None else torch.argsort(perm)
        self.size = blocks.shape[0] * blocks.shape[1]

    def apply(self, v, transpose=False):
        n, b, _ = self.blocks.shape
        if self.perm is not None:
            v = v.index_select(-1, self.perm)
        shaped = v.unflatten(-1, (n, b))
        # (M v)_c = sum_j M[c, j] v_j  per block; transpose uses M[j, c]
        eq = "...nj,njc->...nc" if transpose else "...nj,ncj->...nc"
        out = torch.einsum(eq, shaped, self.blocks).flatten(-2)
        if self.perm is not None:
            out = out.index_select(-1, self.inverse_perm)
        return out

    def to(self, dtype):
        return BlockDiagonal(self.blocks.to(dtype), self.perm)


class LowRankUpdate(Operator):
    def __init__(self, u: torch.Tensor, t: torch.Tensor):
        self.u, self.t = u, t
        self.size = u.shape[0]

    def apply(self, v, transpose=False):
        proj = v @ self.u  # (..., r)
        core = self.t if transpose else self.t.T
        return v - (proj @ core) @ self.u.T

    def to(self, dtype):
        return LowRankUpdate(self.u.to(dtype), self.t.to(dtype))


class Diagonal(Operator):
    def __init__(self, d: torch.Tensor):
        self.d = d
        self.size = d.shape[0]

    def apply(self, v, transpose=False):
        return v * self.d

    def to(self, dtype):
        return Diagonal(self.d.to(dtype))


class Chain(Operator):
    def __init__(self, stages: list[Operator]):
        self.stages = list(stages)
        self.size = self.stages[0].size

    def apply(self, v, transpose=False):
        for stage in (reversed(self.stages) if transpose else self.stages):
            v = stage.apply(v, transpose)
        return v

    def to(self, dtype):
        return Chain([s.to(dtype) for s in self.stages])


class Scaled(Operator):
    def __init__(self, op: Operator, scale: float):
        self.op, self.scale = op, float(scale)
        self.size = op.size

    def apply(self, v, transpose=False):
        if self.scale == 1.0:
            return self.op.apply(v, transpose)
        return torch.lerp(v, self.op.apply(v, transpose), self.scale)

    def to(self, dtype):
        return Scaled(self.op.to(dtype), self.scale)


def low_rank_parts(op: Operator) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(U, C)`` when ``op`` is ``I − U·C·Uᵀ`` (a reflection chain, scaled or not), else ``None``."""
    if isinstance(op, LowRankUpdate):
        return op.u, op.t
    if isinstance(op, Scaled) and isinstance(op.op, LowRankUpdate):
        return op.op.u, op.op.t * op.scale
    return None


def scaled(op: Operator | None, scale: float) -> Operator | None:
    if op is None:
        return None
    return op if scale == 1.0 else Scaled(op, scale)


def dense(op: Operator, dtype=torch.float64) -> torch.Tensor:
    """The full ``D x D`` matrix (for tests and references): rows of ``I`` mapped by ``M``."""
    eye = torch.eye(op.size, dtype=dtype)
    return op.to(dtype).apply(eye).T
