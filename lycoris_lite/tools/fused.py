"""Fusing adapters into a model and saving it: a diffusers folder, or one safetensors file.

* :func:`fuse_adapter_files` loads adapter files (kohya/LyCORIS, diffusers or PEFT; any algorithm) onto a
  pipeline, each at its multiplier, fuses them in the order given (the composition order of
  :mod:`lycoris_lite.core.layer`) and puts the original modules back. The weights are then bit for bit those
  of the same pipeline with the adapters attached and fused. Nothing changes unless every file loads
  and every fused weight is finite.
* :func:`save_fused` writes the pipeline as a diffusers folder (``save_pretrained``, plus the slow
  tokenizer's vocabulary files; reload with ``DiffusionPipeline.from_pretrained(folder)``), or with
  ``single_file=True`` as one safetensors file in this layout:

  - tensors: each weight-holding component's state dict (UNet, VAE, text encoders) under
    ``<component>.`` (``unet.conv_in.weight`` …), in the dtype of the pipeline;
  - metadata ``lycoris_lite.fused``: JSON ``{"format": 1, "pipeline": class, "base_model": name or path,
    "components": {component: class}, "adapters": [{"source", "weight"}]}`` (files written before the
    key was renamed carry it as ``lycoris_lite.merged``, which is read too).

  Tokenizers and the scheduler hold no weights and are not in the file: :func:`load_fused` builds the
  base pipeline (the recorded ``base_model``, or the one given) and loads every component's tensors into
  it strictly (every key, every shape). Both outputs are written to a temporary name and renamed
  (:mod:`lycoris_lite.io.formats.safe_io`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..io.files import LoadedAdapter, components_of, load_adapter
from ..io.formats.safe_io import atomic_write_folder, read_state_dict, write_state_dict
from ..core.controller import controller_for
from ..models import save_pipeline, load_pipeline

FUSED_KEY = "lycoris_lite.fused"
#: the metadata key of single-file checkpoints written before it was renamed, still read
OLD_FUSED_KEY = "lycoris_lite.merged"
FUSED_FORMAT = 1
PROVENANCE_FILE = "lycoris_lite_fuse.json"


def _attached(components: dict[str, nn.Module]) -> list[str]:
    return [c for c, m in components.items() if (ctrl := controller_for(m, create=False)) is not None and ctrl.configs]


def fuse_adapter_files(target, adapters: Sequence[tuple[object, float]], *, strict: bool = True,
                       allow_pickle: bool = False) -> list[LoadedAdapter]:
    """Fuse ``adapters`` (``[(file or folder, weight), …]``) into ``target``'s UNet and text encoders.

    ``target``: a pipeline or a ``{component: model}`` dict without adapters attached. Returns what
    each file held. On any error (a file that does not load, NaN/Inf fused weights) every adapter is
    removed again and the model is bitwise what it was.
    """
    components = components_of(target)
    busy = _attached(components)
    if busy:
        raise ValueError(f"{busy} already carry adapters; fuse_adapter_files works on a model without any")
    if not adapters:
        raise ValueError("give at least one adapter to fuse")
    for _, weight in adapters:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"adapter weights must be finite numbers, got {weight!r}")
    loaded = []
    try:
        for i, (source, weight) in enumerate(adapters):
            loaded.append(load_adapter(components, source, f"fused_{i}", scale=float(weight), strict=strict,
                                       allow_pickle=allow_pickle, activate=True))
        for c in _attached(components):
            ctrl = controller_for(components[c])
            ctrl.merge_adapter(list(ctrl.configs), safe_merge=True)  # every layer checked before any is written
        for c in _attached(components):
            controller_for(components[c]).merge_and_unload()
    except BaseException:
        for c in _attached(components):
            controller_for(components[c]).unload()
        raise
    return loaded


def _weight_components(pipe) -> dict[str, nn.Module]:
    found = getattr(pipe, "components", None)
    if not isinstance(found, dict):
        raise TypeError(f"expected a diffusers pipeline, got {type(pipe).__name__}")
    return {name: module for name, module in found.items() if isinstance(module, nn.Module)}


def _state_for_file(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``{"<component>.<key>": tensor}``; tensors sharing storage (tied weights) are copied apart."""
    state, seen = {}, set()
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            ptr = (value.device, value.untyped_storage().data_ptr())
            state[f"{name}.{key}"] = value.clone() if ptr in seen else value
            seen.add(ptr)
    return state


