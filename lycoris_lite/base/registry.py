"""The one registry of algorithms.

Each algorithm is one module in :mod:`lycoris_lite.algos` holding its maths as pure functions, its
config class and an :class:`Algorithm` subclass registered with :func:`register`. Configs, file
detection, the trainer's ``--algo`` choices, the UI and the test matrix all iterate
:data:`ALGORITHMS`.

The contract an algorithm implements (all tensors float, shapes per :class:`LayerSpec`):

* ``resolve(config, spec, name) -> settings``: per-layer hyper-parameters (rank, scale, block sizes)
  as an instance of the algorithm's ``settings_class``, a frozen dataclass on
  :class:`~lycoris_lite.base.settings.Settings` declared next to its config (the LoRA family's on
  :class:`~lycoris_lite.base.settings.ScaledSettings`), raising ``ValueError`` when the config does not
  fit the layer. Every other method takes the settings as that dataclass and reads its fields.
* ``init_params(spec, settings, init_weights, generator) -> {key: tensor}``: the trainable tensors,
  named as in the algorithm's kohya/LyCORIS file keys.
* additive algorithms (``multiplicative = False``):
  ``delta_weight(params, spec, settings) -> ΔW`` (base-weight shape, ``alpha / r`` included) and
  ``delta_forward(x, params, spec, settings, multiplier) -> multiplier·Δy`` (the cheap activation route,
  used when ``use_activation_route`` says so; otherwise the layer folds ``W + s·ΔW`` into the base op).
  Optional: ``add_delta_forward(y, x, …)`` (inference: ``Δy`` added into the layer's output in place)
  and ``folded_route(params, spec, settings, multiplier) -> (route, tensors) | None`` (training alone
  on a layer: ``ΔW`` folded into the base op forward, the route's backward; see
  :func:`lycoris_lite.algos.common.folded_route`).
* multiplicative algorithms: ``transform(params, spec, settings) -> (input_op, output_op)`` with
  ``W' = output_op · W · input_op`` (either may be ``None``; see :mod:`lycoris_lite.base.operators`).
* ``regularization(params, settings) -> tensor | None``: an optional training penalty.

Decomposable algorithms (``decomposable = True``) have settings on
:class:`~lycoris_lite.algos.dora.DecomposableSettings` (``dora``: the axis, ``None`` without DoRA) and a
``dora_scale`` tensor when DoRA is on (:mod:`lycoris_lite.algos.dora`); settings from ``resolve`` then
also have ``dora_init=True``, and ``init_params`` gives the magnitude relative to ``‖W + ΔW‖``, which the
layer turns into the absolute one when it attaches the adapter (it alone sees the weight).

What the file formats, ``inspect`` and the UI need to know of an algorithm is declared here too, so a
new algorithm is one new module (``tests/test_toy_algorithm.py`` registers one):

* kohya/LyCORIS files: ``detect_keys``, ``kohya_keys``, ``matches``, ``from_kohya`` / ``to_kohya``
  (``settings_from_tensors`` computes the scale from the file's alpha), ``input_width``;
  ``lycoris_name``, ``lycoris_args`` and ``network_dim_alpha`` for kohya's ``ss_network_*`` metadata.
* PEFT folders: ``peft_type``, ``peft_keys``, ``peft_unsupported``, ``peft_fields``, ``check_peft_config``,
  ``from_peft`` / ``to_peft`` (one module's tensors and the ``adapter_config.json`` fields) and
  ``peft_config_fields``; an algorithm without ``peft_type`` has no PEFT form.
* every format: ``file_keys`` (all tensor names its modules carry), ``describe_size`` (``inspect``'s
  and the UI cards' size in words).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import ClassVar, Iterable

import torch

from .config import AdapterConfig
from .layer_kind import LayerSpec
from .operators import Operator
from .settings import ScaledSettings, Settings


class NotSplittable(ValueError):
    """An adapter on a fused matrix with no exact same-algorithm form per module, or per-module adapters
    with no exact fused form (the message says why): :meth:`Algorithm.split_rows` / ``join_rows``."""


#: Algorithm.param_shapes' memo
_SHAPES: dict[tuple, dict[str, tuple[int, ...]]] = {}


class Algorithm:
    name: ClassVar[str]
    config_class: ClassVar[type[AdapterConfig]]
    #: the frozen dataclass of the per-layer settings every method takes (see the module's docstring)
    settings_class: ClassVar[type[Settings]]
    multiplicative: ClassVar[bool] = False
    #: additive algorithms with a cheap activation route (``delta_forward``); the others are folded
    #: into the base op as ``W + s·ΔW``
    activation_route: ClassVar[bool] = True
    #: additive algorithms that take a DoRA stage (``use_dora``: settings ``dora``, tensor ``dora_scale``;
    #: see :mod:`lycoris_lite.algos.dora`)
    decomposable: ClassVar[bool] = False
    #: kohya/LyCORIS file keys (after ``<module>.``), one of which claims a module for this algorithm
    detect_keys: ClassVar[tuple[str, ...]] = ()
    #: our tensor key -> its kohya/LyCORIS file key, where they differ
    kohya_keys: ClassVar[dict[str, str]] = {}
    #: every tensor name (after ``<module>.``) this algorithm's modules carry in any file format
    #: (kohya/LyCORIS, PEFT): what names a module's algorithm in ``inspect`` and where the module path
    #: of a dotted (diffusers/PEFT) key ends; must include ``detect_keys`` and ``peft_keys``
    file_keys: ClassVar[frozenset[str]] = frozenset()
    #: LyCORIS's ``algo`` network argument (kohya's ``ss_network_args``); ``None``: :attr:`name`
    lycoris_name: ClassVar[str | None] = None
    #: our config field -> LyCORIS's network argument, written (as a string) when the field is set
    lycoris_args: ClassVar[dict[str, str]] = {}
    #: PEFT's ``peft_type`` for this algorithm; ``None``: PEFT has no such method (no PEFT folders)
    peft_type: ClassVar[str | None] = None
    #: the tensor names (after ``<module>.``) of a module in PEFT's layout
    peft_keys: ClassVar[tuple[str, ...]] = ()
    #: tensor names PEFT writes for features we do not have -> what the feature is (a clear refusal)
    peft_unsupported: ClassVar[dict[str, str]] = {}
    #: ``adapter_config.json`` fields ``from_peft`` reads as numbers -> ``int`` or ``float`` (checked first,
    #: so a wrong value is a clear error; ``r`` and the patterns are checked for every method)
    peft_fields: ClassVar[dict[str, type]] = {}

    @classmethod
    def resolve(cls, config: AdapterConfig, spec: LayerSpec, name: str) -> Settings:
        raise NotImplementedError

    @classmethod
    def init_params(cls, spec: LayerSpec, settings: Settings, init_weights, generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def param_shapes(cls, spec: LayerSpec, settings: Settings) -> dict[str, tuple[int, ...]]:
        """``{key: shape}`` of the tensors ``init_params`` gives (built on the meta device: nothing
        allocated), remembered per (algorithm, layer spec, settings): loading checks every layer of a
        file against it, and a UNet repeats a few dozen layer shapes."""
        key = (cls, spec, settings)
        if key in _SHAPES:
            return _SHAPES[key]
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in cls.init_params(spec, settings, True, None).items()}
        if len(_SHAPES) >= 4096:
            _SHAPES.clear()
        _SHAPES[key] = shapes
        return shapes

    @classmethod
    def settings_from_tensors(cls, spec: LayerSpec, tensors: dict[str, torch.Tensor], alpha: float | None,
                              name: str, side: str | None = None, **options) -> Settings:
        """Per-layer settings of an adapter read from a file: ranks from shapes, the scale from the
        file's ``alpha`` (``None``: the file has none, see :func:`file_alpha`), ``side`` of a rotation;
        ``options`` are what a format holds elsewhere (PEFT's ``use_rslora``, …, each algorithm names
        its own). ``ValueError`` when the tensors do not fit the layer."""
        raise NotImplementedError

    @classmethod
    def matches(cls, file_tensors: dict[str, torch.Tensor]) -> bool:
        """Whether a kohya/LyCORIS file module's tensors (by file key) belong to this algorithm."""
        return any(k in file_tensors for k in cls.detect_keys)

    @classmethod
    def input_width(cls, file_tensors: dict[str, torch.Tensor]) -> int | None:
        """The ``in_features`` (input channels) of the layer a kohya module's tensors were made for, or
        None when they do not say (an output-side rotation): what family detection reads on the
        cross-attention ``to_k`` layers (768 wide in SD 1.x, 1024 in SD 2.x, 2048 in SDXL)."""
        return None

    @classmethod
    def from_kohya(cls, spec: LayerSpec, file_tensors: dict[str, torch.Tensor], alpha, name: str,
                   side: str | None = None) -> tuple[Settings, dict[str, torch.Tensor]]:
        """``(settings, tensors by our key)`` from a kohya/LyCORIS module's tensors."""
        back = {v: k for k, v in cls.kohya_keys.items()}
        params = {back.get(k, k): v for k, v in file_tensors.items()}
        return cls.settings_from_tensors(spec, params, alpha, name, side), params

    @classmethod
    def to_kohya(cls, params: dict[str, torch.Tensor], settings: Settings) -> tuple[dict[str, torch.Tensor], float | None]:
        """``(tensors by file key, alpha)``; ``alpha`` ``None`` writes none (the LoRA family writes the
        alpha from which loaders' ``alpha / rank`` gives the layer's scale)."""
        return {cls.kohya_keys.get(k, k): v for k, v in params.items()}, None

    @classmethod
    def network_dim_alpha(cls, config: dict) -> tuple:
        """kohya's ``ss_network_dim`` / ``ss_network_alpha`` for a config dict (``to_dict``), as LyCORIS
        records them: the rank and the alpha (``None`` alpha: the rank)."""
        r = config.get("r")
        return r, config.get("alpha") if config.get("alpha") is not None else r

    @classmethod
    def describe_size(cls, tensors: dict[str, torch.Tensor]) -> str:
        """One module's size in words for ``inspect`` and the UI cards (``r=4``, ``r=4 tucker``,
        ``full``, ``block 8``), from its tensors by file key in any format; ``"?"`` when they do not say."""
        return "?"

    # ---- PEFT folders ---------------------------------------------------------------------------
    @classmethod
    def check_peft_config(cls, config: dict, component: str) -> None:
        """Refuse (``ValueError``) or warn about ``adapter_config.json`` settings this algorithm cannot
        read as PEFT means them. PEFT has DoRA (``use_dora``) for LoRA alone."""
        if config.get("use_dora"):
            raise ValueError(f"{component}: use_dora=True on a {cls.peft_type} adapter (PEFT has DoRA for LoRA only)")

    @classmethod
    def from_peft(cls, spec: LayerSpec, tensors: dict[str, torch.Tensor], config: dict,
                  names: tuple[str, ...]) -> tuple[Settings, dict[str, torch.Tensor]]:
        """``(settings, tensors by our key)`` of one PEFT module: its tensors by :attr:`peft_keys` and the
        folder's ``adapter_config.json``; ``names`` are the module's names for ``rank_pattern`` /
        ``alpha_pattern`` (:func:`pattern_value`). ``ValueError`` (or ``KeyError`` for a missing
        tensor) when they do not form an adapter of the layer."""
        raise ValueError(f"{cls.name} has no PEFT form")

    @classmethod
    def to_peft(cls, layers: dict[str, "LayerEntry"], specs: dict[str, LayerSpec],
                component: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        """``({module path: {PEFT key: tensor}}, adapter_config fields)`` of one component's layers (all
        of this algorithm; ``specs`` by the same paths). ``ValueError`` when PEFT cannot hold them
        exactly (nothing is written then)."""
        raise ValueError(f"{component}: no PEFT layout for {cls.name!r}")

    @classmethod
    def peft_config_fields(cls, config: dict, layers: dict[str, "LayerEntry"]) -> dict:
        """Our config's fields describing a PEFT adapter (its ``adapter_config.json`` and the layers read
        from it; best effort: the per-layer settings are what the layers use)."""
        return {}

    @classmethod
    def bake_constraint(cls, params: dict[str, torch.Tensor], settings: Settings
                        ) -> tuple[Settings, dict[str, torch.Tensor]]:
        """``(settings, tensors)`` of the same adapter with any training-time constraint on its tensors
        applied to them and switched off (OFT/BOFT's COFT clamp), so that a tool that reads the
        constraint differently computes the same weight. Default: unchanged."""
        return settings, params

    # ---- fused projections (:mod:`lycoris_lite.base.rows`) ----------------------------------------
    @classmethod
    def split_rows(cls, params: dict[str, torch.Tensor], spec: LayerSpec, settings: Settings,
                   parts: list[tuple[LayerSpec, tuple]]) -> list[tuple[Settings, dict[str, torch.Tensor]]]:
        """Exact per-module adapters of this adapter on a fused matrix (``spec``) for the modules that
        hold its output rows: ``parts`` gives each module's spec and rows (``(start, stop)`` segments of
        the fused rows, in the module's row order). ``W'_T = W'_F[rows_T]`` for every ``T`` and every
        multiplier. :class:`NotSplittable` (with the reason) when this algorithm has no such form."""
        raise NotSplittable(f"{cls.name} has no per-module form on a fused matrix")

    @classmethod
    def join_rows(cls, spec: LayerSpec, parts: list[tuple[LayerSpec, tuple, Settings, dict[str, torch.Tensor]]]
                  ) -> tuple[Settings, dict[str, torch.Tensor]]:
        """The inverse of :meth:`split_rows`: one adapter on the fused matrix ``spec`` equal, row for row
        and at every multiplier, to the per-module adapters ``parts`` (each ``(spec, rows, settings,
        tensors)``). :class:`NotSplittable` (with the reason) when there is no exact one."""
        raise NotSplittable(f"{cls.name} adapters on separate modules have no exact form on the fused matrix")

    @classmethod
    def delta_weight(cls, params, spec: LayerSpec, settings: Settings) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def add_delta_weight(cls, weight: torch.Tensor, params, spec: LayerSpec, settings: Settings,
                         multiplier: float = 1.0, out: torch.Tensor | None = None) -> torch.Tensor:
        """``weight + multiplier · ΔW``: a new tensor, or written into ``out`` (which may be ``weight``
        itself; otherwise ``weight`` is never written). Implementations may fuse the sum into the
        product that builds ``ΔW`` (one pass over the weight when fusing)."""
        return torch.add(weight, cls.delta_weight(params, spec, settings), alpha=multiplier, out=out)

    @classmethod
    def delta_forward(cls, x, params, spec: LayerSpec, settings: Settings, multiplier: float = 1.0) -> torch.Tensor | None:
        """``multiplier · spec.op(x, ΔW)``; implementations fold the scale into their smallest factor."""
        return None

    @classmethod
    def add_delta_forward(cls, y: torch.Tensor, x, params, spec: LayerSpec, settings: Settings,
                          multiplier: float = 1.0) -> torch.Tensor:
        """``y += multiplier · spec.op(x, ΔW)`` in place, returning ``y``: the inference form of the
        activation route (no autograd; ``y`` is the layer's fresh output). The default adds
        :meth:`delta_forward`'s ``Δy``; an algorithm may write its last product into ``y`` directly."""
        return y.add_(cls.delta_forward(x, params, spec, settings, multiplier).to(y.dtype))

    @classmethod
    def folded_route(cls, params, spec: LayerSpec, settings: Settings, multiplier: float = 1.0):
        """``(route, tensors)`` for :func:`~lycoris_lite.algos.common.folded_route` when training this
        adapter alone on a layer is cheaper with ``ΔW`` folded into the base op forward and the
        activation route backward; ``None`` (the default) for the activation route both ways."""
        return None

    @classmethod
    def use_activation_route(cls, spec: LayerSpec, settings: Settings, needs_grad: bool) -> bool:
        """Whether the unfused forward adds ``delta_forward(x)`` (True) or folds ``W + s·ΔW`` into the
        base op (False)."""
        return cls.activation_route

    @classmethod
    def forward_gain(cls, settings: Settings) -> tuple[Settings, float]:
        """``(settings', g)`` with ``g · ΔW(settings') = ΔW(settings)``: the factor of the file's
        ``alpha / r`` that the forward moves out of the settings into the layer's multiplier tensor, so
        a compiled forward reads it as data and a hotswap to another alpha never retraces. Additive
        algorithms are linear in :class:`ScaledSettings`' ``scale``; DoRA (a norm of ``W + ΔW``) and the
        rotations are not: they keep their settings (``g = 1``)."""
        if cls.multiplicative or (cls.decomposable and settings.dora) or not isinstance(settings, ScaledSettings):
            return settings, 1.0
        return replace(settings, scale=1.0), float(settings.scale)

    @classmethod
    def transform(cls, params, spec: LayerSpec, settings: Settings) -> tuple[Operator | None, Operator | None]:
        raise NotImplementedError

    @classmethod
    def regularization(cls, params, settings: Settings) -> torch.Tensor | None:
        return None


@dataclass
class LayerEntry:
    """One adapter on one layer: its algorithm, per-layer settings and tensors (by our keys), and
    ``source``: the module's name in the file it was read from (``""`` when not read from a file)."""

    algorithm: type[Algorithm]
    settings: Settings
    tensors: dict[str, torch.Tensor]
    source: str = ""


ALGORITHMS: dict[str, type[Algorithm]] = {}
#: the per-module tensor of kohya/LyCORIS files every algorithm may carry (its alpha)
ALPHA_KEY = "alpha"


def register(cls: type[Algorithm]) -> type[Algorithm]:
    if cls.name in ALGORITHMS:
        raise ValueError(f"algorithm {cls.name!r} registered twice")
    undeclared = sorted((set(cls.detect_keys) | set(cls.peft_keys)) - cls.file_keys)
    if undeclared:
        raise ValueError(f"algorithm {cls.name!r}: file_keys lacks {undeclared}")
    settings_class = getattr(cls, "settings_class", None)
    if not (isinstance(settings_class, type) and issubclass(settings_class, Settings)):
        raise ValueError(f"algorithm {cls.name!r}: settings_class must be a frozen dataclass on Settings")
    taken = next((a.name for a in ALGORITHMS.values() if cls.peft_type and a.peft_type == cls.peft_type), None)
    if taken:
        raise ValueError(f"algorithm {cls.name!r}: PEFT type {cls.peft_type!r} is {taken!r}'s")
    cls.config_class.algo = cls.name
    ALGORITHMS[cls.name] = cls
    return cls


def get_algorithm(name: str) -> type[Algorithm]:
    try:
        return ALGORITHMS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}") from None


