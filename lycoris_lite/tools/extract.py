"""LoRA extraction: the best LoRA of a weight change, for one tensor, one adapter or a fine-tuned model.

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

:func:`extract_lora` extracts from a fully fine-tuned model (UNet, text encoders) against its base;
:func:`adapter_to_lora` from an adapter attached to a model (any algorithm, through ``W_eff − W``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from ..base import portable
from ..algos.lora import LoRA, LoRAConfig
from ..io.formats.kohya import LayerEntry
from ..core.layer import AdapterLayer
from ..base.layer_kind import LayerSpec
from ..core.controller import AdapterController, controller_for
from ..io.files import components_of, COMPONENTS

METHODS = ("auto", "randomized", "full")
#: power iterations of the randomized SVD before ``auto`` gives up on it
MAX_POWER_ITERATIONS = 8
#: converged when one more iteration captures less than this fraction of the still uncaptured energy
CONVERGENCE = 1e-2
#: first rank tried by the randomized SVD in ``energy`` mode without ``max_rank`` (doubled as needed)
ENERGY_START_RANK = 64


# ---- one matrix ------------------------------------------------------------------------------------
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
    ``q × q`` Gram matrix in float64 (LAPACK on the wide matrix itself is many times slower), on
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


# ---- an adapter on a model ----------------------------------------------------------------------------
@torch.no_grad()
def adapter_delta(layer: AdapterLayer, adapter_name: str, multiplier: float = 1.0) -> torch.Tensor:
    """``ΔW`` of one adapter on one layer at ``multiplier``, base-weight shape, float32 (float64 for a
    float64 layer), from the layer's original weight (merged adapters left out).

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

    ``base``: a pipeline, a ``{component: model}`` dict or one model (then called ``unet``); ``tuned``:
    the same structure, each model possibly a state dict (the benchmark shares every unchanged tensor
    with the base this way). Both must have the same tensor names and shapes. Every Linear and Conv2d
    (``groups=1``) weight of the base that differs in ``tuned`` gets a LoRA of ``rank`` (or of the
    ``energy`` fraction, see the module docstring; neither: exact, at the numerical rank), computed on
    the base's device. Returns an :class:`Extraction`; ``result.attach(base, name)`` attaches it,
    ``files.save_adapter`` writes it. ``progress(component, path, error)`` is called after each layer.

    ``extract_lora(delta_weight, rank)`` with one tensor is the per-tensor form
    (:func:`lora_factors`), returning ``(lora_down, lora_up, relative error)``.

    Args:
        base, tuned: as above (or a ``ΔW`` tensor and a rank).
        rank, energy, max_rank: the rank rule (one of ``rank`` or ``energy``; ``max_rank`` caps ``energy``).
        method: ``"auto"``, ``"svd"`` or ``"randomized"`` (see the module docstring); ``seed`` for the latter.
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


__all__ = ["METHODS", "Extraction", "LoRAFactors", "adapter_delta", "adapter_to_lora", "attach_entries", "extract_lora",
           "layer_delta", "lora_factors", "randomized_svd", "truncated_svd"]
