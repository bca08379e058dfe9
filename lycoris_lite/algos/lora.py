"""LoRA / LoCon: ``ΔW = s · up · down`` with ``s = alpha / r`` (or ``alpha / √r``, rank-stabilised).

Shapes (kohya/LyCORIS layout, so file tensors are used as they are):

* Linear: ``lora_down (r, in)``, ``lora_up (out, r)``.
* Conv2d: ``lora_down (r, in, kh, kw)`` (the base conv's stride/padding/dilation), ``lora_up (out, r, 1, 1)``.
* Conv2d with Tucker (k > 1, ``use_tucker``): ``lora_down (r, in, 1, 1)``, ``lora_mid (r, r, kh, kw)``,
  ``lora_up (out, r, 1, 1)``; ``ΔW[p,q] = Σ mid[i,j] up[p,i] down[j,q]``.

Activation route: ``Δy = up(s · down(x))`` (two thin ops; the full ΔW is never built).

PEFT (``LORA``): ``lora_A.weight`` is ``lora_down``, ``lora_B.weight`` ``lora_up`` (the same tensors), scale
``alpha/r`` or ``alpha/√r`` (``use_rslora``), ``lora_magnitude_vector`` the DoRA magnitude on the output
axis (``use_dora``; :func:`lycoris_lite.algos.dora.from_peft`). PEFT's LoRA has no Tucker core.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace

import torch

from ..base.layer_kind import LayerSpec
from ..base.operators import is_one
from ..base.registry import Algorithm, NotSplittable, file_alpha, pattern_value, register
from ..base.rows import put_rows, same_tensors, take_rows
from ..base.settings import ScaledSettings
from . import dora, peft
from .common import kaiming_, rebuild_tucker


def lora_scale(alpha: float, r: int, rank_stabilized: bool = False) -> float:
    """The one place ``alpha / r`` (or ``alpha / √r``) is computed for the LoRA family."""
    return alpha / (math.sqrt(r) if rank_stabilized else r)


def alpha_for(settings: ScaledSettings, r: int | None = None, rank_stabilized: bool = False) -> float:
    """The alpha a file stores for a layer of the LoRA family so that a loader computing
    :func:`lora_scale` at rank ``r`` (default: the layer's) gets the layer's scale: the layer's own alpha
    when it does, else the inverse of :func:`lora_scale` (``scale · r`` or ``scale · √r``)."""
    r = settings.r if r is None else r
    if lora_scale(settings.alpha, r, rank_stabilized) == settings.scale:
        return float(settings.alpha)
    return float(settings.scale) * (math.sqrt(r) if rank_stabilized else r)


def peft_alphas(layers: dict) -> tuple[bool, dict[str, float]]:
    """``(use_rslora, {path: alpha})`` reproducing every layer's scale under PEFT's LoRA rule."""
    def fits(settings, rank_stabilized):
        return lora_scale(settings.alpha, settings.r, rank_stabilized) == settings.scale

    settings = [e.settings for e in layers.values()]
    rslora = not all(fits(s, False) for s in settings) and all(fits(s, True) for s in settings)
    return rslora, {path: alpha_for(e.settings, rank_stabilized=rslora) for path, e in layers.items()}


def delta_weight(down, up, scale: float, mid=None, shape=None) -> torch.Tensor:
    """``ΔW = scale · up @ down`` reshaped to ``shape`` (Tucker: ``rebuild_tucker(mid, up, down)``)."""
    if mid is not None:
        return rebuild_tucker(mid, up.flatten(1), down.flatten(1)) * scale
    delta = up.flatten(1) @ down.flatten(1)
    return (delta.reshape(shape) if shape is not None else delta) * scale


#: elements of the result a fuse block holds (1 MiB in float32, inside a 2 MiB L2): the block's
#: product is made and the weight added to it while it is in cache
FUSE_BLOCK = 1 << 18


def add_low_rank(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, scale: float,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``weight + scale · up @ down`` for a 2-D ``weight`` ``(out, in)``, ``up`` ``(out, r)``, ``down``
    ``(r, in)``, written into ``out`` (default: a new tensor; it may be ``weight`` itself).

    Without autograd it runs in row blocks of about :data:`FUSE_BLOCK` elements: each block's
    ``up @ down`` is made in cache and the weight added to it there, so the weight is read once and the
    result written once (one ``addmm`` into a new tensor copies the weight in first and then reads and
    writes the result again; benchmarks/README "Measurements behind the code")."""
    if out is not None and out.data_ptr() == weight.data_ptr():
        return out.addmm_(up, down, alpha=scale)
    if torch.is_grad_enabled() and (weight.requires_grad or up.requires_grad or down.requires_grad):
        return torch.addmm(weight, up, down, alpha=scale)
    out = torch.empty_like(weight, memory_format=torch.contiguous_format) if out is None else out
    rows = max(1, FUSE_BLOCK // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], rows):
        block = out[start:start + rows]
        torch.mm(up[start:start + rows], down, out=block)
        torch.add(weight[start:start + rows], block, alpha=scale, out=block)
    return out


def delta_forward(x, down, up, scale: float, spec: LayerSpec, mid=None) -> torch.Tensor:
    """``Δy = up(scale · down(x))``: equal to ``spec.op(x, delta_weight(...))``. The scale multiplies
    the rank-``r`` activation ``h`` (``T × r``), never the full-size output; not ``up`` either, whose
    scaled copy the last op would keep for backward in every layer (the parameter itself is free)."""
    if mid is not None:
        h = spec.op(spec.pointwise(x, down.flatten(1)), mid)
    else:
        h = spec.op(x, down)
    return spec.pointwise(h if is_one(scale) else h * scale, up.flatten(1))


@dataclass
class LoRAConfig(dora.DecomposableConfig):
    """LoRA / LoCon. ``use_rslora``: scale ``alpha/√r``; ``use_tucker``: Tucker core for k×k convs;
    ``dropout``: dropout on the adapter's input while training; ``use_dora``/``dora_axis``: DoRA
    (:mod:`lycoris_lite.algos.dora`)."""

    aliases = {**dora.DecomposableConfig.aliases, "lora_alpha": "alpha", "init_lora_weights": "init_weights",
               "lora_dropout": "dropout"}
    use_rslora: bool = False
    use_tucker: bool = False
    dropout: float = 0.0

    def validate(self):
        super().validate()
        if self.r < 1:
            raise ValueError("LoRA needs r >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True, kw_only=True)
class LoRASettings(dora.DecomposableSettings, ScaledSettings):
    """LoRA's per-layer settings: ``r``, ``alpha``, ``scale`` (:class:`ScaledSettings`), ``dora``,
    ``dora_init`` (:class:`~lycoris_lite.algos.dora.DecomposableSettings`), and

    * ``tucker``: the layer (a k×k conv) has a Tucker core ``lora_mid``;
    * ``dropout``: the probability of dropout on the adapter's input while training (0: none).
    """

    tucker: bool = False
    dropout: float = 0.0


@register
class LoRA(Algorithm):
    name = "lora"
    config_class = LoRAConfig
    settings_class = LoRASettings
    decomposable = True
    detect_keys = ("lora_up.weight",)
    kohya_keys = {"lora_down": "lora_down.weight", "lora_up": "lora_up.weight", "lora_mid": "lora_mid.weight"}
    peft_type = "LORA"
    peft_keys = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    peft_fields = {"lora_alpha": float}
    peft_unsupported = {"lora_B.bias": "LoRA bias (lora_bias=True)", "lora_embedding_A": "LoRA on embeddings",
                        "lora_embedding_B": "LoRA on embeddings"}
    file_keys = frozenset({*kohya_keys.values(), *peft_keys, *peft_unsupported, dora.KEY})
    lycoris_name = "locon"
    lycoris_args = {"use_tucker": "use_tucker", "use_rslora": "rs_lora", "dropout": "dropout"}

    @classmethod
    def input_width(cls, file_tensors):
        down = file_tensors.get("lora_down.weight", file_tensors.get("lora_A.weight"))
        return down.shape[1] if down is not None and down.dim() >= 2 else None

    @classmethod
    def split_rows(cls, params, spec, settings, parts):
        """Each module takes its rows of ``lora_up`` (and of an output-axis DoRA magnitude); ``lora_down``
        and the scale are shared."""
        if "lora_mid" in params:
            raise NotSplittable("a Tucker LoRA (lora_mid) belongs to a k×k conv, not a fused projection")
        return [(settings, {"lora_down": params["lora_down"], "lora_up": take_rows(params["lora_up"], rows),
                            **dora.split_magnitude(params, settings, rows)}) for _, rows in parts]

    @classmethod
    def join_rows(cls, spec, parts):
        """Modules sharing ``lora_down`` and the scale: one ``lora_up`` of their rows (what
        :meth:`split_rows` split). Otherwise a block-diagonal LoRA of rank ``Σ r_T``: ``lora_down`` the
        stacked downs, ``lora_up`` each module's ``s_T · up_T`` in its rows and rank columns, scale 1.
        Rows no module covers stay zero (no change there)."""
        if any("lora_mid" in t for *_, t in parts):
            raise NotSplittable("a Tucker LoRA (lora_mid) belongs to a k×k conv, not a fused projection")
        first = parts[0][2]
        magnitude = dora.join_magnitude([(rows, s, t) for _, rows, s, t in parts], spec.out_features)
        if all(s == first for _, _, s, _ in parts) and same_tensors([t for *_, t in parts], ["lora_down"]):
            up = put_rows([(rows, t["lora_up"]) for _, rows, _, t in parts], spec.out_features)
            return first, {"lora_down": parts[0][3]["lora_down"], "lora_up": up, **magnitude}
        total = sum(t["lora_down"].shape[0] for *_, t in parts)
        down = torch.cat([t["lora_down"] for *_, t in parts])
        up = down.new_zeros((spec.out_features, total))
        col = 0
        for _, rows, s, t in parts:
            r = t["lora_down"].shape[0]
            block = put_rows([(rows, t["lora_up"] * s.scale)], spec.out_features)
            up[:, col:col + r] = block
            col += r
        return replace(first, r=total, alpha=float(total), scale=1.0), {"lora_down": down, "lora_up": up, **magnitude}

    @classmethod
    def describe_size(cls, tensors):
        down = tensors.get("lora_down.weight", tensors.get("lora_A.weight"))
        return "?" if down is None else f"r={down.shape[0]}" + (" tucker" if "lora_mid.weight" in tensors else "")

    @classmethod
    def resolve(cls, config, spec, name):
        r = pattern_value(config.rank_pattern, name, config.r)
        alpha = pattern_value(config.alpha_pattern, name, config.alpha if config.alpha is not None else r)
        return LoRASettings(
            r=r,
            alpha=float(alpha),
            scale=lora_scale(alpha, r, config.use_rslora),
            tucker=bool(config.use_tucker and spec.is_conv and spec.taps > 1),
            dropout=config.dropout,
            **dora.resolve(config, spec),
        )

    @classmethod
    def init_params(cls, spec, settings, init_weights, generator):
        r = settings.r
        kh, kw = spec.kernel_size
        if not spec.is_conv:
            down, up = torch.empty(r, spec.in_features), torch.empty(spec.out_features, r)
            params = {}
        elif settings.tucker:
            down, up = torch.empty(r, spec.in_features, 1, 1), torch.empty(spec.out_features, r, 1, 1)
            params = {"lora_mid": kaiming_(torch.empty(r, r, kh, kw), generator)}
        else:
            down, up = torch.empty(r, spec.in_features, kh, kw), torch.empty(spec.out_features, r, 1, 1)
            params = {}
        params["lora_down"] = kaiming_(down, generator)
        params["lora_up"] = kaiming_(up, generator) if init_weights is False else up.zero_()
        return {**params, **dora.init_params(spec, settings, init_weights, generator)}

    @classmethod
    def settings_from_tensors(cls, spec, tensors, alpha, name, side=None, rank_stabilized=False):
        """``rank_stabilized``: the file's scale is ``alpha/√r`` (PEFT's ``use_rslora``)."""
        r = tensors["lora_down"].shape[0]
        a = file_alpha(alpha, r)
        return LoRASettings(r=r, alpha=a, scale=lora_scale(a, r, rank_stabilized), tucker="lora_mid" in tensors,
                            dropout=0.0, **dora.file_settings(spec, tensors, name))

    @classmethod
    def to_kohya(cls, params, settings):
        return super().to_kohya(params, settings)[0], alpha_for(settings)

    @classmethod
    def check_peft_config(cls, config, component):
        """PEFT's LoRA has DoRA (``use_dora``)."""

    @classmethod
    def from_peft(cls, spec, tensors, config, names):
        params = {"lora_down": tensors["lora_A.weight"], "lora_up": tensors["lora_B.weight"]}
        if config.get("use_dora") or "lora_magnitude_vector" in tensors:
            params[dora.KEY] = dora.from_peft(tensors["lora_magnitude_vector"], spec, names[0])
        return peft.rank_scaled(cls, spec, params, config, names, "lora_alpha",
                                rank_stabilized=bool(config.get("use_rslora")))

    @classmethod
    def to_peft(cls, layers, specs, component):
        for path, e in layers.items():
            if e.settings.tucker or "lora_mid" in e.tensors:
                raise ValueError(f"{component}: layer {path!r} is a Tucker LoRA (lora_mid), which PEFT's LoRA cannot hold")
        axis = peft.one_value({e.settings.dora for e in layers.values()},
                              "use_dora setting (DoRA on every layer or none)", component)
        if axis == "input":
            raise ValueError(f"{component}: DoRA on the input axis (LyCORIS's older dora_scale (1, in)) has no PEFT form; "
                             "PEFT normalises per output channel. Save it with format='kohya'")
        tensors = {}
        for path, e in layers.items():
            tensors[path] = {"lora_A.weight": e.tensors["lora_down"], "lora_B.weight": e.tensors["lora_up"]}
            if axis:
                tensors[path]["lora_magnitude_vector"] = dora.to_peft(e.tensors[dora.KEY], specs[path])
        rslora, alphas = peft_alphas(layers)
        r, rank_pattern = peft.common_and_patterns({p: e.settings.r for p, e in layers.items()}, int)
        alpha, alpha_pattern = peft.common_and_patterns(alphas)
        dropout = Counter(float(e.settings.dropout) for e in layers.values()).most_common(1)[0][0]
        return tensors, {"r": r, "lora_alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
                         "use_rslora": rslora, "lora_dropout": dropout, "fan_in_fan_out": False, "use_dora": bool(axis),
                         "lora_bias": False, "init_lora_weights": True}

    @classmethod
    def peft_config_fields(cls, config, layers):
        g = config.get
        return {"r": g("r", 8), "alpha": g("lora_alpha", 8), "use_rslora": bool(g("use_rslora")),
                "use_dora": bool(g("use_dora")), "rank_pattern": g("rank_pattern") or {},
                "alpha_pattern": g("alpha_pattern") or {}}

    @classmethod
    def delta_weight(cls, params, spec, settings):
        return delta_weight(params["lora_down"], params["lora_up"], settings.scale, params.get("lora_mid"), spec.weight_shape)

    @classmethod
    def add_delta_weight(cls, weight, params, spec, settings, multiplier=1.0, out=None):
        """``W + multiplier·scale·up @ down`` by :func:`add_low_rank` (no ΔW tensor; Tucker: the default)."""
        if "lora_mid" in params:
            return super().add_delta_weight(weight, params, spec, settings, multiplier, out)
        flat = weight.reshape(weight.shape[0], -1)
        result = add_low_rank(flat, params["lora_up"].flatten(1), params["lora_down"].flatten(1),
                              settings.scale * multiplier, None if out is None else out.view(flat.shape))
        return result.reshape(weight.shape) if out is None else out

    @classmethod
    def delta_forward(cls, x, params, spec, settings, multiplier=1.0):
        return delta_forward(x, params["lora_down"], params["lora_up"], settings.scale * multiplier, spec,
                             params.get("lora_mid"))

