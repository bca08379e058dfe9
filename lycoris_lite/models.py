"""Tiny, offline model builders for tests, demos and benchmarks.

Nothing in this module touches the network or the Hugging Face Hub (except
:func:`load_pipeline` when it is explicitly given a hub id).  Every builder is
deterministic: the weights are a pure function of ``seed`` and the global torch
RNG state is left untouched.

Heavy dependencies (``diffusers``, ``transformers``) are imported lazily inside
the functions so that ``import lycoris_lite.models`` stays cheap and the core
package imports without them.

Public API
----------
* :func:`build_clip_tokenizer` -- offline byte-level CLIP BPE tokenizer (vocab 914).
* :func:`tiny_unet_config` / :func:`build_tiny_unet` -- SD-1.5-layout UNet, tiny widths.
* :func:`build_tiny_text_encoder` -- tiny ``CLIPTextModel`` (or ``...WithProjection``).
* :func:`build_tiny_vae` -- tiny ``AutoencoderKL`` (latent factor 8, 4 latent channels).
* :func:`build_tiny_sd_pipeline` -- tiny ``StableDiffusionPipeline`` (64x64 images).
* :func:`tiny_sdxl_unet_config` / :func:`build_tiny_sdxl_unet` -- SDXL-layout UNet, tiny widths.
* :func:`build_tiny_sdxl_pipeline` -- tiny ``StableDiffusionXLPipeline`` (64x64 images).
* :func:`sd15_unet_config` / :func:`build_sd15_unet` -- full-size SD 1.5 UNet, random weights.
* :func:`sd15_text_encoder_config` / :func:`build_sd15_text_encoder` -- full-size SD 1.5 CLIP-L text encoder.
* :func:`load_pipeline` -- ``"tiny-sd"`` / ``"tiny-sdxl"`` or a real ``DiffusionPipeline.from_pretrained``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

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
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
TINY_SD_NAME = "tiny-sd"
TINY_SDXL_NAME = "tiny-sdxl"

#: Number of learned BPE merges of the tiny tokenizer: 512 byte symbols + merges + 2
#: special tokens = 914 ids, below the tiny text encoders' ``vocab_size`` of 1000.
TINY_NUM_MERGES = 400
TINY_VOCAB_SIZE = 1000  # embedding rows of the tiny text encoders
TINY_TEXT_HIDDEN = 32  # hidden size of the tiny (first) text encoder
TINY_TEXT2_HIDDEN = 64  # hidden size of the tiny SDXL second text encoder
MODEL_MAX_LENGTH = 77


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block with the CPU RNG seeded to ``seed``; restore the RNG afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------

# Small English corpus (prompt-style) the tiny BPE merges are learned from.  The merges
# are learned deterministically at first use (a few milliseconds) and cached.
_BPE_CORPUS = """
a photo of a dog. a photo of a cat. a photo of sks dog. a photo of a sks dog in the snow.
a painting of a cat. a painting of a dog on the beach. an oil painting of a house by the sea.
a portrait of a woman with red hair, highly detailed, sharp focus, studio lighting.
a portrait photo of a man wearing a black hat, soft light, bokeh, film grain.
a watercolor painting of a mountain landscape at sunset with a river and trees.
a beautiful landscape with green hills, blue sky and white clouds, trending on artstation.
a cute puppy sitting on the grass in the garden, morning light, photograph.
a small kitten sleeping on a red sofa in a cozy living room.
a drawing of a castle on a hill, fantasy art, concept art, digital painting.
an anime girl with long hair standing in the rain, city street at night, neon lights.
a close up photo of a flower with water drops, macro photography, depth of field.
the quick brown fox jumps over the lazy dog. the cat sat on the mat.
a bowl of fruit on a wooden table, still life, oil on canvas, masterpiece.
a futuristic city with flying cars and tall buildings, science fiction, cinematic.
a car driving on a road through the forest in autumn, orange and yellow leaves.
a man riding a horse on the beach, golden hour, wide angle, high quality.
a picture of a bird sitting on a branch, nature photography, national geographic.
a sketch of an old tree, pencil drawing, black and white, detailed lines.
a render of a robot in a room, unreal engine, octane render, volumetric lighting.
a painting in the style of van gogh, starry night over a little village.
a photo of the face of a young woman smiling, natural light, portrait photography.
a dog running in the park, a cat playing with a ball, children playing in the street.
a boat on the lake, reflections in the water, calm evening, pastel colors.
a cup of coffee on a table next to a window, rainy day, warm and cozy.
a medieval knight in shining armor holding a sword, epic fantasy illustration.
a dragon flying over the mountains, dramatic clouds, matte painting, artstation.
an astronaut riding a horse on the moon, photorealistic, high resolution, 4k, 8k.
a house in the woods covered with snow, winter, christmas lights, cold blue tones.
a vase of roses on a shelf, soft shadows, simple background, product photography.
the best quality, ultra detailed, realistic, sharp, colorful, vibrant, dark, bright.
a photo of my dog, a photo of your cat, a photo of their house, a photo of this city.
a low quality, blurry, ugly, bad anatomy, worst quality, jpeg artifacts, watermark, text.
"""


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode mapping (256 entries, in CLIP order)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@functools.lru_cache(maxsize=None)
def _learn_merges(num_merges: int = TINY_NUM_MERGES) -> tuple[tuple[str, str], ...]:
    """Learn ``num_merges`` BPE merges (CLIP style, ``</w>`` end-of-word) on the corpus.

    Deterministic: ties on pair frequency are broken lexicographically.
    """
    byte_enc = bytes_to_unicode()
    words = re.findall(r"[a-z]+", _BPE_CORPUS.lower())
    vocab: Counter[tuple[str, ...]] = Counter()
    for w in words:
        syms = [byte_enc[b] for b in w.encode("utf-8")]
        syms[-1] = syms[-1] + "</w>"
        vocab[tuple(syms)] += 1

    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, freq in vocab.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = best[0] + best[1]
        new_vocab: Counter[tuple[str, ...]] = Counter()
        for word, freq in vocab.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_vocab[tuple(out)] += freq
        vocab = new_vocab
    if len(merges) < num_merges:  # pragma: no cover - corpus is large enough
        raise RuntimeError(f"corpus only supports {len(merges)} merges, wanted {num_merges}")
    return tuple(merges)


def _tiny_vocab_and_merges(num_merges: int = TINY_NUM_MERGES) -> tuple[dict[str, int], list[str]]:
    """CLIP-ordered vocabulary: 256 bytes, 256 bytes + ``</w>``, merges, bos, eos."""
    byte_syms = list(bytes_to_unicode().values())
    tokens = byte_syms + [s + "</w>" for s in byte_syms]
    merges = _learn_merges(num_merges)
    seen = set(tokens)
    for a, b in merges:
        t = a + b
        if t not in seen:
            tokens.append(t)
            seen.add(t)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}
    return vocab, [f"{a} {b}" for a, b in merges]


def _write_vocab_and_merges(folder: Path, overwrite: bool = True) -> None:
    vocab, merges = _tiny_vocab_and_merges()
    if overwrite or not (folder / "vocab.json").exists():
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    if overwrite or not (folder / "merges.txt").exists():
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def write_clip_tokenizer_files(path: str | os.PathLike, pad_token: str = EOS_TOKEN) -> Path:
    """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and
    ``special_tokens_map.json`` of the tiny CLIP tokenizer into ``path`` (created)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_vocab_and_merges(path)
    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return path


