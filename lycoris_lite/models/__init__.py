"""Tiny, offline models for tests, demos and benchmarks (one pretrained, the others random), and the
real-model loader.

Nothing in this package touches the network or the Hugging Face Hub (except :func:`load_pipeline` when it
is explicitly given a hub id). Every builder is deterministic: the weights are a pure function of
``seed`` (or, for ``tiny-world``, committed files) and the global torch RNG state is left untouched. It imports nothing else of lycoris_lite.

Heavy dependencies (``diffusers``, ``transformers``) are imported inside the functions so that
``import lycoris_lite.models`` stays cheap and the core package imports without them.

* :mod:`.world`: the synthetic world of the pretrained tiny model: captioned scenes (:func:`.world.scene`,
  :func:`.world.draw`), generic pictures for its autoencoder (:func:`.world.clutter`) and the instruments
  that read pictures back (:func:`.world.detect`, :func:`.world.appearance`, :func:`.world.subject_similarity`).
* :mod:`.world_model`: ``tiny-world``, the embedded *pretrained* pipeline (:data:`TINY_WORLD_DIR`,
  :func:`load_tiny_world_pipeline`), the recipe that trained it (:func:`.world_model.pretrain`,
  ``make tiny-model``) and its measure (:func:`.world_model.caption_accuracy`).
* :mod:`.world_flux`: ``tiny-world-flux``, its Flux.1-shaped counterpart (:data:`TINY_WORLD_FLUX_DIR`,
  :func:`load_tiny_world_flux_pipeline`; recipe :func:`.world_flux.pretrain`).
* :mod:`.tokenizer`: :func:`build_clip_tokenizer`, an offline byte-level CLIP BPE tokenizer (vocab 914),
  and :func:`save_pipeline` (``save_pretrained`` plus the files it needs).
* :mod:`.tiny`: :func:`tiny_unet_config` / :func:`build_tiny_unet` (SD-1.5 layout, tiny widths),
  :func:`build_tiny_text_encoder`, :func:`build_tiny_vae`, :func:`build_tiny_sd_pipeline` (64x64 images),
  :func:`tiny_sdxl_unet_config` / :func:`build_tiny_sdxl_unet`, :func:`build_tiny_sdxl_pipeline`.
* :mod:`.full_size`: :func:`sd15_unet_config` / :func:`build_sd15_unet` and :func:`sd15_text_encoder_config`
  / :func:`build_sd15_text_encoder`: SD 1.5's real shapes with random weights.
* :mod:`.tiny_dit`: tiny transformer (DiT) pipelines with the real module paths, hidden width 32:
  :func:`build_tiny_flux_pipeline`, :func:`build_tiny_flux_kontext_pipeline`,
  :func:`build_tiny_flux2_pipeline`, :func:`build_tiny_sd3_pipeline`,
  :func:`build_tiny_qwen_image_pipeline`, :func:`build_tiny_z_image_pipeline`,
  :func:`build_tiny_wan_pipeline`, :func:`build_tiny_wan22_pipeline` (each ``(seed=0,
  dtype=torch.float32, path=None)``) and their ``tiny_<family>_transformer_config``; Flux.1 at full
  width for benchmarks: :func:`flux_width_transformer_config` / :func:`build_flux_width_transformer`.
* :mod:`.text_encoders`: their tokenizers (:func:`build_t5_tokenizer`: Unigram for T5/UMT5;
  :func:`build_qwen_tokenizer`, :func:`build_mistral_tokenizer`: byte-level BPE with chat templates)
  and tiny text encoders (T5, UMT5, Qwen2.5-VL, Qwen3, Mistral 3).
* :mod:`.loading`: :func:`load_pipeline`: a name of :data:`TINY_PIPELINES` (``"tiny-world"``,
  ``"tiny-world-flux"``, ``"tiny-sd"``,
  ``"tiny-sdxl"``, ``"tiny-flux"``, ``"tiny-flux-kontext"``, ``"tiny-flux2"``, ``"tiny-sd3"``,
  ``"tiny-qwen-image"``, ``"tiny-z-image"``, ``"tiny-wan"``, ``"tiny-wan22"``) or a real
  ``DiffusionPipeline.from_pretrained``.
"""

