"""Adapter arithmetic: a weighted combination of adapters as a new LoRA adapter, for every algorithm.

PEFT's ``add_weighted_adapter`` does this for LoRA; the definitions here are PEFT's for LoRA inputs and
the same rules applied to each adapter's weight change ``ΔW`` for every other algorithm.

Notation, per layer: adapter ``i`` with weight ``w_i``; ``ΔW_i`` its weight change at multiplier 1
(``alpha / r`` included; for OFT, BOFT and HRA the effective change ``L·W·R − W`` of the layer's original
weight, see :func:`lycoris_lite.tools.extract.adapter_delta`). The user's multipliers (``set_scale``) are left
out: the weights play their part. For a LoRA, ``A`` is ``lora_down`` and ``B`` ``lora_up``, and
``c_i = w_i · alpha_i / r_i``.

* ``linear``: plain LoRA inputs of one rank (PEFT): ``A' = Σ sign(c_i)·√|c_i|·A_i``, ``B' = Σ √|c_i|·B_i``,
  which has cross terms ``B_j A_i`` (not ``Σ w_i ΔW_i``; PEFT calls it a rough approximation). Any other
  algorithm: one algorithm with the same tensor shapes on each layer, and ``Σ w_i ΔW_i``.
* ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: plain LoRAs (PEFT): the rule below on the
  ``A``'s and on the ``B``'s separately, with the factor weights of ``linear``. Any other algorithm: one
  algorithm with the same tensor shapes on each layer, and the rule on the ``ΔW_i``.
* ``cat``: plain LoRAs (PEFT): ``A' = [c_1·A_1; c_2·A_2; …]``, ``B' = [B_1 B_2 …]`` (rank ``Σ r_i``),
  exactly ``Σ w_i ΔW_i``. Any algorithms, mixed: ``Σ w_i ΔW_i``.
* ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: any algorithms,
  mixed: the rule (``svd``: ``linear``) on the ``ΔW_i``, then the best rank-``svd_rank`` approximation
  ``B' = U_r·S_r``, ``A' = V_rᵀ`` (PEFT's split; with ``svd_clamp``, both clamped at that quantile of their
  entries, as PEFT does).

"Plain LoRA" is a LoRA without a Tucker core on every adapter of the layer. A ΔW-space result without
``_svd`` is stored exactly, as a LoRA at the numerical rank of the combined ΔW (up to
``min(out, in·kh·kw)``: large for OFT/BOFT and pruned ΔW; the ``*_svd`` types give a compact one).

Rules on task tensors ``t_i`` (PEFT's ``merge_utils``; ``density`` in (0, 1], 1 prunes nothing):

* ``linear`` (task arithmetic): ``Σ w_i t_i``;
* ``magnitude_prune``: keep the ``int(density · numel)`` largest ``|t_i|`` of each, then ``Σ w_i t_i``;
* ``dare_linear``: keep each entry with probability ``density`` and divide by it, then ``Σ w_i t_i``;
* ``ties`` / ``dare_ties``: magnitude / DARE pruning, the sign of ``Σ_i t_i`` (``"total"``) or of
  ``Σ_i sign(t_i)`` (``"frequency"``) elected per entry, then the mean of the weighted entries that
  agree with it (``Σ w_i t_i [agree] / max(1, #agree)``).

DARE draws one Bernoulli mask per task tensor, in order: components, layers (module order), then
``A``'s before ``B``'s (LoRA) or the ΔW's, adapters in the given order; ``generator`` makes it
reproducible (the global RNG otherwise, as PEFT).

The result is always a LoRA with scale 1 (``alpha = r``), attached as ``adapter_name`` to every
component that carries one of the adapters, on the union of their layers (an adapter missing from a
layer is left out there), inactive. Everything is computed and checked before anything is attached.
With one adapter whose layers are plain LoRAs the type becomes ``linear`` (PEFT's rule: an exact
``w·ΔW``); other single adapters keep their type, so ``svd`` turns one OFT into a LoRA of a chosen rank.
Unlike PEFT, an existing ``adapter_name`` is an error (PEFT returns silently).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .extract import adapter_delta, attach_entries, lora_entry
from .svd import full_svd, lora_factors, lora_layout
from ..io.formats.kohya import LayerEntry
from ..core.layer import AdapterLayer
from ..core.controller import controller_for

COMBINATION_TYPES = ("svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
                     "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")
RULES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")
#: types that combine parameters one to one: one algorithm and the same shapes on every layer
SAME_SHAPE_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_DENSITY_RULES = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def rule_of(combination_type: str) -> str:
    """The combination rule of a combination type (``svd`` → ``linear``, ``ties_svd`` → ``ties`` …)."""
    base = combination_type.removesuffix("_svd")
    return "linear" if base in ("svd", "cat") else base


# ---- rules on task tensors --------------------------------------------------------------------------
def prune(tensor: torch.Tensor, density: float, method: str, *, rescale: bool = False,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep a fraction ``density`` of ``tensor``'s entries: the largest in magnitude (``"magnitude"``) or
    a Bernoulli(``density``) draw (``"random"``, divided by ``density`` with ``rescale``)."""
    if density >= 1:
        return tensor
    if method == "magnitude":
        mask = torch.zeros_like(tensor).reshape(-1)
        top = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
        mask[top[1]] = 1
        return tensor * mask.reshape(tensor.shape)
    if method == "random":
        kept = tensor * torch.bernoulli(torch.full_like(tensor, density), generator=generator)
        return kept / density if rescale else kept
    raise ValueError(f"unknown pruning method {method!r}; 'magnitude' or 'random'")


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Entries (of task tensors stacked on dim 0) whose sign is the elected one (ties go to +)."""
    sign = stacked.sign()
    if method == "total":
        magnitude = stacked.sum(dim=0)
    elif method == "frequency":
        magnitude = sign.sum(dim=0)
    else:
        raise ValueError(f"unknown majority_sign_method {method!r}; one of {', '.join(SIGN_METHODS)}")
    return sign == torch.where(magnitude >= 0, 1, -1)


def disjoint_combine(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of the entries in ``mask`` (0 where none is): TIES's "disjoint merge"."""
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def combine_tensors(tensors: list[torch.Tensor], weights, rule: str = "linear", *, density: float | None = None,
                    majority_sign_method: str = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    """Combine same-shaped task tensors with one of :data:`RULES` (see the module docstring)."""
    if rule not in RULES:
        raise ValueError(f"unknown combination rule {rule!r}; one of {', '.join(RULES)}")
    if rule in _DENSITY_RULES:
        _check_density(density, rule)
        if rule in ("ties", "magnitude_prune"):
            tensors = [prune(t, density, "magnitude") for t in tensors]
        else:
            tensors = [prune(t, density, "random", rescale=True, generator=generator) for t in tensors]
    stacked = torch.stack(tensors, dim=0)
    w = torch.as_tensor(weights, dtype=stacked.dtype, device=stacked.device)
    weighted = stacked * w.reshape(-1, *([1] * (stacked.dim() - 1)))
    if rule in ("ties", "dare_ties"):
        return disjoint_combine(weighted, majority_sign_mask(stacked, majority_sign_method))
    return weighted.sum(dim=0)


def _check_density(density, what: str) -> None:
    if density is None:
        raise ValueError(f"{what} needs a density in (0, 1]")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")


# ---- one layer ---------------------------------------------------------------------------------------
def _plain_lora(slot) -> bool:
    return slot.algorithm.name == "lora" and set(slot.tensors()) == {"lora_down", "lora_up"}


def _describe(slot) -> str:
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in slot.named_parameters(recurse=False))
    return f"{slot.algorithm.name} ({shapes})"


