"""Tiny, offline transformer (DiT) pipelines with the real module layouts: Flux.1 (and Kontext),
Flux.2, SD3/3.5, Qwen-Image, Z-Image, Wan 2.1 and Wan 2.2 (two experts).

Each ``build_tiny_<family>_pipeline(seed=0, dtype=torch.float32)`` returns a ready diffusers pipeline
whose transformer has the full model's module paths (``transformer_blocks.0.attn.to_q``,
``single_transformer_blocks.0.proj_mlp``, ``blocks.0.ffn.net.0.proj``, ...) at hidden width 32 (2
heads of 16) and 2 blocks of each kind, so adapters written for the real models' names apply by path.
``pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np")`` runs on a CPU in
about a second. Weights are a pure function of ``seed`` (transformer ``seed``, VAE ``seed + 1``, text
encoders ``seed + 2`` onwards); the global RNG is left untouched.

:func:`flux_width_transformer_config` / :func:`build_flux_width_transformer`: Flux.1's real widths
(3072 = 24 heads x 128, joint dim 4096) with 2 double and 4 single blocks, random weights, for benchmarks.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from .full_size import _cast, _fast_seeded_init
from .text_encoders import (TEXT_HIDDEN, build_mistral_tokenizer, build_qwen_tokenizer, build_t5_tokenizer,
                            build_tiny_mistral3_text_encoder, build_tiny_qwen3_text_encoder,
                            build_tiny_qwen25vl_text_encoder, build_tiny_t5_encoder)
from .tiny import TINY_TEXT2_HIDDEN, TINY_TEXT_HIDDEN, build_tiny_text_encoder, seeded
from .tokenizer import build_clip_tokenizer, save_pipeline

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import DiffusionPipeline, FluxTransformer2DModel

_HEADS, _HEAD_DIM = 2, 16  # hidden width 32
_ROPE_AXES = (4, 6, 6)  # (index, height, width) rotary dims, summing to the head dim as Flux's (16, 56, 56)


# --------------------------------------------------------------------------------------
# Transformer configs
# --------------------------------------------------------------------------------------


def tiny_flux_transformer_config(**overrides: Any) -> dict[str, Any]:
    """``FluxTransformer2DModel`` config: Flux.1-dev's layout (guidance embedding, 16 latent channels
    packed 2x2 -> ``in_channels`` 64) with 2 double-stream blocks (``transformer_blocks``), 2 single
    blocks, 2 heads of 16, T5 width 32 (``joint_attention_dim``) and CLIP pooled width 32."""
    return {"patch_size": 1, "in_channels": 64, "num_layers": 2, "num_single_layers": 2,
            "attention_head_dim": _HEAD_DIM, "num_attention_heads": _HEADS, "joint_attention_dim": TEXT_HIDDEN,
            "pooled_projection_dim": TINY_TEXT_HIDDEN, "guidance_embeds": True, "axes_dims_rope": _ROPE_AXES,
            **overrides}


def flux_width_transformer_config(**overrides: Any) -> dict[str, Any]:
    """Flux.1-dev's real widths (hidden 3072 = 24 heads x 128, T5 4096, CLIP pooled 768, rotary
    (16, 56, 56)) with 2 double-stream and 4 single-stream blocks (the real model has 19 and 38):
    1,310,154,816 parameters, 5.2 GB in float32."""
    full_width = {"num_layers": 2, "num_single_layers": 4, "attention_head_dim": 128, "num_attention_heads": 24,
                  "joint_attention_dim": 4096, "pooled_projection_dim": 768, "axes_dims_rope": (16, 56, 56)}
    return tiny_flux_transformer_config(**{**full_width, **overrides})


def build_flux_width_transformer(seed: int = 0, dtype: torch.dtype = torch.float32,
                                 device: str | torch.device = "cpu", **overrides: Any) -> "FluxTransformer2DModel":
    """``FluxTransformer2DModel`` of :func:`flux_width_transformer_config` (``overrides`` applied), eval
    mode, built on the meta device and filled in place on ``device`` in ``dtype`` by the seeded
    pool init of :mod:`.full_size` (seconds, not minutes). Deterministic for a seed."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**flux_width_transformer_config(**overrides))
    if any(True for _ in model.buffers()):  # pragma: no cover - Flux has none; to_empty would leave garbage
        raise RuntimeError("unexpected buffers in FluxTransformer2DModel")
    model = _cast(model, dtype).to_empty(device=device)
    _fast_seeded_init(model, seed)
    return model.eval()