def build_clip_tokenizer(
    path: str | os.PathLike | None = None, *, pad_token: str = EOS_TOKEN
) -> "CLIPTokenizer":
    """Build an offline byte-level CLIP BPE tokenizer (``transformers.CLIPTokenizer``).

    Vocabulary (914 ids, CLIP's ordering): ids 0-255 are the 256 byte-level unicode
    symbols (GPT-2 ``bytes_to_unicode``), 256-511 the same with the ``</w>`` suffix,
    512-911 the 400 BPE merges learned on a small English prompt corpus (so "dog",
    "photo", "painting" ... are single tokens), 912 ``<|startoftext|>`` (bos) and 913
    ``<|endoftext|>`` (eos, unk and -- by default -- pad).  ``model_max_length`` is 77.
    All ids are < 1000, the tiny text encoders' ``vocab_size``.

    The files are written to ``path`` (kept) or to a temporary folder (deleted after
    loading) and read back with ``CLIPTokenizer.from_pretrained(folder)``, which works
    offline in transformers 4 and 5.  ``pad_token="!"`` mimics SDXL's second tokenizer
    (pad id 0).
    """
    from transformers import CLIPTokenizer

    if path is not None:
        folder = write_clip_tokenizer_files(path, pad_token=pad_token)
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    with tempfile.TemporaryDirectory(prefix="lycoris_lite_tok_") as tmp:
        folder = write_clip_tokenizer_files(tmp, pad_token=pad_token)
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


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

    with _seeded(seed):
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

    vocab, _ = _tiny_vocab_and_merges()
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
    with _seeded(seed):
        model = cls(config)
    return model.eval()


