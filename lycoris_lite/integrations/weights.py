"""The weight rules of a pipeline's adapters: what a weight may say, and what it means per layer.

An adapter's weight is a number, or per component ``{"unet": w, "text_encoder": w, "text_encoder_2": w}``
(or ``"transformer"``, ``"transformer_2"``, ``"text_encoder_3"``: any of
:data:`~lycoris_lite.io.files.COMPONENTS`) whose denoiser part may be block-wise: :func:`normalize_weight`
checks one and gives it one form; :func:`unet_layer_scales` turns a block-wise UNet weight into a scale per
layer, :func:`transformer_layer_scales` a transformer's (by block index per block group).
:class:`~lycoris_lite.integrations.pipeline.LycorisPipelineMixin` applies them.
"""

from __future__ import annotations

import re

from ..io.files import COMPONENTS, DENOISERS

_BLOCK_PARTS = ("down", "mid", "up")
#: a transformer layer's block group and index: ``transformer_blocks.3.attn.to_q`` -> (transformer_blocks, 3)
_GROUP_PATH = re.compile(r"^([A-Za-z_]\w*)\.(\d+)\.")
_BLOCK_PATH = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(attentions|resnets)\.(\d+)\.|^(down_blocks|up_blocks)\.(\d+)\.|^mid_block\.")


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def normalize_weight(weight, components) -> dict:
    """One adapter's weight as ``{component: float | block dict}`` for the components it may touch.

    ``weight``: a number (every component), or a dict with keys among :data:`~lycoris_lite.io.files.COMPONENTS`
    (``unet``, ``transformer``, ``transformer_2``, ``text_encoder``, …; missing components get 1.0); the
    ``unet`` value may be block-wise.
    """
    if weight is None:
        weight = 1.0
    if not isinstance(weight, dict):
        w = _number(weight, "an adapter weight")
        return {c: w for c in components}
    unknown = set(weight) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown component(s) {sorted(unknown)} in an adapter weight; use {', '.join(COMPONENTS)}")
    out = {}
    for c in components:
        value = weight.get(c, 1.0)
        if c == "unet" and isinstance(value, dict):
            out[c] = _check_blocks(value)
        elif c in DENOISERS and isinstance(value, dict):
            out[c] = _check_groups(value)
        else:
            out[c] = _number(value, f"the {c} weight")
    return out


def _check_blocks(blocks: dict) -> dict:
    unknown = set(blocks) - set(_BLOCK_PARTS)
    if unknown:
        raise ValueError(f"unknown UNet part(s) {sorted(unknown)} in a block-wise weight; use down, mid, up")
    for part, value in blocks.items():
        if part == "mid":
            if isinstance(value, (list, dict)):
                value = value[0] if isinstance(value, list) and len(value) == 1 else value
            if isinstance(value, (list, dict)):
                raise ValueError("the mid block takes one number")
            _number(value, "the mid weight")
        elif isinstance(value, list):
            for v in value:
                _number(v, f"a {part} block weight")
        elif isinstance(value, dict):
            for key, v in value.items():
                if not re.fullmatch(r"block_\d+", str(key)):
                    raise ValueError(f"{part} block keys are block_0, block_1, …; got {key!r}")
                for item in (v if isinstance(v, list) else [v]):
                    _number(item, f"the {part}.{key} weight")
        else:
            _number(value, f"the {part} weight")
    return blocks


def _check_groups(groups: dict) -> dict:
    """A transformer's block-wise weight: ``{group: number | [one per block] | {index: number}}``."""
    if not groups:
        raise ValueError("a block-wise transformer weight names no block group")
    for group, value in groups.items():
        if not isinstance(group, str) or not re.fullmatch(r"[A-Za-z_]\w*", group):
            raise ValueError(f"block groups are the transformer's block lists (transformer_blocks, "
                             f"single_transformer_blocks, blocks, layers, …); got {group!r}")
        if isinstance(value, list):
            if not value:
                raise ValueError(f"{group}: an empty list of block weights")
            for v in value:
                _number(v, f"a {group} block weight")
        elif isinstance(value, dict):
            for key, v in value.items():
                if isinstance(key, bool) or not re.fullmatch(r"\d+", str(key)):
                    raise ValueError(f"{group} block keys are block indices (0, 1, … or '0', '1', …); got {key!r}")
                _number(v, f"the {group}.{key} weight")
        else:
            _number(value, f"the {group} weight")
    return groups


