"""Adapters on a diffusers pipeline: ``lycoris_lite.enable(pipe)`` and the methods it adds.

``enable(pipe)`` gives one pipeline instance (anything with a ``unet`` or a ``transformer``, and text
encoder(s): SD 1.x/2.x, SDXL, Flux.1/Kontext, Flux.2, SD3, Qwen-Image, Z-Image, Wan 2.1/2.2) the adapter
methods of :class:`LycorisPipelineMixin` by switching that instance to a subclass of its own class;
diffusers' classes are not patched, other instances are untouched, and the subclass keeps the class name,
so ``save_pretrained`` writes the same ``model_index.json``.

The state of a pipeline's adapters:

* every loaded adapter stays attached (an inactive one costs nothing in the forward), so switching the
  active stack reads no disk and moves no tensor: it sets scales;
* the *stack* is the ordered list of active adapters; each has a weight: a float, or per component
  ``{"unet": w, "transformer": w, "transformer_2": w, "text_encoder": w, …}``, where the UNet part may be
  block-wise (see :func:`~lycoris_lite.integrations.weights.unet_layer_scales`);
* adapters are composed on each layer in the order they were loaded (``layer.py`` states the formula);
* *fused* adapters are folded into the weights (bit-exact unfuse: the original tensors are kept).
"""

from __future__ import annotations

import inspect
import os
from collections import Counter
from contextlib import ExitStack, contextmanager
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..io import files
from ..core.layer import AdapterLayer
from ..core.controller import AdapterController, controller_for, fuse_layers
from ..core.offload import offload_hook
from ..core.stack import FrozenMapping, LayerWeights, Stack
from ..tools.arithmetic import combine_adapters
from .schedule import normalize_schedule, scheduled
from .weights import _number, normalize_weight, transformer_layer_scales, unet_layer_scales

TEXT_COMPONENTS = files.TEXT_ENCODERS
#: the pipeline-call arguments whose ``scale`` diffusers pipelines take as the LoRA scale of one call
#: (UNet pipelines, Flux/SD3/Z-Image, Flux.2/Qwen-Image/Wan)
SCALE_KWARGS = ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs")


# ---- state ----------------------------------------------------------------------------------------
@dataclass
class AdapterInfo:
    """What the pipeline knows of one loaded adapter."""

    name: str
    format: str
    components: list[str]
    algorithms: dict[str, int]
    metadata: dict[str, str] = field(default_factory=dict)
    source: str | None = None
    #: {component: {model module path: the file's module name}} (:attr:`files.LoadedAdapter.coverage`)
    coverage: dict[str, dict[str, str]] = field(default_factory=dict)
    #: the file's keys that matched no layer (``strict=False`` only)
    skipped_keys: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PipelineStack:
    """The pipeline's stack, one immutable value: ``names`` (the active adapters, in order), ``weights``
    (each loaded adapter's weight as
    :func:`~lycoris_lite.integrations.weights.normalize_weight` gives it: ``{component: number or
    block-wise dict}``) and ``enabled``. :meth:`LycorisPipelineMixin._apply` turns it into one
    :class:`~lycoris_lite.core.stack.Stack` per component, checks them all, then applies them."""

    names: tuple[str, ...] = ()
    weights: Mapping[str, dict] = field(default_factory=dict)
    enabled: bool = True

    def __post_init__(self):
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "weights", FrozenMapping(self.weights))


@dataclass
class _State:
    adapters: dict[str, AdapterInfo] = field(default_factory=dict)   # in load order
    stack: PipelineStack = field(default_factory=PipelineStack)
    schedules: dict[str, dict | tuple] = field(default_factory=dict)  # name -> per-step schedule