def save_fused(pipe, out: str | os.PathLike, *, single_file: bool = False, base_model: str | None = None,
               adapters: Sequence[tuple[object, float]] = ()) -> Path:
    """Write ``pipe`` (adapters fused, none attached) to ``out``: a diffusers folder, or one safetensors
    file with ``single_file`` (see the module docstring). ``base_model`` and ``adapters`` are recorded as
    provenance. ``out`` must not exist (a folder may exist empty). Returns ``out``."""
    modules = _weight_components(pipe)
    busy = _attached(modules)
    if busy:
        raise ValueError(f"{busy} still carry adapters: fuse them first (fuse_adapter_files or merge_and_unload)")
    out = Path(out)
    provenance = {"format": FUSED_FORMAT, "pipeline": type(pipe).__name__, "base_model": base_model,
                  "components": {c: type(m).__name__ for c, m in modules.items()},
                  "adapters": [{"source": str(s), "weight": float(w)} for s, w in adapters]}
    if single_file:
        if out.suffix != ".safetensors":
            raise ValueError(f"a single-file checkpoint is a .safetensors file, not {out.name!r}")
        if out.is_dir():
            raise ValueError(f"{out} is a folder")
        return write_state_dict(out, _state_for_file(modules), {FUSED_KEY: json.dumps(provenance)})
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; pick a new path")
    tokenizers = tuple(name for name, value in pipe.components.items() if name.startswith("tokenizer") and value is not None)

    def write(folder: Path) -> None:
        save_pipeline(pipe, folder, tokenizers)
        (folder / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))

    return atomic_write_folder(out, write)


def load_fused(path: str | os.PathLike, base: str | os.PathLike | None = None, **load_kwargs):
    """The pipeline of a single-file checkpoint written by :func:`save_fused`: the base pipeline
    (``base``, default the recorded ``base_model``; ``load_kwargs`` go to ``models.load_pipeline``) with
    every component's tensors from the file, loaded strictly."""
    state, metadata = read_state_dict(path)
    key = next((k for k in (FUSED_KEY, OLD_FUSED_KEY) if k in metadata), None)
    if key is None:
        raise ValueError(f"{path}: not a fused checkpoint written by lycoris-lite (no {FUSED_KEY!r} metadata)")
    info = json.loads(metadata[key])
    if info.get("format") != FUSED_FORMAT:
        raise ValueError(f"{path}: fused-checkpoint format {info.get('format')!r}, this version reads {FUSED_FORMAT}")
    base = base or info.get("base_model")
    if not base:
        raise ValueError(f"{path} records no base model; give base= (the model the adapters were fused into)")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        component, _, rest = key.partition(".")
        parts.setdefault(component, {})[rest] = value
    pipe = load_pipeline(base, **load_kwargs)
    modules = _weight_components(pipe)
    missing = sorted(set(modules) - set(parts))
    extra = sorted(set(parts) - set(modules))
    if missing or extra:
        raise ValueError(f"{path} does not fit {base}: components missing {missing}, unknown {extra}")
    for component, tensors in parts.items():
        module = modules[component]
        reference = module.state_dict()
        bad = [k for k in reference if k in tensors and tensors[k].shape != reference[k].shape]
        if bad:
            raise ValueError(f"{path} does not fit {base}: {component}.{bad[0]} is {tuple(tensors[bad[0]].shape)}, "
                             f"the model's {tuple(reference[bad[0]].shape)}")
        module.load_state_dict(tensors, strict=True)
    return pipe


__all__ = ["fuse_adapter_files", "load_fused", "save_fused"]
