"""Adapters on fused projections, mapped between an original module and the diffusers modules that hold
its rows (:mod:`.original` says which): :func:`split_entry` when reading, :func:`join_entries` when
writing a file in original names.

Each algorithm splits and joins itself (``Algorithm.split_rows`` / ``join_rows``, exact or
:class:`~lycoris_lite.base.registry.NotSplittable` with the reason). What remains exact where an
algorithm has no per-module form: an additive adapter's row view (each module keeps the fused adapter
and takes its rows of ``ΔW``) and, for an output-side rotation, the dense fused view (the fused delta
computed once from the modules' weights, each keeping its rows). Nothing is approximated: the one case
left (DoRA normalised along the input axis) is refused with its reason.
"""

from __future__ import annotations

import torch
from torch import nn

from ...algos.dora import split_magnitude
from ...base.layer_kind import LayerSpec
from ...base.registry import LayerEntry, NotSplittable
from ...base.rows import (DELTA_KEY, RowViewBase, RowViewSettings, dense_rows_view, fused_delta, put_rows, row_count,
                          row_view, same_tensors, take_rows)
from ...core.quantized import quantized_weight
from ...core.targets import base_module_at, submodule
from .original import OriginalModule, Part, module_original


def fused_spec(om: OriginalModule) -> LayerSpec:
    """The original (fused) matrix as a layer: ``out_features × in_features`` (every original module
    with parts is a linear layer)."""
    return LayerSpec("linear", om.out_features, om.in_features)


def split_entry(entry: LayerEntry, om: OriginalModule, model: nn.Module) -> dict[str, LayerEntry]:
    """``{diffusers path: LayerEntry}`` of an adapter read on original module ``om`` (on
    :func:`fused_spec`): the algorithm's exact split (``Algorithm.split_rows``), else, for an additive
    adapter, the module's row view of it (:func:`~lycoris_lite.base.rows.row_view`). ``ValueError`` with
    the reason when no exact form exists; nothing is ever approximated."""
    algo, settings = entry.algorithm, entry.settings
    spec = fused_spec(om)
    parts = [(LayerSpec.from_module(base_module_at(model, p.path), p.path), p.rows) for p in om.parts]
    for (tspec, rows), part in zip(parts, om.parts):
        if tspec.in_features != spec.in_features or tspec.out_features != row_count(rows):
            raise ValueError(f"{entry.source}: {part.path} is not {row_count(rows)}×{spec.in_features} (the model "
                             f"changed under its name map)")
    try:
        pieces = algo.split_rows(entry.tensors, spec, settings, parts)
    except NotSplittable as exc:
        where = f"{entry.source} ({algo.name} on the fused {om.name} = {', '.join(p.path for p in om.parts)})"
        if algo.multiplicative:
            return _dense_view(entry, om, spec, parts, model, where, exc)
        view = row_view(algo)
        try:
            pieces = [(RowViewSettings(inner=settings, fused=spec, rows=rows),
                       {**{k: v for k, v in entry.tensors.items() if k != "dora_scale"},
                        **split_magnitude(entry.tensors, settings, rows)}) for _, rows in parts]
        except NotSplittable as inner:
            raise ValueError(f"{where}: no exact per-module form: {inner}. It is not loaded approximately") from None
        algo = view
    return {part.path: LayerEntry(algo, s, t, entry.source) for part, (s, t) in zip(om.parts, pieces)}


def _dense_view(entry: LayerEntry, om: OriginalModule, spec: LayerSpec, parts, model: nn.Module, where: str,
                reason: Exception) -> dict[str, LayerEntry]:
    """Each module's rows of the fused delta of a rotation with no per-module form
    (:func:`~lycoris_lite.base.rows.dense_rows_view`), from the modules' base weights now."""
    fused = put_rows([(p.rows, _base_weight(model, p.path).detach().to(torch.float64)) for p in om.parts],
                     om.out_features)
    try:
        delta = fused_delta(entry.algorithm, entry.tensors, spec, entry.settings, fused)
    except NotSplittable as exc:
        raise ValueError(f"{where}: no exact per-module form: {exc}") from None
    view = dense_rows_view(entry.algorithm)
    out = {}
    for part, (tspec, rows) in zip(om.parts, parts):
        settings = RowViewSettings(inner=entry.settings, fused=spec, rows=rows)
        tensors = {**entry.tensors, DELTA_KEY: take_rows(delta, rows).to(torch.float32).contiguous()}
        out[part.path] = LayerEntry(view, settings, tensors, entry.source)
    del reason  # the per-module split's reason: the dense view is the exact form that remains
    return out


