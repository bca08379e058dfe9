"""LoKr: ``ΔW = s · kron(w1, w2)``, each factor full or low-rank.

Factor shapes come from :func:`factorization`: ``out = a·b``, ``in = c·d`` with
``(a, b) = factorization(out, factor)`` and ``(c, d) = factorization(in, factor)``.

* ``lokr_w1 (a, c)``, or ``lokr_w1_a (a, r) @ lokr_w1_b (r, c)`` when ``decompose_both`` and
  ``r < max(a, c) / 2``.
* ``lokr_w2 (b, d[, kh, kw])`` when ``full_matrix`` or ``r >= max(b, d) / 2``; otherwise
  ``lokr_w2_a (b, r) @ lokr_w2_b (r, d·kh·kw)``; Tucker (k×k conv): ``lokr_t2 (r, r, kh, kw)``,
  ``lokr_w2_a (r, b)``, ``lokr_w2_b (r, d)``.

Scale: ``alpha / r`` when a factor is low-rank; **1 when both factors are full** (LyCORIS's rule:
alpha is ignored, files often store a huge placeholder).

Activation route (never builds ``kron`` for a linear layer): with ``X = x.reshape(..., c, d)``,
``Δy = s · (w1 @ X @ w2ᵀ).reshape(..., a·b)``. Convs run ``w2`` as a conv on each of the ``c``
channel groups and mix the groups with ``w1``. While training the routes keep only ``x`` and the
factors; their thin intermediates are recomputed in backward (:class:`KronLowRankRoute`,
:class:`KronConvRoute`, otherwise ``recompute_in_backward``).

PEFT (``LOKR``): the same keys and layouts; PEFT's scale is always ``alpha/r`` with the config's ``r``
(kept as the layer's scale, also with both factors full), its ``decompose_factor`` does not sort
``(factor, dim // factor)`` (:func:`peft_factorization`); no DoRA.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..base.operators import is_one
from ..base.registry import Algorithm, NotSplittable, file_alpha, pattern_value, register
from ..base.rows import blocks_of, put_rows, same_tensors, take_rows
from ..base.settings import ScaledSettings
from . import dora, peft
from .common import factorization, factored_route, init_factors, op_backward, rebuild_tucker, recompute_in_backward
from .lora import alpha_for, lora_scale


def factor_w1(params) -> torch.Tensor:
    if "lokr_w1" in params:
        return params["lokr_w1"]
    return params["lokr_w1_a"] @ params["lokr_w1_b"]


def factor_w2(params, shape_b_d_k) -> torch.Tensor:
    """``w2`` as ``(b, d)`` for linear or ``(b, d, kh, kw)`` for conv."""
    if "lokr_w2" in params:
        return params["lokr_w2"]
    if "lokr_t2" in params:
        return rebuild_tucker(params["lokr_t2"], params["lokr_w2_a"].T, params["lokr_w2_b"])
    return (params["lokr_w2_a"] @ params["lokr_w2_b"]).reshape(shape_b_d_k)


def delta_weight(w1, w2, scale: float, shape) -> torch.Tensor:
    """``ΔW = scale · kron(w1, w2)`` reshaped to ``shape`` (w1 gets 1×1 spatial dims for convs)."""
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return (torch.kron(w1.contiguous(), w2.contiguous()) * scale).reshape(shape)


def delta_forward(x, w1, w2, scale: float, spec) -> torch.Tensor:
    """``scale · spec.op(x, kron(w1, w2))`` without building the product (the scale multiplies w1)."""
    w1 = w1 * scale
    a, c = w1.shape
    b, d = w2.shape[:2]
    if not spec.is_conv:
        grouped = x.unflatten(-1, (c, d))  # (..., c, d)
        inner = torch.matmul(grouped, w2.T)  # (..., c, b)
        # w1 acts on the c axis as one GEMM (a broadcast matmul would run one tiny GEMM per token)
        out = torch.matmul(inner.transpose(-1, -2), w1.T).transpose(-1, -2)  # (..., a, b)
        return out.flatten(-2)
    n = x.shape[0]
    h = spec.op(x.reshape(n * c, d, *x.shape[2:]), w2)  # (n*c, b, H', W')
    out = torch.matmul(w1, h.reshape(n, c, -1))  # (n, a, b·H'·W'): w1 mixes the c groups
    return out.reshape(n, a * b, *h.shape[2:])


def delta_forward_low_rank(x, w1, w2_a, w2_b) -> torch.Tensor:
    """``spec.op(x, kron(w1, w2_a @ w2_b))`` on a linear layer (``w1`` scaled), as three GEMMs on thin
    ``(r, …)`` intermediates (no copies, no intermediate as large as the activation):
    ``low = w2_b·Xᵀ`` (``r × N·c``), ``mixed = low·w1ᵀ`` over the ``c`` axis (``r × N·a``),
    ``Δy = mixedᵀ·w2_aᵀ`` (``N·a × b``), with ``X`` the input grouped as ``(N·c, d)``."""
    (a, b), r = (w1.shape[0], w2_a.shape[0]), w2_a.shape[1]
    _, _, mixed = _thin_products(x, w1, w2_b)
    return (mixed.view(r, -1).T @ w2_a.T).view(*x.shape[:-1], a * b)


def _thin_products(x, w1, w2_b):
    """``(X, low, mixed)`` of :func:`delta_forward_low_rank`: ``X`` ``(N·c, d)``, ``low`` ``(r, N·c)``,
    ``mixed`` ``(r·N, a)``."""
    grouped = x.reshape(-1, w2_b.shape[1])
    low = w2_b @ grouped.T
    return grouped, low, low.view(-1, w1.shape[1]) @ w1.T


class KronLowRankRoute:
    """:func:`delta_forward_low_rank` for :func:`~lycoris_lite.algos.common.factored_route`: backward
    recomputes ``low`` and ``mixed`` (two thin GEMMs) instead of keeping them. Every product keeps the
    short dimension ``r`` as the rows of its result, the GEMM shape MKL runs fast."""

    def __init__(self, factors, spec=None):
        self.factors, self.spec = factors, spec

    def forward(self, x, w1, w2_a, w2_b):
        return delta_forward_low_rank(x, w1, w2_a, w2_b)

    def delta(self, *tensors):
        """``ΔW = kron(w1, w2_a·w2_b)`` (the scale is in ``w1``), for :func:`~lycoris_lite.algos.common.folded_route`."""
        w1, w2_a, w2_b = self.factors(*tensors)
        return torch.kron(w1.contiguous(), (w2_a @ w2_b).contiguous())

    def backward(self, x, factors, grad, need_x):
        w1, w2_a, w2_b = factors
        (a, c), r = w1.shape, w2_a.shape[1]
        grouped, low, mixed = _thin_products(x, w1, w2_b)
        g = grad.reshape(-1, w2_a.shape[0])  # (N·a, b)
        grad_w2_a = (mixed.view(r, -1) @ g).T
        del mixed
        grad_mixed = w2_a.T @ g.T  # (r, N·a)
        grad_w1 = grad_mixed.view(-1, a).T @ low.view(-1, c)
        del low
        grad_low = grad_mixed.view(-1, a) @ w1  # (r·N, c)
        grad_w2_b = grad_low.view(r, -1) @ grouped
        grad_x = (grad_low.view(r, -1).T @ w2_b).view(x.shape) if need_x else None
        return grad_x, (grad_w1, grad_w2_a, grad_w2_b)


class KronConvRoute:
    """The conv route of :func:`delta_forward` for :func:`~lycoris_lite.algos.common.factored_route`:
    ``h = op(x grouped as (n·c, d, H, W), w2)``, ``Δy = w1`` mixing the ``c`` groups of ``h``.

    Backward recomputes ``h`` (about ``1/c`` of the base conv's cost) instead of keeping it:
    ``∂w1 = Σ ∂Δy·hᵀ``, ``∂h = w1ᵀ·∂Δy``, then the grouped conv's own gradients. It runs over at most
    about four slices of the ``n·c`` groups, so its transient tensors (``h``, ``∂h`` and the conv
    backward's buffers) stay near a quarter of an activation."""

    pieces = 4

    def __init__(self, spec, factors):
        self.spec, self.factors = spec, factors

    def forward(self, x, w1, w2):
        return delta_forward(x, w1, w2, 1.0, self.spec)

    def delta(self, *tensors):
        """``ΔW = kron(w1, w2)`` (the scale is in ``w1``), for :func:`~lycoris_lite.algos.common.folded_route`."""
        w1, w2 = self.factors(*tensors)
        return delta_weight(w1, w2, 1.0, self.spec.weight_shape)

    def backward(self, x, factors, grad, need_x):
        w1, w2 = factors
        (a, c), b, n = w1.shape, w2.shape[0], x.shape[0]
        grouped = x.reshape(n * c, *w2.shape[1:2], *x.shape[2:])
        g = grad.reshape(n, a, -1)
        step = -(-c // max(1, self.pieces // n))
        grad_w1 = torch.zeros_like(w1)
        grad_w2 = torch.zeros_like(w2)
        grad_x = torch.empty_like(grouped) if need_x else None
        for i in range(n):
            for k in range(0, c, step):
                rows = slice(i * c + k, i * c + min(k + step, c))
                h = self.spec.op(grouped[rows], w2)
                grad_w1[:, k:k + step] += g[i] @ h.reshape(h.shape[0], -1).T
                del h
                grad_h = (w1[:, k:k + step].T @ g[i]).reshape(-1, b, *grad.shape[2:])
                gx, gw = op_backward(self.spec, grouped[rows], w2, grad_h, need_x)
                grad_w2 += gw
                if need_x:
                    grad_x[rows] = gx
        return (grad_x.reshape(x.shape) if need_x else None), (grad_w1, grad_w2)


def peft_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's LoKr ``factorization``: ``(factor, dim // factor)`` unsorted when ``factor`` divides,
    else the most square split (LyCORIS's, which sorts the first case too)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    return factorization(dimension, factor)


def peft_lokr_shapes(spec, r: int, decompose_both: bool, factor: int, effective: bool) -> dict[str, tuple]:
    """The tensors (key -> shape) PEFT's ``LoKrLayer.update_layer`` creates for a layer."""
    a, b = peft_factorization(spec.out_features, factor)
    c, d = peft_factorization(spec.in_features, factor)
    use_w1 = not (decompose_both and r < max(a, c) / 2)
    use_w2 = not (r < max(b, d) / 2)
    effective = effective and spec.is_conv and spec.kernel_size != (1, 1)
    kh, kw = spec.kernel_size
    shapes = {"lokr_w1": (a, c)} if use_w1 else {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)}
    if use_w2:
        shapes["lokr_w2"] = (b, d, kh, kw) if spec.is_conv else (b, d)
    elif effective:
        shapes.update(lokr_t2=(r, r, kh, kw), lokr_w2_a=(r, b), lokr_w2_b=(r, d))
    else:
        shapes.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d * spec.taps))
    return shapes


@dataclass
class LoKrConfig(dora.DecomposableConfig):
    """LoKr. ``factor`` (-1 = most square split), ``decompose_both`` (w1 low-rank too),
    ``full_matrix`` (both factors full: alpha ignored, scale 1), ``use_tucker`` (k×k convs),
    ``use_dora``/``dora_axis``: DoRA (LyCORIS's DoKr)."""

    aliases = {**dora.DecomposableConfig.aliases, "decompose_factor": "factor", "use_effective_conv2d": "use_tucker"}
    factor: int = -1
    decompose_both: bool = False
    full_matrix: bool = False
    use_tucker: bool = False

    def validate(self):
        super().validate()
        if self.r < 1:
            raise ValueError("LoKr needs r >= 1")
        if self.factor == 0 or self.factor < -1:
            raise ValueError(f"factor must be -1 (auto) or a positive integer, got {self.factor}")


@dataclass(frozen=True, kw_only=True)
class LoKrSettings(dora.DecomposableSettings, ScaledSettings):
    """LoKr's per-layer settings: ``r``, ``alpha``, ``scale`` (:class:`ScaledSettings`; ``scale`` is 1 when
    both factors are full, except from PEFT), ``dora``, ``dora_init``
    (:class:`~lycoris_lite.algos.dora.DecomposableSettings`), and

    * ``shape``: ``(a, b, c, d)`` with ``out = a·b``, ``in = c·d``: ``w1`` is ``(a, c)``, ``w2`` ``(b, d)``;
    * ``w1_low_rank`` / ``w2_low_rank``: the factor is ``w_a @ w_b`` at rank ``r`` (else one full tensor);
    * ``tucker``: ``w2`` of a k×k conv has a Tucker core ``lokr_t2``.
    """

    shape: tuple[int, int, int, int]
    w1_low_rank: bool
    w2_low_rank: bool
    tucker: bool = False


@register
class LoKr(Algorithm):
    name = "lokr"
    config_class = LoKrConfig
    settings_class = LoKrSettings
    decomposable = True
    detect_keys = ("lokr_w1", "lokr_w1_a")
    peft_type = "LOKR"
    peft_keys = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    peft_fields = {"alpha": float, "decompose_factor": int}
    file_keys = frozenset({*peft_keys, dora.KEY})
    lycoris_args = {"use_tucker": "use_tucker", "factor": "factor", "decompose_both": "decompose_both",
                    "full_matrix": "full_matrix"}

    @classmethod
    def split_rows(cls, params, spec, settings, parts):
        """``kron(w1, w2)``'s rows come in blocks of ``b`` (one row of ``w1`` each): a module whose rows
        begin and end on block boundaries is a LoKr with its rows of ``w1`` (``lokr_w1`` or
        ``lokr_w1_a``) and the same ``w2``; a boundary inside a block has no LoKr form."""
        a, b, c, d = settings.shape
        out = []
        for tspec, rows in parts:
            blocks = blocks_of(rows, b)
            if blocks is None:
                cut = next(x for seg in rows for x in seg if x % b)
                raise NotSplittable(f"its kron blocks are {b} rows tall and a module boundary falls at row {cut}, "
                                    "inside one")
            index = tuple(blocks)
            tensors = {k: v for k, v in params.items() if not k.startswith("lokr_w1")}
            key = "lokr_w1" if "lokr_w1" in params else "lokr_w1_a"
            tensors[key] = take_rows(params[key], index)
            if key == "lokr_w1_a":
                tensors["lokr_w1_b"] = params["lokr_w1_b"]
            tensors.update(dora.split_magnitude(params, settings, rows))
            out.append((replace(settings, shape=(tspec.out_features // b, b, c, d)), tensors))
        return out

    @classmethod
    def join_rows(cls, spec, parts):
        """Modules with the same ``w2``, scale and ``w1`` form, each on whole blocks of rows, covering
        every row: one LoKr with their ``w1`` rows in place (what :meth:`split_rows` split)."""
        first = parts[0][2]
        b, c, d = first.shape[1:]
        key = "lokr_w1" if "lokr_w1" in parts[0][3] else "lokr_w1_a"
        w2_keys = [k for k in parts[0][3] if k.startswith(("lokr_w2", "lokr_t2"))] + (
            ["lokr_w1_b"] if key == "lokr_w1_a" else [])
        if (any(replace(s, shape=first.shape) != first for _, _, s, _ in parts)
                or not same_tensors([t for *_, t in parts], w2_keys) or any(key not in t for *_, t in parts)):
            raise NotSplittable("LoKr adapters whose w2 factors, w1 forms or scales differ between the modules have "
                                "no exact LoKr on the fused matrix")
        blocks = [blocks_of(rows, b) for _, rows, _, _ in parts]
        if any(x is None for x in blocks) or sum(stop - start for bl in blocks for start, stop in bl) * b != spec.out_features:
            raise NotSplittable(f"the modules do not cover the fused matrix's rows in whole {b}-row kron blocks")
        w1 = put_rows([(bl, t[key]) for bl, (*_, t) in zip(blocks, parts)], spec.out_features // b)
        tensors = {**{k: parts[0][3][k] for k in w2_keys}, key: w1,
                   **dora.join_magnitude([(rows, s, t) for _, rows, s, t in parts], spec.out_features)}
        return replace(first, shape=(spec.out_features // b, b, c, d)), tensors

    @classmethod
    def describe_size(cls, tensors):
        low = tensors.get("lokr_w2_b", tensors.get("lokr_w1_b"))
        return "full" if low is None else f"r={low.shape[0]}"

    @classmethod
    def input_width(cls, file_tensors):
        """``c · d``: the columns of ``w1`` (or ``w1_b``) times those of ``w2`` (or ``w2_b``)."""
        w1 = file_tensors.get("lokr_w1", file_tensors.get("lokr_w1_b"))
        w2 = file_tensors.get("lokr_w2", file_tensors.get("lokr_w2_b"))
        if w1 is None or w2 is None or w1.dim() != 2 or w2.dim() < 2:
            return None
        return w1.shape[1] * w2.shape[1]

    @classmethod
    def resolve(cls, config, spec, name):
        r = pattern_value(config.rank_pattern, name, config.r)
        alpha = pattern_value(config.alpha_pattern, name, config.alpha if config.alpha is not None else r)
        a, b = factorization(spec.out_features, config.factor)
        c, d = factorization(spec.in_features, config.factor)
        w1_low = config.decompose_both and not config.full_matrix and r < max(a, c) / 2
        w2_low = not config.full_matrix and r < max(b, d) / 2
        return LoKrSettings(
            r=r, alpha=float(alpha), shape=(a, b, c, d),
            w1_low_rank=bool(w1_low), w2_low_rank=bool(w2_low),
            tucker=bool(w2_low and config.use_tucker and spec.is_conv and spec.taps > 1),
            scale=lora_scale(alpha, r) if (w1_low or w2_low) else 1.0,
            **dora.resolve(config, spec),
        )

    @classmethod
    def init_params(cls, spec, settings, init_weights, generator):
        a, b, c, d = settings.shape
        r = settings.r
        kh, kw = spec.kernel_size
        params = {}
        if settings.w1_low_rank:
            params["lokr_w1_a"], params["lokr_w1_b"] = torch.empty(a, r), torch.empty(r, c)
        else:
            params["lokr_w1"] = torch.empty(a, c)
        zero_key = "lokr_w2"
        if not settings.w2_low_rank:
            params["lokr_w2"] = torch.empty(b, d, kh, kw) if spec.is_conv else torch.empty(b, d)
        elif settings.tucker:
            params["lokr_t2"] = torch.empty(r, r, kh, kw)
            params["lokr_w2_a"], params["lokr_w2_b"] = torch.empty(r, b), torch.empty(r, d)
            zero_key = "lokr_w2_b"
        else:
            params["lokr_w2_a"], params["lokr_w2_b"] = torch.empty(b, r), torch.empty(r, d * spec.taps)
            zero_key = "lokr_w2_b"
        return {**init_factors(params, zero_key, init_weights, generator),
                **dora.init_params(spec, settings, init_weights, generator)}

    @classmethod
    def settings_from_tensors(cls, spec, tensors, alpha, name, side=None, peft_rank=None):
        """``peft_rank``: the rank a PEFT config gives, whose scale is ``alpha / peft_rank`` whatever
        the factors (LyCORIS's is 1 when both are full)."""
        if "lokr_w1" in tensors:
            a, c = tensors["lokr_w1"].shape[:2]
        else:
            a, c = tensors["lokr_w1_a"].shape[0], tensors["lokr_w1_b"].shape[1]
        tucker = "lokr_t2" in tensors
        if "lokr_w2" in tensors:
            b, d = tensors["lokr_w2"].shape[:2]
        elif tucker:
            b, d = tensors["lokr_w2_a"].shape[1], tensors["lokr_w2_b"].shape[1]
        else:
            b, d = tensors["lokr_w2_a"].shape[0], tensors["lokr_w2_b"].shape[1] // spec.taps
        if a * b != spec.out_features or c * d != spec.in_features:
            raise ValueError(f"layer {name!r}: LoKr factors ({a}x{c}) ⊗ ({b}x{d}) do not fit "
                             f"{spec.out_features}x{spec.in_features}")
        w1_low, w2_low = "lokr_w1" not in tensors, "lokr_w2" not in tensors
        # LyCORIS / ComfyUI / AUTOMATIC1111: the rank of the decomposed factor, w2's winning
        r = tensors["lokr_w2_b"].shape[0] if w2_low else tensors["lokr_w1_b"].shape[0] if w1_low else 1
        if peft_rank is not None:
            if w1_low or w2_low:
                peft.check_rank(name, peft_rank, r)
            r = peft_rank
        a_value = file_alpha(alpha, r)
        scaled = w1_low or w2_low or peft_rank is not None
        return LoKrSettings(r=r, alpha=a_value, shape=(a, b, c, d), w1_low_rank=w1_low, w2_low_rank=w2_low,
                            tucker=tucker, scale=lora_scale(a_value, r) if scaled else 1.0,
                            **dora.file_settings(spec, tensors, name))

    @classmethod
    def to_kohya(cls, params, settings):
        tensors, _ = super().to_kohya(params, settings)
        if not settings.w1_low_rank and not settings.w2_low_rank and settings.scale != 1.0:
            # LyCORIS's loaders ignore alpha when both factors are full (scale 1): fold a scale such a
            # layer carries (PEFT's alpha/r, from PEFT folders) into w1
            tensors["lokr_w1"] = tensors["lokr_w1"] * settings.scale
        return tensors, alpha_for(settings)

    @classmethod
    def from_peft(cls, spec, tensors, config, names):
        params = dict(tensors)
        r, alpha = peft.rank_and_alpha(config, names, "alpha")
        return cls.settings_from_tensors(spec, params, alpha, names[0], peft_rank=r), params

    @classmethod
    def to_peft(cls, layers, specs, component):
        """PEFT's ``r``, ``decompose_both``, ``decompose_factor`` and ``use_effective_conv2d`` that rebuild
        every layer's tensors (``ValueError`` when none do)."""
        peft.require_no_dora(component, layers, cls.name)
        decompose_both = any(e.settings.w1_low_rank for e in layers.values())
        effective = any(e.settings.tucker for e in layers.values())
        candidates = [-1] + sorted({e.settings.shape[k] for e in layers.values() for k in (0, 2)})
        factor = None
        for f in candidates:
            if all((peft_factorization(specs[p].out_features, f), peft_factorization(specs[p].in_features, f))
                   == (tuple(e.settings.shape[:2]), tuple(e.settings.shape[2:])) for p, e in layers.items()):
                factor = f
                break
        if factor is None:
            raise ValueError(f"{component}: no PEFT decompose_factor reproduces these LoKr factor shapes (PEFT does not "
                             "sort (factor, dim // factor) when factor > √dim); use factor=-1 or factor ≤ √dim")
        ranks, alphas = {}, {}
        for path, e in layers.items():
            s = e.settings
            a, b, c, d = s.shape
            if s.w2_low_rank:
                options = [s.r]
            elif s.w1_low_rank:
                options = [e.tensors["lokr_w1_a"].shape[1]]
            else:
                options = [s.r, max(b, d), max(a, b, c, d)]
            want = {k: tuple(v.shape) for k, v in e.tensors.items()}
            r_p = next((r for r in options if peft_lokr_shapes(specs[path], r, decompose_both, factor, effective) == want),
                       None)
            if r_p is None:
                raise ValueError(f"{component}: layer {path!r}: PEFT's LoKr rules (decompose_both={decompose_both}, "
                                 f"use_effective_conv2d={effective}) give other tensors than {want}")
            ranks[path], alphas[path] = r_p, alpha_for(s, r_p)
        r, rank_pattern = peft.common_and_patterns(ranks, int)
        alpha, alpha_pattern = peft.common_and_patterns(alphas)
        return {p: dict(e.tensors) for p, e in layers.items()}, {
            "r": r, "alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
            "decompose_both": decompose_both, "decompose_factor": factor, "use_effective_conv2d": effective,
            "rank_dropout": 0.0, "module_dropout": 0.0, "rank_dropout_scale": False, "init_weights": True}

    @classmethod
    def peft_config_fields(cls, config, layers):
        g = config.get
        return {"r": g("r", 8), "alpha": g("alpha", 8), "use_tucker": bool(g("use_effective_conv2d")),
                "rank_pattern": g("rank_pattern") or {}, "alpha_pattern": g("alpha_pattern") or {},
                "factor": g("decompose_factor", -1), "decompose_both": bool(g("decompose_both"))}

    @classmethod
    def _factors(cls, params, spec, settings, scale=1.0):
        """``(scale · w1, w2)``."""
        a, b, c, d = settings.shape
        w2_shape = (b, d, *spec.kernel_size) if spec.is_conv else (b, d)
        w1 = factor_w1(params)
        return w1 if is_one(scale) else w1 * scale, factor_w2(params, w2_shape)

    @classmethod
    def delta_weight(cls, params, spec, settings):
        w1, w2 = cls._factors(params, spec, settings)
        return delta_weight(w1, w2, settings.scale, spec.weight_shape)

    @classmethod
    def _route(cls, params, spec, settings, multiplier):
        """``(route or None, tensors)``: the route object of :func:`delta_forward` (a conv, or a
        linear layer with a low-rank ``w2``), and the tensors its ``factors`` take."""
        keys = sorted(k for k in params if k != dora.KEY)
        values = [params[k] for k in keys]
        scale = settings.scale * multiplier

        def factors(*values):
            return cls._factors(dict(zip(keys, values)), spec, settings, scale)

        if spec.is_conv:
            return KronConvRoute(spec, factors), values
        if "lokr_w2_a" in params and "lokr_t2" not in params:
            def low_rank_factors(*values):
                p = dict(zip(keys, values))
                return factor_w1(p) * scale, p["lokr_w2_a"], p["lokr_w2_b"]

            return KronLowRankRoute(low_rank_factors, spec), values
        return None, values

    @classmethod
    def delta_forward(cls, x, params, spec, settings, multiplier=1.0):
        """The activation route; while training its activation-sized intermediates are recomputed in
        backward instead of kept (only ``x``, which the base layer keeps anyway, and the factors are)."""
        route, values = cls._route(params, spec, settings, multiplier)
        if route is not None:
            return factored_route(route, x, *values)
        scale = settings.scale * multiplier
        keys = sorted(k for k in params if k != dora.KEY)

        def full(x, *values):
            return delta_forward(x, *cls._factors(dict(zip(keys, values)), spec, settings, scale), 1.0, spec)

        return recompute_in_backward(full, x, *values)

    @classmethod
    def folded_route(cls, params, spec, settings, multiplier=1.0):
        """Training alone on a conv: ``kron(w1, w2)`` folded into the base conv forward (its route's
        forward is a grouped conv of ``1/a`` of the base conv's work), the route's backward
        (:func:`~lycoris_lite.algos.common.folded_route`). Never on a linear layer, whose route never
        builds the full Kronecker product."""
        if not spec.is_conv or "lokr_t2" in params:
            return None
        route, values = cls._route(params, spec, settings, multiplier)
        return None if route is None else (route, values)
