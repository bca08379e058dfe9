"""Adapters on fused projections, handed to the separate modules that hold the fused matrix's rows.

A fused matrix ``W_F`` (``out_F × in``; Flux's ``img_attn.qkv``) is held by modules that each own some
of its output rows (``to_q``, ``to_k``, ``to_v``). A module's rows are ``Rows``: ``(start, stop)``
segments of ``W_F``'s rows, in the module's own row order (a swapped pair of halves is two segments).
An adapter on ``W_F`` reaches module ``T`` as the rows of the adapted matrix: ``W'_T = W'_F[rows_T]``.

Each algorithm says how it splits (``Algorithm.split_rows``: exact per-module adapters of the same
algorithm, or :class:`NotSplittable` with the reason) and joins (``Algorithm.join_rows``, the inverse
that writing a fused original layout needs). Where an additive adapter has no per-module form (a LoKr
whose ``kron`` blocks straddle a module boundary), :func:`row_view` gives the exact one: the module
keeps the whole fused adapter and takes its rows of ``ΔW_F`` (and, in the activation route, of
``Δy_F``): ``ΔW_T = ΔW_F[rows_T]``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from .layer_kind import LayerSpec
from .registry import Algorithm, NotSplittable
from .settings import Settings

Rows = tuple[tuple[int, int], ...]


def row_count(rows: Rows) -> int:
    return sum(stop - start for start, stop in rows)


def row_index(rows: Rows, device=None) -> torch.Tensor:
    """The fused rows of ``rows`` as one index tensor, in order."""
    return torch.cat([torch.arange(start, stop, device=device) for start, stop in rows])


def take_rows(t: torch.Tensor, rows: Rows) -> torch.Tensor:
    """``t[rows]`` along dim 0 (a view for one segment, else a copy)."""
    if len(rows) == 1:
        return t[rows[0][0]:rows[0][1]]
    return torch.cat([t[start:stop] for start, stop in rows])


def put_rows(parts: list[tuple[Rows, torch.Tensor]], total: int) -> torch.Tensor:
    """The inverse of :func:`take_rows` over parts that cover ``total`` rows once: one tensor whose rows
    ``rows_i`` are ``t_i``'s (rows no part covers are zero)."""
    first = parts[0][1]
    out = first.new_zeros((total, *first.shape[1:]))
    for rows, t in parts:
        offset = 0
        for start, stop in rows:
            out[start:stop] = t[offset:offset + stop - start]
            offset += stop - start
    return out


