"""LoHa: ``ΔW = s · (w1a @ w1b) ⊙ (w2a @ w2b)``, ``s = alpha / r`` (Hadamard product of two rank-r
products, rank up to r²).

Shapes (kohya/LyCORIS layout): ``hada_w1_a, hada_w2_a (out, r)``; ``hada_w1_b, hada_w2_b
(r, in·kh·kw)`` (2-D for convs too). Tucker (k×k conv, ``use_tucker``): ``hada_t1, hada_t2
(r, r, kh, kw)``, ``hada_w{1,2}_a (r, out)``, ``hada_w{1,2}_b (r, in)``, with
``W_i = Σ t_i[a,b] w_i_a[a,p] w_i_b[b,q]`` and ``ΔW = s · W_1 ⊙ W_2``.

Routes: at inference the layer folds the (cached) ``W + s·ΔW`` into one call of the base op. While
training, the Hadamard product equals a rank-r² LoRA with Khatri-Rao factors
``up[:, p·r+q] = w1a[:, p] ⊙ w2a[:, q]``, ``down[p·r+q] = w1b[p] ⊙ w2b[q]``: that activation route is used
when it costs less than the weight route's extra weight-gradient pass (``3·r²·(in·kh·kw + out) <
out·in·kh·kw``), else ``W + s·ΔW`` is folded (one op instead of PEFT's two). On a linear or 1×1 layer
where the LoHa trains alone, the forward folds ``W + s·ΔW`` into the base op all the same and only the
backward takes the Khatri-Rao route (:meth:`LoHa.folded_route`): the forward's two rank-r² GEMMs go,
and the step costs about what a rank-16 LoRA's does (1.05–1.11× ours at 640 wide, against 1.31× with
the route both ways). The Hadamard product recomputes its factors in the backward pass instead of
keeping two ``out × in`` intermediates.

PEFT (``LOHA``): the same keys and layouts; scale ``alpha/r``; ``use_effective_conv2d`` is ``use_tucker``
(one setting for all k×k convs); no DoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base.registry import Algorithm, NotSplittable, file_alpha, pattern_value, register
from ..base.rows import put_rows, same_tensors, take_rows
from ..base.settings import ScaledSettings
from . import dora, peft
from .common import LowRankRoute, factored_route, init_factors, rebuild_tucker
from .lora import alpha_for, lora_scale


class _HadamardProduct(torch.autograd.Function):
    """``(w1a @ w1b) * (w2a @ w2b)`` keeping only the four factors for backward."""

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b):
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        return (w1a @ w1b) * (w2a @ w2b)

    @staticmethod
    def backward(ctx, grad):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        g1 = grad * (w2a @ w2b)
        g2 = grad * (w1a @ w1b)
        return g1 @ w1b.T, w1a.T @ g1, g2 @ w2b.T, w2a.T @ g2


def delta_weight(w1a, w1b, w2a, w2b, scale: float, shape, t1=None, t2=None) -> torch.Tensor:
    """``ΔW = scale · (w1a @ w1b) ⊙ (w2a @ w2b)`` (or the Tucker form) reshaped to ``shape``."""
    if t1 is not None:
        return rebuild_tucker(t1, w1a.T, w1b) * rebuild_tucker(t2, w2a.T, w2b) * scale
    return (_HadamardProduct.apply(w1a, w1b, w2a, w2b) * scale).reshape(shape)


def khatri_rao_factors(w1a, w1b, w2a, w2b, scale: float, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down, up)`` with ``up @ down = scale · (w1a @ w1b) ⊙ (w2a @ w2b)`` (flattened), rank r²:
    ``up[:, p·r+q] = scale · w1a[:, p] ⊙ w2a[:, q]``, ``down[p·r+q] = w1b[p] ⊙ w2b[q]`` (as an
    ``(r², in, kh, kw)`` kernel for convs)."""
    r = w1a.shape[1]
    up = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], r * r) * scale
    down = (w1b[:, None, :] * w2b[None, :, :]).reshape(r * r, -1)
    if spec.is_conv:
        down = down.reshape(r * r, spec.in_features, *spec.kernel_size)
    return down, up


class KhatriRaoRoute(LowRankRoute):
    """:class:`LowRankRoute` with the Khatri-Rao factors of :func:`khatri_rao_factors` and their
    backward written out: with ``Gu = ∂up`` as ``(out, r, r)`` and ``Gd = ∂down`` as ``(r, r, in·kh·kw)``,
    ``∂w1a = s·Σ_q Gu[:, :, q] ⊙ w2a[:, q]``, ``∂w2a = s·Σ_p Gu[:, p, :] ⊙ w1a[:, p]``,
    ``∂w1b = Σ_q Gd[:, q] ⊙ w2b[q]``, ``∂w2b = Σ_p Gd[p] ⊙ w1b[p]``."""

    def __init__(self, spec, scale: float):
        super().__init__(spec)
        self.scale = scale

    def factors(self, w1a, w1b, w2a, w2b):
        return khatri_rao_factors(w1a, w1b, w2a, w2b, self.scale, self.spec)

    def delta(self, w1a, w1b, w2a, w2b):
        """``ΔW`` flattened, by the Hadamard formula (``2·r·out·in`` multiply-adds, not ``r²·out·in``)."""
        return (w1a @ w1b) * (w2a @ w2b) * self.scale

    def factors_vjp(self, tensors, grads):
        w1a, w1b, w2a, w2b = tensors
        grad_down, grad_up = grads
        r = w1a.shape[1]
        gu = grad_up.reshape(-1, r, r) * self.scale
        gd = grad_down.reshape(r, r, -1)
        return ((gu @ w2a.unsqueeze(2)).squeeze(2), (gd * w2b.unsqueeze(0)).sum(1),
                (gu.transpose(1, 2) @ w1a.unsqueeze(2)).squeeze(2), (gd * w1b.unsqueeze(1)).sum(0))


