"""Maths shared by several algorithms: factorisations, the Cayley transform, Tucker rebuilds."""

from __future__ import annotations

import math

import torch


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dim = m * n`` with ``m <= n`` (LyCORIS's rule, used for LoKr).

    ``factor > 0`` that divides ``dim`` gives ``(factor, dim // factor)`` sorted; otherwise the most
    square split with ``m <= factor`` (``factor = -1``: most square). ``128 -> (8, 16)``,
    ``1024, 4 -> (4, 256)``.
    """
    if factor > 0 and dim % factor == 0:
        m, n = factor, dim // factor
        return (m, n) if m <= n else (n, m)
    if factor < 0:
        factor = dim
    m, n = 1, dim
    length = m + n
    while m < n:
        new_m = m + 1
        while dim % new_m != 0:
            new_m += 1
        new_n = dim // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
        length = m + n
    return (m, n) if m <= n else (n, m)


def skew(raw: torch.Tensor) -> torch.Tensor:
    """``Q = B - Bᵀ`` over the last two dims: a skew-symmetric matrix from an unconstrained one."""
    return raw - raw.transpose(-1, -2)


def clamp_norm(q: torch.Tensor, radius: float) -> torch.Tensor:
    """COFT: if ``‖Q‖_F > radius`` (all blocks together) rescale ``Q`` onto that sphere; 0 = off."""
    if radius <= 0:
        return q
    norm = torch.linalg.vector_norm(q)
    factor = torch.clamp(radius / (norm + 1e-8), max=1.0)
    return q * factor


def cayley(q: torch.Tensor, neumann_terms: int = 0) -> torch.Tensor:
    """Orthogonal ``(I - Q)(I + Q)⁻¹`` for skew-symmetric ``Q`` (batched over leading dims).

    ``neumann_terms = n > 0`` uses the truncated series ``I - 2Q + 2Q² - ... ± Q^{n-1}`` instead of
    the inverse (only approximately orthogonal; PEFT's Cayley-Neumann with the sign of ``Q`` flipped).
    The inverse is taken in at least float32.
    """
    b = q.shape[-1]
    eye = torch.eye(b, dtype=q.dtype, device=q.device)
    if neumann_terms > 0:
        out = eye.expand_as(q).clone()
        power = eye.expand_as(q)
        for k in range(1, neumann_terms):
            power = power @ (-q)
            out = out + (power if k == neumann_terms - 1 else 2 * power)
        return out
    work = q if q.dtype in (torch.float32, torch.float64) else q.float()
    eye_w = eye.to(work.dtype)
    # (I - Q)(I + Q)^{-1}: solve X (I + Q) = (I - Q)
    out = torch.linalg.solve(eye_w + work, eye_w - work, left=False)
    return out.to(q.dtype)


def rebuild_tucker(core: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``W[p, q, kh, kw] = Σ_ij core[i, j, kh, kw] · up[p, i] · down[j, q]``.

    ``core``: ``(r1, r2, kh, kw)``, ``up``: ``(out, r1)``, ``down``: ``(r2, in)`` -> ``(out, in, kh, kw)``.
    """
    return torch.einsum("ijhw,pi,jq->pqhw", core, up, down)


def kaiming_(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``kaiming_uniform_(a=√5)`` as nn.Linear does, with an explicit generator."""
    fan_in = t[0].numel() if t.dim() > 1 else t.numel()
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    with torch.no_grad():
        return t.uniform_(-bound, bound, generator=generator)


def init_factors(params: dict[str, torch.Tensor], zero_key: str, init_weights, generator=None) -> dict:
    """Kaiming-initialise every factor; ``zero_key`` starts at zero (so ΔW = 0) unless
    ``init_weights`` is False (random non-identity weights, for tests)."""
    for key, value in params.items():
        if key == zero_key and init_weights is not False:
            value.zero_()
        else:
            kaiming_(value, generator)
    return params


def normal_(t: torch.Tensor, std: float, generator: torch.Generator | None = None, mean: float = 0.0):
    with torch.no_grad():
        return t.normal_(mean, std, generator=generator)


ROTATION_SIDES = ("input", "output")


def rotated_dim(spec, side: str) -> int:
    """Length of the vectors a rotation acts on: ``out`` (output side) or ``in·kh·kw`` (input side)."""
    return spec.out_features if side == "output" else spec.flat_in


def divisors_near(dim: int, target: int, count: int = 4) -> list[int]:
    divs = [k for k in range(1, dim + 1) if dim % k == 0]
    return sorted(divs, key=lambda k: (abs(k - target), k))[:count]


def block_layout(dim: int, block_size: int, block_num: int, name: str, what: str = "block_size") -> tuple[int, int]:
    """``(block_num, block_size)`` with ``block_num · block_size = dim``; clear error otherwise."""
    if block_num > 0:
        if dim % block_num:
            raise ValueError(
                f"layer {name!r}: {block_num} blocks do not divide the rotated dimension {dim}; "
                f"numbers of blocks that fit: {divisors_near(dim, block_num)}"
            )
        return block_num, dim // block_num
    if block_size <= 0 or dim % block_size:
        raise ValueError(
            f"layer {name!r}: {what}={block_size} does not divide the rotated dimension {dim}; "
            f"sizes that fit: {divisors_near(dim, max(block_size, 1))}"
        )
    return dim // block_size, block_size