def blocks_of(rows: Rows, size: int) -> tuple[tuple[int, int], ...] | None:
    """``rows`` as ``(first, stop)`` ranges of ``size``-row blocks when every segment starts and stops on
    a block boundary, else ``None``."""
    if any(start % size or stop % size for start, stop in rows):
        return None
    return tuple((start // size, stop // size) for start, stop in rows)


def same_tensors(dicts: list[dict[str, torch.Tensor]], keys) -> bool:
    """Whether every dict holds the same values (bit for bit) under ``keys``."""
    first = dicts[0]
    return all(set(keys) <= set(d) and all(torch.equal(d[k], first[k]) for k in keys) for d in dicts)


@dataclass(frozen=True, kw_only=True)
class RowViewSettings(Settings):
    """A module's view of an additive adapter on a fused matrix: the adapter's own settings
    (``inner``), the fused matrix's spec (``fused``) and the module's ``rows`` of it."""

    inner: Settings
    fused: LayerSpec
    rows: Rows

    @property
    def rank(self):
        return self.inner.rank

    @property
    def dora(self):
        return getattr(self.inner, "dora", None)

    @property
    def dora_init(self):
        return getattr(self.inner, "dora_init", False)

    def __getattr__(self, name):  # scale, alpha, r, shape…: the adapter's own
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(object.__getattribute__(self, "inner"), name)


class RowViewBase(Algorithm):
    """The base of :func:`row_view` and :func:`dense_rows_view` classes (the writers find them by it): a
    module's view of the adapter ``inner`` on a fused matrix, which has no file form of its own."""

    inner: type[Algorithm]
    settings_class = RowViewSettings
    detect_keys = ()

    @classmethod
    def describe_size(cls, tensors):
        return cls.inner.describe_size(tensors)

    @classmethod
    def to_kohya(cls, params, settings):
        raise NotSplittable(f"a module holding some rows of a fused {cls.inner.name} adapter has no "
                            "file form of its own; write the fused module (the original layout)")


@functools.lru_cache(maxsize=None)
def row_view(algorithm: type[Algorithm]) -> type[RowViewBase]:
    """The row-view form of additive ``algorithm``: the same name, settings :class:`RowViewSettings`,
    tensors the fused adapter's (with a DoRA magnitude of the module's rows), and
    ``ΔW_T = ΔW_F[rows]``, ``Δy_T = Δy_F[..., rows]``. Not registered: files name the algorithm."""
    if algorithm.multiplicative:
        raise TypeError("a row view is for additive algorithms")

    class View(RowViewBase):
        name = algorithm.name
        inner = algorithm
        config_class = algorithm.config_class
        decomposable = algorithm.decomposable
        file_keys = algorithm.file_keys

        @classmethod
        def param_shapes(cls, spec, settings):
            shapes = dict(algorithm.param_shapes(settings.fused, settings.inner))
            if "dora_scale" in shapes:
                shapes["dora_scale"] = (spec.out_features, *shapes["dora_scale"][1:])
            return shapes

        @classmethod
        def _inner_params(cls, params):
            return {k: v for k, v in params.items() if k != "dora_scale"}

        @classmethod
        def delta_weight(cls, params, spec, settings):
            return take_rows(algorithm.delta_weight(cls._inner_params(params), settings.fused, settings.inner),
                             settings.rows)

        @classmethod
        def delta_forward(cls, x, params, spec, settings, multiplier=1.0):
            y = algorithm.delta_forward(x, cls._inner_params(params), settings.fused, settings.inner, multiplier)
            dim = settings.fused.channel_dim
            return y.index_select(dim, row_index(settings.rows, y.device))

        @classmethod
        def use_activation_route(cls, spec, settings, needs_grad):
            return algorithm.use_activation_route(settings.fused, settings.inner, needs_grad)

        @classmethod
        def forward_gain(cls, settings):
            inner, gain = algorithm.forward_gain(settings.inner)
            return replace(settings, inner=inner), gain

        @classmethod
        def regularization(cls, params, settings):
            return algorithm.regularization(cls._inner_params(params), settings.inner)


    View.__name__ = View.__qualname__ = f"RowView[{algorithm.__name__}]"
    return View


@functools.lru_cache(maxsize=None)
def dense_rows_view(algorithm: type[Algorithm]) -> type[RowViewBase]:
    """The fused view of a multiplicative ``algorithm`` on the output side, where no per-module form
    exists (a rotation block straddling a module boundary, BOFT's butterfly, HRA's reflections): the
    fused delta ``ΔW_F = M·W_F − W_F`` is computed once, from the base weights of every module of the
    fused matrix (:func:`fused_delta`), and each module keeps its rows as the tensor ``delta``:
    ``ΔW_T = ΔW_F[rows_T]``. Exact at every multiplier ``s``: the user's ``M_s = I + s·(M − I)`` gives
    ``W_T + s·ΔW_T``. It costs a dense ``out_T × in`` tensor per module and runs folded into the base op
    (``W + s·ΔW``); the rotation's own tensors stay with it (what writing the original layout needs)."""
    if not algorithm.multiplicative:
        raise TypeError("a dense fused view is for multiplicative algorithms")

    class View(RowViewBase):
        name = algorithm.name
        inner = algorithm
        config_class = algorithm.config_class
        file_keys = algorithm.file_keys
        activation_route = False

        @classmethod
        def param_shapes(cls, spec, settings):
            return {**algorithm.param_shapes(settings.fused, settings.inner),
                    DELTA_KEY: (spec.out_features, spec.in_features)}

        @classmethod
        def delta_weight(cls, params, spec, settings):
            return params[DELTA_KEY]

        @classmethod
        def delta_forward(cls, x, params, spec, settings, multiplier=1.0):
            return torch.nn.functional.linear(x, params[DELTA_KEY] * multiplier)

        @classmethod
        def use_activation_route(cls, spec, settings, needs_grad):
            return False

        @classmethod
        def forward_gain(cls, settings):
            return settings, 1.0


    View.__name__ = View.__qualname__ = f"DenseRows[{algorithm.__name__}]"
    return View


#: the tensor of a :func:`dense_rows_view` module: its rows of the fused delta
DELTA_KEY = "fused_delta_rows"


def fused_delta(algorithm: type[Algorithm], params: dict[str, torch.Tensor], spec: LayerSpec, settings: Settings,
                weight: torch.Tensor) -> torch.Tensor:
    """``M·W_F − W_F`` (float64) of a multiplicative adapter on the output side of the fused matrix
    ``weight`` (``out_F × in``)."""
    w = weight.to(torch.float64)
    in_op, out_op = algorithm.transform({k: v.to(torch.float64) for k, v in params.items()}, spec, settings)
    if in_op is not None:
        raise NotSplittable("an input-side rotation splits per module; it needs no fused view")
    return out_op.apply(w.T).T - w


__all__ = ["DELTA_KEY", "NotSplittable", "RowViewBase", "RowViewSettings", "Rows", "dense_rows_view", "fused_delta", "blocks_of", "put_rows", "row_count",
           "row_index", "row_view", "same_tensors", "take_rows"]