def build_tiny_vae(seed: int = 0, *, scaling_factor: float = 0.18215, sample_size: int = 64) -> "AutoencoderKL":
    """Tiny ``AutoencoderKL``: 4 levels (8, 8, 16, 16 channels) -> spatial factor 8, 4 latent
    channels, ``norm_num_groups=4``, one resnet per level.  Image (B, 3, 64, 64) <-> latent
    (B, 4, 8, 8).  Weights fixed by ``seed``, eval mode."""
    from diffusers import AutoencoderKL

    with _seeded(seed):
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


def save_pipeline(pipe, path: str | os.PathLike, tokenizer_dirs: tuple[str, ...]) -> None:
    """``save_pretrained`` plus the slow-tokenizer files.

    transformers 5 saves a ``CLIPTokenizer`` as ``tokenizer.json`` only; transformers 4's
    (slow) ``CLIPTokenizer`` -- what diffusers instantiates from ``model_index.json`` --
    needs ``vocab.json`` / ``merges.txt``, so they are written too (when missing).
    """
    pipe.save_pretrained(os.fspath(path), safe_serialization=True)
    for sub in tokenizer_dirs:
        _write_vocab_and_merges(Path(path) / sub, overwrite=False)


def _sd_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


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

    with _seeded(seed):
        unet = UNet2DConditionModel(**tiny_sdxl_unet_config(**config_overrides))
    return unet.eval()


def _sdxl_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )


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


# --------------------------------------------------------------------------------------
# Full-size SD 1.5 shapes (random weights)
# --------------------------------------------------------------------------------------

SD15_UNET_NUM_PARAMS = 859_520_964
SD15_TEXT_ENCODER_NUM_PARAMS = 123_060_480


def sd15_unet_config() -> dict[str, Any]:
    """The exact ``unet/config.json`` of Stable Diffusion 1.5 (859,520,964 parameters)."""
    return {
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": [
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": [
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ],
    }


_POOL_SIZE = 1 << 24


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating parameters/buffers to ``dtype`` via ``nn.Module._apply`` (bypasses
    diffusers' ``ModelMixin.to`` dtype warning about ``_keep_in_fp32_modules``)."""
    if dtype == torch.float32:
        return module
    return module._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)


