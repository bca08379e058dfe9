"""Adapter files: load onto a pipeline's components and save, all-or-nothing.

``load_adapter(pipe_or_components, source, name)`` reads a file, a folder or a state dict, detects its
format (kohya/LyCORIS, diffusers LoRA, PEFT folder) and algorithms, maps every module name through the
live model, validates every key and shape of every component, and only then attaches the adapter to
the denoiser (UNet or transformer(s)) and text encoder(s). ``save_adapter(..., format=)`` writes

* ``"kohya"``: the kohya/LyCORIS file AUTOMATIC1111 and ComfyUI read, with metadata;
* ``"diffusers"``: ``pytorch_lora_weights.safetensors`` as ``save_lora_weights`` writes it (LoRA only);
* ``"peft"``: PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``), one per
  component in ``unet/``, ``transformer/``, ``text_encoder/``, … subfolders (a flat folder for a single
  model);

every file atomically, after the whole adapter has been converted.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..base.checks import non_finite_keys
from ..base.config import AdapterConfig
from ..base.dtypes import DTYPES
from .formats import community, diffusers_format, kohya, peft_format
from .formats.names import COMPONENTS, DENOISERS, KOHYA_PREFIXES, TEXT_ENCODERS, build_name_map, split_key
from .formats.safe_io import atomic_write_folder, read_state_dict, write_state_dict
from .metadata import PREFIX as META_PREFIX, component_config, header_alphas, network_metadata
from ..core.controller import AdapterController, controller_for
from ..core.offload import check_not_offloaded
from ..core.targets import model_class
from ..base.registry import ALGORITHMS, LayerEntry, get_algorithm

FORMATS = ("kohya", "comfyui", "diffusers", "peft")


@dataclass
class LoadedAdapter:
    """What a load applied: ``coverage`` maps each component's model module paths to the file's module
    names applied to them; ``skipped_keys`` are the file's keys that matched nothing (only with
    ``strict=False``: a strict load refuses them; a load that applies nothing is always refused)."""

    name: str
    format: str
    algorithms: dict[str, int]          # algorithm -> number of layers
    components: dict[str, int]          # component -> number of layers
    skipped_keys: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    coverage: dict[str, dict[str, str]] = field(default_factory=dict)  # component -> {model path: file module}
    #: the module names the file uses (``"sd-scripts / musubi-tuner (lora_unet_ + original names)"``, …)
    layout: str = ""

    def coverage_line(self) -> str:
        """One line: how many of the file's modules apply, where, and what was skipped."""
        applied = sum(self.components.values())
        where = ", ".join(f"{c} {n}" for c, n in self.components.items())
        skipped = sorted({(split_key(k) or (k, ""))[0] for k in self.skipped_keys})
        line = f"{applied} module(s) applied ({where})"
        if skipped:
            line += f"; {len(skipped)} skipped, matching no layer: {skipped[:5]}" + (" …" if len(skipped) > 5 else "")
        return line


#: a metadata key of the files we write: ``{component: class name}`` of the models the adapter was on
MODEL_CLASSES_KEY = META_PREFIX + "model_classes"


def is_unet(module: nn.Module) -> bool:
    """Whether ``module`` is a UNet (diffusers' ``UNet2DConditionModel`` and its kin, by class name)."""
    return any("UNet" in cls.__name__ for cls in type(_unwrapped(module)).__mro__)


def components_of(target) -> dict[str, nn.Module]:
    """``{component: module}`` from a pipeline, a dict, or a single module: ``unet`` for a UNet
    (:func:`is_unet`), ``transformer`` for any other model."""
    if isinstance(target, dict):
        found = {k: v for k, v in target.items() if v is not None}
    elif isinstance(target, nn.Module):
        found = {"unet" if is_unet(target) else "transformer": target}
    else:
        found = {c: getattr(target, c, None) for c in COMPONENTS}
        found = {k: v for k, v in found.items() if isinstance(v, nn.Module)}
    unknown = set(found) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown component(s) {sorted(unknown)}; expected some of {COMPONENTS}")
    if not found:
        raise ValueError(f"nothing to attach adapters to: none of {', '.join(COMPONENTS)}")
    return {k: _unwrapped(v) for k, v in found.items()}


