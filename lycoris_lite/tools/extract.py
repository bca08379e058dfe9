"""LoRA extraction: the best LoRA of a weight change, for one adapter or a fine-tuned model.

Each layer's weight change ``ΔW`` becomes a LoRA through :func:`lycoris_lite.tools.svd.lora_factors`
(truncated SVD; that module states the factors' layout, the rank rules and the SVD methods).

:func:`extract_lora` extracts from a fully fine-tuned model (UNet, text encoders) against its base;
:func:`adapter_to_lora` from an adapter attached to a model (any algorithm, through ``W_eff − W``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..base import portable
from ..algos.lora import LoRA, LoRAConfig
from ..io.formats.kohya import LayerEntry
from ..core.layer import AdapterLayer
from ..base.layer_kind import LayerSpec
from ..core.controller import AdapterController, controller_for
from ..io.files import components_of, COMPONENTS
from .svd import check_rank_choice, lora_factors


# ---- an adapter on a model ----------------------------------------------------------------------------
@torch.no_grad()
def adapter_delta(layer: AdapterLayer, adapter_name: str, multiplier: float = 1.0) -> torch.Tensor:
    """``ΔW`` of one adapter on one layer at ``multiplier``, base-weight shape, float32 (float64 for a
    float64 layer), from the layer's original weight (fused adapters left out).

    Additive algorithms give their ``delta_weight`` (the formula itself, no ``W + ΔW − W`` rounding);
    multiplicative ones ``L·W·R − W``, computed in float64 (on a CPU copy of the layer where its device
    has no float64: :func:`lycoris_lite.base.portable.float64_device`). A single adapter's change is linear in
    its multiplier (``W + s·(L·W·R − W)``, see :mod:`lycoris_lite.core.layer`), so this is ``multiplier · ΔW(1)``.
    The result is on the layer's device.
    """
    slot = layer.adapters[adapter_name]
    dtype = torch.float64 if layer.weight.dtype == torch.float64 else torch.float32
    if slot.algorithm.multiplicative:
        work = layer
        if not portable.supports_float64(layer.weight.device):
            work = copy.deepcopy(layer).to(portable.float64_device(layer.weight.device))
        base = work.effective_weight([]).double()
        delta = work.effective_weight([adapter_name], base=base, scales={adapter_name: 1.0}) - base
    else:
        delta = slot.algorithm.delta_weight(slot.tensors(dtype), layer.spec, slot.settings)
    return (delta * multiplier if multiplier != 1.0 else delta).to(layer.weight.device, dtype)


def layer_delta(layer: AdapterLayer, adapter_name: str) -> torch.Tensor:
    """``W_eff − W`` of one adapter on one layer at the adapter's current multiplier."""
    return adapter_delta(layer, adapter_name, layer.adapters[adapter_name].scale)


def lora_entry(spec: LayerSpec, path: str, down: torch.Tensor, up: torch.Tensor) -> LayerEntry:
    """A LoRA layer entry with scale 1 (``alpha = r``) from factors in the layer's layout."""
    tensors = {"lora_down": down.float().contiguous(), "lora_up": up.float().contiguous()}
    return LayerEntry(LoRA, LoRA.settings_from_tensors(spec, tensors, float(down.shape[0]), path), tensors)


def adapter_to_lora(components: dict[str, nn.Module], adapter_name: str, rank: int | None = None, progress=None, *,
                    energy: float | None = None, method: str = "auto"
                    ) -> tuple[dict[str, dict[str, LayerEntry]], dict[str, dict[str, float]]]:
    """A LoRA of adapter ``adapter_name`` (at its current multiplier) on every layer that carries it.

    Returns ``({component: {module path: LayerEntry}}, {component: {module path: relative error}})``;
    the entries can be attached with :func:`attach_entries` and written by ``files.save_adapter``.
    ``progress(component, path, error)`` is called after each layer.
    """
    check_rank_choice(rank, energy, None, method)
    entries: dict[str, dict[str, LayerEntry]] = {}
    errors: dict[str, dict[str, float]] = {}
    for component, model in components.items():
        ctrl = controller_for(model, create=False)
        if ctrl is None or adapter_name not in ctrl.configs:
            continue
        for path, layer in ctrl.layers():
            if adapter_name not in layer.adapters:
                continue
            f = lora_factors(layer_delta(layer, adapter_name), rank, energy=energy, method=method)
            entries.setdefault(component, {})[path] = lora_entry(layer.spec, path, f.down, f.up)
            errors.setdefault(component, {})[path] = f.error
            if progress is not None:
                progress(component, path, f.error)
    if not entries:
        raise ValueError(f"no adapter named {adapter_name!r} on these components")
    return entries, errors


