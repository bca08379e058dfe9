"""The SVD behind LoRA extraction: the best LoRA of one weight change ``ΔW`` (:func:`lora_factors`).

For one layer, the weight change ``ΔW`` is flattened to ``(out, in·kh·kw)`` and factorised by SVD,
``ΔW = U S Vᵀ``. The rank-``r`` truncation ``U_r S_r V_rᵀ`` is the best rank-``r`` approximation in the
Frobenius norm (Eckart-Young), with relative error ``√(Σ_{i>r} s_i²) / ‖ΔW‖_F``. The singular values are
split evenly between the factors:

* ``lora_up = U_r · √S_r``: ``(out, r)`` for a Linear, ``(out, r, 1, 1)`` for a Conv2d;
* ``lora_down = √S_r · V_rᵀ``: ``(r, in)`` for a Linear, ``(r, in, kh, kw)`` for a Conv2d (the LoCon
  layout: a k×k conv followed by a 1×1 conv),

with ``alpha = r`` (scale 1). The relative error ``‖ΔW − up·down‖_F / ‖ΔW‖_F`` is always measured on the
factors actually returned (0 for a layer whose ΔW is zero).

The rank of each layer is one of

* ``rank=r``: ``min(r, out, in·kh·kw)``;
* ``energy=e`` (``0 < e ≤ 1``): the smallest rank whose factors hold a fraction ``e`` of ``‖ΔW‖_F²``, so
  the relative error is at most ``√(1 − e)`` (optionally capped by ``max_rank``);
* neither: the numerical rank (singular values above ``4 · eps · s_1``, i.e. all but float rounding),
  which reproduces ``ΔW`` to float rounding.

SVD methods (``method``):

* ``"full"``: ``torch.linalg.svd`` (``O(out·in·min(out, in))``; 30-40 s for a 1280 × 11520 conv weight
  on two CPU cores).
* ``"randomized"``: subspace iteration (Halko, Martinsson & Tropp 2011, algorithms 4.3/4.4) on
  ``q = r + p`` random directions with ``p = max(r, 10)``: a Gaussian sketch, then power iterations
  ``Q ← orth(ΔW · orth(ΔWᵀ Q))`` until the energy the top-``r`` directions capture stops growing by
  more than 1% of what is left uncaptured (at most 8 iterations). Each iteration costs two
  ``out × in × q`` products.
* ``"auto"`` (default): randomized where it is cheaper (``2q ≤ min(out, in·kh·kw)``) and converged;
  full SVD otherwise (small matrices, the numerical-rank mode, or no convergence).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..base import portable

METHODS = ("auto", "randomized", "full")
#: power iterations of the randomized SVD before ``auto`` gives up on it
MAX_POWER_ITERATIONS = 8
#: converged when one more iteration captures less than this fraction of the still uncaptured energy
CONVERGENCE = 1e-2
#: first rank tried by the randomized SVD in ``energy`` mode without ``max_rank`` (doubled as needed)
ENERGY_START_RANK = 64


class LoRAFactors(NamedTuple):
    """``lora_down`` and ``lora_up`` in the layer's layout, the relative error and the SVD method used."""

    down: torch.Tensor
    up: torch.Tensor
    error: float
    method: str


def _check_rank(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")


def check_rank_choice(rank, energy, max_rank=None, method: str = "auto") -> None:
    """Validate a rank choice: at most one of ``rank`` and ``energy`` (``0 < energy ≤ 1``)."""
    if rank is not None and energy is not None:
        raise ValueError("give rank or energy, not both")
    if rank is not None:
        _check_rank(rank, "rank")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or not 0 < energy <= 1):
        raise ValueError(f"energy must be a number in (0, 1], got {energy!r}")
    if max_rank is not None:
        _check_rank(max_rank, "max_rank")
    if method not in METHODS:
        raise ValueError(f"unknown SVD method {method!r}; one of {', '.join(METHODS)}")


