"""Independent float64 references, written from the maths with dense matrices.

Nothing here imports the library's formulas: each function takes the adapter's tensors (as stored
under their file keys) and the base weight, and returns the transformed weight ``W'`` at multiplier 1.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def _d(t):
    return t.detach().to(F64)


def lora(w, p, s):
    up, down = _d(p["lora_up"]).flatten(1), _d(p["lora_down"])
    if "lora_mid" in p:
        mid = _d(p["lora_mid"])
        delta = torch.zeros(w.shape, dtype=F64)
        for i in range(mid.shape[0]):
            for j in range(mid.shape[1]):
                delta += up[:, i, None, None, None] * down.flatten(1)[j][None, :, None, None] * mid[i, j][None, None]
        return w + s.scale * delta
    return w + s.scale * (up @ down.flatten(1)).reshape(w.shape)


def loha(w, p, s):
    if "hada_t1" in p:
        def tucker(t, a, b):
            return torch.einsum("ijhw,ip,jq->pqhw", _d(t), _d(a), _d(b))
        delta = tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"]) * tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
        return w + s.scale * delta
    m1 = _d(p["hada_w1_a"]) @ _d(p["hada_w1_b"])
    m2 = _d(p["hada_w2_a"]) @ _d(p["hada_w2_b"])
    return w + s.scale * (m1 * m2).reshape(w.shape)


def lokr(w, p, s):
    a, b, c, d = s.shape
    w1 = _d(p["lokr_w1"]) if "lokr_w1" in p else _d(p["lokr_w1_a"]) @ _d(p["lokr_w1_b"])
    if "lokr_w2" in p:
        w2 = _d(p["lokr_w2"])
    elif "lokr_t2" in p:
        w2 = torch.einsum("ijhw,ip,jq->pqhw", _d(p["lokr_t2"]), _d(p["lokr_w2_a"]), _d(p["lokr_w2_b"]))
    else:
        w2 = (_d(p["lokr_w2_a"]) @ _d(p["lokr_w2_b"])).reshape(b, d, *w.shape[2:])
    delta = torch.zeros(w.shape, dtype=F64)
    for i in range(a):
        for k in range(c):
            delta[i * b:(i + 1) * b, k * d:(k + 1) * d] = w1[i, k] * w2
    return w + s.scale * delta


def _cayley_dense(q):
    eye = torch.eye(q.shape[-1], dtype=F64)
    return (eye - q) @ torch.linalg.inv(eye + q)


def _clamp(q, radius):
    norm = torch.linalg.vector_norm(q)
    return q * min(1.0, radius / (float(norm) + 1e-8)) if radius > 0 else q


def _apply_side(w, m, side, rescale):
    flat = w.reshape(w.shape[0], -1)
    out = m @ flat if side == "output" else flat @ m
    if rescale is not None:
        out = _d(rescale)[:, None] * out
    return out.reshape(w.shape)


def oft(w, p, s):
    raw = _d(p["oft_blocks"])
    q = _clamp(raw - raw.transpose(-1, -2), s.radius)
    if s.neumann_terms:
        eye = torch.eye(q.shape[-1], dtype=F64)
        blocks = []
        for qi in q:
            acc, power = eye.clone(), eye.clone()
            n = s.neumann_terms
            for k in range(1, n):
                power = power @ (-qi)
                acc = acc + (power if k == n - 1 else 2 * power)
            blocks.append(acc)
    else:
        blocks = [_cayley_dense(qi) for qi in q]
    return _apply_side(w, torch.block_diag(*blocks), s.side, p.get("rescale"))


def boft(w, p, s):
    raw = _d(p["oft_blocks"])
    q = _clamp(raw - raw.transpose(-1, -2), s.radius)
    dim, b = s.dim, s.block_size
    m_total = torch.eye(dim, dtype=F64)
    for i in range(q.shape[0]):
        rot = torch.block_diag(*[_cayley_dense(-qi) for qi in q[i]])  # (I + Q)(I − Q)⁻¹
        k = (2 ** i) * b // 2
        # position (g, j, h) of the permuted vector holds element (g, h, j) of the (g, 2, k) view
        perm = [g * 2 * k + h * k + j for g in range(dim // (2 * k)) for j in range(k) for h in range(2)]
        pmat = torch.zeros(dim, dim, dtype=F64)
        for new, old in enumerate(perm):
            pmat[new, old] = 1.0
        stage = pmat.T @ rot @ pmat
        # output side W' = B_{m-1}⋯B_0·W; input side mirrors it: W' = W·B_0⋯B_{m-1}
        m_total = stage @ m_total if s.side == "output" else m_total @ stage
    return _apply_side(w, m_total, s.side, p.get("rescale"))


def hra(w, p, s):
    u = _d(p["hra_u"])
    dim = u.shape[0]
    m = torch.eye(dim, dtype=F64)
    if s.apply_gs:
        basis = []
        for i in range(u.shape[1]):
            v = u[:, i].clone()
            for qv in basis:
                v -= (qv @ v) * qv
            if v.norm() > 1e-6 * u[:, i].norm():
                basis.append(v / v.norm())
        for qv in basis:
            m = m - 2 * torch.outer(qv, qv)
    else:
        for i in range(u.shape[1]):
            ui = u[:, i] / u[:, i].norm()
            m = m @ (torch.eye(dim, dtype=F64) - 2 * torch.outer(ui, ui))
    return _apply_side(w, m, s.side, None)


REFERENCES = {"lora": lora, "loha": loha, "lokr": lokr, "oft": oft, "boft": boft, "hra": hra}


def dora(w, adapted, magnitude, axis):
    """DoRA: ``m ⊙ W'/‖W'‖`` (``‖·‖ + eps``) per output row (``axis="output"``) or input column."""
    if axis == "output":
        norm = torch.stack([adapted[o].norm() for o in range(adapted.shape[0])])
        norm = norm.reshape(-1, *[1] * (adapted.dim() - 1))
    else:
        norm = torch.stack([adapted[:, i].norm() for i in range(adapted.shape[1])])
        norm = norm.reshape(1, -1, *[1] * (adapted.dim() - 2))
    return _d(magnitude) * adapted / (norm + torch.finfo(F64).eps)


def transformed_weight(algo: str, weight: torch.Tensor, params: dict, settings) -> torch.Tensor:
    """``W'`` at multiplier 1 (DoRA applied when the settings say so)."""
    out = REFERENCES[algo](_d(weight), params, settings)
    if getattr(settings, "dora", None):
        out = dora(_d(weight), out, params["dora_scale"], settings.dora)
    return out


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().to(F64), b.detach().to(F64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


__all__ = ["REFERENCES", "transformed_weight", "relative_error", "math"]
