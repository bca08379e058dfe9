"""Target presets, as data: Stable Diffusion's and one set per transformer (DiT) family.

A preset is what ``target_modules`` takes: a list of diffusers module names (dotted suffixes: ``"to_q"``
matches ``…attn1.to_q``), or, where a suffix cannot tell two layers apart, one regex over full module
paths (alternatives joined by ``|``). Each transformer family has three, checked against the module
paths of its tiny model (``lycoris_lite.models``):

* ``<family>-attn``: the attention projections (image and text streams);
* ``<family>-attn-mlp``: those and the feed-forward layers;
* ``<family>-all``: every linear layer of the blocks, modulation (adaLN) included.

Three cases need a regex. Flux.1's single blocks end in ``proj_out``, a name the model's final projection
shares; Flux.2's single blocks end in ``attn.to_out``, a name that in its double blocks is the list that
holds ``to_out.0``; Z-Image's ``adaLN_modulation.0`` is a SiLU in its final layer. Flux.2's single blocks
fuse Q, K, V and the MLP input into ``attn.to_qkv_mlp_proj``, counted with attention.
"""

from __future__ import annotations

import re

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
UNET_ATTENTION_FF = UNET_ATTENTION + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
UNET_FULL = UNET_ATTENTION_FF + [
    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv",
]
TEXT_ENCODER = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]

# ---- transformers ----------------------------------------------------------------------------------
#: joint attention of the double-stream (MMDiT) blocks: the image stream's and the text stream's projections
JOINT_ATTENTION = UNET_ATTENTION + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
_FF = ["ff.net.0.proj", "ff.net.2"]
_FF_CONTEXT = ["ff_context.net.0.proj", "ff_context.net.2"]


def _paths(*patterns: str) -> str:
    """A regex preset: the module paths that fully match one of ``patterns``."""
    return "|".join(patterns)


def _suffixes(*names: str) -> list[str]:
    """Full-path patterns of dotted suffixes (what a list entry matches)."""
    return [rf"(?:.*\.)?{re.escape(name)}" for name in names]


def _blocks(group: str, *names: str) -> list[str]:
    """Full-path patterns of ``names`` inside every block of ``group`` (``transformer_blocks.<i>.<name>``)."""
    return [rf"{group}\.\d+\.{re.escape(name)}" for name in names]


_FLUX_DOUBLE = _blocks("transformer_blocks", *(f"attn.{n}" for n in JOINT_ATTENTION), *_FF, *_FF_CONTEXT)
FLUX_ATTENTION = JOINT_ATTENTION  # the single blocks' attn.to_q/to_k/to_v too
FLUX_ATTENTION_MLP = _paths(*_FLUX_DOUBLE, *_blocks("single_transformer_blocks", "attn.to_q", "attn.to_k",
                                                    "attn.to_v", "proj_mlp", "proj_out"))
FLUX_ALL = _paths(FLUX_ATTENTION_MLP, *_blocks("transformer_blocks", "norm1.linear", "norm1_context.linear"),
                  *_blocks("single_transformer_blocks", "norm.linear"))

_FLUX2_FF = ["ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"]
FLUX2_ATTENTION = JOINT_ATTENTION + ["to_qkv_mlp_proj"]
FLUX2_ATTENTION_MLP = _paths(*_blocks("transformer_blocks", *(f"attn.{n}" for n in JOINT_ATTENTION), *_FLUX2_FF),
                             *_blocks("single_transformer_blocks", "attn.to_qkv_mlp_proj", "attn.to_out"))
FLUX2_ALL = _paths(FLUX2_ATTENTION_MLP, r"double_stream_modulation_img\.linear",
                   r"double_stream_modulation_txt\.linear", r"single_stream_modulation\.linear")

SD3_ATTENTION = JOINT_ATTENTION  # SD3.5's second attention (attn2) too
SD3_ATTENTION_MLP = SD3_ATTENTION + _FF + _FF_CONTEXT
SD3_ALL = SD3_ATTENTION_MLP + ["norm1.linear", "norm1_context.linear"]

QWEN_IMAGE_ATTENTION = JOINT_ATTENTION
QWEN_IMAGE_ATTENTION_MLP = QWEN_IMAGE_ATTENTION + ["img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                                                   "txt_mlp.net.2"]
QWEN_IMAGE_ALL = QWEN_IMAGE_ATTENTION_MLP + ["img_mod.1", "txt_mod.1"]

Z_IMAGE_ATTENTION = UNET_ATTENTION  # the main layers' and both refiners'
Z_IMAGE_ATTENTION_MLP = Z_IMAGE_ATTENTION + ["feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
Z_IMAGE_ALL = _paths(*_suffixes(*Z_IMAGE_ATTENTION_MLP), *_blocks("noise_refiner", "adaLN_modulation.0"),
                     *_blocks("layers", "adaLN_modulation.0"))

WAN_ATTENTION = UNET_ATTENTION  # self-attention attn1 and cross-attention attn2
WAN_ATTENTION_MLP = WAN_ATTENTION + ["ffn.net.0.proj", "ffn.net.2"]
WAN_ALL = WAN_ATTENTION_MLP + ["condition_embedder.time_proj"]  # the modulation every block reads

PRESETS: dict[str, list[str] | str] = {
    "unet-attn": UNET_ATTENTION,
    "unet-attn-ff": UNET_ATTENTION_FF,
    "unet-full": UNET_FULL,
    "text-encoder": TEXT_ENCODER,
    "flux-attn": FLUX_ATTENTION,
    "flux-attn-mlp": FLUX_ATTENTION_MLP,
    "flux-all": FLUX_ALL,
    "flux2-attn": FLUX2_ATTENTION,
    "flux2-attn-mlp": FLUX2_ATTENTION_MLP,
    "flux2-all": FLUX2_ALL,
    "sd3-attn": SD3_ATTENTION,
    "sd3-attn-mlp": SD3_ATTENTION_MLP,
    "sd3-all": SD3_ALL,
    "qwen-image-attn": QWEN_IMAGE_ATTENTION,
    "qwen-image-attn-mlp": QWEN_IMAGE_ATTENTION_MLP,
    "qwen-image-all": QWEN_IMAGE_ALL,
    "z-image-attn": Z_IMAGE_ATTENTION,
    "z-image-attn-mlp": Z_IMAGE_ATTENTION_MLP,
    "z-image-all": Z_IMAGE_ALL,
    "wan-attn": WAN_ATTENTION,
    "wan-attn-mlp": WAN_ATTENTION_MLP,
    "wan-all": WAN_ALL,
}


def resolve_targets(targets: str | list[str]) -> str | list[str]:
    """A preset name becomes its list (or its regex); anything else is returned unchanged."""
    if isinstance(targets, str) and targets in PRESETS:
        preset = PRESETS[targets]
        return preset if isinstance(preset, str) else list(preset)
    return targets
