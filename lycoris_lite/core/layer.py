"""The one layer wrapper: named adapters of any algorithm on a Linear or Conv2d layer.

Composition order (one formula, used by both the fused weight and the unfused forward): for the
live adapters in the order they were added to the layer,

    W_eff = M_k( … M_1(W) ) + Σ_j s_j · ΔW_j

where each multiplicative adapter ``i`` (OFT, BOFT, HRA) is ``M_i(W) = W + s_i·(L_i·W·R_i − W)`` and the
additive ones (LoRA, LoHa, LoKr) add ``s_j·ΔW_j`` on top (not transformed). ``s`` is the user's
multiplier; ``alpha / r`` lives inside each algorithm's formula. Rotations do not commute, so the order
matters, and fused and unfused results follow the same one.

An additive adapter with DoRA (``use_dora``, :mod:`lycoris_lite.algos.dora`) is a stage of the chain
instead, ``M_i(W) = W + s_i·(m ⊙ (W + ΔW_i)/‖W + ΔW_i‖ − W)`` on the weight it receives, i.e. a
per-channel gain on everything before it plus its own ``ΔW_i`` under a gain. The chain therefore
expands into terms ``coef · L · S · R`` whose source ``S`` is the weight or such a ``ΔW_i``; every
term runs on activations where that is exact and cheap.

State-dict keys of the base layer are unchanged: the wrapper registers the base layer's own ``weight``
and ``bias`` Parameters and puts adapter tensors under ``adapters.<name>.<key>``; the original module is
kept (unregistered) and put back by :meth:`AdapterLayer.unwrap`.

Fusing swaps the weight's storage for a newly computed tensor and keeps the original tensor as the
backup (same device, or ``backup_device``); unfusing swaps it back, so unfuse is bit-exact after any
number of cycles and costs one copy of the fused layers (:func:`~lycoris_lite.core.controller.fuse_layers`
puts the new weights of one fuse into one block, :mod:`lycoris_lite.core.buffers`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..base.checks import all_finite
from ..base.layer_kind import LayerSpec, move_channels_back, move_channels_last
from ..algos import common, dora
from ..base.operators import Diagonal, Operator, is_one, low_rank_parts, orthogonal_blocks, rotate_output, scaled
from ..base.registry import Algorithm
from ..base.settings import Settings
from .quantized import check_fusable, quantized_weight
from .slot import AdapterSlot, _Use, _own_storage, compute_dtype


def _apply_ops(t: torch.Tensor, ops, spec: LayerSpec, cdtype) -> torch.Tensor:
    """``ops`` applied in turn along the channel axis of ``t`` (last for linear layers, axis 1 for
    convs, where each acts in place of the axis), computed in ``cdtype``; returns ``t``'s dtype."""
    v = t.to(cdtype)
    for op in ops:
        v = op.apply_channels_first(v) if spec.is_conv else op.apply(v)
    return v.to(t.dtype)


@dataclass
class _Term:
    """``coef · L_t · S · R_t`` in the expansion of the multiplicative chain; ``S`` is the weight
    (``source=None``) or the ``ΔW`` of a DoRA adapter (``source`` its use). ``coef`` is a number or a
    0-d tensor (see :func:`~lycoris_lite.base.operators.is_one`)."""

    coef: float | torch.Tensor
    inputs: list[Operator] = field(default_factory=list)  # R_1 .. R_k (W ← W·R_1 first)
    outputs: list[Operator] = field(default_factory=list)  # L_1 .. L_k (W ← L_1·W first)
    source: _Use | None = None

    @property
    def plain(self) -> bool:
        """``1 · W``: nothing to apply."""
        return is_one(self.coef) and not self.inputs and not self.outputs and self.source is None


