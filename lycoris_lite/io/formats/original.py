"""The original (BFL / Stability / Wan / Tongyi) module names of transformer models, and which diffusers
modules, and which rows of them, each one is.

Community files for transformer models (sd-scripts, musubi-tuner, ComfyUI, xlabs) name modules as the
model's original code does, where some projections are fused: Flux's ``double_blocks.{i}.img_attn.qkv``
is diffusers' ``transformer_blocks.{i}.attn.to_q``, ``to_k`` and ``to_v`` (rows ``[0, D)``, ``[D, 2D)``,
``[2D, 3D)``); Flux's ``single_blocks.{i}.linear1`` is ``to_q``, ``to_k``, ``to_v`` and ``proj_mlp``;
a final ``adaLN_modulation`` is diffusers' ``norm_out.linear`` with its two halves swapped (the
original is ``(shift, scale)``, diffusers ``(scale, shift)``).

This module is the one place those facts live: :data:`RULES` (per denoiser class, one line per
original module, read from diffusers' single-file converters ``convert_*_checkpoint_to_diffusers``),
turned into :class:`OriginalModule` entries for a live model by :func:`original_modules`: the rows come
from the live modules' sizes, never from constants. Tests check the rules against diffusers' own
single-file converters (probe weights) and LoRA converters (``load_lora_weights`` on kohya / ComfyUI
files). How adapters on these modules reach the diffusers modules is :mod:`.projections`.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

from torch import nn

from ...core.targets import adapter_capable_paths, base_module_at, model_class

#: a part's rows of the fused matrix, as ``(start, stop)`` segments in the part's own row order
Rows = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Part:
    """One diffusers module inside an original module: its path and the original's rows it holds."""

    path: str
    rows: Rows


@dataclass(frozen=True)
class OriginalModule:
    """An original module (``name``, dotted) as diffusers holds it: ``parts`` in the original's row
    order; ``out_features``/``in_features`` of the original matrix."""

    name: str
    parts: tuple[Part, ...]
    out_features: int
    in_features: int

    @property
    def is_rename(self) -> bool:
        """One diffusers module with every row in place: only the name differs."""
        return len(self.parts) == 1 and self.parts[0].rows == ((0, self.out_features),)