@torch.no_grad()
def _fast_seeded_init(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter of a freshly materialised module deterministically and fast.

    Norm layers get weight 1 / bias 0.  Every other parameter gets N(0, 1) values scaled
    to the variance of PyTorch's default init (``std = 1 / sqrt(3 * fan_in)``).  To avoid
    drawing ~10^9 random numbers (~12 s on 2 cores) the values are sliced, at a random
    seeded offset per tensor, from one seeded pool of 2**24 N(0, 1) samples: tensors are
    not independent of each other, but each looks random and the result is a pure
    function of ``seed`` on any device / dtype.
    """
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(_POOL_SIZE, generator=gen)
    pool2 = torch.cat([pool, pool])
    pools: dict[torch.device, torch.Tensor] = {}
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d)

    def fill(t: torch.Tensor, fan_in: int) -> None:
        n = t.numel()
        src = pools.get(t.device)
        if src is None:
            src = pools[t.device] = pool2.to(t.device)
        off = int(torch.randint(_POOL_SIZE, (1,), generator=gen))
        if n <= _POOL_SIZE:
            vals = src[off : off + n]
        else:  # tile (never hit by SD-sized tensors)
            reps = -(-n // _POOL_SIZE)
            vals = src[:_POOL_SIZE].repeat(reps)[:n]
        torch.mul(vals.view(t.shape), (3.0 * max(fan_in, 1)) ** -0.5, out=t)

    for mod in module.modules():
        own = dict(mod.named_parameters(recurse=False))
        if not own:
            continue
        if isinstance(mod, norm_types):
            if "weight" in own:
                own.pop("weight").fill_(1.0)
            if "bias" in own:
                own.pop("bias").zero_()
        weight = own.get("weight")
        fan_in = weight[0].numel() if weight is not None and weight.dim() > 1 else None
        for name, p in own.items():
            fi = fan_in if fan_in is not None else (p[0].numel() if p.dim() > 1 else p.numel())
            fill(p, fi)


def build_sd15_unet(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    fast_init: bool = True,
) -> "UNet2DConditionModel":
    """Full-size SD-1.5-shaped ``UNet2DConditionModel`` with random weights, eval mode.

    Exactly :func:`sd15_unet_config` (859,520,964 parameters; latents (B, 4, 64, 64),
    ``encoder_hidden_states`` (B, 77, 768)).  With ``fast_init`` (default) the model is
    built on the meta device, materialised directly on ``device`` in ``dtype`` and filled
    by a seeded pool-based init (a few seconds on 2 CPU cores instead of ~14 s; see
    ``_fast_seeded_init``).  ``fast_init=False`` uses diffusers' regular init under
    ``torch.manual_seed(seed)``.  Deterministic for a given seed either way.
    """
    from diffusers import UNet2DConditionModel

    if not fast_init:
        with _seeded(seed):
            unet = UNet2DConditionModel(**sd15_unet_config())
        return _cast(unet, dtype).to(device).eval()

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd15_unet_config())
    unet = _cast(unet, dtype).to_empty(device=device)
    if any(True for _ in unet.buffers()):  # pragma: no cover - SD 1.5 UNet has no buffers
        raise RuntimeError("unexpected buffers in UNet2DConditionModel; use fast_init=False")
    _fast_seeded_init(unet, seed)
    return unet.eval()


def sd15_text_encoder_config():
    """``transformers.CLIPTextConfig`` of SD 1.5's text encoder (CLIP ViT-L/14 text tower).

    hidden 768, 12 layers, intermediate 3072, 12 heads, vocab 49408, 77 positions,
    quick_gelu, projection_dim 768; 123,060,480 parameters.  bos/eos/pad ids are those of
    SD 1.5's ``text_encoder/config.json`` (0 / 2 / 1; ``eos_token_id == 2`` makes CLIP
    pool at the argmax id, i.e. the real CLIP tokenizer's ``<|endoftext|>`` = 49407).
    """
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        projection_dim=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        initializer_range=0.02,
        initializer_factor=1.0,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def build_sd15_text_encoder(
    seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> "CLIPTextModel":
    """Full-size SD 1.5 ``CLIPTextModel`` (see :func:`sd15_text_encoder_config`) with random
    weights fixed by ``seed``, eval mode.  Input ids (B, 77) -> (B, 77, 768)."""
    from transformers import CLIPTextModel

    with _seeded(seed):
        model = CLIPTextModel(sd15_text_encoder_config())
    return model.to(device=device, dtype=dtype).eval()


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def _looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID_RE.match(name)) and ".." not in name and not name.endswith((".", "-"))


def load_pipeline(name_or_path: str | os.PathLike, **kwargs: Any):
    """Load a diffusion pipeline by name.

    * ``"tiny-sd"`` -> :func:`build_tiny_sd_pipeline`, ``"tiny-sdxl"`` ->
      :func:`build_tiny_sdxl_pipeline` (kwargs: ``seed``, ``path``; ``torch_dtype`` /
      ``dtype`` and ``device`` are applied with ``pipe.to``).
    * an existing local folder or a hub id (``owner/name``) ->
      ``diffusers.DiffusionPipeline.from_pretrained(name_or_path, **kwargs)``.
    * anything else (a missing local path) -> ``FileNotFoundError``.
    """
    name = os.fspath(name_or_path)
    tiny = {TINY_SD_NAME: build_tiny_sd_pipeline, TINY_SDXL_NAME: build_tiny_sdxl_pipeline}
    if name in tiny:
        dtype = kwargs.pop("torch_dtype", None) or kwargs.pop("dtype", None)
        device = kwargs.pop("device", None)
        build_kwargs = {k: kwargs.pop(k) for k in ("seed", "path") if k in kwargs}
        if kwargs:
            raise TypeError(f"unexpected arguments for {name!r}: {sorted(kwargs)}")
        pipe = tiny[name](**build_kwargs)
        if dtype is not None or device is not None:
            pipe = pipe.to(device=device, dtype=dtype)
        return pipe

    if not os.path.exists(name) and not _looks_like_hub_id(name):
        raise FileNotFoundError(
            f"pipeline {name!r} not found: it is not a local folder, not a hub id of the form "
            f"'owner/name', and not one of the built-in tiny pipelines "
            f"({TINY_SD_NAME!r}, {TINY_SDXL_NAME!r})"
        )
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(name, **kwargs)
