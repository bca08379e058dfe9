"""What the algorithms' PEFT codecs (``Algorithm.from_peft`` / ``to_peft``) share.

PEFT's ``adapter_config.json`` holds one value per adapter for most settings: per-layer ranks and alphas
go to ``rank_pattern`` / ``alpha_pattern`` (keys: escaped full module paths), and everything else it
holds globally (OFT block size, Cayley–Neumann terms, LoKr factor, HRA Gram–Schmidt, …) must agree
across a component's layers, or writing raises a clear error. PEFT rotates the input side only.
"""

from __future__ import annotations

import re
from collections import Counter

from ..base.registry import pattern_value
from ..base.settings import Settings


def pattern_key(path: str) -> str:
    """A ``rank_pattern``/``alpha_pattern`` key matching exactly ``path`` under PEFT's rule
    ``re.match(rf"(.*\\.)?({key})$", name)`` (also when the model adds a prefix such as ``text_model.``)."""
    return re.escape(path)


def one_value(values, what: str, component: str):
    """The one value of ``values`` (PEFT holds ``what`` once per adapter); ``ValueError`` if they differ."""
    values = set(values)
    if len(values) > 1:
        raise ValueError(f"{component}: PEFT holds one {what} per adapter, but the layers have {sorted(values, key=str)}")
    return values.pop()


def common_and_patterns(values: dict[str, float | int], cast=float) -> tuple:
    """``(most common value, {pattern_key(path): value} for the other layers)``: PEFT's ``r`` /
    ``rank_pattern`` (or alpha / ``alpha_pattern``) for per-layer values."""
    common = Counter(values.values()).most_common(1)[0][0]
    return cast(common), {pattern_key(p): cast(v) for p, v in values.items() if v != common}


def rank_and_alpha(config: dict, names, alpha_field: str) -> tuple[int, float]:
    """``(r, alpha)`` a PEFT config gives the module called ``names`` (PEFT's defaults: 8 and 8)."""
    r = int(pattern_value(config.get("rank_pattern"), names, config.get("r", 8)))
    return r, float(pattern_value(config.get("alpha_pattern"), names, config.get(alpha_field, 8)))


def check_rank(name: str, config_rank: int, tensor_rank: int) -> None:
    if config_rank != tensor_rank:
        raise ValueError(f"layer {name!r}: the adapter config gives rank {config_rank}, its tensors rank {tensor_rank}")


def rank_scaled(algo, spec, params: dict, config: dict, names, alpha_field: str, **options) -> tuple[Settings, dict]:
    """``(settings, params)`` of one module of an algorithm scaled by ``alpha / r`` (LoRA, LoHa): the
    config's alpha for the module given to the algorithm's ``settings_from_tensors`` (which computes the
    scale; ``options`` go there too), and the config's rank checked against the tensors'."""
    r, alpha = rank_and_alpha(config, names, alpha_field)
    settings = algo.settings_from_tensors(spec, params, alpha, names[0], **options)
    check_rank(names[0], r, settings.r)
    return settings, params


def require_input_side(component: str, path: str, settings: Settings, algo_name: str) -> None:
    if settings.side != "input":
        raise ValueError(f"{component}: layer {path!r} has an output-side {algo_name.upper()} (the kohya/LyCORIS "
                         f"convention); PEFT rotates the input side only, so it cannot be written as PEFT. Save it "
                         f"with format='kohya', or train with rotation_side='input'")


def require_no_dora(component: str, layers: dict, algo_name: str) -> None:
    path = next((p for p, e in layers.items() if e.settings.dora), None)
    if path is not None:
        raise ValueError(f"{component}: layer {path!r} is a {algo_name.upper()} with DoRA (LyCORIS's weight_decompose); "
                         f"PEFT's {algo_name.upper()} has no DoRA. Save it with format='kohya'")


def blocks_config(component: str, layers: dict, size_key: str, num_key: str) -> dict:
    """PEFT's block size or number of blocks (the other 0) of rotation layers (OFT, BOFT)."""
    sizes = {e.settings.block_size for e in layers.values()}
    nums = {e.settings.block_num for e in layers.values()}
    if len(sizes) == 1:
        return {size_key: sizes.pop(), num_key: 0}
    if len(nums) == 1:
        return {size_key: 0, num_key: nums.pop()}
    raise ValueError(f"{component}: PEFT holds one block size or one number of blocks per adapter; these layers have "
                     f"block sizes {sorted(sizes)} and block numbers {sorted(nums)}")