def attach_entries(components: dict[str, nn.Module], adapter_name: str, entries: dict[str, dict[str, LayerEntry]],
                   config_class=LoRAConfig, activate: bool = False) -> None:
    """Attach per-layer entries as adapter ``adapter_name`` (validated on every component first)."""
    plans = {c: {p: (e.algorithm, e.settings, e.tensors) for p, e in layers.items()} for c, layers in entries.items()}
    for c, plan in plans.items():
        # a model without adapters gets no controller until everything has validated
        checker = controller_for(components[c], create=False) or AdapterController(components[c])
        checker.check_plan(adapter_name, plan)
    for c, plan in plans.items():
        ranks = sorted({e.settings.rank for e in entries[c].values() if e.settings.rank is not None})
        fields = {"target_modules": sorted(plan)}
        if ranks:
            fields["r"] = ranks[-1]
        controller_for(components[c]).attach(adapter_name, plan, config_class(**fields), activate=activate)


# ---- a fine-tuned model against its base -----------------------------------------------------------
@dataclass
class Extraction:
    """What :func:`extract_lora` found, per component (``unet``, ``text_encoder`` …) and module path.

    * ``entries``: the LoRA of each changed Linear/Conv2d weight (scale 1);
    * ``errors``: each layer's relative error ``‖ΔW − up·down‖_F / ‖ΔW‖_F``, as measured;
    * ``methods``: the SVD each layer used (``"randomized"`` or ``"full"``);
    * ``unrepresented``: every other changed tensor (biases, norms, embeddings, grouped convs …), which
      a LoRA cannot hold, with its relative change ``‖Δ‖_F / ‖base‖_F``.
    """

    entries: dict[str, dict[str, LayerEntry]] = field(default_factory=dict)
    errors: dict[str, dict[str, float]] = field(default_factory=dict)
    methods: dict[str, dict[str, str]] = field(default_factory=dict)
    unrepresented: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, dict[str, int]]:
        return {c: {p: e.settings.r for p, e in layers.items()} for c, layers in self.entries.items()}

    def _all_errors(self) -> list[float]:
        return [e for layers in self.errors.values() for e in layers.values()]

    @property
    def max_error(self) -> float:
        return max(self._all_errors(), default=0.0)

    @property
    def mean_error(self) -> float:
        values = self._all_errors()
        return sum(values) / len(values) if values else 0.0

    def attach(self, target, adapter_name: str = "extracted", activate: bool = True) -> None:
        """Attach the LoRA to ``target`` (the base pipeline, a ``{component: model}`` dict or a model)."""
        attach_entries(components_of(target), adapter_name, self.entries, activate=activate)


def _state_of(model) -> Mapping[str, torch.Tensor]:
    if isinstance(model, nn.Module):
        return model.state_dict()
    if isinstance(model, Mapping):
        return model
    raise TypeError(f"expected a model or a state dict, got {type(model).__name__}")


def _tuned_components(tuned, bases: dict[str, nn.Module]) -> dict[str, Mapping[str, torch.Tensor]]:
    """``{component: state dict}`` of ``tuned``: a pipeline, a dict of models or state dicts, a model or a
    state dict (for a single base component)."""
    if isinstance(tuned, nn.Module) or (isinstance(tuned, Mapping) and not set(tuned) <= set(COMPONENTS)):
        if len(bases) != 1:
            raise ValueError(f"tuned is one model but the base has {sorted(bases)}; give a pipeline or "
                             "a {component: model} dict")
        return {next(iter(bases)): _state_of(tuned)}
    if isinstance(tuned, Mapping):
        found = dict(tuned)
    else:
        found = {c: getattr(tuned, c, None) for c in COMPONENTS}
    found = {c: _state_of(m) for c, m in found.items() if m is not None}
    extra = sorted(set(found) - set(bases))
    if extra:
        raise ValueError(f"tuned has {extra} but the base has not (it has {sorted(bases)})")
    if not found:
        raise ValueError("tuned has none of the base's components")
    return found


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b or (a.data_ptr() == b.data_ptr() and a.device == b.device and a.shape == b.shape
                  and a.stride() == b.stride() and a.dtype == b.dtype):
        return True
    return torch.equal(a, b.to(device=a.device, dtype=a.dtype))


def _relative_change(base: torch.Tensor, tuned: torch.Tensor) -> float:
    device, wide = portable.float64_device(base.device), torch.float64
    diff = torch.linalg.vector_norm(tuned.to(device, wide) - base.to(device, wide))
    norm = torch.linalg.vector_norm(base.to(device, wide))
    return float(diff / norm) if norm > 0 else math.inf