def delta_forward(x, w1a, w1b, w2a, w2b, scale: float, spec) -> torch.Tensor:
    """``spec.op(x, ΔW)`` through the rank-r² Khatri-Rao factors (non-Tucker layouts).

    On a linear (or 1×1 conv) layer, training keeps only ``x`` and the four factors: ``h = op(x, down)``
    (``T × r²``) is recomputed in backward, one thin GEMM. A k×k conv keeps ``h``: there the recompute
    is a k×k conv with ``r²`` outputs (costly: benchmarks/README "Measurements behind the code"),
    while ``h`` stays under what PEFT keeps (its ``ΔW`` for the conv's backward)."""
    route = KhatriRaoRoute(spec, scale)
    if not spec.is_pointwise:
        return route.forward(x, *route.factors(w1a, w1b, w2a, w2b))
    return factored_route(route, x, w1a, w1b, w2a, w2b)


@dataclass
class LoHaConfig(dora.DecomposableConfig):
    """LoHa. ``use_tucker``: Tucker cores for k×k convs (``use_effective_conv2d`` in PEFT);
    ``use_dora``/``dora_axis``: DoRA (LyCORIS's DoHa)."""

    aliases = {**dora.DecomposableConfig.aliases, "use_effective_conv2d": "use_tucker"}
    use_tucker: bool = False

    def validate(self):
        super().validate()
        if self.r < 1:
            raise ValueError("LoHa needs r >= 1")


@dataclass(frozen=True, kw_only=True)
class LoHaSettings(dora.DecomposableSettings, ScaledSettings):
    """LoHa's per-layer settings: ``r``, ``alpha``, ``scale`` (:class:`ScaledSettings`), ``dora``,
    ``dora_init`` (:class:`~lycoris_lite.algos.dora.DecomposableSettings`), and ``tucker``: the layer (a
    k×k conv) has Tucker cores ``hada_t1``, ``hada_t2``."""

    tucker: bool = False


