"""Stable Diffusion target presets, as data. Names are diffusers module names (dotted suffixes)."""

from __future__ import annotations

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
UNET_ATTENTION_FF = UNET_ATTENTION + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
UNET_FULL = UNET_ATTENTION_FF + [
    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv",
]
TEXT_ENCODER = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]

PRESETS: dict[str, list[str]] = {
    "unet-attn": UNET_ATTENTION,
    "unet-attn-ff": UNET_ATTENTION_FF,
    "unet-full": UNET_FULL,
    "text-encoder": TEXT_ENCODER,
}


def resolve_targets(targets: str | list[str]) -> str | list[str]:
    """A preset name becomes its list; anything else is returned unchanged."""
    if isinstance(targets, str) and targets in PRESETS:
        return list(PRESETS[targets])
    return targets