# kinds: "concat" (targets' rows one after another, in order), "swap" (one target, halves swapped:
# the original's (shift, scale) is diffusers' (scale, shift)), "swap_if_2" (swap when the target has
# two chunks, i.e. out = 2·in, as SD3's last context block)
_FLUX_TOP = (
    ("img_in", ("x_embedder",), "concat"),
    ("txt_in", ("context_embedder",), "concat"),
    ("final_layer.linear", ("proj_out",), "concat"),
    ("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap"),
)
#: the double blocks' attention, the same in Flux.1 and Flux.2
_FLUX_ATTENTION = (
    ("double_blocks.{i}.img_attn.qkv", ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
                                        "transformer_blocks.{i}.attn.to_v"), "concat"),
    ("double_blocks.{i}.txt_attn.qkv", ("transformer_blocks.{i}.attn.add_q_proj", "transformer_blocks.{i}.attn.add_k_proj",
                                        "transformer_blocks.{i}.attn.add_v_proj"), "concat"),
    ("double_blocks.{i}.img_attn.proj", ("transformer_blocks.{i}.attn.to_out.0",), "concat"),
    ("double_blocks.{i}.txt_attn.proj", ("transformer_blocks.{i}.attn.to_add_out",), "concat"),
)
RULES: dict[str, tuple[tuple[str, tuple[str, ...], str], ...]] = {
    "FluxTransformer2DModel": _FLUX_TOP + _FLUX_ATTENTION + (
        ("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",), "concat"),
        ("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",), "concat"),
        ("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",), "concat"),
        ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",), "concat"),
        ("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",), "concat"),
        ("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",), "concat"),
        ("double_blocks.{i}.img_mlp.0", ("transformer_blocks.{i}.ff.net.0.proj",), "concat"),
        ("double_blocks.{i}.img_mlp.2", ("transformer_blocks.{i}.ff.net.2",), "concat"),
        ("double_blocks.{i}.txt_mlp.0", ("transformer_blocks.{i}.ff_context.net.0.proj",), "concat"),
        ("double_blocks.{i}.txt_mlp.2", ("transformer_blocks.{i}.ff_context.net.2",), "concat"),
        ("double_blocks.{i}.img_mod.lin", ("transformer_blocks.{i}.norm1.linear",), "concat"),
        ("double_blocks.{i}.txt_mod.lin", ("transformer_blocks.{i}.norm1_context.linear",), "concat"),
        ("single_blocks.{i}.linear1", ("single_transformer_blocks.{i}.attn.to_q", "single_transformer_blocks.{i}.attn.to_k",
                                       "single_transformer_blocks.{i}.attn.to_v",
                                       "single_transformer_blocks.{i}.proj_mlp"), "concat"),
        ("single_blocks.{i}.linear2", ("single_transformer_blocks.{i}.proj_out",), "concat"),
        ("single_blocks.{i}.modulation.lin", ("single_transformer_blocks.{i}.norm.linear",), "concat"),
    ),
    "Flux2Transformer2DModel": _FLUX_TOP + _FLUX_ATTENTION + (
        ("time_in.in_layer", ("time_guidance_embed.timestep_embedder.linear_1",), "concat"),
        ("time_in.out_layer", ("time_guidance_embed.timestep_embedder.linear_2",), "concat"),
        ("guidance_in.in_layer", ("time_guidance_embed.guidance_embedder.linear_1",), "concat"),
        ("guidance_in.out_layer", ("time_guidance_embed.guidance_embedder.linear_2",), "concat"),
        ("double_stream_modulation_img.lin", ("double_stream_modulation_img.linear",), "concat"),
        ("double_stream_modulation_txt.lin", ("double_stream_modulation_txt.linear",), "concat"),
        ("single_stream_modulation.lin", ("single_stream_modulation.linear",), "concat"),
        ("double_blocks.{i}.img_mlp.0", ("transformer_blocks.{i}.ff.linear_in",), "concat"),
        ("double_blocks.{i}.img_mlp.2", ("transformer_blocks.{i}.ff.linear_out",), "concat"),
        ("double_blocks.{i}.txt_mlp.0", ("transformer_blocks.{i}.ff_context.linear_in",), "concat"),
        ("double_blocks.{i}.txt_mlp.2", ("transformer_blocks.{i}.ff_context.linear_out",), "concat"),
        ("single_blocks.{i}.linear1", ("single_transformer_blocks.{i}.attn.to_qkv_mlp_proj",), "concat"),
        ("single_blocks.{i}.linear2", ("single_transformer_blocks.{i}.attn.to_out",), "concat"),
    ),
    "SD3Transformer2DModel": (
        ("x_embedder.proj", ("pos_embed.proj",), "concat"),
        ("context_embedder", ("context_embedder",), "concat"),
        ("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",), "concat"),
        ("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",), "concat"),
        ("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",), "concat"),
        ("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",), "concat"),
        ("final_layer.linear", ("proj_out",), "concat"),
        ("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap"),
        ("joint_blocks.{i}.x_block.attn.qkv", ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
                                               "transformer_blocks.{i}.attn.to_v"), "concat"),
        ("joint_blocks.{i}.x_block.attn.proj", ("transformer_blocks.{i}.attn.to_out.0",), "concat"),
        ("joint_blocks.{i}.x_block.attn2.qkv", ("transformer_blocks.{i}.attn2.to_q", "transformer_blocks.{i}.attn2.to_k",
                                                "transformer_blocks.{i}.attn2.to_v"), "concat"),
        ("joint_blocks.{i}.x_block.attn2.proj", ("transformer_blocks.{i}.attn2.to_out.0",), "concat"),
        ("joint_blocks.{i}.x_block.mlp.fc1", ("transformer_blocks.{i}.ff.net.0.proj",), "concat"),
        ("joint_blocks.{i}.x_block.mlp.fc2", ("transformer_blocks.{i}.ff.net.2",), "concat"),
        ("joint_blocks.{i}.x_block.adaLN_modulation.1", ("transformer_blocks.{i}.norm1.linear",), "concat"),
        ("joint_blocks.{i}.context_block.attn.qkv", ("transformer_blocks.{i}.attn.add_q_proj",
                                                     "transformer_blocks.{i}.attn.add_k_proj",
                                                     "transformer_blocks.{i}.attn.add_v_proj"), "concat"),
        ("joint_blocks.{i}.context_block.attn.proj", ("transformer_blocks.{i}.attn.to_add_out",), "concat"),
        ("joint_blocks.{i}.context_block.mlp.fc1", ("transformer_blocks.{i}.ff_context.net.0.proj",), "concat"),
        ("joint_blocks.{i}.context_block.mlp.fc2", ("transformer_blocks.{i}.ff_context.net.2",), "concat"),
        ("joint_blocks.{i}.context_block.adaLN_modulation.1", ("transformer_blocks.{i}.norm1_context.linear",),
         "swap_if_2"),
    ),
    "ZImageTransformer2DModel": tuple(
        (f"{stack}.{{i}}.attention.{old}", tuple(f"{stack}.{{i}}.attention.{n}" for n in new), "concat")
        for stack in ("layers", "noise_refiner", "context_refiner")
        for old, new in (("qkv", ("to_q", "to_k", "to_v")), ("out", ("to_out.0",)))
    ) + (
        ("x_embedder", ("all_x_embedder.2-1",), "concat"),
        ("final_layer.linear", ("all_final_layer.2-1.linear",), "concat"),
        ("final_layer.adaLN_modulation.1", ("all_final_layer.2-1.adaLN_modulation.1",), "concat"),
    ),
    "WanTransformer3DModel": tuple(
        (f"blocks.{{i}}.{attn}.{old}", (f"blocks.{{i}}.{new_attn}.{new}",), "concat")
        for attn, new_attn in (("self_attn", "attn1"), ("cross_attn", "attn2"))
        for old, new in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("k_img", "add_k_proj"),
                         ("v_img", "add_v_proj"))
    ) + (
        ("blocks.{i}.ffn.0", ("blocks.{i}.ffn.net.0.proj",), "concat"),
        ("blocks.{i}.ffn.2", ("blocks.{i}.ffn.net.2",), "concat"),
        ("text_embedding.0", ("condition_embedder.text_embedder.linear_1",), "concat"),
        ("text_embedding.2", ("condition_embedder.text_embedder.linear_2",), "concat"),
        ("time_embedding.0", ("condition_embedder.time_embedder.linear_1",), "concat"),
        ("time_embedding.2", ("condition_embedder.time_embedder.linear_2",), "concat"),
        ("time_projection.1", ("condition_embedder.time_proj",), "concat"),
        ("head.head", ("proj_out",), "concat"),
        ("img_emb.proj.1", ("condition_embedder.image_embedder.ff.net.0.proj",), "concat"),
        ("img_emb.proj.3", ("condition_embedder.image_embedder.ff.net.2",), "concat"),
    ),
}
#: classes whose original names are diffusers' own (their community files differ by prefix only)
SAME_NAMES = ("QwenImageTransformer2DModel",)