def _unwrapped(module: nn.Module) -> nn.Module:
    """The model inside a ``torch.compile`` wrapper (``_orig_mod``) or an :class:`AdapterModel`."""
    module = getattr(module, "_orig_mod", module)
    return module.model if hasattr(module, "controller") and hasattr(module, "model") else module


def detect_format(state: dict[str, torch.Tensor]) -> str:
    keys = list(state)
    if keys and all(k.split(".", 1)[0].startswith(tuple(KOHYA_PREFIXES)) for k in keys):
        return "kohya"
    if keys and all(k.startswith(tuple(c + "." for c in COMPONENTS)) for k in keys):
        return "diffusers"
    if keys and all(k.startswith(peft_format.KEY_PREFIX) for k in keys):
        return "peft"
    if diffusers_format.looks_like_diffusers(keys):
        return "diffusers"  # one model's LoRA without component prefixes (``save_lora_adapter``)
    return "unknown"


def kohya_layout(state: dict[str, torch.Tensor], names: dict) -> str:
    """The module names a kohya-style file uses: sd-scripts' / musubi-tuner's original names of a
    transformer, else kohya/LyCORIS names of diffusers paths."""
    modules = {k.split(".", 1)[0] for k in state}
    if any(modules & cn.original_spellings for cn in names.values()):
        return "sd-scripts / musubi-tuner (lora_unet_ + original names)"
    return "kohya/LyCORIS"


def _sides_from_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """``{module: "input" | "output"}`` of the file's rotation sides (our own metadata key)."""
    key = META_PREFIX + "rotation_sides"
    raw = metadata.get(key)
    try:
        sides = json.loads(raw) if raw else {}
    except ValueError as exc:  # not JSON, or a number past Python's digit limit
        raise ValueError(f"the file's metadata {key} is not valid JSON ({exc})") from None
    if not isinstance(sides, dict) or not all(isinstance(k, str) and v in ("input", "output") for k, v in sides.items()):
        raise ValueError(f"the file's metadata {key} is not a mapping of module names to 'input'/'output'")
    return sides


def _summary_config(entries: dict[str, LayerEntry]) -> AdapterConfig:
    """A config that describes a loaded adapter: its most common algorithm, and that algorithm's most
    common rank, alpha and DoRA axis where its layers' settings have them."""
    algo = Counter(e.algorithm.name for e in entries.values()).most_common(1)[0][0]
    settings = [e.settings for e in entries.values() if e.algorithm.name == algo]
    fields = {"target_modules": sorted(entries)}
    for field_name, key in (("r", "rank"), ("alpha", "alpha"), ("dora_axis", "dora")):
        values = Counter(getattr(s, key) for s in settings if getattr(s, key, None))
        if values:
            fields[field_name] = values.most_common(1)[0][0]
    if "dora_axis" in fields:
        fields["use_dora"] = True
    return get_algorithm(algo).config_class(**fields)


def _default_name(path: Path) -> str:
    name = path.name if path.is_dir() else path.stem
    if not path.is_dir() and name in ("pytorch_lora_weights", "adapter_model", "adapter_config") and path.parent.name:
        name = path.parent.name
    return name.replace(".", "_") or "adapter"


def default_component(components: dict[str, nn.Module]) -> str:
    """The component a one-model file (a flat PEFT folder, a diffusers file without component prefixes)
    belongs to: the first denoiser present, else the one component, else ``unet``."""
    found = next((c for c in DENOISERS if c in components), None)
    return found or (next(iter(components)) if len(components) == 1 else "unet")


def saved_model_classes(metadata: dict[str, str]) -> dict[str, str]:
    """``{component: class name}`` the file says it was saved from (our metadata), ``{}`` if it does not."""
    raw = metadata.get(MODEL_CLASSES_KEY)
    try:
        classes = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return classes if isinstance(classes, dict) else {}


def _peft_folders(path: Path, components: dict[str, nn.Module], component: str | None) -> dict[str, Path]:
    """``{component: PEFT folder}`` for a folder source (a single adapter or per-component subfolders)."""
    found = peft_format.adapter_folders(path)
    if None in found:
        return {component or default_component(components): path}
    return {c: p for c, p in found.items() if component is None or c == component}


