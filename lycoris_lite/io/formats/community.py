"""Dotted community layouts of transformer adapters, resolved against the live model's names.

ComfyUI and original-code trainers write ``diffusion_model.<original module>.<tensor key>``
(``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``), some tools ``model.diffusion_model.``
or no prefix at all; ai-toolkit, OneTrainer and SimpleTuner write diffusers module paths under
``transformer.`` (or ``diffusion_model.``), with LoRA in PEFT's spelling or LyCORIS's own keys
(``….to_q.lokr_w1``); xlabs writes ``double_blocks.0.processor.qkv_lora1.down.weight``.

Nothing is sniffed by substring: each key is split at its first registered tensor-key part
(:func:`~lycoris_lite.io.formats.names.split_key`), its prefix removed, and the module looked up among
the live transformer's original names (:mod:`.original`) and diffusers paths. The result is the same
state under the kohya names of those modules (:func:`to_kohya_names`), read by
:func:`lycoris_lite.io.formats.kohya.read`, so fused projections split as they do there. Keys that
resolve to nothing are returned apart and reported.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ...base.registry import file_key_roots
from .names import KOHYA_PREFIXES, ComponentNames, split_key, underscore
from .original import original_modules

#: prefixes before a module path, longest first
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.")
#: LoRA tensor keys in the spellings of PEFT and diffusers -> kohya's
LORA_KEYS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
             "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight"}
_LORA_ONLY = {"lora_down.weight", "lora_up.weight", "alpha"}
_XLABS = re.compile(r"(?:diffusion_model\.)?(double_blocks|single_blocks)\.(\d+)\.processor\.(qkv|proj)_lora([12]?)"
                    r"\.(down|up)\.weight")


def _xlabs(key: str) -> tuple[str, str] | None:
    """``(original module, kohya tensor key)`` of an xlabs key (``…processor.qkv_lora1.down.weight``:
    ``lora1`` is the image stream, ``lora2`` the text stream; a single block's ``qkv_lora`` is
    ``linear1``'s Q/K/V rows, its ``proj_lora`` ``linear2``'s attention columns)."""
    m = _XLABS.fullmatch(key)
    if m is None:
        return None
    kind, i, what, stream, role = m.groups()
    if kind == "double_blocks":
        module = f"double_blocks.{i}.{'txt' if stream == '2' else 'img'}_attn.{what}"
    else:
        module = f"single_blocks.{i}.{'linear1' if what == 'qkv' else 'linear2'}"
    return module, "lora_down.weight" if role == "down" else "lora_up.weight"


def xlabs_key(key: str) -> tuple[str, str] | None:
    """``("xlabs:<original module>", tensor key)`` of an xlabs key (for reading without a model)."""
    found = _xlabs(key)
    return None if found is None else (f"xlabs:{found[0]}", found[1])


def to_kohya_names(state: dict[str, torch.Tensor], model: nn.Module, names: ComponentNames
                   ) -> tuple[dict[str, torch.Tensor], str, list[str]] | None:
    """``(state under kohya names, layout, unresolved keys)`` for a transformer's dotted file, or
    ``None`` when the file is a plain diffusers/PEFT LoRA under diffusers paths (the diffusers reader
    keeps its metadata's scales) or nothing of it resolves.

    ``layout`` names what was found (``"ComfyUI (diffusion_model. + original names)"``, ``"xlabs"``,
    …). xlabs' single-block LoRAs, which touch part of ``linear1``'s rows or ``linear2``'s columns, are
    written as LoRAs of the whole matrix with zeros elsewhere (exact).
    """
    originals = original_modules(model)
    roots = file_key_roots()
    out: dict[str, torch.Tensor] = {}
    unresolved: list[str] = []
    layouts: set[str] = set()
    plain_lora = True
    for key, value in state.items():
        if key.split(".", 1)[0].startswith(tuple(KOHYA_PREFIXES)):  # kohya names beside (another component's)
            out[key] = value
            plain_lora = False
            continue
        found = _xlabs(key)
        if found is not None:
            module, tensor_key = found
            prefix, kind = "", "xlabs"
        else:
            split = split_key(key, roots)
            if split is None:
                unresolved.append(key)
                continue
            dotted, tensor_key = split
            prefix = next((p for p in PREFIXES if dotted.startswith(p)), "")
            module = dotted[len(prefix):]
            kind = None
        tensor_key = LORA_KEYS.get(tensor_key, tensor_key)
        if tensor_key not in _LORA_ONLY:
            plain_lora = False
        if module in originals and not (originals[module].is_rename and originals[module].parts[0].path == module):
            om = originals[module]
            file_name = "lora_unet_" + underscore(module)
            layouts.add(kind or f"{prefix}original names")
            plain_lora = False
            if kind == "xlabs":
                value = _pad_xlabs(value, module, tensor_key, om)
        elif module in names.to_file:
            file_name = names.to_file[module]
            layouts.add(f"{prefix}diffusers names")
            if prefix != "transformer.":
                plain_lora = False
        else:
            unresolved.append(key)
            continue
        out[f"{file_name}.{tensor_key}"] = value
    if not layouts or (plain_lora and layouts <= {"transformer.diffusers names", "diffusers names"}):
        return None
    names_of = {"diffusion_model.original names": "ComfyUI (diffusion_model. + original names)",
                "model.diffusion_model.original names": "original checkpoint names (model.diffusion_model.)",
                "diffusion_model.diffusers names": "ComfyUI (diffusion_model. + diffusers names)",
                "transformer.diffusers names": "diffusers names under transformer. (ai-toolkit, OneTrainer, SimpleTuner)"}
    return out, ", ".join(sorted(names_of.get(x, x) for x in layouts)), unresolved


def _pad_xlabs(value: torch.Tensor, module: str, tensor_key: str, om) -> torch.Tensor:
    """xlabs' single-block LoRAs as LoRAs of the whole original matrix: ``qkv_lora``'s up covers the first
    ``3·D`` rows of ``linear1`` (zeros below), ``proj_lora``'s down the first ``D`` columns of ``linear2``."""
    if module.endswith("linear1") and tensor_key == "lora_up.weight" and value.shape[0] < om.out_features:
        return torch.cat([value, value.new_zeros(om.out_features - value.shape[0], *value.shape[1:])])
    if module.endswith("linear2") and tensor_key == "lora_down.weight" and value.shape[1] < om.in_features:
        return torch.cat([value, value.new_zeros(value.shape[0], om.in_features - value.shape[1])], dim=1)
    return value


__all__ = ["LORA_KEYS", "PREFIXES", "to_kohya_names", "xlabs_key"]
