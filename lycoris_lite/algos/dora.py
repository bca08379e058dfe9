"""DoRA: weight decomposition for the additive algorithms (LoRA, LoHa, LoKr).

An adapter with ``use_dora=True`` keeps a magnitude ``m`` (``dora_scale``) beside its ``ΔW`` and is a
stage of the layer's multiplicative chain (see :mod:`lycoris_lite.core.layer`), applied to the weight ``W``
it receives:

    D(W) = m ⊙ (W + ΔW) / ‖W + ΔW‖,     W' = W + s·(D(W) − W)

with ``s`` the user's multiplier (``s = 0`` is the base layer, ``s = 1`` the DoRA layer, as for OFT;
AUTOMATIC1111's and ComfyUI's convention). At ``s = 1`` this is PEFT's ``use_dora`` and LyCORIS's
``weight_decompose``; for other ``s`` PEFT scales ``ΔW`` inside the norm and keeps ``m`` (so its
``s = 0`` is not the base layer) and LyCORIS keeps ``ΔW`` whole (``W' = (W + ΔW)(1 + s(g − 1))``).

The norm's axis (``axis``):

* ``"output"``: one norm per output channel, over ``in·kh·kw`` (PEFT; LyCORIS ≥ 3.2 ``wd_on_output``).
  ``dora_scale``: ``(out, 1)`` Linear, ``(out, 1, 1, 1)`` Conv2d (LyCORIS's layout; PEFT's
  ``lora_magnitude_vector`` is ``(out,)`` / ``(1, out, 1, 1)``).
* ``"input"``: one norm per input channel, over ``out·kh·kw`` (LyCORIS 2.2–3.1). ``dora_scale``:
  ``(1, in)`` / ``(1, in, 1, 1)``.

``‖·‖`` gets ``finfo.eps`` added (LyCORIS's guard against a zero row). While training the norm is a
constant (detached), as in the DoRA paper (§4.3) and PEFT, so only ``m`` and ``ΔW``'s factors get
gradients through ``m/‖·‖`` and ``ΔW`` respectively.

Per channel the stage is a gain: with ``g = m / ‖W + ΔW‖``, ``W' = (1 − s + s·g) ⊙ W + s·g ⊙ ΔW`` (a
diagonal on the output side for ``"output"``, on the input side for ``"input"``), which is how the
layer runs it without building ``W'``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base.config import AdapterConfig, check_choice
from ..base.registry import NotSplittable
from ..base.rows import put_rows, take_rows
from ..base.settings import Settings

AXES = ("output", "input")
KEY = "dora_scale"


def magnitude_shape(spec, axis: str) -> tuple[int, ...]:
    ones = (1, 1) if spec.is_conv else ()
    return (spec.out_features, 1, *ones) if axis == "output" else (1, spec.in_features, *ones)


def channel_norm(weight: torch.Tensor, axis: str) -> torch.Tensor:
    """``‖weight‖`` per output channel (``(out, 1[, 1, 1])``) or per input channel (``(1, in[, 1, 1])``)."""
    trailing = (1,) * (weight.dim() - 1)
    if axis == "output":
        return torch.linalg.vector_norm(weight.reshape(weight.shape[0], -1), dim=1).reshape(-1, *trailing)
    norm = torch.linalg.vector_norm(weight.transpose(0, 1).reshape(weight.shape[1], -1), dim=1)
    return norm.reshape(-1, *trailing).transpose(0, 1)


def gain(magnitude: torch.Tensor, adapted: torch.Tensor, axis: str) -> torch.Tensor:
    """``g = m / (‖W + ΔW‖ + eps)`` for ``adapted = W + ΔW`` (shaped like ``magnitude``), the norm a
    constant for autograd."""
    with torch.no_grad():
        norm = channel_norm(adapted, axis) + torch.finfo(adapted.dtype).eps
    return magnitude / norm


def decompose(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, axis: str,
              scale: float = 1.0) -> torch.Tensor:
    """``W + s·(m ⊙ (W + ΔW)/‖W + ΔW‖ − W)`` as a dense weight."""
    adapted = weight + delta
    return weight + scale * (gain(magnitude, adapted, axis) * adapted - weight)


def axis_of(tensor: torch.Tensor, spec, name: str = "") -> str:
    """The axis a file's ``dora_scale`` normalises, from its shape: ``(out, 1[, 1, 1])`` output,
    ``(1, in[, 1, 1])`` input (LyCORIS's two historic layouts)."""
    shape = tuple(tensor.shape)
    for axis in AXES:
        if shape == magnitude_shape(spec, axis):
            return axis
    raise ValueError(f"layer {name!r}: dora_scale has shape {shape}; expected {magnitude_shape(spec, 'output')} "
                     f"(per output channel) or {magnitude_shape(spec, 'input')} (per input channel)")


@dataclass
class DecomposableConfig(AdapterConfig):
    """Config fields of the algorithms that take a DoRA stage: ``use_dora`` (PEFT's name; LyCORIS's
    ``dora_wd``/``weight_decompose``) and ``dora_axis`` (``"output"``, the default of PEFT and LyCORIS ≥
    3.2, or ``"input"``)."""

    aliases = {"dora_wd": "use_dora", "weight_decompose": "use_dora"}
    use_dora: bool = False
    dora_axis: str = "output"

    def validate(self):
        check_choice("dora_axis", self.dora_axis, AXES)


@dataclass(frozen=True, kw_only=True)
class DecomposableSettings(Settings):
    """Settings fields of the algorithms that take a DoRA stage (``Algorithm.decomposable``).

    * ``dora``: the axis of the stage's norm (``"output"`` or ``"input"``, :data:`AXES`); ``None``: no DoRA.
    * ``dora_init``: the magnitude is still relative (a new adapter from ``resolve``): the layer sets it
      from its weight when attaching (:func:`init_params`) and keeps the settings with ``dora_init=False``.
    """

    dora: str | None = None
    dora_init: bool = False


# ---- what the additive algorithms call -------------------------------------------------------------
def resolve(config, spec) -> dict:
    """The :class:`DecomposableSettings` fields of a config's DoRA stage, as keyword arguments:
    ``{"dora": axis, "dora_init": True}`` or ``{}``."""
    if not getattr(config, "use_dora", False):
        return {}
    return {"dora": config.dora_axis, "dora_init": True}


def init_params(spec, settings: DecomposableSettings, init_weights, generator=None) -> dict[str, torch.Tensor]:
    """``{"dora_scale": relative magnitude}``: ones (``init_weights=True``: the layer then sets
    ``m = ‖W + ΔW‖``, so the stage starts as ``W + ΔW``) or ``1 + N(0, 0.1)`` (``False``: a
    non-identity magnitude, for tests). The layer multiplies it by ``‖W + ΔW‖`` when attaching."""
    axis = settings.dora
    if not axis:
        return {}
    magnitude = torch.ones(magnitude_shape(spec, axis))
    if init_weights is False:
        with torch.no_grad():
            magnitude.normal_(1.0, 0.1, generator=generator)
    return {KEY: magnitude}


def file_settings(spec, tensors: dict, name: str = "") -> dict:
    """The :class:`DecomposableSettings` fields of a file module's tensors (in our layout), as keyword
    arguments: ``{"dora": axis}`` when they carry ``dora_scale``, else ``{}``."""
    return {"dora": axis_of(tensors[KEY], spec, name)} if KEY in tensors else {}


def magnitude_from_weight(relative: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor, axis: str) -> torch.Tensor:
    """``m = relative ⊙ ‖W + ΔW‖``: the magnitude a new adapter starts from (:func:`init_params`)."""
    return relative * channel_norm(weight + delta, axis).to(relative.dtype)


# ---- PEFT's layout -----------------------------------------------------------------------------------
def from_peft(magnitude: torch.Tensor, spec, path: str) -> torch.Tensor:
    """PEFT's ``lora_magnitude_vector`` (``(out,)`` Linear, ``(1, out, 1, 1)`` Conv2d: one norm per output
    channel) -> our ``dora_scale`` ``(out, 1[, 1, 1])``."""
    if magnitude.numel() != spec.out_features:
        raise ValueError(f"layer {path!r}: lora_magnitude_vector has shape {tuple(magnitude.shape)}; the layer has "
                         f"{spec.out_features} outputs")
    return magnitude.reshape(magnitude_shape(spec, "output"))


def to_peft(magnitude: torch.Tensor, spec) -> torch.Tensor:
    """Our output-axis ``dora_scale`` -> PEFT's ``lora_magnitude_vector``."""
    return magnitude.reshape(1, -1, 1, 1) if spec.is_conv else magnitude.reshape(-1)


# ---- fused projections (:mod:`lycoris_lite.base.rows`) ----------------------------------------------
def split_magnitude(params: dict, settings, rows) -> dict:
    """A module's part of a fused adapter's DoRA magnitude: its rows on the output axis (each row's norm
    is its own); ``{}`` without DoRA. The input axis normalises every column over all of the fused
    matrix's rows, which no module holds alone: :class:`NotSplittable`."""
    axis = getattr(settings, "dora", None)
    if not axis:
        return {}
    if axis == "input":
        raise NotSplittable("its DoRA magnitude is normalised along the input axis (dora_scale (1, in)): each "
                            "column's norm runs over every row of the fused matrix, which no single module holds")
    return {KEY: take_rows(params[KEY], rows)}


def join_magnitude(parts: list, total: int) -> dict:
    """The fused magnitude of per-module output-axis DoRA magnitudes (``parts``: ``(rows, settings,
    tensors)`` covering every row); ``{}`` when none has DoRA; :class:`NotSplittable` otherwise."""
    axes = {getattr(settings, "dora", None) for _, settings, _ in parts}
    if axes == {None}:
        return {}
    if axes != {"output"}:
        raise NotSplittable("its modules' DoRA stages differ (or are on the input axis), which one fused "
                            "magnitude cannot hold")
    if sum(stop - start for rows, _, _ in parts for start, stop in rows) != total:
        raise NotSplittable("some rows of the fused matrix have no DoRA magnitude (a module without the adapter)")
    return {KEY: put_rows([(rows, t[KEY]) for rows, _, t in parts], total)}