def algorithm_for(config: AdapterConfig) -> type[Algorithm]:
    return get_algorithm(config.algo)


def config_from_dict(data: dict) -> AdapterConfig:
    """Build the right config class from a dict with an ``algo`` key (as written by ``to_dict``).

    Args:
        data: ``{"algo": name, field: value, …}``; PEFT's field names are accepted.

    Returns:
        An instance of that algorithm's config class.

    Raises:
        ValueError: no ``algo`` key, an unknown algorithm, unknown fields (listed with the valid ones) or
            invalid values.
    """
    if "algo" not in data:
        raise ValueError("config dict has no 'algo' key")
    return get_algorithm(data["algo"]).config_class.from_dict(data)


def detect_algorithm(file_tensors: dict[str, torch.Tensor]) -> type[Algorithm] | None:
    """The registered algorithm whose keys a kohya/LyCORIS module carries (``None`` if none)."""
    found = [algo for algo in ALGORITHMS.values() if algo.matches(file_tensors)]
    return found[0] if len(found) == 1 else None


def algorithm_of(file_tensors: dict[str, torch.Tensor]) -> type[Algorithm] | None:
    """The algorithm of one module's tensors in any format: :func:`detect_algorithm` (kohya/LyCORIS
    keys, told apart by shapes), else the one algorithm that alone owns some key (``file_keys``)."""
    algo = detect_algorithm(file_tensors)
    if algo is not None:
        return algo
    owners = set()
    for key in file_tensors:
        found = [a for a in ALGORITHMS.values() if key in a.file_keys]
        if len(found) == 1:
            owners.add(found[0])
    return owners.pop() if len(owners) == 1 else None


