"""Hugging Face PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``).

Keys are ``base_model.model.<module path>.<param>`` with PEFT's parameter names and layouts (what
``PeftModel.save_pretrained`` writes with PEFT 0.21). Each algorithm owns its PEFT codec: its
``peft_type``, its tensor names (``peft_keys``) and the conversion of one module's tensors and settings
to and from PEFT's layout and ``adapter_config.json`` fields (``Algorithm.from_peft`` / ``to_peft``, in
its module under :mod:`lycoris_lite.algos`). This module holds the folder IO and the driver that asks the
registry: it splits keys into modules, maps module names through the live model and checks what PEFT
holds for any method.

Reading and writing are pure mappings: :func:`read` (a state dict and a config -> per-layer entries) and
:func:`write` (entries -> a state dict and a config). Nothing here imports PEFT.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ...base.layer_kind import LayerSpec
from ...base.registry import ALGORITHMS, Algorithm, LayerEntry, peft_algorithm
from ...core.targets import adapter_capable_paths, base_module_at
from .kohya import join_modules
from .names import COMPONENTS
from .safe_io import AdapterFileError, atomic_write, read_state_dict, write_state_dict

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
#: the PEFT version whose layouts the writer follows (OFTv2 with the 0.18 Cayley–Neumann series)
PEFT_LAYOUT_VERSION = "0.18.0"


# ---- module names -------------------------------------------------------------------------------------
def module_paths(model: nn.Module) -> set[str]:
    """Paths of the modules of ``model`` an adapter may sit on (wrapped ones by their original path)."""
    return set(adapter_capable_paths(model))


def resolve_path(paths: set[str], path: str) -> str | None:
    """The live module path for a file's ``path``: as given, or with/without the ``text_model.`` level
    (transformers 5's ``CLIPTextModel`` has none; files written with transformers 4 have it)."""
    for candidate in (path, path.removeprefix("text_model."), "text_model." + path):
        if candidate in paths:
            return candidate
    return None


# ---- folders -----------------------------------------------------------------------------------------
def is_peft_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def adapter_folders(path: str | os.PathLike) -> dict[str | None, Path]:
    """The PEFT adapters in folder ``path``: ``{None: path}`` for one adapter (one model's), else
    ``{component: path/component}`` for the per-component subfolders (``unet/``, ``text_encoder/``, …)
    there are; ``{}`` for none."""
    path = Path(path)
    if is_peft_folder(path):
        return {None: path}
    return {c: path / c for c in COMPONENTS if is_peft_folder(path / c)}


def holds_only_adapter_files(path: str | os.PathLike) -> bool:
    """Whether folder ``path`` holds nothing but a PEFT adapter save (flat, or in component subfolders):
    such a folder may be replaced whole by a new save."""
    allowed_files = {CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME, "README.md"}
    for entry in Path(path).iterdir():
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            continue
        if entry.is_file() and not entry.is_symlink() and entry.name in allowed_files:
            continue
        if entry.is_dir() and not entry.is_symlink() and entry.name in COMPONENTS and all(
                f.is_file() and not f.is_symlink() and f.name in allowed_files for f in entry.iterdir()):
            continue
        return False
    return True


def read_folder(path: str | os.PathLike, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
    """``(state dict, adapter_config, safetensors header metadata)`` of a PEFT adapter folder."""
    path = Path(path)
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, bad UTF-8, a 5000-digit number
        raise AdapterFileError(f"{path / CONFIG_NAME}: not a readable JSON adapter config "
                               f"({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise AdapterFileError(f"{path / CONFIG_NAME}: no peft_type; not a PEFT adapter config")
    weights = path / WEIGHTS_NAME
    if not weights.is_file() and (path / PICKLE_WEIGHTS_NAME).is_file():
        weights = path / PICKLE_WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: has {CONFIG_NAME} but its weights are not found: {weights}")
    state, metadata = read_state_dict(weights, allow_pickle=allow_pickle)
    return state, config, metadata


def write_folder(path: str | os.PathLike, state: dict[str, torch.Tensor], config: dict,
                 metadata: dict[str, str] | None = None) -> Path:
    """Write ``adapter_model.safetensors`` then ``adapter_config.json`` (each atomically)."""
    path = Path(path)
    write_state_dict(path / WEIGHTS_NAME, state, {"format": "pt", **(metadata or {})})
    text = json.dumps(config, indent=2, sort_keys=True)

    def write_text(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)

    atomic_write(path / CONFIG_NAME, write_text)
    return path


# ---- reading -----------------------------------------------------------------------------------------
def _split(state: dict[str, torch.Tensor], algo: type[Algorithm]):
    """``({module: {param: tensor}}, unsupported {key: what}, unknown keys)``."""
    keys = list(state)
    strip = KEY_PREFIX if keys and all(k.startswith(KEY_PREFIX) for k in keys) else ""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unsupported, unknown = {}, []
    for key, value in state.items():
        rest = key[len(strip):]
        for param in algo.peft_keys:
            if rest.endswith("." + param):
                modules.setdefault(rest[: -len(param) - 1], {})[param] = value
                break
        else:
            what = next((w for p, w in algo.peft_unsupported.items() if f".{p}" in f".{rest}"), None)
            if what:
                unsupported[key] = what
            else:
                unknown.append(key)
    return modules, unsupported, unknown


#: ``adapter_config.json`` fields every method's reader uses, by the kind of value PEFT writes there
#: (each algorithm adds its own: ``Algorithm.peft_fields``)
_FIELDS = {"r": int}


def _is_number(value, integral: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return not integral or float(value).is_integer()


def check_config_values(config: dict, component: str, algo: type[Algorithm], source: str = CONFIG_NAME) -> None:
    """The config's values ``algo``'s reader uses have the types PEFT writes (a ``ValueError`` naming the
    field otherwise, instead of a ``TypeError`` from deep inside). ``source``: where the config was
    read, for the message (diffusers files keep a LoraConfig in their header)."""
    def refuse(key, want):
        raise ValueError(f"{component}: {source} has {key}={config[key]!r}; expected {want}")

    for key, kind in {**_FIELDS, **algo.peft_fields}.items():
        if key in config and not _is_number(config[key], integral=kind is int):
            refuse(key, "an integer" if kind is int else "a finite number")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            refuse(key, "a mapping of module-name patterns to numbers")
        for pattern, value in patterns.items():
            if not _is_number(value, integral=key == "rank_pattern"):
                raise ValueError(f"{component}: {source} {key}[{pattern!r}] is {value!r}; expected "
                                 f"{'an integer' if key == 'rank_pattern' else 'a finite number'}")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{component}: {source} {key} key {pattern!r} is not a regular expression "
                                 f"({exc})") from None


def _check_config(config: dict, component: str) -> type[Algorithm]:
    algo = peft_algorithm(str(config.get("peft_type", "")).upper())
    if algo is None:
        supported = [a.peft_type for a in ALGORITHMS.values() if a.peft_type]
        raise ValueError(f"{component}: PEFT type {config.get('peft_type')!r} is not supported; "
                         f"supported: {', '.join(supported)}")
    check_config_values(config, component, algo)
    algo.check_peft_config(config, component)
    if config.get("lora_bias"):
        raise ValueError(f"{component}: LoRA with a trained bias (lora_bias=True) is not supported")
    if config.get("fan_in_fan_out"):
        raise ValueError(f"{component}: fan_in_fan_out=True (transposed Conv1D weights) is not supported")
    if config.get("layer_replication"):
        raise ValueError(f"{component}: layer_replication is not supported")
    if config.get("target_parameters"):
        raise ValueError(f"{component}: target_parameters (adapters on bare parameters) are not supported")
    return algo


def read(state: dict[str, torch.Tensor], config: dict, model: nn.Module, component: str = "unet",
         strict: bool = True) -> tuple[dict[str, LayerEntry], list[str]]:
    """Map one PEFT adapter (state dict + ``adapter_config.json`` dict) onto ``model``.

    Returns ``({module path: LayerEntry}, skipped keys)``; every problem raises ``ValueError`` before
    anything is attached (``strict=False`` skips unknown modules and keys instead).
    """
    algo = _check_config(config, component)
    modules, unsupported, unknown = _split(state, algo)
    if unsupported:
        key, what = next(iter(unsupported.items()))
        raise ValueError(f"{component}: {what} is not supported (key {key!r})")
    if config.get("bias") not in (None, "none") and any(k.endswith(".bias") for k in unknown):
        raise ValueError(f"{component}: trained biases (bias={config['bias']!r}) are not supported; keys "
                         f"{[k for k in unknown if k.endswith('.bias')][:3]}")
    if config.get("modules_to_save") and unknown:
        raise ValueError(f"{component}: modules_to_save {config['modules_to_save']} (fully trained modules) are not "
                         f"supported; keys {unknown[:3]}")
    paths = module_paths(model)
    layers, skipped, missing = {}, list(unknown), []
    for file_path, tensors in modules.items():
        live = resolve_path(paths, file_path)
        if live is None:
            missing.append(file_path)
            skipped += [f"{file_path}.{k}" for k in tensors]
            continue
        spec = LayerSpec.from_module(base_module_at(model, live), live)
        try:
            settings, params = algo.from_peft(spec, tensors, config, (live, file_path))
        except KeyError as exc:
            raise ValueError(f"{component}: layer {live!r} ({algo.name}) is missing the tensor {exc}") from None
        except (IndexError, TypeError, RuntimeError, ZeroDivisionError) as exc:  # tensors of the wrong rank, …
            raise ValueError(f"{component}: layer {live!r} ({algo.name}): its tensors "
                             f"{({k: tuple(v.shape) for k, v in tensors.items()})} do not form a {algo.name} adapter "
                             f"({type(exc).__name__}: {exc})") from None
        layers[live] = LayerEntry(algo, settings, params, file_path)
    if strict and (missing or unknown):
        parts = []
        if missing:
            targets = config.get("target_modules")
            parts.append(f"{len(missing)} module(s) of this PEFT adapter (target_modules={targets!r}) are not in the "
                         f"{component} ({type(model).__name__}): {sorted(missing)[:8]}")
        if unknown:
            parts.append(f"keys that are not {algo.name} tensors: {sorted(unknown)[:8]}")
        raise ValueError(f"{component}: " + "; ".join(parts) + " (strict=False loads the rest and returns the skipped keys)")
    if not layers:
        raise ValueError(f"{component}: the PEFT adapter has no tensors for this model")
    return layers, skipped


def our_config(config: dict, layers: dict[str, LayerEntry]):
    """Our config describing a PEFT adapter read with :func:`read` (best effort; the per-layer
    settings are what the layers use): the algorithm's ``peft_config_fields``, or only the rotation
    side (what the layers' tensors mean) when those do not make a valid config."""
    algo = peft_algorithm(str(config["peft_type"]).upper())
    fields = {**algo.peft_config_fields(config, layers), "target_modules": sorted(layers)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return algo.config_class(**fields)
    except (TypeError, ValueError):
        return algo.config_class(**{k: fields[k] for k in ("target_modules", "rotation_side") if k in fields})


# ---- writing -----------------------------------------------------------------------------------------
def write(layers: dict[str, LayerEntry], model: nn.Module, component: str = "unet",
          dtype: torch.dtype | None = None, peft_version: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Per-layer entries of one component -> ``(state dict, adapter_config dict)`` in PEFT's layout.

    Raises ``ValueError`` (nothing written) when the adapter cannot be expressed exactly as PEFT.
    """
    algos = {e.algorithm for e in layers.values()}
    if len(algos) != 1:
        raise ValueError(f"{component}: a PEFT adapter holds one method; this one mixes {sorted(a.name for a in algos)}")
    algo = algos.pop()
    if algo.peft_type is None:
        raise ValueError(f"{component}: no PEFT layout for {algo.name!r}")
    specs = {p: LayerSpec.from_module(base_module_at(model, p), p) for p in layers}
    tensors, config = algo.to_peft(layers, specs, component)
    state = join_modules({KEY_PREFIX + path: module for path, module in tensors.items()}, dtype)
    config.update({
        "peft_type": algo.peft_type, "peft_version": peft_version or PEFT_LAYOUT_VERSION,
        "target_modules": sorted(layers), "exclude_modules": None, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "bias": "none", "task_type": None,
        "base_model_name_or_path": None, "revision": None, "inference_mode": True,
        "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
    })
    return state, config