def transformer_layer_scales(groups: dict, layer_names) -> dict[str, float]:
    """The scale of each transformer layer for a block-wise weight ``{group: value}``.

    A group is one of the transformer's block lists, by its attribute name (Flux ``transformer_blocks``
    and ``single_transformer_blocks``, SD3 and Qwen-Image ``transformer_blocks``, Wan ``blocks``, Z-Image
    ``layers``, ``noise_refiner``, ``context_refiner``…); ``value`` is a number (every block of the group),
    a list (one number per block, in order; missing trailing blocks keep 1.0) or ``{index: number}``.
    Layers in groups not named, and outside any block list (embeddings, final projections), keep 1.0.
    Raises when a group has no adapted layers, or a list or index names a block past the group's last
    adapted one (both named in the message).
    """
    scales, last = {}, {}
    for name in layer_names:
        m = _GROUP_PATH.match(name)
        scale = 1.0
        if m:
            group, index = m.group(1), int(m.group(2))
            last[group] = max(last.get(group, -1), index)
            value = groups.get(group, 1.0)
            if isinstance(value, list):
                scale = value[index] if index < len(value) else 1.0
            elif isinstance(value, dict):
                scale = next((v for k, v in value.items() if int(k) == index), 1.0)
            else:
                scale = value
        scales[name] = float(scale)
    for group, value in groups.items():
        if group not in last:
            raise ValueError(f"block group {group!r}: the adapter has no layers there; it has layers in "
                             f"{sorted(last) or 'no block group'}")
        count = last[group] + 1
        if isinstance(value, list) and len(value) > count:
            raise ValueError(f"{len(value)} {group} weights, but the adapter has layers in {count} {group}")
        if isinstance(value, dict):
            past = sorted(int(k) for k in value if int(k) >= count)
            if past:
                raise ValueError(f"{group}.{past[0]}: the adapter's last adapted block there is {group}.{count - 1}")
    return scales


def unet_layer_scales(blocks: dict, layer_names) -> dict[str, float]:
    """The scale of each UNet layer for a block-wise weight.

    ``blocks = {"down": d, "mid": m, "up": u}``, each optional (missing: 1.0). ``d``/``u`` is a number (the
    whole part), a list (one number per block: ``down_blocks.i``/``up_blocks.i``), or a dict as in
    diffusers: ``{"block_i": number | [one per layer]}``, where the list's ``j``-th entry scales
    ``attentions.j`` and ``resnets.j`` of block ``i`` (the block's up/down-samplers take 1.0).
    Layers outside the blocks (``conv_in``, time embedding, ``conv_out``) keep 1.0.
    Raises when a list names more blocks or layers than the UNet has.
    """
    scales = {}
    seen: dict[tuple, int] = {}
    for name in layer_names:
        m = _BLOCK_PATH.match(name)
        scale = 1.0
        if m and name.startswith("mid_block."):
            scale = float(blocks.get("mid", 1.0) if not isinstance(blocks.get("mid"), list) else blocks["mid"][0])
        elif m:
            group = m.group(1) or m.group(5)
            part = "down" if group == "down_blocks" else "up"
            block = int(m.group(2) or m.group(6))
            layer = int(m.group(4)) if m.group(4) is not None else None
            seen[(part, block)] = max(seen.get((part, block), -1), layer if layer is not None else -1)
            value = blocks.get(part, 1.0)
            if isinstance(value, list):
                scale = value[block] if block < len(value) else 1.0
            elif isinstance(value, dict):
                entry = value.get(f"block_{block}", 1.0)
                if isinstance(entry, list):
                    scale = entry[layer] if layer is not None and layer < len(entry) else 1.0
                else:
                    scale = entry
            else:
                scale = value
        scales[name] = float(scale)
    for part in ("down", "up"):
        value = blocks.get(part)
        n_blocks = 1 + max((b for (p, b) in seen if p == part), default=-1)
        if isinstance(value, list) and len(value) > n_blocks:
            raise ValueError(f"{len(value)} {part} block weights, but the adapter has layers in {n_blocks} {part} blocks")
        if isinstance(value, dict):
            for key, entry in value.items():
                block = int(key.split("_")[1])
                if (part, block) not in seen:
                    raise ValueError(f"{part}.{key}: the adapter has no layers in {part}_blocks.{block}")
                if isinstance(entry, list) and len(entry) > seen[(part, block)] + 1:
                    raise ValueError(f"{part}.{key} has {len(entry)} weights, but that block has "
                                     f"{seen[(part, block)] + 1} adapted layers")
    return scales


__all__ = ["normalize_weight", "transformer_layer_scales", "unet_layer_scales"]