def file_key_roots() -> set[str]:
    """The first dotted part of every registered file key (``lora_A`` of ``lora_A.weight``) and of
    :data:`ALPHA_KEY`: in a dotted key, where the module path ends."""
    return {k.split(".", 1)[0] for algo in ALGORITHMS.values() for k in algo.file_keys} | {ALPHA_KEY}


def peft_algorithm(peft_type: str) -> type[Algorithm] | None:
    """The registered algorithm of PEFT's ``peft_type`` (``"LORA"``, …), ``None`` if none."""
    return next((a for a in ALGORITHMS.values() if a.peft_type is not None and a.peft_type == peft_type), None)


def file_alpha(alpha, rank: int) -> float:
    """A file's alpha; ``None`` (the file has none) means ``alpha = rank`` (scale 1). (kohya/LyCORIS
    files also mean ``alpha = rank`` by a zero alpha: :func:`lycoris_lite.io.formats.kohya.read` passes
    ``None`` for it.)"""
    return float(rank) if alpha is None else float(alpha)


def pattern_value(patterns: dict | None, names: str | Iterable[str], default):
    """``rank_pattern``/``alpha_pattern`` lookup (PEFT's rule): the first key with
    ``re.match(rf"(.*\\.)?({key})$", name)`` matching, trying each of ``names`` in turn."""
    for name in (names,) if isinstance(names, str) else names:
        for key, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({key})$", name):
                return value
    return default
