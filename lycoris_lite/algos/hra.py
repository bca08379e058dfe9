"""HRA: a chain of Householder reflections, ``M = Π_{i=1..r} (I − 2 û_i û_iᵀ)``, ``û_i = u_i / ‖u_i‖``.

``hra_u``: ``(D, r)`` (PEFT's layout; our kohya-style key ``<module>.hra_u`` with the same shape).
The chain is applied in compact WY form ``M = I − Û T Ûᵀ`` with ``T`` upper triangular,
``T⁻¹ = striu(ÛᵀÛ) + ½ I``, so the unfused forward costs about what a rank-r LoRA costs: the
``D × D`` matrix is never built.

* ``rotation_side="input"`` (PEFT, the default): ``W' = W · M`` with ``D = in·kh·kw``;
  ``"output"``: ``W' = M · W`` with ``D = out``. Input side on a k×k conv transforms the weight.
* ``apply_GS``: the columns are orthonormalised first (Gram-Schmidt) and ``M = I − 2 Q Qᵀ``. A column
  whose residual vanishes (PEFT's symmetric init gives such duplicates) is dropped instead of
  producing NaN as PEFT does. ``I − 2QQᵀ`` is never the identity, so GS starts away from it.
* ``init_weights=True`` with even ``r``: columns repeated in pairs, so each pair of reflections
  cancels and ``M = I`` exactly. Odd ``r`` cannot start at the identity (a warning says so).
* :func:`orthogonality_penalty` ``‖I − ÛᵀÛ‖_F``: the paper's regulariser, used by the trainer.

PEFT (``HRA``): ``hra_u`` unchanged, input side only; ``r`` and ``apply_GS`` once per adapter.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..base.config import AdapterConfig, check_choice
from ..base.operators import LowRankUpdate
from ..base.registry import Algorithm, NotSplittable, register
from .oft import join_shared_rotation, split_shared_rotation
from ..base.settings import Settings
from . import peft
from .common import ROTATION_SIDES, kaiming_, rotated_dim


def unit_columns(u: torch.Tensor) -> torch.Tensor:
    return u / torch.linalg.vector_norm(u, dim=0, keepdim=True).clamp_min(1e-12)


def householder_core(u_hat: torch.Tensor) -> torch.Tensor:
    """``T`` of the compact WY form: ``Π (I − 2 û_i û_iᵀ) = I − Û T Ûᵀ``."""
    r = u_hat.shape[1]
    gram = u_hat.T @ u_hat
    t_inv = torch.triu(gram, diagonal=1) + 0.5 * torch.eye(r, dtype=u_hat.dtype, device=u_hat.device)
    eye = torch.eye(r, dtype=u_hat.dtype, device=u_hat.device)
    return torch.linalg.solve_triangular(t_inv, eye, upper=True)


def gram_schmidt(u: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Orthonormal columns spanning ``u``'s, in order; near-dependent columns become zero (no NaN)."""
    columns = []
    for i in range(u.shape[1]):
        v = u[:, i]
        for q in columns:
            v = v - (q @ v) * q
        norm = torch.linalg.vector_norm(v)
        keep = norm > eps * torch.linalg.vector_norm(u[:, i]).clamp_min(1e-30)
        columns.append(torch.where(keep, v / norm.clamp_min(1e-30), torch.zeros_like(v)))
    return torch.stack(columns, dim=1)


def reflection_operator(u: torch.Tensor, apply_gs: bool = False) -> LowRankUpdate:
    """The operator ``M`` (``D × D``) of the reflection chain encoded by ``u`` (``D × r``)."""
    if apply_gs:
        q = gram_schmidt(u)
        return LowRankUpdate(q, 2.0 * torch.eye(u.shape[1], dtype=u.dtype, device=u.device))
    u_hat = unit_columns(u)
    return LowRankUpdate(u_hat, householder_core(u_hat))


def orthogonality_penalty(u: torch.Tensor) -> torch.Tensor:
    """``‖I − ÛᵀÛ‖_F`` for unit columns ``Û``: 0 when the reflection planes are orthogonal."""
    u_hat = unit_columns(u)
    eye = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
    return torch.linalg.matrix_norm(eye - u_hat.T @ u_hat)


@dataclass
class HRAConfig(AdapterConfig):
    """HRA. ``r`` reflections (even for an identity start), ``apply_GS``, ``rotation_side``."""

    aliases = {"hra_r": "r", "hra_apply_GS": "apply_GS"}
    apply_GS: bool = False
    rotation_side: str = "input"

    def validate(self):
        check_choice("rotation_side", self.rotation_side, ROTATION_SIDES)
        if self.r < 1:
            raise ValueError("HRA needs r >= 1")
        if self.init_weights is True and self.r % 2:
            warnings.warn(f"HRA with odd r={self.r} cannot start at the identity (use an even r)", stacklevel=3)