def tiny_flux2_transformer_config(**overrides: Any) -> dict[str, Any]:
    """``Flux2Transformer2DModel`` config: Flux.2-dev's layout (32 latent channels patchified 2x2 ->
    128, guidance embedding, 4-axis rotary) with 2 double and 2 single blocks, 2 heads of 16, and text
    width 3 x 32 (Flux.2 stacks three hidden states of the text encoder)."""
    return {"patch_size": 1, "in_channels": 128, "num_layers": 2, "num_single_layers": 2,
            "attention_head_dim": _HEAD_DIM, "num_attention_heads": _HEADS, "joint_attention_dim": 3 * TEXT_HIDDEN,
            "timestep_guidance_channels": 32, "mlp_ratio": 3.0, "axes_dims_rope": (4, 4, 4, 4),
            "guidance_embeds": True, **overrides}


#: SD3's T5 width: wider than CLIP-L (32) + CLIP-G (64), which SD3 zero-pads up to it
_SD3_T5_WIDTH = 128


def tiny_sd3_transformer_config(**overrides: Any) -> dict[str, Any]:
    """``SD3Transformer2DModel`` config with SD3.5-large's layout (RMS q/k norms, 16 latent channels,
    patch 2, last block context-pre-only): 2 blocks, 2 heads of 16, T5 width 128, pooled CLIP-L + G
    width 32 + 64, 8x8 latents by default (64 px) and positions up to 16 patches per side."""
    return {"sample_size": 8, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
            "attention_head_dim": _HEAD_DIM, "num_attention_heads": _HEADS, "joint_attention_dim": _SD3_T5_WIDTH,
            "caption_projection_dim": _HEADS * _HEAD_DIM, "pooled_projection_dim": TINY_TEXT_HIDDEN + TINY_TEXT2_HIDDEN,
            "pos_embed_max_size": 16, "qk_norm": "rms_norm", **overrides}


def tiny_qwen_image_transformer_config(**overrides: Any) -> dict[str, Any]:
    """``QwenImageTransformer2DModel`` config: Qwen-Image's layout (16 latent channels packed 2x2) with
    2 blocks, 2 heads of 16 and text width 32."""
    return {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 2,
            "attention_head_dim": _HEAD_DIM, "num_attention_heads": _HEADS, "joint_attention_dim": TEXT_HIDDEN,
            "axes_dims_rope": _ROPE_AXES, **overrides}


def tiny_z_image_transformer_config(**overrides: Any) -> dict[str, Any]:
    """``ZImageTransformer2DModel`` config: Z-Image's layout (2 noise and 2 context refiner blocks, q/k
    norms, patch 2) with 2 main layers, width 32 (2 heads of 16) and caption width 32."""
    return {"all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": _HEADS * _HEAD_DIM,
            "n_layers": 2, "n_refiner_layers": 2, "n_heads": _HEADS, "n_kv_heads": _HEADS, "qk_norm": True,
            "cap_feat_dim": TEXT_HIDDEN, "axes_dims": list(_ROPE_AXES), "axes_lens": [1024, 512, 512], **overrides}


def tiny_wan_transformer_config(**overrides: Any) -> dict[str, Any]:
    """``WanTransformer3DModel`` config: Wan 2.1 / 2.2 text-to-video layout (patch (1, 2, 2), RMS q/k
    norms across heads, normed cross-attention) with 2 blocks, 2 heads of 16, FFN 64, UMT5 width 32."""
    return {"patch_size": (1, 2, 2), "num_attention_heads": _HEADS, "attention_head_dim": _HEAD_DIM,
            "in_channels": 16, "out_channels": 16, "text_dim": TEXT_HIDDEN, "freq_dim": 32, "ffn_dim": 64,
            "num_layers": 2, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32,
            **overrides}


def _build(cls, seed: int, dtype: torch.dtype, *args, **kwargs):
    with seeded(seed):
        module = cls(*args, **kwargs)
    return _cast(module.eval(), dtype)


# --------------------------------------------------------------------------------------
# VAEs and schedulers
# --------------------------------------------------------------------------------------


def _kl_vae(seed: int, dtype: torch.dtype, *, scaling_factor: float, shift_factor: float):
    """Flux.1's ``AutoencoderKL`` (16 latent channels, no quant convs; also SD3's and Z-Image's) with
    channels (8, 8, 16, 16): factor 8."""
    from diffusers import AutoencoderKL

    return _build(AutoencoderKL, seed, dtype, in_channels=3, out_channels=3,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=16, norm_num_groups=4,
                  sample_size=32, scaling_factor=scaling_factor, shift_factor=shift_factor,
                  use_quant_conv=False, use_post_quant_conv=False)


def _flux2_vae(seed: int, dtype: torch.dtype):
    from diffusers import AutoencoderKLFlux2

    return _build(AutoencoderKLFlux2, seed, dtype, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                  latent_channels=32, norm_num_groups=4, sample_size=32)


