"""The adapter stack of one model: which adapters run, at what weights, and whether adapters are on.

One immutable value, held by the model's :class:`~lycoris_lite.core.controller.AdapterController`
(``controller.stack``) and applied by it in one place (``apply_stack``: checked first, then written to
the layers; the layers' ``active``/``disabled`` lists and the slots' ``scale`` are that value laid out
for the forward, written nowhere else). The pipeline and the web UI build new stacks and hand them
over; nothing rolls back, because nothing is written before the whole stack has been checked.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

#: an adapter's weight: one number for every layer, or ``{layer path: number}`` (layers not named: ``default``)
Weight = float | Mapping[str, float]


class FrozenMapping(Mapping):
    """A read-only mapping (a copy of the one given) that copies and pickles like any value, as
    ``copy.deepcopy(pipe)`` needs (``MappingProxyType`` does neither)."""

    __slots__ = ("_items",)

    def __init__(self, items=()):
        object.__setattr__(self, "_items", dict(items))

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self) -> Iterator:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __setattr__(self, name, value):
        raise AttributeError("a FrozenMapping cannot be changed")

    def __reduce__(self):
        return FrozenMapping, (self._items,)

    def __repr__(self) -> str:
        return f"FrozenMapping({self._items!r})"


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LayerWeights:
    """Per-layer weights of one adapter: ``layers[path]``, else ``default``."""

    default: float = 1.0
    layers: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "default", _number(self.default, "an adapter weight"))
        object.__setattr__(self, "layers", FrozenMapping(
            {str(k): _number(v, f"the weight of layer {k!r}") for k, v in dict(self.layers).items()}))

    def at(self, layer: str) -> float:
        return self.layers.get(layer, self.default)


@dataclass(frozen=True)
class Stack:
    """``names``: the active adapters, in stack order (on each layer they compose in the order they
    were added: see :mod:`lycoris_lite.core.layer`); ``weights``: each known adapter's weight (active or
    not: a weight set on an inactive adapter is kept for when it runs), a number or
    :class:`LayerWeights`; ``enabled``: False runs the base model (fused adapters stay in the weights).
    Missing weights are 1."""

    names: tuple[str, ...] = ()
    weights: Mapping[str, LayerWeights] = field(default_factory=dict)
    enabled: bool = True

    def __post_init__(self):
        names = (self.names,) if isinstance(self.names, str) else tuple(self.names)
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names repeat in {list(names)}")
        weights = {n: w if isinstance(w, LayerWeights) else LayerWeights(w) for n, w in dict(self.weights).items()}
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "weights", FrozenMapping(weights))
        object.__setattr__(self, "enabled", bool(self.enabled))

    def weight(self, name: str, layer: str) -> float:
        """The weight of adapter ``name`` on ``layer``."""
        found = self.weights.get(name)
        return 1.0 if found is None else found.at(layer)

    def with_names(self, names) -> "Stack":
        return replace(self, names=tuple(names))

    def with_weights(self, weights: Mapping[str, Weight]) -> "Stack":
        """This stack with the given adapters' weights replaced (the others kept)."""
        return replace(self, weights={**self.weights, **weights})

    def with_enabled(self, enabled: bool) -> "Stack":
        return replace(self, enabled=enabled)

    def without(self, names) -> "Stack":
        """This stack with ``names`` gone (out of the stack and their weights forgotten)."""
        gone = set(names)
        return Stack(tuple(n for n in self.names if n not in gone),
                     {n: w for n, w in self.weights.items() if n not in gone}, self.enabled)
