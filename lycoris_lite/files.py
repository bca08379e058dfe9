"""Adapter files: load onto a pipeline's components and save, all-or-nothing.

``load_adapter(pipe_or_components, source, name)`` reads a file (or a state dict), detects its format
and algorithms, maps every module name through the live model, validates every key and shape, and only
then attaches the adapter to the UNet and text encoder(s). ``save_adapter`` writes the kohya/LyCORIS
format (what AUTOMATIC1111 and ComfyUI read) with metadata, atomically.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import AdapterConfig
from .formats import kohya
from .formats.names import build_name_map
from .formats.safe_io import read_state_dict, write_state_dict
from .model import controller_for
from .registry import ALGORITHMS, get_algorithm

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
META_PREFIX = "lycoris_lite."


@dataclass
class LoadedAdapter:
    name: str
    format: str
    algorithms: dict[str, int]          # algorithm -> number of layers
    components: dict[str, int]          # component -> number of layers
    skipped_keys: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


def components_of(target) -> dict[str, nn.Module]:
    """``{component: module}`` from a pipeline, a dict, or a single UNet-like module."""
    if isinstance(target, dict):
        found = {k: v for k, v in target.items() if v is not None}
    elif isinstance(target, nn.Module):
        found = {"unet": target}
    else:
        found = {c: getattr(target, c, None) for c in COMPONENTS}
        found = {k: v for k, v in found.items() if isinstance(v, nn.Module)}
    unknown = set(found) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown component(s) {sorted(unknown)}; expected some of {COMPONENTS}")
    if not found:
        raise ValueError("no unet or text encoder to attach adapters to")
    return {k: (v.model if hasattr(v, "controller") and hasattr(v, "model") else v) for k, v in found.items()}


def detect_format(state: dict[str, torch.Tensor]) -> str:
    keys = list(state)
    if keys and all(k.split(".", 1)[0].startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lycoris_", "oft_unet_")) for k in keys):
        return "kohya"
    if keys and all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys):
        return "diffusers"
    if keys and all(k.startswith("base_model.model.") for k in keys):
        return "peft"
    return "unknown"


def _sides_from_metadata(metadata: dict[str, str]) -> dict[str, str]:
    raw = metadata.get(META_PREFIX + "rotation_sides")
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}


def _summary_config(entries: dict[str, kohya.LayerEntry]) -> AdapterConfig:
    """A config that describes a loaded adapter: its most common algorithm, rank and alpha."""
    algo = Counter(e.algorithm.name for e in entries.values()).most_common(1)[0][0]
    ranks = Counter(e.settings.get("r") for e in entries.values() if e.settings.get("r"))
    cls = get_algorithm(algo).config_class
    fields = {"target_modules": sorted(entries)}
    if ranks and algo in ("lora", "loha", "lokr", "hra"):
        fields["r"] = ranks.most_common(1)[0][0]
    return cls(**fields)


def load_adapter(target, source, adapter_name: str | None = None, *, strict: bool = True,
                 allow_pickle: bool = False, activate: bool = True, scale: float = 1.0) -> LoadedAdapter:
    """Attach the adapter in ``source`` (a file path or a state dict) to ``target``'s components.

    Nothing is attached unless every component's part validates. Returns what was loaded.
    """
    components = components_of(target)
    if isinstance(source, (str, os.PathLike)):
        state, metadata = read_state_dict(source, allow_pickle=allow_pickle)
        adapter_name = adapter_name or Path(source).stem
    elif isinstance(source, dict):
        state, metadata = dict(source), {}
        if adapter_name is None:
            raise ValueError("adapter_name is required when loading a state dict")
    else:
        raise TypeError(f"source must be a path or a state dict, not {type(source).__name__}")
    if not state:
        raise ValueError("the adapter file holds no tensors")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"the adapter has NaN/Inf values in {bad[:5]}")
    fmt = detect_format(state)
    if fmt != "kohya":
        raise ValueError(f"unrecognised adapter format ({fmt}); keys look like {list(state)[:3]}")
    names = build_name_map(components)
    plans, skipped = kohya.read(state, components, names, _sides_from_metadata(metadata), strict=strict)

    controllers = {c: controller_for(components[c]) for c in plans}
    for c, layers in plans.items():
        controllers[c].check_plan(adapter_name, {p: (e.algorithm, e.settings, e.tensors) for p, e in layers.items()})
    for c, layers in plans.items():
        ctrl = controllers[c]
        ctrl.attach(adapter_name, {p: (e.algorithm, e.settings, e.tensors) for p, e in layers.items()},
                    _summary_config(layers), activate=activate)
        if scale != 1.0:
            ctrl.set_scale(adapter_name, scale)
    algorithms = Counter(e.algorithm.name for layers in plans.values() for e in layers.values())
    return LoadedAdapter(adapter_name, fmt, dict(algorithms), {c: len(v) for c, v in plans.items()}, skipped, metadata)


def adapter_entries(components: dict[str, nn.Module], adapter_name: str) -> dict[str, dict[str, kohya.LayerEntry]]:
    entries = {}
    for component, model in components.items():
        ctrl = controller_for(model, create=False)
        if ctrl is None or adapter_name not in ctrl.configs:
            continue
        layers = {}
        for path, layer in ctrl.layers():
            if adapter_name in layer.adapters:
                slot = layer.adapters[adapter_name]
                layers[path] = kohya.LayerEntry(slot.algorithm, dict(slot.settings), slot.tensors())
        entries[component] = layers
    if not entries:
        raise ValueError(f"no adapter named {adapter_name!r} on these components")
    return entries


def save_adapter(target, adapter_name: str, path: str | os.PathLike, *, format: str = "kohya",
                 dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Write adapter ``adapter_name`` to ``path`` (safetensors, atomic)."""
    if format != "kohya":
        raise ValueError(f"unknown format {format!r}; this version writes 'kohya'")
    if dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, not {dtype}")
    components = components_of(target)
    entries = adapter_entries(components, adapter_name)
    names = build_name_map(components)
    state = kohya.write(entries, names, dtype)
    algorithms = Counter(e.algorithm.name for layers in entries.values() for e in layers.values())
    main = algorithms.most_common(1)[0][0]
    ranks = [e.settings.get("r") for layers in entries.values() for e in layers.values() if e.settings.get("r")]
    sides = {e.algorithm.name: e.settings["side"] for layers in entries.values() for e in layers.values() if "side" in e.settings}
    configs = {c: controller_for(m).configs[adapter_name].to_dict() for c, m in components.items() if c in entries}
    meta = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_args": json.dumps({"algo": "locon" if main == "lora" else "diag-oft" if main == "oft" else main}),
        "ss_network_dim": str(max(ranks) if ranks else 0),
        "ss_network_alpha": str(next((e.settings.get("alpha") for ls in entries.values() for e in ls.values() if "alpha" in e.settings), 1.0)),
        META_PREFIX + "algorithms": json.dumps(dict(algorithms)),
        META_PREFIX + "rotation_sides": json.dumps(sides),
        META_PREFIX + "config": json.dumps(configs),
    }
    meta.update(metadata or {})
    return write_state_dict(path, state, meta)


__all__ = ["LoadedAdapter", "load_adapter", "save_adapter", "detect_format", "components_of", "ALGORITHMS"]
