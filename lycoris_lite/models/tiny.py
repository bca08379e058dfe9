"""Tiny, offline SD 1.5 and SDXL pipelines with the real module layouts, for tests, demos and benchmarks.

Every builder is deterministic: the weights are a pure function of ``seed`` and the global torch RNG
state is left untouched. ``diffusers`` and ``transformers`` are imported inside the builders, so that
``import lycoris_lite.models`` stays cheap.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, Iterator

import torch

from .tokenizer import BOS_TOKEN, EOS_TOKEN, MODEL_MAX_LENGTH, build_clip_tokenizer, save_pipeline, vocab_and_merges

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

TINY_VOCAB_SIZE = 1000  # embedding rows of the tiny text encoders
TINY_TEXT_HIDDEN = 32  # hidden size of the tiny (first) text encoder
TINY_TEXT2_HIDDEN = 64  # hidden size of the tiny SDXL second text encoder


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with the CPU RNG seeded to ``seed``; restore the RNG afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------
# Tiny SD 1.5 components
# --------------------------------------------------------------------------------------


def tiny_unet_config(
    block_out_channels: tuple[int, ...] = (8, 16, 32, 32),
    cross_attention_dim: int = TINY_TEXT_HIDDEN,
    attention_head_dim: int = 2,
    norm_num_groups: int = 4,
    sample_size: int = 8,
    layers_per_block: int = 2,
) -> dict[str, Any]:
    """Config dict of a UNet2DConditionModel with SD 1.5's exact module layout, tiny widths.

    Same block types / depths / names as SD 1.5 (4 down blocks
    ``CrossAttnDownBlock2D x3 + DownBlock2D``, ``UNetMidBlock2DCrossAttn``, up blocks
    ``UpBlock2D + CrossAttnUpBlock2D x3``, ``layers_per_block=2``, conv ``proj_in`` /
    ``proj_out`` (``use_linear_projection=False``), one transformer block per attention),
    but channels ``(8, 16, 32, 32)``, 2 heads (``attention_head_dim=2`` is the head
    *count*, as in SD 1.5's config), ``norm_num_groups=4`` and ``cross_attention_dim=32``
    (= the tiny text encoder's hidden size).  ``sample_size=8``: latents are 4x8x8 and the
    pipeline renders 64x64 images (VAE factor 8).
    """
    return {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": (
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        "only_cross_attention": False,
        "block_out_channels": tuple(block_out_channels),
        "layers_per_block": layers_per_block,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": norm_num_groups,
        "norm_eps": 1e-5,
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": attention_head_dim,
        "use_linear_projection": False,
    }


def build_tiny_unet(seed: int = 0, **config_overrides: Any) -> "UNet2DConditionModel":
    """Tiny SD-1.5-layout ``UNet2DConditionModel`` (see :func:`tiny_unet_config`), eval mode.

    Input: ``sample`` (B, 4, 8, 8), ``timestep``, ``encoder_hidden_states`` (B, 77, 32);
    output ``sample`` (B, 4, 8, 8).  556,572 parameters; weights fixed by ``seed``.
    """
    from diffusers import UNet2DConditionModel

    with seeded(seed):
        unet = UNet2DConditionModel(**tiny_unet_config(**config_overrides))
    return unet.eval()


def _tiny_text_config(
    hidden_size: int,
    *,
    projection_dim: int | None = None,
    intermediate_size: int = 64,
    num_attention_heads: int = 4,
    num_hidden_layers: int = 2,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
):
    from transformers import CLIPTextConfig

    vocab, _ = vocab_and_merges()
    bos = vocab[BOS_TOKEN] if bos_token_id is None else bos_token_id
    eos = vocab[EOS_TOKEN] if eos_token_id is None else eos_token_id
    pad = eos if pad_token_id is None else pad_token_id
    return CLIPTextConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        projection_dim=hidden_size if projection_dim is None else projection_dim,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )


def build_tiny_text_encoder(
    seed: int = 0,
    hidden_size: int = TINY_TEXT_HIDDEN,
    *,
    with_projection: bool = False,
    projection_dim: int | None = None,
    intermediate_size: int = 64,
    num_attention_heads: int = 4,
    num_hidden_layers: int = 2,
    pad_token_id: int | None = None,
) -> "CLIPTextModel":
    """Tiny CLIP text encoder matching :func:`build_clip_tokenizer`, eval mode.

    ``CLIPTextModel`` (or ``CLIPTextModelWithProjection`` if ``with_projection``, as SDXL's
    second encoder) with vocab_size 1000, max_position_embeddings 77, quick_gelu,
    ``hidden_size`` (32 by default), intermediate 64 (divisible by the block sizes rotations use; diffusers' fixture has 37), 4 heads, 2 layers and
    ``projection_dim`` (= hidden_size by default).  bos/eos/pad ids are the tokenizer's
    (912 / 913 / 913).  Input ids (B, 77) -> ``last_hidden_state`` (B, 77, hidden_size),
    ``pooler_output`` (B, hidden_size) or ``text_embeds`` (B, projection_dim).
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = _tiny_text_config(
        hidden_size,
        projection_dim=projection_dim,
        intermediate_size=intermediate_size,
        num_attention_heads=num_attention_heads,
        num_hidden_layers=num_hidden_layers,
        pad_token_id=pad_token_id,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with seeded(seed):
        model = cls(config)
    return model.eval()


def build_tiny_vae(seed: int = 0, *, scaling_factor: float = 0.18215, sample_size: int = 64) -> "AutoencoderKL":
    """Tiny ``AutoencoderKL``: 4 levels (8, 8, 16, 16 channels) -> spatial factor 8, 4 latent
    channels, ``norm_num_groups=4``, one resnet per level.  Image (B, 3, 64, 64) <-> latent
    (B, 4, 8, 8).  Weights fixed by ``seed``, eval mode."""
    from diffusers import AutoencoderKL

    with seeded(seed):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            act_fn="silu",
            latent_channels=4,
            norm_num_groups=4,
            sample_size=sample_size,
            scaling_factor=scaling_factor,
        )
    return vae.eval()


#: the noise schedule SD 1.5 and SDXL were trained with
_NOISE_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}


def _sd_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**_NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False)


def build_tiny_sd_pipeline(seed: int = 0, path: str | os.PathLike | None = None) -> "StableDiffusionPipeline":
    """Tiny ``StableDiffusionPipeline`` with SD 1.5's layout; renders 64x64 images.

    Components: :func:`build_tiny_unet` (seed), :func:`build_tiny_vae` (seed + 1),
    :func:`build_tiny_text_encoder` (seed + 2), :func:`build_clip_tokenizer` and SD 1.5's
    ``DDIMScheduler`` (scaled_linear 0.00085-0.012, ``clip_sample=False``,
    ``set_alpha_to_one=False``, ``steps_offset=1``); no safety checker / feature extractor.
    ``pipe(prompt, num_inference_steps=2, output_type="np").images`` has shape
    (1, 64, 64, 3).  If ``path`` is given the pipeline is also ``save_pretrained`` there.
    """
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=build_tiny_vae(seed + 1),
        text_encoder=build_tiny_text_encoder(seed + 2),
        tokenizer=build_clip_tokenizer(),
        unet=build_tiny_unet(seed),
        scheduler=_sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    if path is not None:
        save_pipeline(pipe, path, ("tokenizer",))
    return pipe


# --------------------------------------------------------------------------------------
# Tiny SDXL
# --------------------------------------------------------------------------------------


def tiny_sdxl_unet_config(
    block_out_channels: tuple[int, ...] = (8, 16, 32),
    cross_attention_dim: int = TINY_TEXT_HIDDEN + TINY_TEXT2_HIDDEN,
    text_embeds_dim: int = TINY_TEXT2_HIDDEN,
    addition_time_embed_dim: int = 8,
    sample_size: int = 8,
) -> dict[str, Any]:
    """Config of a UNet2DConditionModel with SDXL's module layout, tiny widths.

    As SDXL base: down ``DownBlock2D, CrossAttnDownBlock2D, CrossAttnDownBlock2D``, up
    ``CrossAttnUpBlock2D, CrossAttnUpBlock2D, UpBlock2D``, ``layers_per_block=2``, linear
    ``proj_in``/``proj_out`` (``use_linear_projection=True``), ``transformer_layers_per_block``
    ``(1, 1, 2)`` (SDXL: 1, 2, 10; the mid block uses the last), ``addition_embed_type
    ="text_time"``.  Tiny: channels ``(8, 16, 32)``, heads ``(1, 2, 4)`` (head dim 8),
    ``cross_attention_dim = 32 + 64 = 96`` (the two text encoders' hidden sizes
    concatenated), ``addition_time_embed_dim=8`` and
    ``projection_class_embeddings_input_dim = 6 * 8 + 64 = 112``.  ``sample_size=8``
    (latents 4x8x8, 64x64 images).
    """
    return {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "only_cross_attention": False,
        "block_out_channels": tuple(block_out_channels),
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 4,
        "norm_eps": 1e-5,
        "cross_attention_dim": cross_attention_dim,
        "transformer_layers_per_block": (1, 1, 2),
        "attention_head_dim": (1, 2, 4),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": addition_time_embed_dim,
        "projection_class_embeddings_input_dim": 6 * addition_time_embed_dim + text_embeds_dim,
    }


def build_tiny_sdxl_unet(seed: int = 0, **config_overrides: Any) -> "UNet2DConditionModel":
    """Tiny SDXL-layout ``UNet2DConditionModel`` (see :func:`tiny_sdxl_unet_config`), eval mode.

    Input ``sample`` (B, 4, 8, 8), ``encoder_hidden_states`` (B, 77, 96) and
    ``added_cond_kwargs={"text_embeds": (B, 64), "time_ids": (B, 6)}``.
    """
    from diffusers import UNet2DConditionModel

    with seeded(seed):
        unet = UNet2DConditionModel(**tiny_sdxl_unet_config(**config_overrides))
    return unet.eval()


def _sdxl_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**_NOISE_SCHEDULE, num_train_timesteps=1000, prediction_type="epsilon",
                                  timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False)