def _video_vae(cls_name: str, seed: int, dtype: torch.dtype):
    """Wan 2.1's causal 3D VAE (``AutoencoderKLWan``; Qwen-Image's ``AutoencoderKLQwenImage`` is the same
    design): z 16, spatial factor 8, temporal factor 4, base width 8."""
    import diffusers

    return _build(getattr(diffusers, cls_name), seed, dtype, base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4],
                  num_res_blocks=1, temperal_downsample=[False, True, True])


def _flow_scheduler(**config: Any):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **config)


#: Flux.1's scheduler: resolution-dependent shift
_FLUX_SHIFT = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
               "base_image_seq_len": 256, "max_image_seq_len": 4096}


def _finish(pipe: "DiffusionPipeline", path: str | os.PathLike | None) -> "DiffusionPipeline":
    pipe.set_progress_bar_config(disable=True)
    if path is not None:
        save_pipeline(pipe, path)
    return pipe


# --------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------


def _flux_components(seed: int, dtype: torch.dtype) -> dict[str, Any]:
    from diffusers import FluxTransformer2DModel

    return {"transformer": _build(FluxTransformer2DModel, seed, dtype, **tiny_flux_transformer_config()),
            "vae": _kl_vae(seed + 1, dtype, scaling_factor=0.3611, shift_factor=0.1159),
            "text_encoder": _cast(build_tiny_text_encoder(seed + 2), dtype), "tokenizer": build_clip_tokenizer(),
            "text_encoder_2": _cast(build_tiny_t5_encoder(seed + 3), dtype), "tokenizer_2": build_t5_tokenizer(),
            "scheduler": _flow_scheduler(**_FLUX_SHIFT)}


def build_tiny_flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32,
                             path: str | os.PathLike | None = None):
    """Tiny ``FluxPipeline`` (Flux.1-dev layout): :func:`tiny_flux_transformer_config`, CLIP-L
    ``text_encoder`` (hidden 32) + offline CLIP tokenizer, T5 ``text_encoder_2`` (hidden 32) + offline T5
    tokenizer (prompts padded to 512), 16-channel ``AutoencoderKL`` (factor 8), Flux's dynamic-shift
    ``FlowMatchEulerDiscreteScheduler``. Sizes: multiples of 16 px. Saved to ``path`` if given."""
    from diffusers import FluxPipeline

    return _finish(FluxPipeline(**_flux_components(seed, dtype)), path)


def build_tiny_flux_kontext_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32,
                                     path: str | os.PathLike | None = None):
    """Tiny ``FluxKontextPipeline``: the components of :func:`build_tiny_flux_pipeline` (Kontext is a
    Flux.1-dev fine-tune); give it ``image=`` to edit, or none for text-to-image. Kontext rescales the
    output to ``max_area`` (default 1024 x 1024): pass ``max_area=height * width`` for tiny sizes, and
    ``_auto_resize=False`` with a tiny input image."""
    from diffusers import FluxKontextPipeline

    return _finish(FluxKontextPipeline(**_flux_components(seed, dtype)), path)


def build_tiny_flux2_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32,
                              path: str | os.PathLike | None = None):
    """Tiny ``Flux2Pipeline``: :func:`tiny_flux2_transformer_config`, a 30-layer hidden-32
    ``Mistral3ForConditionalGeneration`` text encoder with an offline Mistral tokenizer (not a
    ``PixtralProcessor``: see :func:`.text_encoders.build_mistral_tokenizer`), ``AutoencoderKLFlux2``
    (32 latent channels, factor 8, batch-norm latent statistics) and a dynamic-shift flow scheduler."""
    from diffusers import Flux2Pipeline, Flux2Transformer2DModel

    pipe = Flux2Pipeline(transformer=_build(Flux2Transformer2DModel, seed, dtype, **tiny_flux2_transformer_config()),
                         vae=_flux2_vae(seed + 1, dtype),
                         text_encoder=_cast(build_tiny_mistral3_text_encoder(seed + 2), dtype),
                         tokenizer=build_mistral_tokenizer(), scheduler=_flow_scheduler(**_FLUX_SHIFT))
    return _finish(pipe, path)