def full_svd(flat: torch.Tensor, full_matrices: bool = False, driver: str | None = None):
    """``torch.linalg.svd``, retried in float64 (on :func:`lycoris_lite.base.portable.float64_device`) on the
    rare float32 non-convergence; the factors come back on ``flat``'s device in its dtype."""
    try:
        return torch.linalg.svd(flat, full_matrices=full_matrices, driver=driver)
    except RuntimeError:
        wide = flat.to(portable.float64_device(flat.device), torch.float64)
        return tuple(f.to(flat.device, flat.dtype) for f in torch.linalg.svd(wide, full_matrices=full_matrices))


def _top_energy(projected: torch.Tensor, rank: int) -> torch.Tensor:
    """``Σ`` of the ``rank`` largest squared singular values of a wide ``(q, n)`` matrix, from its
    ``q × q`` Gram matrix in float64 (cheaper than LAPACK on the wide matrix itself), on
    :func:`lycoris_lite.base.portable.float64_device`; the sum comes back on ``projected``'s device."""
    wide = projected.to(portable.float64_device(projected.device), torch.float64)
    return torch.linalg.eigvalsh(wide @ wide.T)[-rank:].sum().to(projected.device, projected.dtype)


def _wide_svd(projected: torch.Tensor):
    """SVD of a wide ``(q, n)`` matrix through the QR of its transpose: ``Bᵀ = Q R``, ``Rᵀ = U S Wᵀ``,
    so ``B = U S (Q W)ᵀ`` (one tall-skinny QR and a ``q × q`` SVD)."""
    q, r = torch.linalg.qr(projected.T)
    u, s, wh = torch.linalg.svd(r.T)
    return u, s, wh @ q.T


def randomized_svd(flat: torch.Tensor, rank: int, oversample: int | None = None,
                   max_iterations: int = MAX_POWER_ITERATIONS, seed: int = 0):
    """``(u (m, rank), s (rank,), vh (rank, n), converged)``: the top-``rank`` SVD of ``flat`` by
    randomized subspace iteration with ``q = rank + oversample`` directions (default ``max(rank, 10)``).

    ``converged`` is True when one more power iteration added less than ``CONVERGENCE`` of the energy
    still outside the top ``rank`` directions (or less than float rounding)."""
    m, n = flat.shape
    q = min(rank + (max(rank, 10) if oversample is None else oversample), m, n)
    generator = torch.Generator(device=flat.device).manual_seed(seed)
    sketch = torch.randn(n, q, generator=generator, device=flat.device, dtype=flat.dtype)
    basis = torch.linalg.qr(flat @ sketch).Q
    total = flat.square().sum()
    rounding = total * 8 * torch.finfo(flat.dtype).eps
    previous, converged = None, False
    for iteration in range(max_iterations + 1):
        projected = basis.T @ flat  # (q, n): flat ≈ basis · projected
        captured = _top_energy(projected, rank)
        if previous is not None and captured - previous <= torch.maximum(CONVERGENCE * (total - captured), rounding):
            converged = True
            break
        if iteration == max_iterations:
            break
        previous = captured
        basis = torch.linalg.qr(flat @ torch.linalg.qr(projected.T).Q).Q
    u, s, vh = _wide_svd(projected)
    return basis @ u[:, :rank], s[:rank], vh[:rank], converged


def _numerical_rank(s: torch.Tensor) -> int:
    if s.numel() == 0 or s[0] == 0:
        return 1
    return max(1, int((s > s[0] * 4 * torch.finfo(s.dtype).eps).sum()))


def _energy_rank(s: torch.Tensor, total: torch.Tensor, energy: float) -> int | None:
    """Smallest ``k`` with ``Σ_{i≤k} s_i² ≥ energy · total`` (``None`` if ``s`` does not get there)."""
    if total == 0:
        return 1
    cumulative = torch.cumsum(s.square(), 0)
    target = energy * total - 8 * torch.finfo(s.dtype).eps * total
    reached = (cumulative >= target).nonzero()
    return int(reached[0]) + 1 if len(reached) else None


def _cheap(rank: int, small: int) -> bool:
    return 2 * (rank + max(rank, 10)) <= small


