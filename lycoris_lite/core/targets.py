"""Finding modules in a model tree: by path, and by the name patterns of a config.

* module paths: :func:`submodule`, :func:`walk_modules` (fast forms of ``get_submodule`` and
  ``named_modules`` that stop at an :class:`~lycoris_lite.core.layer.AdapterLayer`),
  :func:`base_module_at` and :func:`_parent`;
* target matching: :func:`find_targets`, the modules a config's ``target_modules``,
  ``exclude_modules`` and ``layers_to_transform`` name, checked to be supported layers;
* :class:`ModulesToSave`, the wrapper of a module a config's ``modules_to_save`` trains in full.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Iterator
from typing import Iterable

from torch import nn

from ..base.config import AdapterConfig
from ..base.layer_kind import LayerSpec
from .layer import AdapterLayer


# ---- module paths -------------------------------------------------------------------------------
def submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)`` through the ``_modules`` dicts: no ``nn.Module.__getattr__`` per
    level (diffusers' models add a config lookup to each), which adds up over a UNet's layers."""
    module = model
    if path:
        for part in path.split("."):
            child = module._modules.get(part)
            if child is None:
                raise AttributeError(f"{type(module).__name__} has no submodule {part!r} (in {path!r})")
            module = child
    return module


def walk_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` (pre-order, each shared module once) through the ``_modules`` dicts,
    without descending into an :class:`AdapterLayer` (whose children are its adapter slots): adapter
    management walks the tree on every change (benchmarks/README "Measurements behind the code")."""
    stack, seen = [("", model)], set()
    while stack:
        path, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield path, module
        if isinstance(module, AdapterLayer):
            continue
        children = module._modules
        for child_name in reversed(children):
            child = children[child_name]
            if child is not None:
                stack.append((f"{path}.{child_name}" if path else child_name, child))


def base_module_at(model: nn.Module, path: str) -> nn.Module:
    """The layer at ``path``, unwrapped when adapters sit on it."""
    module = submodule(model, path)
    return module._base_module if isinstance(module, AdapterLayer) else module


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    if "." in name:
        parent_name, child = name.rsplit(".", 1)
        return submodule(model, parent_name), child
    return model, name


# ---- target matching ----------------------------------------------------------------------------
def _matches(name: str, pattern) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def _layer_index(name: str, patterns) -> int | None:
    regexes = [rf"(?:.*\.)?{re.escape(p)}\.(\d+)(?:\.|$)" for p in patterns] if patterns else [r"(?:.*?\.)?(\d+)(?:\.|$)"]
    for regex in regexes:
        found = re.match(regex, name)
        if found:
            return int(found.group(1))
    return None


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Module names a config may target: everything but adapter internals."""
    out = []
    for name, module in model.named_modules():
        if not name or ".adapters." in f".{name}." or ".modules_to_save." in f".{name}.":
            continue
        if isinstance(module, AdapterLayer):
            out.append((name, module.base_module))
        else:
            out.append((name, module))
    return out


def _nearest(word: str, names: Iterable[str]) -> list[str]:
    pool = set()
    for n in names:
        parts = n.split(".")
        pool.update(".".join(parts[i:]) for i in range(len(parts)))
    return difflib.get_close_matches(word, sorted(pool), n=5, cutoff=0.5)


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the modules ``config`` targets, checked: every list entry must match something and
    every match must be a supported layer."""
    candidates = _candidates(model)
    names = [n for n, _ in candidates]
    targets = config.target_modules
    if not targets:
        raise ValueError("target_modules is empty: give a list of names, a regex, or 'all-linear'")
    if targets == "all-linear":
        chosen = [n for n, m in candidates if isinstance(m, nn.Linear)]
    else:
        chosen = [n for n in names if _matches(n, targets)]
        if not isinstance(targets, str):
            missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
            if missing:
                hints = "; ".join(f"{t!r}: nearest {_nearest(t, names) or 'none'}" for t in missing)
                raise ValueError(f"target_modules entries match no module: {hints}")
    if config.exclude_modules:
        chosen = [n for n in chosen if not _matches(n, config.exclude_modules)]
    if config.layers_to_transform:
        wanted = set(config.layers_to_transform)
        chosen = [n for n in chosen if _layer_index(n, config.layers_pattern) in wanted]
    if not chosen:
        raise ValueError(
            f"target_modules={targets!r} matches no module of this model; "
            f"nearest names: {_nearest(targets if isinstance(targets, str) else targets[0], names)}"
        )
    modules = dict(candidates)
    for name in chosen:
        LayerSpec.from_module(modules[name], name)  # raises a clear TypeError for other layer types
    return chosen


# ---- modules trained in full ----------------------------------------------------------------------
class ModulesToSave(nn.Module):
    """A module trained in full: one copy per adapter; the active adapter's copy runs."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None

    def add(self, name: str):
        clone = copy.deepcopy(self.original_module)
        clone.requires_grad_(True)
        self.modules_to_save[name] = clone

    def forward(self, *args, **kwargs):
        module = self.modules_to_save[self.active] if self.active in self.modules_to_save else self.original_module
        return module(*args, **kwargs)


def model_class(module: nn.Module) -> type:
    """The model's own class: FSDP2's ``fully_shard`` swaps a module's class for a generated subclass
    (``FSDPFluxTransformer2DModel``); names, families and file metadata go by the class it wraps."""
    return next(cls for cls in type(module).__mro__ if not cls.__module__.startswith("torch.distributed"))


def adapter_capable_paths(model: nn.Module) -> list[str]:
    """Paths of the modules an adapter may sit on (wrapped ones by their original path)."""
    out = []
    for name, module in walk_modules(model):
        if not name or ".modules_to_save." in f".{name}.":
            continue
        if isinstance(module, (nn.Linear, nn.Conv2d, AdapterLayer)):
            out.append(name)
    return out