def build_tiny_sd3_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32,
                            path: str | os.PathLike | None = None):
    """Tiny ``StableDiffusion3Pipeline`` (SD3.5-large layout): :func:`tiny_sd3_transformer_config`, CLIP-L
    (``CLIPTextModelWithProjection``, hidden 32) and CLIP-G (hidden 64, pads with ``"!"``) with offline
    CLIP tokenizers, T5 ``text_encoder_3`` (hidden 128) + T5 tokenizer, 16-channel ``AutoencoderKL``
    with SD3's scaling/shift, ``FlowMatchEulerDiscreteScheduler(shift=3.0)``."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer_2 = build_clip_tokenizer(pad_token="!")
    pipe = StableDiffusion3Pipeline(
        transformer=_build(SD3Transformer2DModel, seed, dtype, **tiny_sd3_transformer_config()),
        vae=_kl_vae(seed + 1, dtype, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=_cast(build_tiny_text_encoder(seed + 2, with_projection=True), dtype),
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=_cast(build_tiny_text_encoder(seed + 3, TINY_TEXT2_HIDDEN, with_projection=True,
                                                     pad_token_id=tokenizer_2.pad_token_id), dtype),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_cast(build_tiny_t5_encoder(seed + 4, d_model=_SD3_T5_WIDTH), dtype),
        tokenizer_3=build_t5_tokenizer(),
        scheduler=_flow_scheduler(shift=3.0))
    return _finish(pipe, path)


def build_tiny_qwen_image_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32,
                                   path: str | os.PathLike | None = None):
    """Tiny ``QwenImagePipeline``: :func:`tiny_qwen_image_transformer_config`, a hidden-32
    ``Qwen2_5_VLForConditionalGeneration`` with an offline ``Qwen2Tokenizer`` (whose split of Qwen-Image's
    prompt template has the 34-token prefix the pipeline drops), ``AutoencoderKLQwenImage`` (factor 8) and
    Qwen-Image's exponential dynamic-shift flow scheduler."""
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    pipe = QwenImagePipeline(
        transformer=_build(QwenImageTransformer2DModel, seed, dtype, **tiny_qwen_image_transformer_config()),
        vae=_video_vae("AutoencoderKLQwenImage", seed + 1, dtype),
        text_encoder=_cast(build_tiny_qwen25vl_text_encoder(seed + 2), dtype), tokenizer=build_qwen_tokenizer(),
        scheduler=_flow_scheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                  base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                  time_shift_type="exponential"))
    return _finish(pipe, path)


def build_tiny_z_image_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32,
                                path: str | os.PathLike | None = None):
    """Tiny ``ZImagePipeline``: :func:`tiny_z_image_transformer_config`, a hidden-32 ``Qwen3Model`` with
    an offline ``Qwen2Tokenizer`` (Qwen3's chat template), Flux.1's 16-channel ``AutoencoderKL`` and
    ``FlowMatchEulerDiscreteScheduler(shift=3.0)``."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    pipe = ZImagePipeline(
        transformer=_build(ZImageTransformer2DModel, seed, dtype, **tiny_z_image_transformer_config()),
        vae=_kl_vae(seed + 1, dtype, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_cast(build_tiny_qwen3_text_encoder(seed + 2), dtype), tokenizer=build_qwen_tokenizer(),
        scheduler=_flow_scheduler(shift=3.0))
    return _finish(pipe, path)


def _wan_pipeline(seed: int, dtype: torch.dtype, path, *, two_experts: bool):
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    expert_2 = _build(WanTransformer3DModel, seed + 5, dtype, **tiny_wan_transformer_config()) if two_experts else None
    pipe = WanPipeline(
        transformer=_build(WanTransformer3DModel, seed, dtype, **tiny_wan_transformer_config()),
        transformer_2=expert_2, boundary_ratio=0.875 if two_experts else None,
        vae=_video_vae("AutoencoderKLWan", seed + 1, dtype),
        text_encoder=_cast(build_tiny_t5_encoder(seed + 2, umt5=True), dtype), tokenizer=build_t5_tokenizer(),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                          num_train_timesteps=1000, flow_shift=3.0))
    return _finish(pipe, path)


def build_tiny_wan_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32,
                            path: str | os.PathLike | None = None):
    """Tiny ``WanPipeline`` (Wan 2.1 text-to-video): :func:`tiny_wan_transformer_config`, a hidden-32
    ``UMT5EncoderModel`` with the offline T5 tokenizer, ``AutoencoderKLWan`` (spatial factor 8, temporal
    4) and Wan's flow ``UniPCMultistepScheduler`` (shift 3). Pass a small ``num_frames`` (1, 5, ...)."""
    return _wan_pipeline(seed, dtype, path, two_experts=False)


def build_tiny_wan22_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32,
                              path: str | os.PathLike | None = None):
    """Tiny ``WanPipeline`` as Wan 2.2 A14B: :func:`build_tiny_wan_pipeline`'s components plus a second
    expert ``transformer_2`` (seed + 5) and ``boundary_ratio=0.875``: ``transformer`` denoises timesteps
    >= 875, ``transformer_2`` the rest."""
    return _wan_pipeline(seed, dtype, path, two_experts=True)
