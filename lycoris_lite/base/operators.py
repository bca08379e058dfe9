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
  ``s = 0`` is the identity and ``s = 1`` the full transform; negative values extrapolate. ``s`` is a
  number or a 0-d tensor (the forward's multiplier, see :func:`is_one`).

``orthogonal`` says an operator is exactly orthogonal (``Mᵀ M = I`` up to rounding: an exact Cayley
transform, not its Neumann series nor a rotation stored as given), which lets :func:`rotate_output`
take ``M``'s gradient from its output instead of keeping its input for backward.
"""

from __future__ import annotations

import torch


def is_one(value) -> bool:
    """Whether ``value`` is the Python number 1: a multiplier known to be exactly one while the forward
    is traced. A tensor multiplier (the layer's ``multiplier`` buffer) is never taken for one, so no
    code path depends on its value: changing it never retraces a compiled forward."""
    return isinstance(value, (int, float)) and value == 1.0


class Operator:
    size: int
    orthogonal: bool = False

    def apply(self, v: torch.Tensor, transpose: bool = False) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def apply_channels_first(self, h: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """:meth:`apply` along axis 1 of an ``(N, D, …)`` tensor (a conv's activations), giving a
        tensor of the same layout; operators that can act there without moving the axis override it."""
        return self.apply(h.movedim(1, -1), transpose).movedim(-1, 1)

    def to(self, dtype: torch.dtype) -> "Operator":  # pragma: no cover
        raise NotImplementedError


class BlockDiagonal(Operator):
    def __init__(self, blocks: torch.Tensor, perm: torch.Tensor | None = None, orthogonal: bool = False):
        self.blocks = blocks
        self.perm = perm
        self.orthogonal = orthogonal
        self.inverse_perm = None if perm is None else torch.argsort(perm)
        self.size = blocks.shape[0] * blocks.shape[1]

    def apply(self, v, transpose=False):
        """Per block ``v_k·B_kᵀ`` (``transpose``: ``v_k·B_k``) as one ``bmm`` over the blocks, each
        reading its columns of every row in place (an einsum copied the activation into and out of a
        blocks-first layout; benchmarks/README "Measurements behind the code")."""
        n, b, _ = self.blocks.shape
        if self.perm is not None:
            v = v.index_select(-1, self.perm)
        rows = v.reshape(-1, n, b).transpose(0, 1)  # (n, T, b)
        out = torch.bmm(rows, self.blocks if transpose else self.blocks.transpose(1, 2)).transpose(0, 1).reshape(v.shape)
        if self.perm is not None:
            out = out.index_select(-1, self.inverse_perm)
        return out

    def apply_channels_first(self, h, transpose=False):
        """Per block ``B_k·h_k`` on the channel axis of ``(N, D, …)`` activations (``transpose``:
        ``B_kᵀ·h_k``): one ``bmm`` over ``N·n`` blocks of ``(b, H·W)`` views, with no move of the
        channel axis (moving it last and back cost more than the conv itself at 320×64×64)."""
        n, b, _ = self.blocks.shape
        if self.perm is not None:
            h = h.index_select(1, self.perm)
        count = h.shape[0]
        mats = (self.blocks.transpose(1, 2) if transpose else self.blocks).repeat(count, 1, 1)
        out = torch.bmm(mats, h.reshape(count * n, b, -1)).view(h.shape)
        if self.perm is not None:
            out = out.index_select(1, self.inverse_perm)
        return out

    def to(self, dtype):
        return BlockDiagonal(self.blocks.to(dtype), self.perm, self.orthogonal)


class LowRankUpdate(Operator):
    def __init__(self, u: torch.Tensor, t: torch.Tensor):
        self.u, self.t = u, t
        self.size = u.shape[0]

    def apply(self, v, transpose=False):
        proj = v @ self.u  # (..., r)
        core = self.t if transpose else self.t.T
        return v - (proj @ core) @ self.u.T

    def apply_channels_first(self, h, transpose=False):
        flat = h.reshape(h.shape[0], self.size, -1)  # (N, D, H·W)
        proj = torch.matmul(self.u.T, flat)  # (N, r, H·W)
        return (flat - torch.matmul(self.u @ (self.t.T if transpose else self.t), proj)).view(h.shape)

    def to(self, dtype):
        return LowRankUpdate(self.u.to(dtype), self.t.to(dtype))


class Diagonal(Operator):
    def __init__(self, d: torch.Tensor):
        self.d = d
        self.size = d.shape[0]

    def apply(self, v, transpose=False):
        return v * self.d

    def apply_channels_first(self, h, transpose=False):
        return h * self.d.view(-1, *([1] * (h.dim() - 2)))

    def to(self, dtype):
        return Diagonal(self.d.to(dtype))


class Chain(Operator):
    def __init__(self, stages: list[Operator]):
        self.stages = list(stages)
        self.size = self.stages[0].size
        self.orthogonal = all(stage.orthogonal for stage in self.stages)

    def apply(self, v, transpose=False):
        for stage in (reversed(self.stages) if transpose else self.stages):
            v = stage.apply(v, transpose)
        return v

    def apply_channels_first(self, h, transpose=False):
        for stage in (reversed(self.stages) if transpose else self.stages):
            h = stage.apply_channels_first(h, transpose)
        return h

    def to(self, dtype):
        return Chain([s.to(dtype) for s in self.stages])


class Scaled(Operator):
    def __init__(self, op: Operator, scale):
        self.op, self.scale = op, scale if isinstance(scale, torch.Tensor) else float(scale)
        self.size = op.size
        self.orthogonal = op.orthogonal and is_one(self.scale)

    def apply(self, v, transpose=False):
        if is_one(self.scale):
            return self.op.apply(v, transpose)
        return torch.lerp(v, self.op.apply(v, transpose), self._weight(v))

    def apply_channels_first(self, h, transpose=False):
        if is_one(self.scale):
            return self.op.apply_channels_first(h, transpose)
        return torch.lerp(h, self.op.apply_channels_first(h, transpose), self._weight(h))

    def _weight(self, like: torch.Tensor):
        return self.scale.to(like.dtype) if isinstance(self.scale, torch.Tensor) else self.scale

    def to(self, dtype):
        return Scaled(self.op.to(dtype), self.scale)


def low_rank_parts(op: Operator) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(U, C)`` when ``op`` is ``I − U·C·Uᵀ`` (a reflection chain, scaled or not), else ``None``."""
    if isinstance(op, LowRankUpdate):
        return op.u, op.t
    if isinstance(op, Scaled) and isinstance(op.op, LowRankUpdate):
        return op.op.u, op.op.t * op.scale
    return None


class _OrthogonalOutputRotation(torch.autograd.Function):
    """``y = v·Mᵀ + bias`` for an orthogonal block-diagonal ``M`` (``blocks``: ``(n, b, b)``), keeping
    ``y`` (the layer's output, which the next operation usually keeps anyway), the blocks and the bias
    for backward, not ``v``. Per block, ``∂B = Σ_t ∂y_t ⊗ v_t`` and ``v_t = Bᵀ(y_t − bias)`` (exact for
    orthogonal ``B``, to rounding), so ``∂B = (Σ_t ∂y_t ⊗ y_t − (Σ_t ∂y_t) ⊗ bias)·B``: one reduction
    over the tokens, as autograd's own, and no activation-sized temporary. ``∂v = ∂y·M``."""

    @staticmethod
    def forward(ctx, v, blocks, bias):
        out = BlockDiagonal(blocks).apply(v)
        if bias is not None:
            out = out.add_(bias)
        ctx.save_for_backward(out, blocks, bias)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        out, blocks, bias = ctx.saved_tensors
        # in the blocks' dtype: under autocast the forward ran in half precision, the backward runs without
        # autocast (autograd casts each gradient back to its input's dtype)
        grad, out = grad.to(blocks.dtype), out.to(blocks.dtype)
        bias = None if bias is None else bias.to(blocks.dtype)
        need_v, need_blocks, need_bias = ctx.needs_input_grad
        n, b, _ = blocks.shape
        grad_v = BlockDiagonal(blocks).apply(grad, transpose=True) if need_v else None
        grad_sum = grad.reshape(-1, grad.shape[-1]).sum(0) if (need_bias or (need_blocks and bias is not None)) else None
        grad_blocks = None
        if need_blocks:
            outer = torch.einsum("...nc,...nk->nck", grad.unflatten(-1, (n, b)), out.unflatten(-1, (n, b)))
            if bias is not None:
                outer = outer - grad_sum.view(n, b, 1) * bias.view(n, 1, b)
            grad_blocks = outer @ blocks
        return grad_v, grad_blocks, grad_sum if need_bias else None


def orthogonal_blocks(op: Operator) -> torch.Tensor | None:
    """The ``(n, b, b)`` blocks of ``op`` when it is one exactly orthogonal block-diagonal matrix
    (no permutation), else ``None``."""
    if isinstance(op, BlockDiagonal) and op.orthogonal and op.perm is None:
        return op.blocks
    return None


def rotate_output(v: torch.Tensor, blocks: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``v·Mᵀ + bias`` with ``M = blockdiag(blocks)`` orthogonal (channels last), keeping only the output
    for backward (see :class:`_OrthogonalOutputRotation`); equal to ``BlockDiagonal(blocks).apply(v) + bias``."""
    return _OrthogonalOutputRotation.apply(v, blocks, bias)


def scaled(op: Operator | None, scale) -> Operator | None:
    """``op`` under the multiplier ``scale`` (a number or a 0-d tensor): :class:`Scaled` unless
    ``scale`` is the number 1."""
    if op is None:
        return None
    return op if is_one(scale) else Scaled(op, scale)


def dense(op: Operator, dtype=torch.float64) -> torch.Tensor:
    """The full ``D x D`` matrix (for tests and references): rows of ``I`` mapped by ``M``."""
    eye = torch.eye(op.size, dtype=dtype)
    return op.to(dtype).apply(eye).T