def build_tiny_sdxl_pipeline(seed: int = 0, path: str | os.PathLike | None = None) -> "StableDiffusionXLPipeline":
    """Tiny ``StableDiffusionXLPipeline`` with SDXL's layout; renders 64x64 images.

    Components: :func:`build_tiny_sdxl_unet` (seed), tiny VAE (seed + 1, scaling 0.13025 as
    SDXL), ``text_encoder`` = ``CLIPTextModel`` hidden 32 (seed + 2), ``text_encoder_2`` =
    ``CLIPTextModelWithProjection`` hidden 64 / projection 64 (seed + 3), two offline
    tokenizers (the second pads with ``"!"`` like SDXL's), SDXL's ``EulerDiscreteScheduler``
    config, no watermarker.  If ``path`` is given it is also ``save_pretrained`` there.
    """
    from diffusers import StableDiffusionXLPipeline

    tokenizer_2 = build_clip_tokenizer(pad_token="!")
    pipe = StableDiffusionXLPipeline(
        vae=build_tiny_vae(seed + 1, scaling_factor=0.13025),
        text_encoder=build_tiny_text_encoder(seed + 2, TINY_TEXT_HIDDEN),
        text_encoder_2=build_tiny_text_encoder(
            seed + 3,
            TINY_TEXT2_HIDDEN,
            with_projection=True,
            projection_dim=TINY_TEXT2_HIDDEN,
            pad_token_id=tokenizer_2.pad_token_id,
        ),
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=tokenizer_2,
        unet=build_tiny_sdxl_unet(seed),
        scheduler=_sdxl_scheduler(),
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    if path is not None:
        save_pipeline(pipe, path, ("tokenizer", "tokenizer_2"))
    return pipe