def has_original_names(model: nn.Module) -> bool:
    """Whether ``model``'s class has original names that differ from diffusers' (:data:`RULES`)."""
    return model_class(model).__name__ in RULES


def original_modules(model: nn.Module) -> dict[str, OriginalModule]:
    """``{original dotted name: OriginalModule}`` for ``model`` (a diffusers transformer of a class in
    :data:`RULES`; ``{}`` for other classes). A module no rule names keeps its diffusers path as its
    original name (Z-Image's ``feed_forward.w1``, Qwen-Image's every module)."""
    paths = tuple(adapter_capable_paths(model))
    sizes = tuple(_sizes(base_module_at(model, p)) for p in paths)
    return _original_modules(model_class(model).__name__, paths, sizes)


def _sizes(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    weight = getattr(module, "weight", None)
    # from the shape alone: indexing a sharded (FSDP2) weight would be a collective
    return (weight.shape[0], math.prod(weight.shape[1:])) if weight is not None else (0, 0)


@functools.lru_cache(maxsize=16)
def _original_modules(class_name: str, paths: tuple[str, ...], sizes: tuple[tuple[int, int], ...]
                      ) -> dict[str, OriginalModule]:
    size = dict(zip(paths, sizes))
    out: dict[str, OriginalModule] = {}
    claimed: set[str] = set()
    for original, targets, kind in RULES.get(class_name, ()):
        indices = [None]
        if "{i}" in original:
            pattern = re.compile(re.escape(targets[0]).replace(re.escape("{i}"), r"(\d+)") + "$")
            indices = sorted({int(m[1]) for p in paths if (m := pattern.match(p))})
        for i in indices:
            names = [t.format(i=i) if i is not None else t for t in targets]
            if not all(n in size for n in names):
                continue
            in_features = {size[n][1] for n in names}
            if len(in_features) != 1:
                continue  # not one input: not a fused projection of this model
            parts, start = [], 0
            for n in names:
                out_n = size[n][0]
                if kind == "swap" or (kind == "swap_if_2" and out_n == 2 * size[n][1]):
                    half = out_n // 2
                    rows = ((start + half, start + out_n), (start, start + half))
                else:
                    rows = ((start, start + out_n),)
                parts.append(Part(n, rows))
                start += out_n
            name = original.format(i=i) if i is not None else original
            out[name] = OriginalModule(name, tuple(parts), start, in_features.pop())
            claimed.update(names)
    for path in paths:
        if path not in claimed and path not in out and size[path][0]:
            out[path] = OriginalModule(path, (Part(path, ((0, size[path][0]),)),), *size[path])
    return out


def module_original(model: nn.Module) -> dict[str, tuple[OriginalModule, int]]:
    """``{diffusers path: (its OriginalModule, its index in the parts)}``."""
    return {part.path: (om, i) for om in original_modules(model).values() for i, part in enumerate(om.parts)}




# ---- reading names without a model (``inspect``) -------------------------------------------------------
#: how a file spells module names -> the tools that write it
LAYOUT_NAMES = {"kohya-original": "sd-scripts / musubi-tuner (lora_unet_ + original names)",
                "comfyui-original": "ComfyUI (diffusion_model. + original names)",
                "xlabs": "xlabs"}


@functools.lru_cache(maxsize=1)
def _name_patterns() -> dict[str, tuple[re.Pattern, re.Pattern]]:
    """Per class in :data:`RULES`: one pattern over its original names in underscore form and one in
    dotted form (``{i}`` any block number)."""
    out = {}
    for cls, rules in RULES.items():
        dotted = "|".join(re.escape(original).replace(re.escape("{i}"), r"\d+") for original, _, _ in rules)
        under = "|".join(re.escape(original.replace(".", "_")).replace(re.escape("{i}"), r"\d+")
                         for original, _, _ in rules)
        out[cls] = (re.compile(f"(?:{under})"), re.compile(f"(?:{dotted})"))
    return out


def original_name_classes(module: str) -> set[str]:
    """The classes (of :data:`RULES`) that have ``module`` as an original name, spelled as sd-scripts
    (``lora_unet_double_blocks_0_img_attn_qkv``) or ComfyUI (``diffusion_model.double_blocks.0.img_attn.qkv``,
    also without the prefix) write it; empty for other names."""
    if module.startswith("lora_unet_"):
        body, which = module[len("lora_unet_"):], 0
    else:
        body = module.removeprefix("model.").removeprefix("diffusion_model.")
        which = 1
    return {cls for cls, patterns in _name_patterns().items() if patterns[which].fullmatch(body)}