def _read_peft(folders: dict[str, Path], components, allow_pickle: bool, strict: bool):
    plans, configs, skipped, metadata = {}, {}, [], {}
    for component, folder in folders.items():
        if component not in components:
            if strict:
                raise ValueError(f"the PEFT adapter has a {component} part ({folder}) but the target has no {component} "
                                 f"(it has {sorted(components)}); strict=False skips it")
            skipped.append(str(folder))
            continue
        state, config, header = peft_format.read_folder(folder, allow_pickle=allow_pickle)
        kohya.check_model_classes(saved_model_classes(header), components)
        _check_tensors(state)
        layers, skip = peft_format.read(state, config, components[component], component, strict=strict)
        plans[component] = layers
        configs[component] = peft_format.our_config(config, layers)
        skipped += [f"{component}.{k}" for k in skip]
        metadata[f"{META_PREFIX}peft_config.{component}"] = json.dumps(config, sort_keys=True)
        for key, value in header.items():  # each part's file header; a value one part disagrees on is kept per part
            if metadata.setdefault(key, value) != value:
                metadata[f"{component}.{key}"] = value
    if not plans:
        raise ValueError("the PEFT adapter has no part for these components")
    return plans, configs, skipped, metadata


def _check_tensors(state) -> None:
    """Every tensor of an adapter is a non-empty floating-point tensor (an ``alpha`` may be an integer)
    without NaN/Inf."""
    if not state:
        raise ValueError("the adapter file holds no tensors")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("the adapter's state dict holds values that are not tensors")
    empty = [k for k, v in state.items() if v.numel() == 0]
    if empty:
        raise ValueError(f"the adapter has empty (zero-size) tensors: {empty[:5]}")
    wrong = [f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in state.items()
             if not v.is_floating_point() and not (k.endswith("alpha") and not v.is_complex() and v.dtype != torch.bool)]
    if wrong:
        raise ValueError(f"adapter tensors must be floating point; these are not: {wrong[:5]}")
    bad = non_finite_keys(state)
    if bad:
        raise ValueError(f"the adapter has NaN/Inf values in {bad[:5]}")


def _check_plans(components: dict[str, nn.Module], adapter_name: str, plans: dict) -> None:
    """Every layer's tensors against the live model (keys and shapes), changing nothing."""
    for c, layers in plans.items():
        # a model without adapters gets no controller until everything has validated
        checker = controller_for(components[c], create=False) or AdapterController(components[c])
        checker.check_plan(adapter_name, {p: (e.algorithm, e.settings, e.tensors) for p, e in layers.items()},
                           allow_existing=True, check_values=False)  # the whole state was checked before


@dataclass
class ReadAdapter:
    """An adapter read and validated against the components, not attached yet."""

    name: str
    format: str
    plans: dict[str, dict[str, LayerEntry]]   # component -> {module path: entry}
    configs: dict[str, AdapterConfig]
    skipped_keys: list[str]
    metadata: dict[str, str]
    layout: str = ""

    def layer_plan(self, component: str) -> dict:
        """``{module path: (algorithm, settings, tensors)}`` for ``AdapterController.attach``."""
        return {p: (e.algorithm, e.settings, e.tensors) for p, e in self.plans[component].items()}