def _factor_weights(weights, slots) -> tuple[list[float], list[float]]:
    """PEFT's per-factor weights: ``sign(c)·√|c|`` on ``A``, ``√|c|`` on ``B`` with ``c = w·alpha/r``."""
    on_a, on_b = [], []
    for weight, slot in zip(weights, slots):
        c = weight * slot.settings.scale
        on_a.append(math.sqrt(abs(c)) * (1 if c >= 0 else -1))
        on_b.append(math.sqrt(abs(c)))
    return on_a, on_b


def _combine_layer(layer: AdapterLayer, names: list[str], weights: list[float], combination_type: str,
                   options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_down, lora_up)`` of the combination on one layer (layer layout, scale 1)."""
    slots = [layer.adapters[n] for n in names]
    rule = rule_of(combination_type)
    combine = dict(density=options["density"], majority_sign_method=options["majority_sign_method"],
                   generator=options["generator"])
    if all(_plain_lora(s) for s in slots):
        if combination_type == "cat":
            downs = [s.tensors()["lora_down"].detach() * w * s.settings.scale for s, w in zip(slots, weights)]
            return torch.cat(downs, 0), torch.cat([s.tensors()["lora_up"].detach() for s in slots], 1)
        if combination_type in SAME_SHAPE_TYPES:
            on_a, on_b = _factor_weights(weights, slots)
            down = combine_tensors([s.tensors()["lora_down"].detach() for s in slots], on_a, rule, **combine)
            up = combine_tensors([s.tensors()["lora_up"].detach() for s in slots], on_b, rule, **combine)
            return down, up
    combined = combine_tensors([adapter_delta(layer, n) for n in names], weights, rule, **combine)
    if not combination_type.endswith("svd"):
        down, up, _, _ = lora_factors(combined, None)  # exact: the numerical rank
        return down, up
    flat = combined.reshape(combined.shape[0], -1)
    u, s, vh = full_svd(flat, options["svd_full_matrices"], options["svd_driver"])
    r = options["svd_rank"]
    up, down = u[:, :r] * s[:r], vh[:r]
    if options["svd_clamp"] is not None:
        high = torch.quantile(torch.cat([up.flatten(), down.flatten()]), options["svd_clamp"])
        up, down = up.clamp(-high, high), down.clamp(-high, high)
    return lora_layout(down, up, combined.shape)


# ---- a whole model or pipeline -------------------------------------------------------------------------
@dataclass
class Combination:
    """What :func:`combine_adapters` attached: the adapter's name, the type used (after the one-adapter
    rule) and the rank of each layer, ``{component: {module path: r}}``."""

    name: str
    combination_type: str
    ranks: dict[str, dict[str, int]]


def _check_arguments(adapters, weights, adapter_name, combination_type, density, majority_sign_method,
                     svd_rank, svd_clamp) -> tuple[list[str], list[float]]:
    adapters = [adapters] if isinstance(adapters, str) else list(adapters)
    if not adapters:
        raise ValueError("give at least one adapter to combine")
    if isinstance(weights, (int, float)) and not isinstance(weights, bool):
        weights = [weights] * len(adapters)
    weights = list(weights)
    if len(weights) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"weights must be finite numbers, got {w!r}")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter name must be a non-empty string without dots, got {adapter_name!r}")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"unknown combination_type {combination_type!r}; one of {', '.join(COMBINATION_TYPES)}")
    if rule_of(combination_type) in _DENSITY_RULES:
        _check_density(density, f"combination_type={combination_type!r}")
    elif density is not None:
        raise ValueError(f"density is used by ties, dare_* and magnitude_prune types, not by {combination_type!r}")
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"unknown majority_sign_method {majority_sign_method!r}; one of {', '.join(SIGN_METHODS)}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, (int, float))
                                  or not 0 < svd_clamp <= 1):
        raise ValueError(f"svd_clamp must be a quantile in (0, 1], got {svd_clamp!r}")
    return adapters, [float(w) for w in weights]


def _layers_to_combine(controllers, adapters, weights) -> dict[str, list]:
    """``{component: [(path, layer, [(adapter, weight) on that layer])]}`` for the layers carrying an input."""
    found = {}
    for c, ctrl in controllers.items():
        items = []
        for path, layer in ctrl.layers():
            pairs = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapters]
            if pairs:
                items.append((path, layer, pairs))
        if items:
            found[c] = items
    if not found:
        raise ValueError(f"no layer carries any of {adapters}")
    return found


def _check_same_shapes(layers: dict[str, list], combination_type: str) -> None:
    for c, items in layers.items():
        for path, layer, pairs in items:
            kinds = {(layer.adapters[a].algorithm.name,
                      tuple((k, tuple(v.shape)) for k, v in layer.adapters[a].named_parameters(recurse=False)))
                     for a, _ in pairs}
            if len(kinds) > 1:
                found = "; ".join(f"{a}: {_describe(layer.adapters[a])}" for a, _ in pairs)
                raise ValueError(f"combination_type={combination_type!r} needs adapters of one algorithm with the "
                                 f"same shapes on every layer; on {c}.{path}: {found}. 'cat' and the '*_svd' types "
                                 "combine different algorithms and ranks.")


def combine_adapters(components: dict[str, nn.Module], adapters: list[str], weights: list[float], adapter_name: str,
                     combination_type: str = "svd", *, density: float | None = None,
                     majority_sign_method: str = "total", svd_rank: int | None = None,
                     svd_clamp: float | None = None, svd_full_matrices: bool = False,
                     svd_driver: str | None = None, generator: torch.Generator | None = None,
                     activate: bool = False) -> Combination:
    """Attach ``adapter_name``, the weighted combination of ``adapters`` (see the module docstring), to
    each component of ``{component: model}`` (a UNet and text encoders) that carries one of them.

    ``svd_rank`` (``*_svd`` types) defaults to the largest LoRA rank among the inputs and is required
    when an input is not a LoRA; ``svd_full_matrices`` and ``svd_driver`` go to ``torch.linalg.svd``
    (PEFT's default is ``full_matrices=True``; the truncated factors are the same).

    Args:
        components: ``{component: model}``; each model carrying one of ``adapters`` gets the new one.
        adapters, weights: the inputs and their weights ``w_i`` (the result is ``Σ w_i ΔW_i`` for the
            exact types).
        adapter_name: the new adapter's name.
        combination_type: one of :data:`COMBINATION_TYPES` (PEFT's names).
        density, majority_sign_method, svd_rank, svd_clamp, svd_full_matrices, svd_driver: as PEFT's.
        generator: the random stream of the ``dare_*`` masks.
        activate: add the new adapter to the active set.

    Returns:
        A :class:`Combination` (ranks and each layer's relative error where the type approximates).

    Raises:
        ValueError: unknown adapters or types, a density outside (0, 1] (or one given to a type that does
            not use it), mismatched algorithms or shapes for the same-shape types, or an existing name.
            All or nothing: nothing is attached then.
    """
    adapters, weights = _check_arguments(adapters, weights, adapter_name, combination_type, density,
                                         majority_sign_method, svd_rank, svd_clamp)
    controllers = {c: controller_for(m, create=False) for c, m in components.items()}
    controllers = {c: ctrl for c, ctrl in controllers.items() if ctrl is not None}
    unknown = [a for a in adapters if not any(a in ctrl.configs for ctrl in controllers.values())]
    if unknown:
        known = sorted({n for ctrl in controllers.values() for n in ctrl.configs})
        raise ValueError(f"unknown adapter(s) {unknown}; these components have {known}")
    for c, ctrl in controllers.items():
        if adapter_name in ctrl.configs:
            raise ValueError(f"adapter {adapter_name!r} already exists on {c}; delete it first or pick another name")
        whole = [a for a in adapters if a in ctrl.configs and ctrl.configs[a].modules_to_save]
        if whole:
            raise ValueError(f"adapter(s) {whole} on {c} train whole modules (modules_to_save): not combinable")

    layers = _layers_to_combine(controllers, adapters, weights)
    slots = [layer.adapters[a] for items in layers.values() for _, layer, pairs in items for a, _ in pairs]
    if len(adapters) == 1 and all(_plain_lora(s) for s in slots):
        combination_type = "linear"
    if combination_type in SAME_SHAPE_TYPES:
        _check_same_shapes(layers, combination_type)
    if combination_type.endswith("svd") and svd_rank is None:
        not_lora = sorted({s.algorithm.name for s in slots if s.algorithm.name != "lora"})
        if not_lora:
            raise ValueError(f"combination_type={combination_type!r} with {', '.join(not_lora)} adapters needs "
                             "svd_rank (the rank of the resulting LoRA)")
        svd_rank = max(s.settings.r for s in slots)

    options = dict(density=density, majority_sign_method=majority_sign_method, generator=generator,
                   svd_rank=svd_rank, svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices,
                   svd_driver=svd_driver)
    entries: dict[str, dict[str, LayerEntry]] = {}
    with torch.no_grad():
        for c, items in layers.items():
            for path, layer, pairs in items:
                names, layer_weights = [a for a, _ in pairs], [w for _, w in pairs]
                down, up = _combine_layer(layer, names, layer_weights, combination_type, options)
                if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
                    raise ValueError(f"the combination on {c}.{path} has NaN/Inf values; nothing was attached")
                entries.setdefault(c, {})[path] = lora_entry(layer.spec, path, down, up)
    attach_entries({c: components[c] for c in entries}, adapter_name, entries, activate=activate)
    ranks = {c: {p: e.settings.r for p, e in layer_entries.items()} for c, layer_entries in entries.items()}
    return Combination(adapter_name, combination_type, ranks)


__all__ = ["COMBINATION_TYPES", "Combination", "RULES", "SIGN_METHODS", "combine_adapters", "combine_tensors",
           "disjoint_combine", "majority_sign_mask", "prune", "rule_of"]