@register
class LoHa(Algorithm):
    name = "loha"
    config_class = LoHaConfig
    settings_class = LoHaSettings
    activation_route = False
    decomposable = True

    @classmethod
    def use_activation_route(cls, spec, settings, needs_grad):
        if not needs_grad or settings.tucker:
            return False
        r2 = settings.r ** 2
        return 3 * r2 * (spec.flat_in + spec.out_features) < spec.out_features * spec.flat_in

    @classmethod
    def folded_route(cls, params, spec, settings, multiplier=1.0):
        """Linear and 1×1 layers: the Khatri-Rao route's backward under a folded forward (a k×k conv
        keeps ``h`` from its forward instead: see :func:`delta_forward`)."""
        if not spec.is_pointwise or "hada_t1" in params:
            return None
        return KhatriRaoRoute(spec, settings.scale * multiplier), (
            params["hada_w1_a"], params["hada_w1_b"], params["hada_w2_a"], params["hada_w2_b"])

    @classmethod
    def delta_forward(cls, x, params, spec, settings, multiplier=1.0):
        return delta_forward(x, params["hada_w1_a"], params["hada_w1_b"], params["hada_w2_a"], params["hada_w2_b"],
                             settings.scale * multiplier, spec)
    detect_keys = ("hada_w1_a",)
    peft_type = "LOHA"
    peft_keys = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    peft_fields = {"alpha": float}
    file_keys = frozenset({*peft_keys, dora.KEY})
    lycoris_args = {"use_tucker": "use_tucker"}

    @classmethod
    def input_width(cls, file_tensors):
        """``hada_w1_b``'s columns (times ``kh·kw`` on a conv without a Tucker core)."""
        w1_b = file_tensors.get("hada_w1_b")
        return w1_b.shape[1] if w1_b is not None and w1_b.dim() >= 2 else None

    @classmethod
    def split_rows(cls, params, spec, settings, parts):
        """``ΔW = (w1a·w1b) ⊙ (w2a·w2b)``: a row of ``ΔW`` needs that row of ``w1a`` and of ``w2a`` only,
        so each module takes its rows of both ``a`` factors (and of an output-axis DoRA magnitude)."""
        if settings.tucker:
            raise NotSplittable("a Tucker LoHa (hada_t1/hada_t2) belongs to a k×k conv, not a fused projection")
        shared = {k: params[k] for k in ("hada_w1_b", "hada_w2_b")}
        return [(settings, {**shared, "hada_w1_a": take_rows(params["hada_w1_a"], rows),
                            "hada_w2_a": take_rows(params["hada_w2_a"], rows),
                            **dora.split_magnitude(params, settings, rows)}) for _, rows in parts]

    @classmethod
    def join_rows(cls, spec, parts):
        """Modules sharing both ``b`` factors and the scale: one LoHa with their rows of the ``a`` factors.
        Otherwise none is exact (the Hadamard product of two sums is not a sum of Hadamard products)."""
        first = parts[0][2]
        if any(s != first for _, _, s, _ in parts) or not same_tensors([t for *_, t in parts], ["hada_w1_b", "hada_w2_b"]):
            raise NotSplittable("LoHa adapters whose b factors (hada_w1_b, hada_w2_b) or scales differ between "
                                "the modules have no exact LoHa on the fused matrix")
        magnitude = dora.join_magnitude([(rows, s, t) for _, rows, s, t in parts], spec.out_features)
        out = spec.out_features
        tensors = {k: parts[0][3][k] for k in ("hada_w1_b", "hada_w2_b")}
        for key in ("hada_w1_a", "hada_w2_a"):
            tensors[key] = put_rows([(rows, t[key]) for _, rows, _, t in parts], out)
        return first, {**tensors, **magnitude}

    @classmethod
    def describe_size(cls, tensors):
        b = tensors.get("hada_w1_b")
        return "?" if b is None else f"r={b.shape[0]}" + (" tucker" if "hada_t1" in tensors else "")

    @classmethod
    def resolve(cls, config, spec, name):
        r = pattern_value(config.rank_pattern, name, config.r)
        alpha = pattern_value(config.alpha_pattern, name, config.alpha if config.alpha is not None else r)
        return LoHaSettings(r=r, alpha=float(alpha), scale=lora_scale(alpha, r),
                            tucker=bool(config.use_tucker and spec.is_conv and spec.taps > 1),
                            **dora.resolve(config, spec))

    @classmethod
    def init_params(cls, spec, settings, init_weights, generator):
        r, out = settings.r, spec.out_features
        if settings.tucker:
            kh, kw = spec.kernel_size
            params = {
                "hada_t1": torch.empty(r, r, kh, kw), "hada_t2": torch.empty(r, r, kh, kw),
                "hada_w1_a": torch.empty(r, out), "hada_w1_b": torch.empty(r, spec.in_features),
                "hada_w2_a": torch.empty(r, out), "hada_w2_b": torch.empty(r, spec.in_features),
            }
        else:
            params = {
                "hada_w1_a": torch.empty(out, r), "hada_w1_b": torch.empty(r, spec.flat_in),
                "hada_w2_a": torch.empty(out, r), "hada_w2_b": torch.empty(r, spec.flat_in),
            }
        return {**init_factors(params, "hada_w2_b", init_weights, generator),
                **dora.init_params(spec, settings, init_weights, generator)}

    @classmethod
    def settings_from_tensors(cls, spec, tensors, alpha, name, side=None):
        tucker = "hada_t1" in tensors
        r = tensors["hada_w1_b"].shape[0]
        a = file_alpha(alpha, r)
        return LoHaSettings(r=r, alpha=a, scale=lora_scale(a, r), tucker=tucker,
                            **dora.file_settings(spec, tensors, name))

    @classmethod
    def to_kohya(cls, params, settings):
        return super().to_kohya(params, settings)[0], alpha_for(settings)

    @classmethod
    def from_peft(cls, spec, tensors, config, names):
        return peft.rank_scaled(cls, spec, dict(tensors), config, names, "alpha")

    @classmethod
    def to_peft(cls, layers, specs, component):
        peft.require_no_dora(component, layers, cls.name)
        effective = {bool(e.settings.tucker) for p, e in layers.items() if specs[p].is_conv and specs[p].taps > 1}
        effective = peft.one_value(effective, "use_effective_conv2d", component) if effective else False
        r, rank_pattern = peft.common_and_patterns({p: e.settings.r for p, e in layers.items()}, int)
        alpha, alpha_pattern = peft.common_and_patterns({p: alpha_for(e.settings) for p, e in layers.items()})
        return {p: dict(e.tensors) for p, e in layers.items()}, {
            "r": r, "alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
            "use_effective_conv2d": effective, "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True}

    @classmethod
    def peft_config_fields(cls, config, layers):
        g = config.get
        return {"r": g("r", 8), "alpha": g("alpha", 8), "use_tucker": bool(g("use_effective_conv2d")),
                "rank_pattern": g("rank_pattern") or {}, "alpha_pattern": g("alpha_pattern") or {}}

    @classmethod
    def delta_weight(cls, params, spec, settings):
        return delta_weight(params["hada_w1_a"], params["hada_w1_b"], params["hada_w2_a"], params["hada_w2_b"],
                            settings.scale, spec.weight_shape, params.get("hada_t1"), params.get("hada_t2"))