@dataclass(frozen=True, kw_only=True)
class HRASettings(Settings):
    """HRA's per-layer settings:

    * ``r``: the number of reflections (the columns of ``hra_u``; :attr:`rank`);
    * ``side``: the reflected side, ``"input"`` (``W' = W·M``) or ``"output"`` (``W' = M·W``);
    * ``dim``: the reflected dimension ``D`` (``in·kh·kw``, or ``out``);
    * ``apply_gs``: the columns are orthonormalised first (Gram–Schmidt, PEFT's ``apply_GS``).
    """

    r: int
    side: str
    dim: int
    apply_gs: bool = False

    @property
    def rank(self) -> int:
        return self.r


@register
class HRA(Algorithm):
    name = "hra"
    config_class = HRAConfig
    settings_class = HRASettings
    multiplicative = True
    detect_keys = ("hra_u",)
    peft_type = "HRA"
    peft_keys = ("hra_u",)
    file_keys = frozenset(peft_keys)
    lycoris_args = {"apply_GS": "apply_GS", "rotation_side": "rotation_side"}

    @classmethod
    def split_rows(cls, params, spec, settings, parts):
        """Input side: every module shares the reflections. Output side: each reflection mixes all of
        the fused matrix's rows, so no per-module HRA is exact."""
        if settings.side == "input":
            return split_shared_rotation(params, settings, parts)
        raise NotSplittable("its output-side reflections mix every row of the fused matrix, so a module's rows "
                            "depend on its neighbours' weights")

    @classmethod
    def join_rows(cls, spec, parts):
        return join_shared_rotation(spec, parts, "HRA")

    @classmethod
    def describe_size(cls, tensors):
        u = tensors.get("hra_u")
        return "?" if u is None else f"r={u.shape[-1]}"

    @classmethod
    def input_width(cls, file_tensors):
        """The rotated dimension: the input on the default side (an output-side file tells nothing)."""
        u = file_tensors.get("hra_u")
        return u.shape[0] if u is not None and u.dim() == 2 else None

    @classmethod
    def resolve(cls, config, spec, name):
        dim = rotated_dim(spec, config.rotation_side)
        if config.r > dim:
            raise ValueError(f"layer {name!r}: HRA r={config.r} exceeds the reflected dimension {dim}")
        return HRASettings(r=config.r, side=config.rotation_side, dim=dim, apply_gs=bool(config.apply_GS))

    @classmethod
    def init_params(cls, spec, settings, init_weights, generator):
        dim, r = settings.dim, settings.r
        if init_weights is not False and r % 2 == 0:
            half = kaiming_(torch.empty(dim, r // 2), generator)
            return {"hra_u": half.repeat_interleave(2, dim=1)}
        return {"hra_u": kaiming_(torch.empty(dim, r), generator)}

    @classmethod
    def settings_from_tensors(cls, spec, tensors, alpha, name, side=None, apply_gs=False):
        """``apply_gs``: the reflections are Gram–Schmidt orthonormalised (PEFT's ``apply_GS``)."""
        dim, r = tensors["hra_u"].shape
        if side is None:  # PEFT's (input) side unless only the output side fits
            side = "input" if dim == spec.flat_in else "output"
        if dim != rotated_dim(spec, side):
            raise ValueError(f"layer {name!r}: hra_u {(dim, r)} does not fit the {side} dimension {rotated_dim(spec, side)}")
        return HRASettings(r=r, side=side, dim=dim, apply_gs=bool(apply_gs))

    @classmethod
    def from_peft(cls, spec, tensors, config, names):
        params = {"hra_u": tensors["hra_u"]}
        return cls.settings_from_tensors(spec, params, None, names[0], "input", apply_gs=bool(config.get("apply_GS"))), params

    @classmethod
    def to_peft(cls, layers, specs, component):
        for path, e in layers.items():
            peft.require_input_side(component, path, e.settings, cls.name)
        r = peft.one_value({e.settings.r for e in layers.values()}, "number of reflections r", component)
        gs = peft.one_value({bool(e.settings.apply_gs) for e in layers.values()}, "apply_GS", component)
        return {p: {"hra_u": e.tensors["hra_u"]} for p, e in layers.items()}, {"r": r, "apply_GS": gs, "init_weights": True}

    @classmethod
    def peft_config_fields(cls, config, layers):
        return {"r": config.get("r", 8), "apply_GS": bool(config.get("apply_GS")), "rotation_side": "input"}

    @classmethod
    def transform(cls, params, spec, settings):
        op = reflection_operator(params["hra_u"], settings.apply_gs)
        return (op, None) if settings.side == "input" else (None, op)

    @classmethod
    def regularization(cls, params, settings):
        return orthogonality_penalty(params["hra_u"])