class LycorisPipelineMixin:
    """Adapter methods for a diffusers pipeline; see :func:`enable`."""

    # ---- plumbing ---------------------------------------------------------------------------------
    @property
    def _lycoris(self) -> _State:
        state = self.__dict__.get("_lycoris_state")
        if state is None:
            state = _State()
            self.__dict__["_lycoris_state"] = state
        return state

    def _adapter_components(self) -> dict[str, nn.Module]:
        return files.components_of(self)

    def _controllers(self) -> dict[str, AdapterController]:
        found = {}
        for c, module in self._adapter_components().items():
            ctrl = controller_for(module, create=False)
            if ctrl is not None:
                found[c] = ctrl
        return found

    def _check_names(self, names) -> list[str]:
        if isinstance(names, str):
            names = [names]
        names = list(names)
        unknown = [n for n in names if n not in self._lycoris.adapters]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this pipeline has {list(self._lycoris.adapters)}")
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names repeat in {names}")
        return names

    # ---- loading --------------------------------------------------------------------------------
    def load_adapter(self, source, adapter_name: str | None = None, scale: float = 1.0, *,
                     unet_scale=None, text_encoder_scale: float | None = None, strict: bool = True,
                     hotswap: bool = False, allow_pickle: bool = False) -> str:
        """Load an adapter and add it to the active stack; returns its name.

        ``source``: a kohya/LyCORIS or diffusers ``.safetensors`` file, a diffusers or PEFT folder, or a
        state dict (any algorithm; see :func:`lycoris_lite.io.files.read_adapter`). The name defaults to the
        file's stem. ``scale`` weights every component; ``unet_scale`` (a number or block-wise dict, UNet
        pipelines only) and ``text_encoder_scale`` override it per component (per-component weights of a
        transformer pipeline: :meth:`set_adapters` with ``{"transformer": …}``).

        ``hotswap=True`` with an existing name replaces that adapter's weights in place (same layers,
        algorithms and shapes), so nothing is re-attached and a compiled UNet keeps its graph; its weight
        becomes this call's ``scale`` (and per-component scales), as for a new load.
        Nothing changes unless the whole file validates against every component.
        """
        state = self._lycoris
        components = self._adapter_components()
        weight = {c: scale for c in components}
        if unet_scale is not None:
            if "unet" not in components:
                raise ValueError(f"unet_scale: this pipeline has no unet (it has {sorted(components)}); give "
                                 "per-component weights with set_adapters(name, {'transformer': …})")
            weight["unet"] = unet_scale
        if text_encoder_scale is not None:
            weight.update({c: text_encoder_scale for c in TEXT_COMPONENTS if c in components})
        weight = normalize_weight(weight, list(components))
        read = files.read_adapter(components, source, adapter_name, strict=strict, allow_pickle=allow_pickle)
        name = read.name
        source_name = str(source) if isinstance(source, (str, os.PathLike)) else None
        if hotswap:
            if name not in state.adapters:
                raise ValueError(f"hotswap=True replaces an existing adapter, and there is none named {name!r}; "
                                 f"this pipeline has {list(state.adapters)}")
            self._hotswap(read)
            loaded = files.loaded_info(read)
            info = state.adapters[name]
            info.metadata, info.source, info.format = dict(read.metadata), source_name, read.format
            info.algorithms, info.coverage, info.skipped_keys = loaded.algorithms, loaded.coverage, loaded.skipped_keys
        else:
            if name in state.adapters:
                raise ValueError(f"an adapter named {name!r} is already loaded; pass adapter_name=, delete it first, "
                                 "or hotswap=True to replace its weights")
            if "." in name:
                raise ValueError(f"adapter names cannot contain dots: {name!r}")
            with self._offload_suspended():
                loaded = files.attach_adapter(components, read, activate=False)
            state.adapters[name] = AdapterInfo(name, loaded.format, list(loaded.components), loaded.algorithms,
                                               dict(loaded.metadata), source_name, loaded.coverage,
                                               loaded.skipped_keys)
        stack = state.stack
        names = stack.names if hotswap or name in stack.names else stack.names + (name,)
        try:
            self._apply(replace(stack, names=names, weights={**stack.weights, name: weight}))
        except ValueError:
            if not hotswap:  # all or nothing: the new adapter goes again
                self._remove(name)
            raise
        return name

    @contextmanager
    def _offload_suspended(self):
        """Take module-by-module offload off the components for the block, then put it back as it was
        (as diffusers' own LoRA loader does), so new adapter tensors are attached to real weights and
        the offload hooks, applied again, see them: accelerate's sequential CPU offload (re-enabled with
        the device it had) and diffusers' group offloading (re-applied with its config). Group offloading
        to disk is refused: its weights are not in memory while the hooks are off."""
        components = self._adapter_components()
        kinds = {c: offload_hook(m) for c, m in components.items()}
        if not any(kinds.values()):
            yield
            return
        from accelerate.hooks import remove_hook_from_module
        from diffusers.hooks.group_offloading import _apply_group_offloading, _get_top_level_group_offload_hook
        from diffusers.hooks.hooks import HookRegistry

        grouped = {}
        for c, kind in kinds.items():
            if kind == "group offloading":
                hook = _get_top_level_group_offload_hook(components[c])
                if hook is None or hook.config.offload_to_disk_path:
                    raise RuntimeError(f"{c} is group-offloaded {'to disk' if hook else 'below its top level'}: "
                                       "load adapters before enabling group offloading")
                grouped[c] = hook.config
        sequential = [c for c, kind in kinds.items() if kind == "sequential CPU offload"]
        for c in sequential:
            remove_hook_from_module(components[c], recurse=True)
        for c in grouped:
            registry = HookRegistry.check_if_exists_or_initialize(components[c])
            for name in ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading"):
                registry.remove_hook(name, recurse=True)
        try:
            yield
        finally:
            for c, config in grouped.items():
                _apply_group_offloading(components[c], config)
            if sequential:
                self.enable_sequential_cpu_offload(device=getattr(self, "_offload_device", None))

    def _hotswap(self, read: files.ReadAdapter) -> None:
        components = self._adapter_components()
        name = read.name
        info = self._lycoris.adapters[name]
        if set(read.plans) != set(info.components):
            raise ValueError(f"hotswap: the new file has parts for {sorted(read.plans)}, adapter {name!r} has "
                             f"{sorted(info.components)}; load it under another name instead")
        copies = []
        for c, layers in read.plans.items():
            ctrl = controller_for(components[c])
            current = {ln: layer for ln, layer in ctrl.layers() if name in layer.adapters}
            if set(layers) != set(current):
                extra, missing = sorted(set(layers) - set(current)), sorted(set(current) - set(layers))
                raise ValueError(f"hotswap: the new {c} part targets other layers (new: {extra[:3]}, missing: "
                                 f"{missing[:3]}); load it under another name instead")
            for ln, entry in layers.items():
                layer = current[ln]
                slot = layer.adapters[name]
                if name in layer.fused:
                    raise ValueError(f"hotswap: adapter {name!r} is fused; unfuse it first")
                if slot.algorithm is not entry.algorithm:
                    raise ValueError(f"hotswap: layer {ln!r} holds {slot.algorithm.name}, the new file "
                                     f"{entry.algorithm.name}; load it under another name instead")
                params = dict(slot.named_parameters(recurse=False))
                if set(params) != set(entry.tensors):
                    raise ValueError(f"hotswap: layer {ln!r} keys {sorted(entry.tensors)} differ from {sorted(params)}")
                for key, value in entry.tensors.items():
                    if value.shape != params[key].shape:
                        raise ValueError(f"hotswap: layer {ln!r} {key} has shape {tuple(value.shape)}, the loaded "
                                         f"adapter {tuple(params[key].shape)}")
                    copies.append((params[key], value))
                copies.append((slot, entry.settings))
        with torch.no_grad():
            for target, value in copies:
                if isinstance(target, torch.Tensor):
                    target.copy_(value)
                else:
                    target.settings = value

    # ---- the stack --------------------------------------------------------------------------------
    def set_adapters(self, adapter_names, weights=None) -> None:
        """Make ``adapter_names`` the active stack, in that order, with ``weights``: a float, a list (one
        per adapter), each a float or per component ``{"unet" or "transformer": x, "transformer_2": x2,
        "text_encoder": y, "text_encoder_2": z, "text_encoder_3": t}`` whose denoiser part may be block-wise:
        a UNet's ``{"down": …, "mid": …, "up": …}`` (:func:`~lycoris_lite.integrations.weights.unet_layer_scales`),
        a transformer's ``{"transformer_blocks": …, "single_transformer_blocks": …}`` by block index per block
        group (:func:`~lycoris_lite.integrations.weights.transformer_layer_scales`)."""
        names = self._check_names(adapter_names)
        if not isinstance(weights, (list, tuple)):
            weights = [weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapters but {len(weights)} weights")
        components = list(self._adapter_components())
        new = {n: normalize_weight(w, components) for n, w in zip(names, weights)}
        stack = self._lycoris.stack
        self._apply(replace(stack, names=tuple(names), weights={**stack.weights, **new}))

    @staticmethod
    def _layer_weights(weight, component: str, name: str, layers: dict[str, AdapterLayer]) -> LayerWeights:
        """One adapter's weight on ``component`` (``{component: number or block dict}``) as per-layer weights."""
        value = weight.get(component, 1.0)
        if not isinstance(value, dict):
            return LayerWeights(value)
        rule = unet_layer_scales if component == "unet" else transformer_layer_scales
        return LayerWeights(1.0, rule(value, [ln for ln, layer in layers.items() if name in layer.adapters]))

    def _apply(self, stack: PipelineStack | None = None) -> None:
        """Make ``stack`` (default: the current one, laid out again) the pipeline's stack: one
        :class:`Stack` per component, every one checked (fused adapters stay in the stack at their
        weight) before any is applied, so a refusal changes nothing."""
        stack = self._lycoris.stack if stack is None else stack
        fused = set(self.fused_adapters)
        out = fused - set(stack.names)
        if out:
            raise ValueError(f"adapter {sorted(out)[0]!r} is fused; unfuse before taking it out of the stack")
        plan = []
        for c, ctrl in self._controllers().items():
            layers = dict(ctrl.layers())
            weights = {n: self._layer_weights(stack.weights.get(n, {}), c, n, layers) for n in ctrl.configs}
            component_stack = Stack(tuple(n for n in stack.names if n in ctrl.configs), weights, stack.enabled)
            plan.append((ctrl, component_stack, ctrl.check_stack(component_stack)))
        for ctrl, component_stack, layers in plan:
            ctrl.apply_stack(component_stack, layers)
            for layer in layers.values():
                for slot in layer.adapters.values():
                    slot.set_trainable(False)
        self._lycoris.stack = stack

    @property
    def adapter_stack(self) -> PipelineStack:
        """The pipeline's stack (immutable): active names in order, every loaded adapter's weight, on/off."""
        return self._lycoris.stack

    def get_active_adapters(self) -> list[str]:
        """The active stack, in order."""
        return list(self._lycoris.stack.names)

    def list_adapters(self) -> dict[str, dict]:
        """``{name: {algorithm, algorithms, rank, weight, components, active, fused, format, source, metadata,
        schedule, coverage, skipped_keys}}`` (``coverage``: ``{component: {model module: file module}}``, what the load
        applied; ``skipped_keys``: what it did not, with ``strict=False``)."""
        out = {}
        fused = set(self.fused_adapters)
        controllers = self._controllers()
        for name, info in self._lycoris.adapters.items():
            ranks = Counter()
            for c in info.components:
                for settings in controllers[c].adapter_settings(name).values():
                    if settings.rank:
                        ranks[settings.rank] += 1
            out[name] = {
                "algorithm": max(info.algorithms, key=info.algorithms.get) if info.algorithms else None,
                "algorithms": dict(info.algorithms),
                "rank": ranks.most_common(1)[0][0] if ranks else None,
                "weight": dict(self._lycoris.stack.weights.get(name, {})),
                "components": list(info.components),
                "active": name in self._lycoris.stack.names,
                "fused": name in fused,
                "format": info.format,
                "source": info.source,
                "metadata": dict(info.metadata),
                "schedule": self._lycoris.schedules.get(name),
                "coverage": {c: dict(m) for c, m in info.coverage.items()},
                "skipped_keys": list(info.skipped_keys),
            }
        return out

    def combine_adapters(self, adapters, weights, adapter_name: str, combination_type: str = "svd",
                         **kwargs) -> str:
        """A new adapter ``adapter_name``, the weighted combination of loaded ``adapters`` (PEFT's
        ``add_weighted_adapter`` for every algorithm: :func:`lycoris_lite.tools.arithmetic.combine_adapters`,
        whose keyword arguments ``density``, ``majority_sign_method``, ``svd_rank``, … pass through).
        It is added to the end of the active stack; the inputs stay loaded."""
        names = self._check_names(adapters)
        if adapter_name in self._lycoris.adapters:
            raise ValueError(f"an adapter named {adapter_name!r} is already loaded")
        combined = combine_adapters(self._adapter_components(), names, weights, adapter_name, combination_type,
                                    **kwargs)
        info = AdapterInfo(adapter_name, "combined", sorted(combined.ranks),
                           {"lora": sum(len(v) for v in combined.ranks.values())},
                           {files.META_PREFIX + "combined_from": ",".join(names)})
        self._lycoris.adapters[adapter_name] = info
        stack = self._lycoris.stack
        self._apply(replace(stack, names=stack.names + (adapter_name,),
                            weights={**stack.weights, adapter_name: normalize_weight(1.0, list(self._adapter_components()))}))
        return adapter_name

    # ---- fusing -----------------------------------------------------------------------------------
    @property
    def fused_adapters(self) -> list[str]:
        found = []
        for ctrl in self._controllers().values():
            found += [n for n in ctrl.merged_adapters if n not in found]
        return found

    def fuse_adapters(self, adapter_names=None, safe: bool = True) -> None:
        """Fold adapters (default: the active stack) into the weights at their current weights.

        With ``safe`` every new weight of every component is computed and checked for NaN/Inf before any
        is written, so a failure changes nothing. Extra memory: one copy of the targeted weights (the
        originals are kept for a bit-exact :meth:`unfuse_adapters`)."""
        active = list(self._lycoris.stack.names)
        names = active if adapter_names is None else self._check_names(adapter_names)
        inactive = [n for n in names if n not in active]
        if inactive:
            raise ValueError(f"adapter(s) {inactive} are not in the active stack {active}; "
                             "set_adapters first")
        fuse_layers([layer for ctrl in self._controllers().values() for _, layer in ctrl.layers()], names, safe)

    def unfuse_adapters(self) -> None:
        """Restore the original weights exactly (the fused adapters stay loaded and in the stack)."""
        for ctrl in self._controllers().values():
            ctrl.unmerge_adapter()

    # ---- switching off, removing, saving ------------------------------------------------------------
    def disable_adapters(self) -> None:
        """Run the base model (fused adapters included) until :meth:`enable_adapters`."""
        self._apply(replace(self._lycoris.stack, enabled=False))

    def enable_adapters(self) -> None:
        self._apply(replace(self._lycoris.stack, enabled=True))

    def delete_adapters(self, adapter_names) -> None:
        """Remove adapters (their tensors are freed); the rest of the stack stays."""
        names = self._check_names(adapter_names)
        fused = [n for n in names if n in self.fused_adapters]
        if fused:
            raise ValueError(f"adapter(s) {fused} are fused; unfuse_adapters() first")
        for name in names:
            self._remove(name)
        self._apply()

    def _remove(self, name: str) -> None:
        """Detach adapter ``name`` from every component and forget it (a component left without
        adapters gets its original modules back)."""
        for ctrl in self._controllers().values():
            if name in ctrl.configs:
                ctrl.delete_adapter(name)
            if not ctrl.configs:
                ctrl.unload()
        state = self._lycoris
        state.adapters.pop(name, None)
        state.schedules.pop(name, None)
        stack = state.stack
        state.stack = PipelineStack(tuple(n for n in stack.names if n != name),
                                    {n: w for n, w in stack.weights.items() if n != name}, stack.enabled)

    def unload_adapters(self) -> None:
        """Remove every adapter: the pipeline's modules, keys and weights are bitwise the original."""
        for ctrl in self._controllers().values():
            ctrl.unload()
        self.__dict__["_lycoris_state"] = _State()

    def save_adapter(self, adapter_name: str, path, format: str = "kohya", *, dtype: torch.dtype | None = None,
                     metadata: dict[str, str] | None = None, layout: str | None = None,
                     bake_constraint: bool = False) -> Path:
        """Write one adapter (every component it has) to ``path`` in ``format`` (kohya, comfyui, diffusers,
        peft; ``layout`` for a transformer's module names, ``bake_constraint`` for OFT/BOFT files every tool
        reads alike: :func:`lycoris_lite.io.files.save_adapter`),
        atomically. The metadata it was loaded with (trigger words, training settings) is kept."""
        (name,) = self._check_names(adapter_name)
        carried = {k: v for k, v in self._lycoris.adapters[name].metadata.items()
                   if not k.startswith(files.META_PREFIX)}
        carried.update(metadata or {})
        return files.save_adapter(self._adapter_components(), name, path, format=format, dtype=dtype,
                                  metadata=carried, layout=layout, bake_constraint=bake_constraint)

    # ---- per-call scale (diffusers' ``cross_attention_kwargs={"scale": s}`` and its kin) ---------------
    @contextmanager
    def _call_scale(self, scale: float):
        """Multiply every unfused adapter's weight by ``scale`` for one call: each component's stack
        with scaled weights (fused layers keep theirs), then the saved stacks back."""
        saved = {ctrl: ctrl.stack for ctrl in self._controllers().values()}
        for ctrl, stack in saved.items():
            weights = {}
            for name, weight in stack.weights.items():
                fused = {ln: weight.at(ln) for ln, layer in ctrl.layers() if name in layer.fused}
                weights[name] = LayerWeights(weight.default * scale,
                                             {**{ln: w * scale for ln, w in weight.layers.items()}, **fused})
            ctrl.apply_stack(replace(stack, weights=weights))
        try:
            yield
        finally:
            for ctrl, stack in saved.items():
                ctrl.apply_stack(stack)

    def set_adapter_schedule(self, adapter_name: str, schedule) -> None:
        """Give adapter ``adapter_name`` a per-step weight for the pipeline's calls, on top of its weight:
        ``{"start": a, "end": b}`` (on while ``a ≤ step / steps < b``) or a list with one factor per step
        (:mod:`lycoris_lite.integrations.schedule`); ``None`` removes it. Applied while the adapter is
        active and unfused, without recompiling a compiled denoiser.

        Raises:
            ValueError: an unknown adapter or a malformed schedule (nothing changes).
        """
        name = self._check_names(adapter_name)[0]
        if schedule is None:
            self._lycoris.schedules.pop(name, None)
        else:
            self._lycoris.schedules[name] = normalize_schedule(schedule)

    def _scheduled(self, kwargs: dict):
        """:func:`~lycoris_lite.integrations.schedule.scheduled` for the active adapters with a schedule."""
        state = self._lycoris
        schedules = {n: s for n, s in state.schedules.items() if n in state.stack.names}
        fused = sorted(set(self.fused_adapters) & set(schedules))
        if fused:
            raise ValueError(f"adapter {fused[0]!r} has a per-step schedule and is fused; unfuse it first")
        slots = {n: [layer.adapters[n] for ctrl in self._controllers().values() for _, layer in ctrl.layers()
                     if n in layer.adapters] for n in schedules}
        return scheduled(kwargs, schedules, slots, inspect.signature(super().__call__).parameters,
                         type(self).__name__)

    def __call__(self, *args, **kwargs):
        """The pipeline's own call; a ``scale`` in ``cross_attention_kwargs``, ``joint_attention_kwargs`` or
        ``attention_kwargs`` (:data:`SCALE_KWARGS`) multiplies every unfused adapter's weight for this
        call (and is taken out, so diffusers' own LoRA scaling never sees it); per-step schedules
        (:meth:`set_adapter_schedule`) apply through the call's ``callback_on_step_end``."""
        scale = None
        if self._lycoris.adapters:
            for key in SCALE_KWARGS:
                extra = kwargs.get(key)
                if extra and "scale" in extra:
                    if scale is not None:
                        raise ValueError(f"a scale in two of {', '.join(SCALE_KWARGS)}; give one")
                    extra = dict(extra)
                    scale = _number(extra.pop("scale"), f"{key}['scale']")
                    kwargs[key] = extra or None
        with ExitStack() as scope:
            if scale is not None:
                scope.enter_context(self._call_scale(scale))
            if self._lycoris.schedules:
                kwargs = scope.enter_context(self._scheduled(kwargs))
            return super().__call__(*args, **kwargs)


_ENABLED_CLASSES: dict[type, type] = {}


def enable(pipe):
    """Give ``pipe`` (this instance only) the adapter methods of :class:`LycorisPipelineMixin`; returns it.

    The instance's class becomes a subclass of its own class with the same name (so ``save_pretrained``
    and ``model_index.json`` are unchanged); calling ``enable`` again does nothing.

    Args:
        pipe: a diffusers pipeline with a ``unet`` (SD 1.x/2.x, SDXL) or a ``transformer`` (and maybe a
            ``transformer_2``: Flux, SD3, Qwen-Image, Z-Image, Wan, …).

    Returns:
        ``pipe`` itself, now with ``load_adapter``, ``set_adapters``, ``fuse_adapters`` & co.

    Raises:
        TypeError: ``pipe`` has neither a ``unet`` nor a ``transformer`` module.
    """
    if isinstance(pipe, LycorisPipelineMixin):
        return pipe
    if not any(isinstance(getattr(pipe, c, None), nn.Module) for c in files.DENOISERS):
        raise TypeError(f"{type(pipe).__name__} has no {' or '.join(files.DENOISERS)} to attach adapters to")
    cls = type(pipe)
    sub = _ENABLED_CLASSES.get(cls)
    if sub is None:
        sub = type(cls.__name__, (LycorisPipelineMixin, cls), {"__module__": cls.__module__,
                                                                "__qualname__": cls.__qualname__,
                                                                "_lycoris_enabled_from": cls})
        _ENABLED_CLASSES[cls] = sub
    pipe.__class__ = sub
    return pipe


__all__ = ["LycorisPipelineMixin", "enable"]