def truncated_svd(flat: torch.Tensor, rank: int | None = None, *, energy: float | None = None,
                  max_rank: int | None = None, method: str = "auto", seed: int = 0):
    """``(u, s, vh, method used)`` of a 2-D ``flat`` truncated to the rank chosen as the module docstring
    says (``rank``, ``energy`` or the numerical rank)."""
    m, n = flat.shape
    small = min(m, n)
    if rank is not None:
        r = min(rank, small)
        if method == "randomized" or (method == "auto" and _cheap(r, small)):
            u, s, vh, converged = randomized_svd(flat, r, seed=seed)
            if converged or method == "randomized":
                return u, s, vh, "randomized"
        u, s, vh = full_svd(flat)
        return u[:, :r], s[:r], vh[:r], "full"
    if energy is not None:
        cap = min(max_rank or small, small)
        total = flat.square().sum()
        tried = min(cap, ENERGY_START_RANK)
        while method == "randomized" or (method == "auto" and _cheap(tried, small)):
            u, s, vh, converged = randomized_svd(flat, tried, seed=seed)
            if not converged and method == "auto":
                break
            k = _energy_rank(s, total, energy)
            if k is not None or tried == cap:
                k = tried if k is None else k
                return u[:, :k], s[:k], vh[:k], "randomized"
            tried = min(2 * tried, cap)
        u, s, vh = full_svd(flat)
        k = min(_energy_rank(s, total, energy) or _numerical_rank(s), cap)
        return u[:, :k], s[:k], vh[:k], "full"
    u, s, vh = full_svd(flat)
    k = _numerical_rank(s)
    return u[:, :k], s[:k], vh[:k], "full"


def lora_layout(down: torch.Tensor, up: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat factors ``down (r, in·kh·kw)``, ``up (out, r)`` in the layout of a layer with weight ``shape``."""
    r = down.shape[0]
    if len(shape) == 4:
        return down.reshape(r, *shape[1:]).contiguous(), up.reshape(shape[0], r, 1, 1).contiguous()
    return down.contiguous(), up.contiguous()


def relative_error(flat: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> float:
    """``‖flat − up·down‖_F / ‖flat‖_F`` (0 for a zero ``flat``)."""
    norm = torch.linalg.matrix_norm(flat)
    if norm == 0:
        return 0.0
    return float(torch.linalg.matrix_norm(flat - up.flatten(1) @ down.flatten(1)) / norm)


@torch.no_grad()
def lora_factors(delta_weight: torch.Tensor, rank: int | None = None, *, energy: float | None = None,
                 max_rank: int | None = None, method: str = "auto", seed: int = 0) -> LoRAFactors:
    """The LoRA of one weight change ``delta_weight`` (``(out, in)`` or ``(out, in, kh, kw)``).

    Computed in float32 (float64 if given float64) on the tensor's device; the returned factors tell
    the rank used. ``ValueError`` for a bad rank choice, shape or NaN/Inf values.
    """
    check_rank_choice(rank, energy, max_rank, method)
    if delta_weight.dim() not in (2, 4):
        raise ValueError(f"delta_weight must be 2-D (Linear) or 4-D (Conv2d), got shape {tuple(delta_weight.shape)}")
    dtype = torch.float64 if delta_weight.dtype == torch.float64 else torch.float32
    flat = delta_weight.detach().reshape(delta_weight.shape[0], -1).to(dtype)
    if not torch.isfinite(flat).all():
        raise ValueError("delta_weight has NaN/Inf values")
    u, s, vh, used = truncated_svd(flat, rank, energy=energy, max_rank=max_rank, method=method, seed=seed)
    root = s.sqrt()
    down, up = lora_layout(root[:, None] * vh, u * root, delta_weight.shape)
    return LoRAFactors(down, up, relative_error(flat, down, up), used)



__all__ = ["METHODS", "LoRAFactors", "check_rank_choice", "full_svd", "lora_factors", "lora_layout", "randomized_svd",
           "relative_error", "truncated_svd"]