from .full_size import build_sd15_text_encoder, build_sd15_unet, sd15_text_encoder_config, sd15_unet_config
from .loading import (TINY_FLUX2_NAME, TINY_FLUX_KONTEXT_NAME, TINY_FLUX_NAME, TINY_PIPELINES, TINY_QWEN_IMAGE_NAME,
                      TINY_SD3_NAME, TINY_SD_NAME, TINY_SDXL_NAME, TINY_WAN22_NAME, TINY_WAN_NAME, TINY_WORLD_FLUX_NAME,
                      TINY_WORLD_NAME, TINY_Z_IMAGE_NAME, load_pipeline)
from .text_encoders import (build_mistral_tokenizer, build_qwen_tokenizer, build_t5_tokenizer,
                            build_tiny_mistral3_text_encoder, build_tiny_qwen3_text_encoder,
                            build_tiny_qwen25vl_text_encoder, build_tiny_t5_encoder)
from .tiny import (build_tiny_sd_pipeline, build_tiny_sdxl_pipeline, build_tiny_sdxl_unet, build_tiny_text_encoder,
                   build_tiny_unet, build_tiny_vae, tiny_sdxl_unet_config, tiny_unet_config)
from .tiny_dit import (build_flux_width_transformer, build_tiny_flux2_pipeline, build_tiny_flux_kontext_pipeline,
                       build_tiny_flux_pipeline, build_tiny_qwen_image_pipeline, build_tiny_sd3_pipeline,
                       build_tiny_wan22_pipeline, build_tiny_wan_pipeline, build_tiny_z_image_pipeline,
                       flux_width_transformer_config, tiny_flux2_transformer_config, tiny_flux_transformer_config,
                       tiny_qwen_image_transformer_config, tiny_sd3_transformer_config, tiny_wan_transformer_config,
                       tiny_z_image_transformer_config)
from .tokenizer import BOS_TOKEN, EOS_TOKEN, build_clip_tokenizer, bytes_to_unicode, save_pipeline
from .world_flux import TINY_WORLD_FLUX_DIR, load_tiny_world_flux_pipeline
from .world_model import TINY_WORLD_DIR, load_tiny_world_pipeline

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "TINY_WORLD_NAME",
    "TINY_WORLD_DIR",
    "load_tiny_world_pipeline",
    "TINY_WORLD_FLUX_NAME",
    "TINY_WORLD_FLUX_DIR",
    "load_tiny_world_flux_pipeline",
    "TINY_SD_NAME",
    "TINY_SDXL_NAME",
    "TINY_FLUX_NAME",
    "TINY_FLUX_KONTEXT_NAME",
    "TINY_FLUX2_NAME",
    "TINY_SD3_NAME",
    "TINY_QWEN_IMAGE_NAME",
    "TINY_Z_IMAGE_NAME",
    "TINY_WAN_NAME",
    "TINY_WAN22_NAME",
    "TINY_PIPELINES",
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
    "tiny_flux_transformer_config",
    "build_tiny_flux_pipeline",
    "build_tiny_flux_kontext_pipeline",
    "tiny_flux2_transformer_config",
    "build_tiny_flux2_pipeline",
    "tiny_sd3_transformer_config",
    "build_tiny_sd3_pipeline",
    "tiny_qwen_image_transformer_config",
    "build_tiny_qwen_image_pipeline",
    "tiny_z_image_transformer_config",
    "build_tiny_z_image_pipeline",
    "tiny_wan_transformer_config",
    "build_tiny_wan_pipeline",
    "build_tiny_wan22_pipeline",
    "flux_width_transformer_config",
    "build_flux_width_transformer",
    "build_t5_tokenizer",
    "build_qwen_tokenizer",
    "build_mistral_tokenizer",
    "build_tiny_t5_encoder",
    "build_tiny_qwen25vl_text_encoder",
    "build_tiny_qwen3_text_encoder",
    "build_tiny_mistral3_text_encoder",
    "load_pipeline",
    "save_pipeline",
]