class AdapterLayer(nn.Module):
    def __init__(self, base: nn.Module, name: str = "", backup_device: torch.device | str | None = None):
        super().__init__()
        self.weight = base.weight
        self.bias = base.bias
        self.adapters = nn.ModuleDict()
        # plain attributes straight into __dict__ (as AdapterSlot does); the base module is kept, not registered
        self.__dict__.update(spec=LayerSpec.from_module(base, name), layer_name=name, active=[], fused=[],
                             disabled=False, backup_device=backup_device, _backup=None, _base_module=base,
                             quant=quantized_weight(base))

    # ---- attributes diffusers and users read on Linear/Conv2d -----------------------------------
    @property
    def base_module(self) -> nn.Module:
        return self._base_module

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride",
                        "padding", "dilation", "groups", "padding_mode"):
                return getattr(self._base_module, name)
            raise

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype adapters on this layer keep and compute in (:func:`compute_dtype` of the weight's, or
        of a quantized layer's compute dtype)."""
        return compute_dtype(self.quant.compute_dtype if self.quant is not None else self.weight.dtype)

    def float_weight(self) -> torch.Tensor:
        """The original weight as it computes: the backup of a fused weight, the weight itself, or a
        quantized layer's weight dequantized into a new float32 tensor (a temporary, never kept)."""
        if self._backup is not None:
            return self._backup
        if self.quant is not None:
            return self.quant.dequantize(self._base_module)
        return self.weight.detach()

    # ---- adapters ---------------------------------------------------------------------------------
    def add(self, name: str, algorithm: type[Algorithm], settings: Settings, params: dict[str, torch.Tensor]):
        """Attach adapter ``name``. A new DoRA adapter (settings ``dora_init``) gets its magnitude
        ``m = relative ⊙ ‖W + ΔW‖`` from the original weight here (PEFT's init), and keeps its settings
        with ``dora_init=False``."""
        weight = self.weight
        dtype = self.adapter_dtype
        params = {k: _own_storage(v.to(device=weight.device, dtype=dtype)) for k, v in params.items()}
        if algorithm.decomposable and settings.dora_init:
            settings = replace(settings, dora_init=False)
            with torch.no_grad():
                delta = algorithm.delta_weight(params, self.spec, settings)
                original = self.float_weight().to(delta)
                params[dora.KEY] = dora.magnitude_from_weight(params[dora.KEY], original, delta, settings.dora)
        self.adapters[name] = AdapterSlot(algorithm, settings, params, dtype, weight.device)

    def remove(self, name: str):
        if name in self.fused:
            raise ValueError(f"adapter {name!r} is fused into {self.layer_name!r}; unfuse it first")
        del self.adapters[name]
        if name in self.active:
            self.active.remove(name)

    def ordered(self, names) -> list[str]:
        """``names`` in the order the adapters were added (the composition order)."""
        wanted = set(names)
        return [n for n in self.adapters if n in wanted]

    def live_adapters(self) -> list[str]:
        if self.disabled:
            return []
        return [n for n in self.ordered(self.active) if n not in self.fused and not self.adapters[n].muted]

    def _fuse_uses(self, names, dtype, scales: dict[str, float] | None = None) -> list[_Use]:
        """``names`` as fusing uses them: tensors in ``dtype``, the float scale (or ``scales[name]``)."""
        scales = scales or {}
        return [_Use(self.adapters[n], self.adapters[n].tensors(dtype), scales.get(n, self.adapters[n].scale),
                     self.adapters[n].settings) for n in names]

    def _forward_uses(self, names) -> list[_Use]:
        """``names`` as the forward uses them: each slot called (its offload hooks run), its multiplier
        tensor, or the number 1 for a slot training at scale 1."""
        uses = []
        for n in names:
            slot = self.adapters[n]
            params, multiplier = slot()
            training = torch.is_grad_enabled() and any(p.requires_grad for p in params.values())
            unit = training and slot.scale == 1.0 and slot.step_factor == 1.0
            uses.append(_Use(slot, params, 1.0, slot.settings) if unit else
                        _Use(slot, params, multiplier, slot.forward_settings))
        return uses

    # ---- the composition plan -----------------------------------------------------------------
    def _plan(self, uses: list[_Use], dtype, base: torch.Tensor | None = None):
        """``(terms, additive uses)`` for ``uses`` in composition order. ``base``: the weight the
        chain starts from, which DoRA stages need for their norms (default: the current weight)."""
        terms = [_Term(1.0)]
        additive = []
        for use in uses:
            algo = use.algorithm
            if algo.decomposable and use.settings.dora:
                terms = self._decomposition_stage(terms, use, dtype, base)
                continue
            if not algo.multiplicative:
                additive.append(use)
                continue
            in_op, out_op = algo.transform(use.params, self.spec, use.settings)
            s = use.multiplier
            if in_op is not None and out_op is not None and not is_one(s):
                # W + s(L W R − W) is not a product of one-sided factors: split every term in two
                terms = [t for old in terms for t in (
                    _Term(old.coef * (1 - s), old.inputs, old.outputs, old.source),
                    _Term(old.coef * s, old.inputs + [in_op], old.outputs + [out_op], old.source))]
            else:
                for t in terms:
                    if in_op is not None:
                        t.inputs = t.inputs + [scaled(in_op, s)]
                    if out_op is not None:
                        t.outputs = t.outputs + [scaled(out_op, s)]
        return terms, additive

    def _decomposition_stage(self, terms: list[_Term], use: _Use, dtype, base) -> list[_Term]:
        """Append a DoRA stage ``W ← (1 − s + s·g) ⊙ W + s·g ⊙ ΔW``, ``g = m/‖W + ΔW‖`` per channel of
        its axis, to the expansion ``terms`` of the chain so far (``W`` = their sum)."""
        spec, settings, s = self.spec, use.settings, use.multiplier
        axis = settings.dora
        params = {k: v.to(dtype) for k, v in use.params.items()}
        if base is None:
            base = self.float_weight() if self.quant is not None else self.weight.detach()
        with torch.no_grad():
            running = self._expand(terms, base.to(dtype), dtype)
            delta = use.algorithm.delta_weight(params, spec, settings)
        gain = dora.gain(params[dora.KEY], running + delta, axis).reshape(-1)
        if axis == "input":  # the flat input index is channel·kh·kw + tap
            gain = gain.repeat_interleave(spec.taps)
        keep, own = Diagonal(1 - s + s * gain), Diagonal(gain)
        side = "inputs" if axis == "input" else "outputs"
        for t in terms:
            setattr(t, side, getattr(t, side) + [keep])
        return terms + [_Term(s, **{side: [own]}, source=use)]

    def _source_weight(self, term: _Term, base: torch.Tensor, dtype) -> torch.Tensor:
        """``S`` of a term: ``base`` or the source adapter's ``ΔW``."""
        if term.source is None:
            return base
        use = term.source
        return use.algorithm.delta_weight({k: v.to(dtype) for k, v in use.params.items()}, self.spec, use.settings)

    def _expand(self, terms: list[_Term], base: torch.Tensor, dtype) -> torch.Tensor:
        """``Σ coef · L·S·R`` as a dense weight."""
        if len(terms) == 1 and is_one(terms[0].coef) and terms[0].source is None:
            return self._transform_weight(base, terms[0])
        return sum(t.coef * self._transform_weight(self._source_weight(t, base, dtype), t) for t in terms)

    def _transform_weight(self, weight: torch.Tensor, term: _Term, inputs: bool = True) -> torch.Tensor:
        flat = self.spec.flatten_weight(weight)
        if inputs:
            for op in term.inputs:  # W ← W·R
                flat = op.apply(flat, transpose=True)
        if term.outputs:
            cols = flat.T
            for op in term.outputs:  # W ← L·W
                cols = op.apply(cols)
            flat = cols.T
        return self.spec.unflatten_weight(flat)

    def effective_weight(self, names, base: torch.Tensor | None = None, out: torch.Tensor | None = None,
                         scales: dict[str, float] | None = None) -> torch.Tensor:
        """``W_eff`` for ``names`` (in composition order) in float32 or wider, from ``base`` (default:
        the original weight), at the adapters' scales (or ``scales[name]``); with ``out`` (any dtype) it
        is written there and ``out`` returned. A stack of additive adapters on the plain weight is summed
        straight into ``out`` (no temporary)."""
        if base is None:
            base = self.float_weight()
        dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
        w = base.to(device=self.weight.device, dtype=dtype)
        terms, additive = self._plan(self._fuse_uses(self.ordered(names), dtype, scales), dtype, w)
        direct = out is not None and out.dtype == dtype and additive and len(terms) == 1 and terms[0].plain
        result = w if direct else self._expand(terms, w, dtype)
        for use in additive:
            result = use.algorithm.add_delta_weight(result, use.params, self.spec, use.settings, use.multiplier,
                                                    out=out if direct else None)
        if out is None or direct:
            return result
        return out.copy_(result)

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec, weight, bias = self.spec, self.weight, self.bias
        if self.disabled and self._backup is not None:
            return spec.op(x, self._backup.to(device=weight.device, dtype=weight.dtype), bias)
        names = self.live_adapters()
        if not names:
            return self._base_module(x) if self.quant is not None else spec.op(x, weight, bias)
        if self.quant is not None:
            return self._quantized_forward(x, names)
        cdtype = compute_dtype(weight.dtype)
        terms, additive = self._plan(self._forward_uses(names), cdtype)
        routed = []
        folded = []
        for use in additive:
            (routed if use.algorithm.use_activation_route(spec, use.settings, self._needs_grad(use)) else folded).append(use)

        weight_delta = None
        for use in folded:
            delta = use.multiplier * use.algorithm.delta_weight(use.params, spec, use.settings)
            weight_delta = delta if weight_delta is None else weight_delta + delta

        plain = len(terms) == 1 and terms[0].plain
        if plain and weight_delta is None and len(routed) == 1:
            use = routed[0]
            folded_route = None if (getattr(use.settings, "dropout", 0.0) and self.training) or not self._needs_grad(use) \
                else use.algorithm.folded_route(use.params, spec, use.settings, use.multiplier)
            if folded_route is not None:  # one adapter training alone: folded forward, route backward
                return common.folded_route(folded_route[0], x, weight, bias, *folded_route[1])
        if plain:
            effective = weight if weight_delta is None else weight + weight_delta.to(weight.dtype)
            y = spec.op(x, effective, bias)
        else:
            y = None
            if len(terms) == 1:
                y = self._low_rank_term(x, terms[0], cdtype, bias)
                if y is None:
                    y = self._orthogonal_output_term(x, terms[0], cdtype, bias)
            if y is None:
                for term in terms:
                    h = self._term_forward(x, term, cdtype)
                    y = h if y is None else y + h
                y = spec.add_bias(y, bias)
            if weight_delta is not None:
                y = y + spec.op(x, weight_delta.to(weight.dtype))

        for use in routed:
            if torch.is_grad_enabled() or (getattr(use.settings, "dropout", 0.0) and self.training):
                # out of place, though autograd keeps no copy of it: in place on the base op's output
                # made training steps slower (benchmarks/README "Measurements behind the code")
                y = y + self._route(x, use, use.multiplier, cdtype).to(y.dtype)
            else:  # inference: accumulated into the fresh output in place
                y = use.algorithm.add_delta_forward(y, x.to(cdtype), use.params, spec, use.settings, use.multiplier)
        return y

    def _quantized_forward(self, x: torch.Tensor, names) -> torch.Tensor:
        """The forward on a quantized layer: the composition formula with every base op the layer's own
        forward ``q(x) = op(x, W) + bias`` (its kernels, its hooks), nothing folded into the weight.
        A term ``coef · L·op(x, W·R)`` is ``coef · L(q(R x) − bias)``; a DoRA term's ``ΔW`` and a folded
        additive adapter run as ``op(x, ΔW)`` next to it; the activation routes as on any layer. Only a DoRA
        stage reads the weight (its norms), dequantized for the call."""
        spec, bias = self.spec, self.bias
        cdtype = self.adapter_dtype
        uses = self._forward_uses(names)
        base = None
        if any(u.algorithm.decomposable and u.settings.dora for u in uses):
            with torch.no_grad():
                base = self.float_weight().to(cdtype)
        terms, additive = self._plan(uses, cdtype, base)
        y = None
        for term in terms:
            if term.source is not None:  # a DoRA stage's own ΔW, through its route or as op(x, ΔW)
                use = term.source
                xin = _apply_ops(x, reversed(term.inputs), spec, cdtype) if term.inputs else x
                if use.algorithm.use_activation_route(spec, use.settings, self._needs_grad(use)):
                    h = self._route(xin, use, term.coef, cdtype).to(x.dtype)
                else:
                    delta = use.algorithm.delta_weight(use.params, spec, use.settings)
                    h = spec.op(xin.to(cdtype), delta * term.coef).to(x.dtype)
            else:
                xin = _apply_ops(x, reversed(term.inputs), spec, cdtype) if term.inputs else x
                h = self._base_module(xin)
                if bias is not None:  # the term is coef · L·op(R x, W): the bias is added once, below
                    h = h - (bias[:, None, None] if spec.is_conv else bias).to(h.dtype)
                if not is_one(term.coef):
                    h = h * term.coef
            if term.outputs:
                h = _apply_ops(h, term.outputs, spec, cdtype)
            y = h if y is None else y + h
        y = spec.add_bias(y, None if bias is None else bias.to(y.dtype))
        for use in additive:
            if use.algorithm.use_activation_route(spec, use.settings, self._needs_grad(use)):
                y = y + self._route(x, use, use.multiplier, cdtype).to(y.dtype)
            else:
                delta = use.multiplier * use.algorithm.delta_weight(use.params, spec, use.settings)
                y = y + spec.op(x.to(cdtype), delta).to(y.dtype)
        return y

    def _route(self, x: torch.Tensor, use: _Use, multiplier, cdtype) -> torch.Tensor:
        """``multiplier · op(x, ΔW)`` of an additive adapter through its activation route (with its
        input dropout while training)."""
        xa = x.to(cdtype)
        p = getattr(use.settings, "dropout", 0.0)
        if p and self.training:
            xa = F.dropout(xa, p, training=True)
        return use.algorithm.delta_forward(xa, use.params, self.spec, use.settings, multiplier)

    @staticmethod
    def _needs_grad(use: _Use) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in use.params.values())

    def _low_rank_term(self, x: torch.Tensor, term: _Term, cdtype, bias=None) -> torch.Tensor | None:
        """A term whose only transform is one ``I − U·C·Uᵀ`` (HRA) runs like a rank-r LoRA:

        input side ``op(x, W·(I − UCUᵀ)) = op(x, W) − up(C(op(x, Uᵀ)))`` with ``up = W·U`` (any kernel:
        ``Uᵀ`` is reshaped to an ``(r, in, kh, kw)`` conv with the base conv's stride and padding);
        output side ``(I − UCUᵀ)·op(x, W) = op(x, W) − U(C(op(x, Uᵀ·W)))``.
        Neither needs the base op's backward nor keeps its output for backward. The thin factors are
        laid out so their gradients run as wide GEMMs (``up`` column-major; benchmarks/README
        "Measurements behind the code").
        """
        ops = term.inputs + term.outputs
        parts = low_rank_parts(ops[0]) if len(ops) == 1 and is_one(term.coef) and term.source is None else None
        if parts is None:
            return None
        spec = self.spec
        u, c = parts
        r = u.shape[1]
        flat = spec.flatten_weight(self.weight).to(cdtype)
        xc = x.to(cdtype)
        if term.inputs:
            down, up = u.T.contiguous().reshape(r, *spec.weight_shape[1:]), flat @ u
        else:
            down, up = (u.T @ flat).reshape(r, *spec.weight_shape[1:]), u
        h = spec.op(xc, down)
        up = up.T.contiguous().T
        correction = spec.pointwise(spec.pointwise(h, c), up)
        return spec.op(x, self.weight, bias) - correction.to(x.dtype)

    def _orthogonal_output_term(self, x: torch.Tensor, term: _Term, cdtype, bias=None) -> torch.Tensor | None:
        """A term whose last transform is one exactly orthogonal block rotation of the output (OFT/BOFT
        with exact Cayley at multiplier 1), while training: ``y = M·op(x, W·R) + bias`` through
        :func:`rotate_output`, which keeps ``y`` for backward instead of the base output (one activation
        less than autograd keeps; ``M``'s gradient is taken from ``y`` through ``M``'s orthogonality)."""
        if not is_one(term.coef) or term.source is not None or len(term.outputs) != 1:
            return None
        blocks = orthogonal_blocks(term.outputs[0])
        if blocks is None or not (torch.is_grad_enabled() and blocks.requires_grad):
            return None
        spec = self.spec
        h = self._term_forward(x, _Term(1.0, term.inputs), cdtype)
        v = move_channels_last(h, spec).to(cdtype)
        y = rotate_output(v, blocks, None if bias is None else bias.to(cdtype))
        return move_channels_back(y, spec).to(x.dtype)

    def _term_forward(self, x: torch.Tensor, term: _Term, cdtype) -> torch.Tensor:
        """``coef · op(x, L·S·R)`` (no bias), rotating activations where that is exact and cheap; a
        DoRA term's ``ΔW`` runs through its algorithm's activation route where it has one."""
        spec, weight, use = self.spec, self.weight, term.source
        routed = (use is not None and (spec.is_pointwise or not term.inputs)
                  and use.algorithm.use_activation_route(spec, use.settings, self._needs_grad(use)))
        if use is not None and not routed:
            weight = use.algorithm.delta_weight(use.params, spec, use.settings).to(weight.dtype)
        if term.inputs and not spec.is_pointwise:
            # a k×k conv's input-side rotation mixes kernel taps: rotate the weight instead
            weight = self._transform_weight(weight.to(cdtype), _Term(1.0, term.inputs), inputs=True).to(self.weight.dtype)
        elif term.inputs:
            x = _apply_ops(x, reversed(term.inputs), spec, cdtype)  # y = x Rᵀ Wᵀ: R_k acts first on x
        h = self._route(x, use, term.coef, cdtype).to(x.dtype) if routed else spec.op(x, weight)
        if term.outputs:
            h = _apply_ops(h, term.outputs, spec, cdtype)
        return h if is_one(term.coef) or routed else h * term.coef

    # ---- following the module through .to(), .half(), offload ------------------------------------
    def _apply(self, fn, recurse: bool = True):
        """``fn`` on the layer's tensors (``nn.Module.to``, ``.half()``, ``.cuda()``, offload hooks) under
        one rule: the base weight and bias take ``fn`` as any module's do; the adapter tensors follow
        them to their device and take the compute dtype of the new weight dtype
        (:func:`compute_dtype`: float32 for a float16/bfloat16 weight, else the weight's own), never a
        half-precision copy; the kept original of a fused weight takes ``fn`` too (or, when kept on
        ``backup_device``, only its dtype), so unfusing restores exactly ``original.to(dtype, device)``."""
        super()._apply(fn, recurse=False)
        base = self._base_module
        for key in ("weight", "bias"):  # the base module holds the same Parameters (fn may swap them)
            if key in self._parameters:
                base._parameters[key] = self._parameters[key]
        weight = self.weight
        dtype = compute_dtype(weight.dtype) if weight.is_floating_point() else torch.float32

        def follow(t: torch.Tensor) -> torch.Tensor:
            moved = fn(torch.empty(0, dtype=t.dtype, device=t.device))  # where fn sends a tensor like t
            if moved.dtype == t.dtype or not t.is_floating_point():
                return fn(t)
            return t.to(device=moved.device, dtype=dtype)

        if recurse:
            for slot in self.adapters.values():
                slot._apply(follow)
        if self._backup is not None:
            backup = self._backup
            if self.backup_device is None or weight.is_meta:
                self._backup = fn(backup)
            else:
                self._backup = backup.to(dtype=weight.dtype)
        return self

    # ---- fuse / unfuse ------------------------------------------------------------------------
    @torch.no_grad()
    def fused_weight(self, names, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight with ``names`` fused (on top of those already fused), in the weight's dtype;
        written into ``out`` (the weight's shape and dtype) when given."""
        check_fusable(self.quant, self.layer_name)
        target = self.ordered(list(self.fused) + list(names))
        if out is not None:
            return self.effective_weight(target, out=out)
        return self.effective_weight(target).to(self.weight.dtype)

    def check_finite(self, names) -> None:
        for name in names:
            for key, value in self.adapters[name].named_parameters(recurse=False):
                if not all_finite(value):
                    raise ValueError(
                        f"adapter {name!r} has NaN/Inf values in {key!r} of layer {self.layer_name!r}; nothing was fused"
                    )

    def write_fused(self, names, new_weight: torch.Tensor) -> None:
        """Swap in ``new_weight`` (from :meth:`fused_weight`); the original tensor becomes the backup."""
        if self._backup is None:
            original = self.weight.data
            self._backup = original if self.backup_device is None else original.to(self.backup_device, copy=True)
        self.weight.data = new_weight
        self.fused = self.ordered(list(self.fused) + list(names))

    def fuse(self, names, safe: bool = False) -> None:
        names = [n for n in self.ordered(names) if n not in self.fused]
        if not names:
            return
        if safe:
            self.check_finite(names)
        new = self.fused_weight(names)
        if safe and not all_finite(new):
            raise ValueError(f"fusing {names} into layer {self.layer_name!r} gives NaN/Inf weights; nothing was fused")
        self.write_fused(names, new)

    def unfuse(self) -> None:
        """Restore the original weight exactly."""
        if self._backup is None:
            return
        backup, weight = self._backup, self.weight
        self.weight.data = backup.to(device=weight.device, dtype=weight.dtype)
        self._backup = None
        self.fused = []

    def unwrap(self, keep_fused: bool = False) -> nn.Module:
        """The original module: unfused (``keep_fused=False``) or with the fused weights baked in."""
        if not keep_fused:
            self.unfuse()
        self._backup = None
        return self._base_module

    def extra_repr(self) -> str:
        return f"{self.spec.kind}: {self.spec.in_features} -> {self.spec.out_features}, active={self.active}, fused={self.fused}"