@torch.no_grad()
def extract_lora(base, tuned=None, rank: int | None = None, *, energy: float | None = None,
                 max_rank: int | None = None, method: str = "auto", seed: int = 0, progress=None):
    """A LoRA of a fully fine-tuned model against its base, with each layer's relative error.

    ``base``: a pipeline, a ``{component: model}`` dict or one model (then called ``unet`` if it is a
    UNet, else ``transformer``); ``tuned``: the same structure, each model possibly a state dict (the
    benchmark shares every unchanged tensor with the base this way). Both must have the same tensor
    names and shapes. Every Linear and Conv2d
    (``groups=1``) weight of the base that differs in ``tuned`` gets a LoRA of ``rank`` (or of the
    ``energy`` fraction, see :mod:`lycoris_lite.tools.svd`; neither: exact, at the numerical rank), computed on
    the base's device. Returns an :class:`Extraction`; ``result.attach(base, name)`` attaches it,
    ``files.save_adapter`` writes it. ``progress(component, path, error)`` is called after each layer.

    ``extract_lora(delta_weight, rank)`` with one tensor is the per-tensor form
    (:func:`~lycoris_lite.tools.svd.lora_factors`), returning ``(lora_down, lora_up, relative error)``.

    Args:
        base, tuned: as above (or a ``ΔW`` tensor and a rank).
        rank, energy, max_rank: the rank rule (one of ``rank`` or ``energy``; ``max_rank`` caps ``energy``).
        method: ``"auto"``, ``"full"`` or ``"randomized"`` (see :mod:`lycoris_lite.tools.svd`); ``seed`` for the latter.
        progress: called as ``progress(component, path, error)`` after each layer.

    Returns:
        An :class:`Extraction`, or ``(lora_down, lora_up, relative error)`` for a tensor.

    Raises:
        ValueError: no tuned model, adapters attached to the base, another architecture or other shapes,
            or a bad rank rule.
    """
    if isinstance(base, torch.Tensor):
        down, up, error, _ = lora_factors(base, tuned if rank is None else rank, energy=energy,
                                          max_rank=max_rank, method=method, seed=seed)
        return down, up, error
    check_rank_choice(rank, energy, max_rank, method)
    if tuned is None:
        raise ValueError("extract_lora needs the tuned model")
    bases = components_of(base)
    tuneds = _tuned_components(tuned, bases)
    result = Extraction()
    for component, tuned_state in tuneds.items():
        model = bases[component]
        if any(isinstance(m, AdapterLayer) for m in model.modules()):
            raise ValueError(f"the base {component} has adapters attached; unload() them before extracting")
        base_state = model.state_dict()
        missing, extra = sorted(set(base_state) - set(tuned_state)), sorted(set(tuned_state) - set(base_state))
        if missing or extra:
            raise ValueError(f"tuned {component} is not the base's architecture: missing {missing[:3]}, "
                             f"extra {extra[:3]} ({len(missing)} / {len(extra)} tensors)")
        bad = [k for k in base_state if tuple(base_state[k].shape) != tuple(tuned_state[k].shape)]
        if bad:
            raise ValueError(f"tuned {component} has other shapes than the base: {bad[0]} is "
                             f"{tuple(tuned_state[bad[0]].shape)}, the base's {tuple(base_state[bad[0]].shape)}")
        layers = {}
        for path, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and getattr(module, "groups", 1) == 1:
                layers[f"{path}.weight"] = (path, LayerSpec.from_module(module, path))
        for key, base_value in base_state.items():
            tuned_value = tuned_state[key]
            if _same(base_value, tuned_value):
                continue
            if key not in layers or not base_value.is_floating_point():
                result.unrepresented.setdefault(component, {})[key] = _relative_change(base_value, tuned_value)
                continue
            path, spec = layers[key]
            dtype = torch.float64 if base_value.dtype == torch.float64 else torch.float32
            delta = tuned_value.to(base_value.device, dtype) - base_value.to(dtype)
            if not torch.isfinite(delta).all():
                raise ValueError(f"tuned {component}.{key} has NaN/Inf values")
            f = lora_factors(delta, rank, energy=energy, max_rank=max_rank, method=method, seed=seed)
            del delta
            result.entries.setdefault(component, {})[path] = lora_entry(spec, path, f.down, f.up)
            result.errors.setdefault(component, {})[path] = f.error
            result.methods.setdefault(component, {})[path] = f.method
            if progress is not None:
                progress(component, path, f.error)
    if not result.entries:
        others = sorted(k for changed in result.unrepresented.values() for k in changed)
        raise ValueError("no Linear/Conv2d weight differs between base and tuned: nothing to extract"
                         + (f" (other tensors differ: {others[:5]})" if others else ""))
    return result


__all__ = ["Extraction", "adapter_delta", "adapter_to_lora", "attach_entries", "extract_lora", "layer_delta"]