def _base_weight(model: nn.Module, path: str) -> torch.Tensor:
    """A module's original weight as floats (its layer's backup when adapters are fused into it; a
    quantized layer's weight dequantized, a temporary)."""
    layer = submodule(model, path)
    if hasattr(layer, "float_weight"):
        return layer.float_weight()
    module = base_module_at(model, path)
    quant = quantized_weight(module)
    return quant.dequantize(module) if quant is not None else module.weight


def join_entries(entries: dict[str, LayerEntry], model: nn.Module) -> dict[str, tuple[OriginalModule, LayerEntry]]:
    """The inverse of :func:`split_entry` for writing a file in original names: ``{original name:
    (OriginalModule, LayerEntry on it)}`` for every module of ``entries`` (one component's, by diffusers
    path). Row views of one fused adapter become it again; split adapters are joined by their
    algorithm's ``join_rows``. ``ValueError`` naming the module and the reason when no exact fused form
    exists."""
    out: dict[str, tuple[OriginalModule, LayerEntry]] = {}
    by_path = module_original(model)
    missing = sorted(p for p in entries if p not in by_path)
    if missing:
        raise ValueError(f"no original name for {missing[:5]}")
    groups: dict[str, list[tuple[int, str]]] = {}
    for path in entries:
        om, i = by_path[path]
        groups.setdefault(om.name, []).append((i, path))
    for name, members in groups.items():
        om = by_path[members[0][1]][0]
        if om.is_rename:
            out[name] = (om, entries[members[0][1]])
            continue
        members.sort()
        chosen = [entries[path] for _, path in members]
        out[name] = (om, _join(om, [(om.parts[i], e) for (i, _), e in zip(members, chosen)], model))
    return out


def _join(om: OriginalModule, members: list[tuple[Part, LayerEntry]], model: nn.Module) -> LayerEntry:
    spec = fused_spec(om)
    first = members[0][1]
    where = f"{om.name} ({', '.join(part.path for part, _ in members)})"
    views = [e for _, e in members if isinstance(e.algorithm, type) and issubclass(e.algorithm, RowViewBase)]
    if views:
        inner = first.settings.inner if views[0] is first else None
        keys = [k for k in first.tensors if k not in ("dora_scale", DELTA_KEY)]
        if (len(views) != len(members) or len(members) != len(om.parts)
                or any(e.settings.inner != inner or e.settings.fused != spec for e in views)
                or not same_tensors([e.tensors for e in views], keys)):
            raise ValueError(f"{where}: these modules hold parts of different fused adapters; no one adapter on "
                             "the original module equals them")
        tensors = {k: first.tensors[k] for k in keys}
        if getattr(inner, "dora", None):
            tensors["dora_scale"] = put_rows([(part.rows, e.tensors["dora_scale"]) for part, e in members],
                                             spec.out_features)
        return LayerEntry(first.algorithm.inner, inner, tensors, first.source)
    algo = first.algorithm
    if any(e.algorithm is not algo for _, e in members):
        raise ValueError(f"{where}: the modules carry different algorithms "
                         f"({sorted({e.algorithm.name for _, e in members})}), which one fused module cannot hold")
    parts = [(LayerSpec.from_module(base_module_at(model, part.path), part.path), part.rows, e.settings, e.tensors)
             for part, e in members]
    try:
        settings, tensors = algo.join_rows(spec, parts)
    except NotSplittable as exc:
        raise ValueError(f"{where}: no exact {algo.name} on the fused original module: {exc}") from None
    return LayerEntry(algo, settings, tensors, first.source)


__all__ = ["RULES", "SAME_NAMES", "OriginalModule", "Part", "Rows", "fused_spec", "has_original_names", "join_entries",
           "module_original", "original_modules", "split_entry"]


__all__ = ["fused_spec", "join_entries", "split_entry"]
