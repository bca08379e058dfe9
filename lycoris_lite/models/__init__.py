"""Tiny, offline model builders for tests, demos and benchmarks, and the real-model loader.

Nothing in this package touches the network or the Hugging Face Hub (except :func:`load_pipeline` when it
is explicitly given a hub id). Every builder is deterministic: the weights are a pure function of
``seed`` and the global torch RNG state is left untouched. It imports nothing else of lycoris_lite.

Heavy dependencies (``diffusers``, ``transformers``) are imported inside the functions so that
``import lycoris_lite.models`` stays cheap and the core package imports without them.

* :mod:`.tokenizer`: :func:`build_clip_tokenizer`, an offline byte-level CLIP BPE tokenizer (vocab 914),
  and :func:`save_pipeline` (``save_pretrained`` plus the files it needs).
* :mod:`.tiny`: :func:`tiny_unet_config` / :func:`build_tiny_unet` (SD-1.5 layout, tiny widths),
  :func:`build_tiny_text_encoder`, :func:`build_tiny_vae`, :func:`build_tiny_sd_pipeline` (64x64 images),
  :func:`tiny_sdxl_unet_config` / :func:`build_tiny_sdxl_unet`, :func:`build_tiny_sdxl_pipeline`.
* :mod:`.full_size`: :func:`sd15_unet_config` / :func:`build_sd15_unet` and :func:`sd15_text_encoder_config`
  / :func:`build_sd15_text_encoder`: SD 1.5's real shapes with random weights.
* :mod:`.loading`: :func:`load_pipeline`: ``"tiny-sd"`` / ``"tiny-sdxl"`` or a real
  ``DiffusionPipeline.from_pretrained``.
"""

from .full_size import build_sd15_text_encoder, build_sd15_unet, sd15_text_encoder_config, sd15_unet_config
from .loading import TINY_SD_NAME, TINY_SDXL_NAME, load_pipeline
from .tiny import (build_tiny_sd_pipeline, build_tiny_sdxl_pipeline, build_tiny_sdxl_unet, build_tiny_text_encoder,
                   build_tiny_unet, build_tiny_vae, tiny_sdxl_unet_config, tiny_unet_config)
from .tokenizer import BOS_TOKEN, EOS_TOKEN, build_clip_tokenizer, bytes_to_unicode, save_pipeline

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "TINY_SD_NAME",
    "TINY_SDXL_NAME",
    "bytes_to_unicode",
    "build_clip_tokenizer",
    "tiny_unet_config",
    "build_tiny_unet",
    "build_tiny_text_encoder",
    "build_tiny_vae",
    "build_tiny_sd_pipeline",
    "tiny_sdxl_unet_config",
    "build_tiny_sdxl_unet",
    "build_tiny_sdxl_pipeline",
    "sd15_unet_config",
    "build_sd15_unet",
    "sd15_text_encoder_config",
    "build_sd15_text_encoder",
    "load_pipeline",
    "save_pipeline",
]