def read_adapter(target, source, adapter_name: str | None = None, *, strict: bool = True,
                 allow_pickle: bool = False, component: str | None = None) -> ReadAdapter:
    """Read ``source`` and map it onto ``target``'s components without changing them.

    ``source``: a kohya/LyCORIS or diffusers file, a diffusers folder (``pytorch_lora_weights.safetensors``),
    a PEFT folder (``adapter_config.json``; applied to the denoiser (:func:`default_component`), or to
    ``component``), a folder of per-component PEFT folders (``unet/``, ``transformer/``, ``text_encoder/``,
    …), or a state dict (kohya or diffusers). A file we wrote names the models it was saved from; one
    from another family's denoiser is refused (:func:`~lycoris_lite.io.formats.kohya.check_model_classes`).
    Raises ``ValueError`` naming the problem for anything that does not fit the model.
    """
    components = components_of(target)
    if component is not None and component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
    configs: dict[str, AdapterConfig] = {}
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"no adapter file or folder at {path}")
        adapter_name = adapter_name or _default_name(path)
        if path.is_file() and (path.name == peft_format.CONFIG_NAME or (
                path.name in (peft_format.WEIGHTS_NAME, peft_format.PICKLE_WEIGHTS_NAME)
                and peft_format.is_peft_folder(path.parent))):
            path = path.parent
        if path.is_dir():
            folders = _peft_folders(path, components, component)
            if folders:
                plans, configs, skipped, metadata = _read_peft(folders, components, allow_pickle, strict)
                _check_plans(components, adapter_name, plans)
                return ReadAdapter(adapter_name, "peft", plans, configs, skipped, metadata, "peft")
            if (path / diffusers_format.WEIGHT_NAME).is_file():
                path = path / diffusers_format.WEIGHT_NAME
            else:
                raise ValueError(f"{path}: a folder with neither {peft_format.CONFIG_NAME} (PEFT), "
                                 f"{diffusers_format.WEIGHT_NAME} (diffusers) nor PEFT subfolders "
                                 f"({', '.join(c + '/' for c in COMPONENTS)})")
        state, metadata = read_state_dict(path, allow_pickle=allow_pickle)
    elif isinstance(source, dict):
        state, metadata = dict(source), {}
        if adapter_name is None:
            raise ValueError("adapter_name is required when loading a state dict")
    else:
        raise TypeError(f"source must be a path or a state dict, not {type(source).__name__}")
    _check_tensors(state)
    kohya.check_model_classes(saved_model_classes(metadata), components)
    fmt = detect_format(state)
    layout, unresolved = "", []
    if fmt in ("diffusers", "unknown") and components.get("transformer") is not None:
        names = build_name_map(components)
        renamed = community.to_kohya_names(state, components["transformer"], names["transformer"])
        if renamed is not None:
            state, layout, unresolved = renamed
            fmt = "kohya"
            kohya.check_unknown(sorted({(split_key(k) or (k, ""))[0] for k in unresolved}), [], strict,
                                components=components)
    if fmt == "kohya":
        names = build_name_map(components)
        plans, skipped = kohya.read(state, components, names, _sides_from_metadata(metadata), strict=strict,
                                    header_alphas=header_alphas(metadata))
        skipped += unresolved
        layout = layout or kohya_layout(state, names)
    elif fmt == "diffusers":
        plans, skipped = diffusers_format.read(state, components, metadata,
                                               default_component=component or default_component(components),
                                               strict=strict)
        if component is not None and set(plans) - {component}:
            raise ValueError(f"the file has weights for {sorted(plans)}; component={component!r} names one")
    elif fmt == "peft":
        raise ValueError("this is a PEFT state dict (base_model.model.* keys): load the PEFT folder with its "
                         f"{peft_format.CONFIG_NAME}, which holds the settings the tensors need")
    else:
        raise ValueError(f"unrecognised adapter format ({fmt}); keys look like {list(state)[:3]}; known formats: "
                         "kohya/LyCORIS (lora_unet_…, lycoris_…), diffusers (unet.….lora_A.weight, "
                         "transformer.….lora_A.weight), PEFT folders")
    _check_plans(components, adapter_name, plans)
    return ReadAdapter(adapter_name, fmt, plans, configs, skipped, metadata, layout or fmt)


def load_adapter(target, source, adapter_name: str | None = None, *, strict: bool = True,
                 allow_pickle: bool = False, activate: bool = True, scale: float = 1.0,
                 component: str | None = None) -> LoadedAdapter:
    """Attach the adapter in ``source`` (see :func:`read_adapter`) to ``target``'s components.

    Nothing is attached unless every component's part validates.

    Args:
        target: a pipeline, a ``{component: model}`` dict or one model.
        source: a kohya/LyCORIS or diffusers ``.safetensors`` file, a diffusers or PEFT folder, or a state dict.
        adapter_name: defaults to the file's stem.
        strict: refuse keys that match no module (else they are reported and skipped).
        allow_pickle: read ``.bin``/``.pt`` files (with ``torch.load(weights_only=True)``).
        activate, scale: add it to the active adapters, at this weight.
        component: load only this component's part.

    Returns:
        A :class:`LoadedAdapter` (name, format, algorithms, layers per component, metadata).

    Raises:
        AdapterFileError: a corrupt, foreign or pickled (unless allowed) file.
        ValueError: shapes or names that do not fit the model, NaN/Inf values, an existing name, or an
            offloaded model (RuntimeError).
    """
    read = read_adapter(target, source, adapter_name, strict=strict, allow_pickle=allow_pickle, component=component)
    return attach_adapter(target, read, activate=activate, scale=scale)


