"""One adapter on one layer: :class:`AdapterSlot` (its tensors, algorithm, settings and the user's
multiplier) and :class:`_Use` (an adapter as one computation uses it), with the rules every slot
follows: the compute dtype of adapters on a layer (:func:`compute_dtype`) and tensors that own their
storage (:func:`_own_storage`). :class:`~lycoris_lite.core.layer.AdapterLayer` holds the slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .buffers import is_file_block
from ..base.registry import Algorithm
from ..base.settings import Settings


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Adapters on half-precision layers keep (and compute in) float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy when it is a view into a larger buffer or not 64-byte aligned: kept as a
    parameter, a view would hold the whole buffer, and MKL's GEMMs round differently for operands off
    16-byte alignment, so a reloaded adapter would not compute bit for bit like the one saved. The
    tensors our reader gives (:func:`lycoris_lite.core.buffers.read_block`) are aligned views into a block
    holding one file's tensors and nothing else: they are kept as they are."""
    if t.data_ptr() % 64 == 0 and t.is_contiguous() and is_file_block(t):
        return t
    if t.data_ptr() % 64 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return t.clone(memory_format=torch.contiguous_format)
    return t


class AdapterSlot(nn.Module):
    """One adapter on one layer: its tensors (registered by their file key), algorithm, settings and
    the user's multiplier.

    The multiplier is held twice, as one value: :attr:`scale` (a Python float, what fusing, saving and
    the pipeline read) and the 0-d buffer ``multiplier`` (what the forward reads: ``scale`` times the
    part of the settings' ``alpha / r`` that :meth:`~lycoris_lite.base.registry.Algorithm.forward_gain`
    moves out of :attr:`forward_settings`), both written only by the ``scale`` and ``settings``
    setters. The forward never branches on its value, so changing the weight, or hotswapping a file
    with another alpha, never retraces a compiled forward; only a change to or from 0 (:attr:`muted`:
    the adapter leaves the forward) does. Calling the slot returns ``(tensors, multiplier)``: a module call, so offload hooks
    on the slot (accelerate's sequential CPU offload) bring its tensors to the device first."""

    def __init__(self, algorithm: type[Algorithm], settings: Settings, params: dict[str, torch.Tensor],
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        # plain attributes straight into __dict__: what nn.Module.__setattr__ does for them, without its
        # per-call checks (they add up over a UNet's layers)
        self.__dict__.update(algorithm=algorithm, _scale=1.0, _step=1.0, muted=False)
        for key, value in params.items():  # frozen: the controller's set_adapter makes the active ones trainable
            self.register_parameter(key, nn.Parameter(value, requires_grad=False))
        self.register_buffer("multiplier", torch.ones((), dtype=dtype, device=device), persistent=False)
        self.settings = settings

    @property
    def algorithm_name(self) -> str:
        return self.algorithm.name

    @property
    def scale(self) -> float:
        """The user's multiplier ``s`` (``W + s·ΔW``, or ``M_s = I + s·(M − I)``)."""
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        value = float(value)
        self.__dict__.update(_scale=value, muted=value == 0.0)
        self._fill_multiplier()

    @property
    def step_factor(self) -> float:
        """A factor on :attr:`scale` for the current denoising step (a per-step schedule; 1 otherwise).
        Only the multiplier tensor changes: never :attr:`muted`, so a compiled forward is not retraced."""
        return self._step

    @step_factor.setter
    def step_factor(self, value: float) -> None:
        self.__dict__["_step"] = float(value)
        self._fill_multiplier()

    @property
    def settings(self) -> Settings:
        """The per-layer settings (the algorithm's ``settings_class``: rank, ``alpha / r``, block sizes…);
        set as a whole (a hotswap)."""
        return self._settings

    @settings.setter
    def settings(self, value: Settings) -> None:
        forward_settings, gain = self.algorithm.forward_gain(value)
        self.__dict__.update(_settings=value, forward_settings=forward_settings, _gain=gain)
        self._fill_multiplier()

    def _fill_multiplier(self) -> None:
        """``multiplier = scale · step_factor · g`` (:meth:`~lycoris_lite.base.registry.Algorithm.forward_gain`),
        written in place: a compiled forward keeps reading the same buffer."""
        with torch.no_grad():
            self.multiplier.fill_(self._scale * self._step * self._gain)

    def forward(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``(tensors by key, multiplier)`` as the layer's forward uses them (with
        :attr:`forward_settings`): views, which keep the
        storage they have now (and pass gradients to the parameters) when an offload hook swaps the
        parameters' ``.data`` back out as this call returns (diffusers' group offloading)."""
        return {k: v.view_as(v) for k, v in self._parameters.items()}, self.multiplier.view_as(self.multiplier)

    def set_trainable(self, trainable: bool) -> None:
        """``requires_grad_(trainable)`` on the tensors whose flag differs (no walk of the module tree)."""
        for p in self._parameters.values():
            if p.requires_grad != trainable:
                p.requires_grad_(trainable)

    def tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        params = self._parameters
        if dtype is None or all(v.dtype == dtype for v in params.values()):
            return dict(params)
        return {k: v.to(dtype) for k, v in params.items()}

    def extra_repr(self) -> str:
        return f"{self.algorithm_name}, scale={self.scale}"


@dataclass
class _Use:
    """An adapter as one computation uses it: its slot, its tensors (in the computation's dtype), its
    multiplier and the settings that go with it: the slot's float ``scale`` and ``settings`` when
    fusing; in the forward its ``multiplier`` tensor and ``forward_settings`` (or the number 1 and the
    settings while training at scale 1, which keeps the orthogonal fast paths)."""

    slot: AdapterSlot
    params: dict[str, torch.Tensor]
    multiplier: float | torch.Tensor
    settings: Settings

    @property
    def algorithm(self) -> type[Algorithm]:
        return self.slot.algorithm
