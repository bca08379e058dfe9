"""Adapter management for any ``nn.Module``.

:class:`AdapterController` does the work on a model tree (one per model, found with
:func:`controller_for`), on the modules :func:`~lycoris_lite.core.targets.find_targets` picks by name
pattern; the PEFT-style wrapper (:mod:`lycoris_lite.integrations.peft_style`) and the
diffusers integration (:mod:`lycoris_lite.integrations.pipeline`) drive it.

Adding an adapter is all-or-nothing: every target, its layer type and the config's fit to it are
checked before any module is touched.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from .. import algos  # noqa: F401  (registers the algorithms)
from .buffers import packed_empty
from ..base.checks import all_finite
from ..base.config import AdapterConfig
from .quantized import check_fusable
from .layer import AdapterLayer
from .offload import check_not_offloaded
from .stack import LayerWeights, Stack
from .targets import ModulesToSave, _candidates, _matches, _nearest, _parent, find_targets, submodule, walk_modules
from ..base.layer_kind import LayerSpec
from ..base.registry import algorithm_for
from ..base.settings import Settings

_ATTR = "_lycoris_controller"


def fuse_layers(layers: list[AdapterLayer], names: list[str], safe: bool = False,
                packed: bool = True) -> None:
    """Fuse adapters ``names`` into each of ``layers`` (those a layer lacks are skipped).

    Every new weight is computed before any is written, into one block of memory per dtype and device
    (``packed``, :func:`~lycoris_lite.core.buffers.packed_empty`; the block is the one copy of the fused
    layers that fusing costs, freed when they are all unfused) or into a tensor of its own each
    (``packed=False``, for weights that outlive the adapters). With ``safe`` the adapter tensors
    and every new weight are checked for NaN/Inf first, so a failure changes nothing."""
    plan = [(layer, todo) for layer in layers if (todo := [n for n in layer.ordered(names) if n not in layer.fused])]
    for layer, _ in plan:  # a quantized layer without an exact fuse refuses before anything is computed
        check_fusable(layer.quant, layer.layer_name)
    if safe:
        for layer, todo in plan:
            layer.check_finite(todo)
    outs: list = [None] * len(plan)
    if packed:
        groups: dict = {}
        for i, (layer, _) in enumerate(plan):
            groups.setdefault((layer.weight.dtype, layer.weight.device), []).append(i)
        for (dtype, device), members in groups.items():
            for i, view in zip(members, packed_empty([plan[i][0].weight.shape for i in members], dtype, device)):
                outs[i] = view
    staged = []
    for (layer, todo), out in zip(plan, outs):
        new = layer.fused_weight(todo, out=out)
        if safe and not all_finite(new):
            raise ValueError(f"fusing {todo} into layer {layer.layer_name!r} gives NaN/Inf weights; nothing was fused")
        staged.append(new)
    for (layer, todo), new in zip(plan, staged):
        layer.write_fused(todo, new)


# ---- the controller --------------------------------------------------------------------------------
def controller_for(model: nn.Module, create: bool = True) -> "AdapterController | None":
    """The :class:`AdapterController` that manages ``model``'s adapters (one per model, kept on the model).

    Args:
        model: any ``nn.Module`` (a UNet, a text encoder, a transformer).
        create: make one when the model has none yet.

    Returns:
        The controller, or None when there is none and ``create`` is False.
    """
    ctrl = model.__dict__.get(_ATTR)
    if ctrl is None and create:
        ctrl = AdapterController(model)
        model.__dict__[_ATTR] = ctrl
    return ctrl


def _refuse_save(*args, **kwargs):
    raise RuntimeError(
        "this model has lycoris-lite adapters attached: saving it would mix adapter tensors into the base "
        "checkpoint. Save the adapter with save_adapter(), or call merge_and_unload() / unload() first."
    )


class AdapterController:
    """Adapters on one model tree. Methods follow PEFT's names, so PEFT code ports by changing the
    import: ``merge_adapter``, ``unmerge_adapter``, ``merge_and_unload`` and ``merged_adapters`` are
    PEFT's words for fusing adapters into the weights and unfusing them
    (:meth:`AdapterLayer.fuse <lycoris_lite.core.layer.AdapterLayer.fuse>`)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.configs: dict[str, AdapterConfig] = {}
        self.stack = Stack()  # the one owner of the active set, the weights and the on/off switch
        self._requires_grad: dict[str, bool] | None = None
        self._saved_modules: dict[str, ModulesToSave] = {}

    # ---- iteration ------------------------------------------------------------------------------
    def layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        """``(path, layer)`` of every wrapped layer, in ``named_modules`` order (:func:`walk_modules`)."""
        for name, module in walk_modules(self.model):
            if isinstance(module, AdapterLayer):
                yield name, module

    def _check_names(self, names) -> list[str]:
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.configs]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has {list(self.configs)}")
        return names

    # ---- adding and removing ----------------------------------------------------------------------
    def add_adapter(self, name: str, config: AdapterConfig, *, generator: torch.Generator | None = None,
                    tensors: dict[str, dict[str, torch.Tensor]] | None = None, activate: bool = False,
                    settings: dict[str, Settings] | None = None) -> list[str]:
        """Attach adapter ``name``; returns the targeted layer names.

        ``tensors`` (``{layer: {key: tensor}}``) gives the weights instead of initialising them;
        ``settings`` overrides the per-layer settings resolved from ``config`` (used by file loaders).
        Nothing is changed if any check fails.
        """
        if not isinstance(config, AdapterConfig):
            raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
        if not name or not isinstance(name, str) or "." in name:
            raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}")
        if name in self.configs:
            raise ValueError(f"adapter {name!r} already exists; delete it first or pick another name")
        algo = algorithm_for(config)
        targets = list(tensors) if tensors is not None and config.target_modules is None else find_targets(self.model, config)
        modules = dict(_candidates(self.model))
        plan = {}
        for layer_name in targets:
            if layer_name not in modules:
                raise ValueError(f"no module named {layer_name!r}; nearest: {_nearest(layer_name, modules)}")
            spec = LayerSpec.from_module(modules[layer_name], layer_name)
            layer_settings = (settings or {}).get(layer_name) or algo.resolve(config, spec, layer_name)
            if tensors is not None:
                if layer_name not in tensors:
                    raise ValueError(f"no tensors given for layer {layer_name!r}")
                params = tensors[layer_name]
            else:
                params = algo.init_params(spec, layer_settings, config.init_weights, generator)
            plan[layer_name] = (algo, layer_settings, params)
        return self.attach(name, plan, config, activate=activate)

    def check_plan(self, name: str, plan: dict, allow_existing: bool = False, check_values: bool = True) -> None:
        """Validate ``{layer: (algorithm, settings, tensors)}`` against the model (no change made).
        ``allow_existing`` skips the check that ``name`` is free (for a plan that replaces it);
        ``check_values=False`` skips the NaN/Inf check (for tensors the caller has checked)."""
        if name in self.configs and not allow_existing:
            raise ValueError(f"adapter {name!r} already exists; delete it first or pick another name")
        modules = dict(_candidates(self.model))
        for layer_name, (algo, layer_settings, params) in plan.items():
            if layer_name not in modules:
                raise ValueError(f"no module named {layer_name!r}; nearest: {_nearest(layer_name, modules)}")
            spec = LayerSpec.from_module(modules[layer_name], layer_name)
            if not isinstance(layer_settings, algo.settings_class):
                raise TypeError(f"layer {layer_name!r}: {algo.name} settings must be a {algo.settings_class.__name__}, "
                                f"got {type(layer_settings).__name__}")
            _check_shapes(layer_name, params, algo.param_shapes(spec, layer_settings), check_values)

    def attach(self, name: str, plan: dict, config: AdapterConfig, activate: bool = False,
               validated: bool = False) -> list[str]:
        """Attach a plan ``{layer: (algorithm, settings, tensors)}``; layers may carry different
        algorithms (as kohya/LyCORIS files do). ``config`` describes the adapter as a whole.
        ``validated``: the plan already passed :meth:`check_plan` against this model."""
        if name in self.configs:
            raise ValueError(f"adapter {name!r} already exists; delete it first or pick another name")
        if not validated:
            self.check_plan(name, plan)
        check_not_offloaded(self.model, plan)
        save_names = self._modules_to_save_targets(config)

        # all checks passed: change the model
        if self._requires_grad is None:
            self._requires_grad = {}
            for n, p in self.model.named_parameters():  # remembered for unload, then frozen
                self._requires_grad[n] = p.requires_grad
                if p.requires_grad:
                    p.requires_grad_(False)
            if hasattr(type(self.model), "save_pretrained"):
                self.model.__dict__["save_pretrained"] = _refuse_save
        for layer_name, (algo, layer_settings, params) in plan.items():
            module = submodule(self.model, layer_name)
            if not isinstance(module, AdapterLayer):
                module = AdapterLayer(module, layer_name)
                parent, child = _parent(self.model, layer_name)
                setattr(parent, child, module)
            module.add(name, algo, layer_settings, params)  # frozen until set_adapter makes it trainable
        for module_name in save_names:
            wrapper = self._saved_modules.get(module_name)
            if wrapper is None:
                wrapper = ModulesToSave(self.model.get_submodule(module_name))
                parent, child = _parent(self.model, module_name)
                setattr(parent, child, wrapper)
                self._saved_modules[module_name] = wrapper
            wrapper.add(name)
            wrapper.modules_to_save[name].requires_grad_(False)
        self.configs[name] = config
        if activate or not self.active:
            self.set_adapter(self.active + [name] if activate and self.active else name)
        return list(plan)

    def _modules_to_save_targets(self, config) -> list[str]:
        if not config.modules_to_save:
            return []
        names = [n for n, _ in _candidates(self.model)]
        found = [n for n in names if _matches(n, config.modules_to_save)]
        missing = [t for t in config.modules_to_save if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise ValueError(f"modules_to_save entries match no module: {missing}")
        return found

    def delete_adapter(self, name: str) -> None:
        self._check_names(name)
        fused = [ln for ln, layer in self.layers() if name in layer.fused]
        if fused:
            raise ValueError(f"cannot delete adapter {name!r} while it is fused (in {fused[0]!r}); unfuse first")
        for _, layer in list(self.layers()):
            if name in layer.adapters:
                layer.remove(name)
        for wrapper in self._saved_modules.values():
            if name in wrapper.modules_to_save:
                del wrapper.modules_to_save[name]
        del self.configs[name]
        self.stack = self.stack.without([name])
        remaining = self.active
        self.set_adapter(remaining) if remaining else self.set_active([])
        for layer_name, layer in list(self.layers()):
            if not layer.adapters:
                parent, child = _parent(self.model, layer_name)
                setattr(parent, child, layer.unwrap())

    # ---- the stack ------------------------------------------------------------------------------
    @property
    def active(self) -> list[str]:
        return list(self.stack.names)

    @property
    def enabled(self) -> bool:
        return self.stack.enabled

    @property
    def active_adapters(self) -> list[str]:
        return list(self.stack.names)

    def check_stack(self, stack: Stack) -> dict[str, AdapterLayer]:
        """Raise ``ValueError`` unless ``stack`` fits this model: known adapter names, per-layer weights
        on layers that carry the adapter, and unchanged weights for fused adapters. Returns the layers
        by path (for :meth:`apply_stack`). Changes nothing."""
        self._check_names(list(stack.names) + list(stack.weights))
        layers = dict(self.layers())
        for name, weights in stack.weights.items():
            stray = [ln for ln in weights.layers if ln not in layers or name not in layers[ln].adapters]
            if stray:
                raise ValueError(f"adapter {name!r} has a weight for {stray[0]!r}, a layer it is not on")
        for ln, layer in layers.items():
            for name in layer.fused:
                if layer.adapters[name].scale != stack.weight(name, ln):
                    raise ValueError(f"adapter {name!r} is fused at weight {layer.adapters[name].scale}; "
                                     "unfuse it before changing its weight")
        return layers

    def apply_stack(self, stack: Stack, layers: dict[str, AdapterLayer] | None = None) -> None:
        """Make ``stack`` this model's stack: checked (:meth:`check_stack`) unless ``layers`` (its
        result) is given, then laid out on every layer (active names, weights, on/off) and on the modules
        trained in full. The only place that writes that state."""
        if layers is None:
            layers = self.check_stack(stack)
        names = stack.names
        for ln, layer in layers.items():
            layer.active = [n for n in names if n in layer.adapters]
            layer.disabled = not stack.enabled
            for name, slot in layer.adapters.items():
                weight = stack.weight(name, ln)
                if slot.scale != weight:
                    slot.scale = weight
        for wrapper in self._saved_modules.values():
            wrapper.active = next((n for n in reversed(names) if n in wrapper.modules_to_save), None)
        self.stack = stack

    def set_active(self, names: list[str]) -> None:
        """Make ``names`` the active adapters, in that order, leaving trainable flags as they are
        (:meth:`set_adapter` also makes them trainable)."""
        self.apply_stack(self.stack.with_names(names))

    def set_adapter(self, names: str | list[str]) -> None:
        """Make ``names`` the active adapters (trainable; the others frozen)."""
        names = self._check_names(names)
        self.set_active(names)
        for _, layer in self.layers():
            for adapter_name, slot in layer.adapters.items():
                slot.set_trainable(adapter_name in names)
        for wrapper in self._saved_modules.values():
            for adapter_name, module in wrapper.modules_to_save.items():
                module.requires_grad_(adapter_name in names)

    def set_scale(self, name: str, scale: float, layers: Iterable[str] | None = None) -> None:
        """The user's multiplier for adapter ``name`` (on the given layers, default all)."""
        self._check_names(name)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != scale:
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        if layers is None:
            weight = LayerWeights(scale)
        else:
            current = self.stack.weights.get(name, LayerWeights())
            weight = LayerWeights(current.default, {**current.layers, **{ln: scale for ln in layers}})
        self.apply_stack(self.stack.with_weights({name: weight}))

    def set_adapters(self, names: str | list[str], weights: float | list[float] | None = None) -> None:
        names = self._check_names(names)
        if weights is None:
            weights = [1.0] * len(names)
        elif isinstance(weights, (int, float)):
            weights = [weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapters but {len(weights)} weights")
        self.apply_stack(self.stack.with_weights(dict(zip(names, weights))))
        self.set_adapter(names)

    def enable_adapter_layers(self) -> None:
        self.apply_stack(self.stack.with_enabled(True))

    def disable_adapter_layers(self) -> None:
        self.apply_stack(self.stack.with_enabled(False))

    @contextmanager
    def disable_adapter(self):
        """Run the base model inside the block (fused weights included), then restore."""
        saved = self.stack
        self.disable_adapter_layers()
        for wrapper in self._saved_modules.values():
            wrapper.active = None
        try:
            yield
        finally:
            self.apply_stack(self.stack.with_enabled(saved.enabled))

    # ---- fusing (PEFT's names: merge = fuse) ------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fuse adapters into the base weights (default: the active ones). With ``safe_merge`` every
        layer is computed and checked for NaN/Inf before any weight is written."""
        names = self.active if adapter_names is None else self._check_names(adapter_names)
        fuse_layers([layer for _, layer in self.layers()], names, safe_merge)

    def unmerge_adapter(self) -> None:
        """Unfuse every fused adapter: the original weights back, bit for bit."""
        for _, layer in self.layers():
            layer.unfuse()

    @property
    def merged_adapters(self) -> list[str]:
        """The fused adapters."""
        found = []
        for _, layer in self.layers():
            found += [n for n in layer.fused if n not in found]
        return found

    def _restore(self, keep_fused: bool) -> nn.Module:
        for layer_name, layer in list(self.layers()):
            parent, child = _parent(self.model, layer_name)
            setattr(parent, child, layer.unwrap(keep_fused=keep_fused))
        for module_name, wrapper in self._saved_modules.items():
            parent, child = _parent(self.model, module_name)
            setattr(parent, child, wrapper.original_module)
        if self._requires_grad is not None:
            for n, p in self.model.named_parameters():
                if n in self._requires_grad:
                    p.requires_grad_(self._requires_grad[n])
        self.model.__dict__.pop("save_pretrained", None)
        self.model.__dict__.pop(_ATTR, None)
        self.configs.clear()
        self.stack = Stack()
        self._saved_modules = {}
        self._requires_grad = None
        return self.model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Fuse, then put the original modules back with the fused weights. Returns the model."""
        names = self.active if adapter_names is None else self._check_names(adapter_names)
        layers = list(self.layers())
        if progressbar:
            try:
                from tqdm.auto import tqdm
                layers = tqdm(layers, desc="fusing")
            except ImportError:
                pass
        if safe_merge:  # weights of their own: they stay in the model after the adapters are gone
            fuse_layers([layer for _, layer in layers], names, safe=True, packed=False)
        else:
            for _, layer in layers:
                layer.fuse([n for n in names if n in layer.adapters])
        return self._restore(keep_fused=True)

    def unload(self) -> nn.Module:
        """Remove every adapter; the model is bitwise the original. Returns the model."""
        return self._restore(keep_fused=False)

    # ---- tensors --------------------------------------------------------------------------------
    def adapter_tensors(self, name: str) -> dict[str, dict[str, torch.Tensor]]:
        """``{layer_name: {key: tensor}}`` of adapter ``name`` (detached)."""
        self._check_names(name)
        return {ln: {k: v.detach() for k, v in layer.adapters[name].named_parameters(recurse=False)}
                for ln, layer in self.layers() if name in layer.adapters}

    def adapter_settings(self, name: str) -> dict[str, Settings]:
        """``{layer_name: settings}`` of adapter ``name`` (each its algorithm's frozen settings dataclass)."""
        self._check_names(name)
        return {ln: layer.adapters[name].settings for ln, layer in self.layers() if name in layer.adapters}

    def trainable_parameters(self, names: list[str] | None = None) -> list[nn.Parameter]:
        names = self.active if names is None else names
        params = []
        for _, layer in self.layers():
            for n in names:
                if n in layer.adapters:
                    params += list(layer.adapters[n].parameters())
        for wrapper in self._saved_modules.values():
            for n in names:
                if n in wrapper.modules_to_save:
                    params += list(wrapper.modules_to_save[n].parameters())
        return params

    def regularization_loss(self, names: list[str] | None = None) -> torch.Tensor:
        """Sum of the algorithms' training penalties (HRA's orthogonality term) over the adapters."""
        names = self.active if names is None else names
        total = None
        for _, layer in self.layers():
            for n in names:
                if n in layer.adapters:
                    slot = layer.adapters[n]
                    term = slot.algorithm.regularization(slot.tensors(), slot.settings)
                    if term is not None:
                        total = term if total is None else total + term
        return total if total is not None else torch.zeros(())

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / max(total, 1):.4f}")


def _check_shapes(layer_name, given: dict, expected: dict, check_values: bool = True) -> None:
    if set(given) != set(expected):
        raise ValueError(
            f"layer {layer_name!r}: tensors {sorted(given)} do not match the expected {sorted(expected)}"
        )
    for key, value in given.items():
        if tuple(value.shape) != expected[key]:
            raise ValueError(
                f"layer {layer_name!r}: {key} has shape {tuple(value.shape)}, expected {expected[key]}"
            )
        if check_values and not all_finite(value):
            raise ValueError(f"layer {layer_name!r}: {key} has NaN/Inf values")