def attach_adapter(target, read: ReadAdapter, *, activate: bool = True, scale: float = 1.0) -> LoadedAdapter:
    """Attach an adapter from :func:`read_adapter` to every component it has a part for."""
    components = components_of(target)
    for c in read.plans:
        ctrl = controller_for(components[c], create=False)
        if ctrl is not None and read.name in ctrl.configs:
            raise ValueError(f"adapter {read.name!r} already exists; delete it first or pick another name")
        check_not_offloaded(components[c], read.plans[c])
    for c, layers in read.plans.items():
        ctrl = controller_for(components[c])
        ctrl.attach(read.name, read.layer_plan(c), read.configs.get(c) or _summary_config(layers), activate=activate,
                    validated=True)
        if scale != 1.0:
            ctrl.set_scale(read.name, scale)
    return loaded_info(read)


def loaded_info(read: ReadAdapter) -> LoadedAdapter:
    """The :class:`LoadedAdapter` report of ``read`` (what attaching it applies)."""
    algorithms = dict(Counter(e.algorithm.name for layers in read.plans.values() for e in layers.values()))
    coverage = {c: {path: e.source or path for path, e in layers.items()} for c, layers in read.plans.items()}
    return LoadedAdapter(read.name, read.format, algorithms, {c: len(v) for c, v in read.plans.items()},
                         read.skipped_keys, read.metadata, coverage, read.layout)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor whole: a sharded one (FSDP2's ``DTensor``) gathered from every rank (a collective: every
    rank must save), any other as it is."""
    full = getattr(tensor, "full_tensor", None)
    return full() if callable(full) else tensor


def adapter_entries(components: dict[str, nn.Module], adapter_name: str) -> dict[str, dict[str, LayerEntry]]:
    """``{component: {layer path: LayerEntry}}`` of adapter ``adapter_name``, its tensors whole (an adapter on a
    model sharded with FSDP2 is gathered: every process must call this, and so :func:`save_adapter`)."""
    entries = {}
    for component, model in components.items():
        ctrl = controller_for(model, create=False)
        if ctrl is None or adapter_name not in ctrl.configs:
            continue
        layers = {}
        for path, layer in ctrl.layers():
            if adapter_name in layer.adapters:
                slot = layer.adapters[adapter_name]
                layers[path] = LayerEntry(slot.algorithm, slot.settings,
                                          {k: _whole(v) for k, v in slot.tensors().items()})
        entries[component] = layers
    if not entries:
        raise ValueError(f"no adapter named {adapter_name!r} on these components")
    return entries


def save_adapter(target, adapter_name: str, path: str | os.PathLike, *, format: str = "kohya",
                 dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None,
                 layout: str | None = None, bake_constraint: bool = False) -> Path:
    """Write adapter ``adapter_name`` to ``path`` atomically; returns the file (kohya, diffusers) or folder (peft).

    * ``"kohya"``: one safetensors file; a transformer with original module names (Flux.1/.2, SD3, Z-Image,
      Wan) in them, as sd-scripts and musubi-tuner write them (``lora_unet_double_blocks_0_img_attn_qkv``),
      its separate Q/K/V adapters joined into one on the fused matrix where that is exact (``layout``).
    * ``"comfyui"``: the kohya file with a transformer's modules as ComfyUI names them
      (``diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight``).
    * ``"diffusers"``: ``path`` is a ``.safetensors`` file or a folder (then
      ``path/pytorch_lora_weights.safetensors``); LoRA adapters only.
    * ``"peft"``: ``path`` is a folder; a pipeline or dict target gets a subfolder per component
      (``path/unet``, ``path/transformer``, ``path/text_encoder``), a single model a flat folder.

    Every file records the class of each model it holds a part for (``lycoris_lite.model_classes``), so
    that loading it onto another family's model is refused.

    The whole adapter is converted (and every check made) before anything is written.

    Args:
        target: a pipeline, a ``{component: model}`` dict or one model carrying the adapter.
        adapter_name: the adapter to write.
        path: the file or folder.
        format, dtype: as above; ``dtype`` float32, float16 or bfloat16 (default: the adapter's).
        layout: for ``kohya``/``comfyui`` on a transformer: ``"original"`` (original names; ``ValueError``
            with the reason where a fused module has no exact adapter), ``"diffusers"`` (the diffusers
            paths, ``lycoris_…``), or ``None``: original names where exact, else diffusers paths (a warning
            says why).
        bake_constraint: write OFT/BOFT blocks with their COFT clamp applied and no constraint (alpha 0):
            the same weights, read alike by ComfyUI (which takes the alpha as the bound itself),
            AUTOMATIC1111 and LyCORIS (``alpha · out``); the clamp no longer limits further training.
        metadata: extra ``str -> str`` entries for the file's header (kohya, diffusers) or config (PEFT).

    Returns:
        The written file or folder.

    Raises:
        ValueError: an unknown format or dtype, an unknown adapter, or an adapter the format cannot hold
            (a non-LoRA in diffusers' format).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in DTYPES.values():
        raise ValueError(f"dtype must be {', '.join(DTYPES)}, not {dtype}")
    components = components_of(target)
    entries = adapter_entries(components, adapter_name)
    if bake_constraint:
        entries = {c: {p: LayerEntry(e.algorithm, *e.algorithm.bake_constraint(e.tensors, e.settings), e.source)
                       for p, e in layers.items()} for c, layers in entries.items()}
    path = Path(path)
    classes = {MODEL_CLASSES_KEY: json.dumps({c: model_class(components[c]).__name__ for c in entries})}
    if format == "diffusers":
        state, meta = diffusers_format.write(entries, components, dtype)
        meta.update(classes)
        meta.update(metadata or {})
        file = path if path.suffix == ".safetensors" else path / diffusers_format.WEIGHT_NAME
        return write_state_dict(file, state, meta)
    if format == "peft":
        if path.suffix == ".safetensors" or path.name == peft_format.CONFIG_NAME:
            path = path.parent
        parts = {c: peft_format.write(layers, components[c], c, dtype) for c, layers in entries.items()}
        flat = isinstance(target, nn.Module)

        def write_parts(folder: Path) -> None:
            for c, (state, config) in parts.items():
                peft_format.write_folder(folder if flat else folder / c, state, config, {**classes, **(metadata or {})})

        # the whole folder at once (every component), so a killed save never leaves parts of two versions
        return atomic_write_folder(path, write_parts, replaceable=peft_format.holds_only_adapter_files)
    names = build_name_map(components)
    state = kohya.write(entries, names, dtype, components, layout, comfyui=format == "comfyui")
    algorithms = Counter(e.algorithm.name for layers in entries.values() for e in layers.values())
    main = algorithms.most_common(1)[0][0]
    sides = {e.algorithm.name: e.settings.side for layers in entries.values() for e in layers.values()
             if hasattr(e.settings, "side")}
    configs = {c: controller_for(m).configs[adapter_name].to_dict() for c, m in components.items() if c in entries}
    meta = {
        **network_metadata(main, component_config(main, configs)),
        META_PREFIX + "algorithms": json.dumps(dict(algorithms)),
        META_PREFIX + "rotation_sides": json.dumps(sides),
        META_PREFIX + "config": json.dumps(configs),
        **classes,
    }
    meta.update(metadata or {})
    return write_state_dict(path, state, meta)


__all__ = ["COMPONENTS", "DENOISERS", "FORMATS", "TEXT_ENCODERS", "LoadedAdapter", "ReadAdapter", "attach_adapter",
           "load_adapter", "read_adapter", "save_adapter", "detect_format", "components_of", "default_component",
           "is_unet", "saved_model_classes", "ALGORITHMS"]
