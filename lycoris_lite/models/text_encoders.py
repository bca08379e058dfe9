"""Tiny offline tokenizers and text encoders of the transformer (DiT) pipelines.

Two tokenizer kinds, both built in code from the prompt corpus of :mod:`.tokenizer` (nothing is
downloaded):

* :func:`build_t5_tokenizer`: a ``T5Tokenizer`` (SentencePiece-style Unigram, ``▁`` word prefix,
  ``</s>`` appended) for T5 (Flux.1, SD3) and UMT5 (Wan).
* :func:`build_qwen_tokenizer` and :func:`build_mistral_tokenizer`: byte-level BPE (GPT-2 byte
  alphabet, merges learned on the corpus) with a chat template: ChatML for Qwen2.5-VL (Qwen-Image)
  and Qwen3 (Z-Image), Mistral's ``[SYSTEM_PROMPT]``/``[INST]`` format for Mistral 3 (Flux.2).

The text encoders have the real classes and module paths with tiny widths (hidden 32, 2 heads, 2
layers unless a pipeline reads deeper hidden states); weights are a pure function of ``seed``.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from typing import TYPE_CHECKING

from .tiny import seeded
from .tokenizer import PROMPT_CORPUS, bytes_to_unicode, learn_bpe_merges

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import (Mistral3ForConditionalGeneration, PreTrainedTokenizerFast,
                              Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen3Model, T5EncoderModel,
                              T5Tokenizer, UMT5EncoderModel)

#: embedding rows of the tiny T5 / Qwen / Mistral text encoders (above every tiny tokenizer's size)
TEXT_VOCAB_SIZE = 1024
TEXT_HIDDEN = 32

#: Qwen-Image encodes ``template.format(prompt)`` and drops the first 34 tokens (the template's
#: system turn and ``<|im_start|>user\n``); the corpus repeats it so that our BPE also splits it into
#: exactly 34 tokens, as Qwen's own tokenizer does.
QWEN_IMAGE_SYSTEM = ("Describe the image by detailing the color, shape, size, texture, quantity, text, "
                     "spatial relationships of the objects and background:")
_TEMPLATE_REPEATS = 64
_BYTE_LEVEL_MERGES = 600

# Qwen's pre-tokenizer (the Split regex of transformers' Qwen2Tokenizer): words keep their leading
# space, digits stand alone, punctuation runs and newlines are their own pieces.
_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                      r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


# --------------------------------------------------------------------------------------
# T5 / UMT5: Unigram
# --------------------------------------------------------------------------------------

_T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5 and UMT5
_T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"()-_/&+*#%@[]<>=~"


@functools.lru_cache(maxsize=None)
def t5_vocab() -> tuple[tuple[str, float], ...]:
    """Unigram pieces and log-probabilities: 3 specials, ``▁``, every corpus word as ``▁word``, then
    single characters (bare and ``▁``-prefixed) at a low score so any ASCII text segments."""
    import regex

    counts = Counter(regex.findall(r"\p{L}+|\p{N}+|[^\s\p{L}\p{N}]", PROMPT_CORPUS))
    total = sum(counts.values())
    pieces: list[tuple[str, float]] = [(s, 0.0) for s in _T5_SPECIALS] + [("▁", -3.0)]
    seen = {p for p, _ in pieces}
    for word, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if ("▁" + word) not in seen:
            pieces.append(("▁" + word, math.log(n / total)))
            seen.add("▁" + word)
    for ch in _T5_CHARS:
        for piece in (ch, "▁" + ch):
            if piece not in seen:
                pieces.append((piece, -20.0))
                seen.add(piece)
    return tuple(pieces)


def build_t5_tokenizer(model_max_length: int = 512) -> "T5Tokenizer":
    """Offline ``T5Tokenizer`` (Unigram over :func:`t5_vocab`, about 440 ids; pad 0, eos 1, unk 2; no
    sentinel ids). ``"a red circle"`` -> ``▁a ▁red ▁circle </s>``. Works for T5 and UMT5 encoders."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=list(t5_vocab()), extra_ids=0, model_max_length=model_max_length)


def _t5_config(config_cls, vocab_size: int, d_model: int, num_layers: int):
    return config_cls(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // 2, d_ff=2 * d_model,
                      num_layers=num_layers, num_heads=2, relative_attention_num_buckets=8,
                      relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                      is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1)


def build_tiny_t5_encoder(seed: int = 0, d_model: int = TEXT_HIDDEN, num_layers: int = 2,
                          umt5: bool = False) -> "T5EncoderModel | UMT5EncoderModel":
    """Tiny ``T5EncoderModel`` (T5 v1.1: gated-gelu, as Flux's and SD3's T5-XXL) or, with ``umt5``,
    ``UMT5EncoderModel`` (Wan); 2 heads of ``d_model // 2``, ``d_ff = 2 * d_model``, 8 relative
    position buckets. Module paths as the real ones: ``encoder.block.0.layer.0.SelfAttention.q``,
    ``encoder.block.0.layer.1.DenseReluDense.wi_0``. Ids (B, L) -> ``last_hidden_state`` (B, L, d_model)."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    with seeded(seed):
        model = model_cls(_t5_config(config_cls, TEXT_VOCAB_SIZE, d_model, num_layers))
    return model.eval()


# --------------------------------------------------------------------------------------
# Byte-level BPE: Qwen (ChatML) and Mistral
# --------------------------------------------------------------------------------------

#: Tekken's first ids (Mistral 3): Mistral3Config uses bos 1, eos 2, ``[IMG]`` 10 and pad 11.
MISTRAL_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
                    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                    "[TOOL_CONTENT]")
#: appended after the BPE ids, in Qwen's order
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>", "<think>", "</think>")

# ChatML as Qwen2.5 / Qwen3 write it; with ``enable_thinking=False`` Qwen3 opens an empty think block.
_CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n"
    "{% if message.content is string %}{{ message.content }}{% else %}"
    "{% for part in message.content %}{% if part.type == 'text' %}{{ part.text }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# Mistral Small 3.1: ``<s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]`` (text parts only).
_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message.content is string %}{% set text = message.content %}"
    "{% else %}{% set text = message.content | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('') %}{% endif %}"
    "{% if message.role == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message.role == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)


@functools.lru_cache(maxsize=None)
def byte_level_vocab_and_merges() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """GPT-2-style byte-level BPE: the 256 byte symbols, then 600 merges learned (with
    :func:`.tokenizer.learn_bpe_merges`) on the prompt corpus plus Qwen-Image's template text.
    Returns (tokens in id order, merges); special tokens are added by each tokenizer."""
    import regex

    byte_enc = bytes_to_unicode()
    template = (f"<|im_start|>system\n{QWEN_IMAGE_SYSTEM}<|im_end|>\n<|im_start|>user\n<|im_end|>\n"
                "<|im_start|>assistant\n")
    text = PROMPT_CORPUS + regex.sub(r"<\|\w+\|>", "", template) * _TEMPLATE_REPEATS
    words = Counter(tuple(byte_enc[b] for b in piece.encode("utf-8"))
                    for piece in regex.findall(_PRETOKENIZE_REGEX, text))
    merges = learn_bpe_merges(words, _BYTE_LEVEL_MERGES)
    tokens = list(byte_enc.values())
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            tokens.append(a + b)
            seen.add(a + b)
    return tuple(tokens), merges


def build_qwen_tokenizer(model_max_length: int = 32768) -> "Qwen2Tokenizer":
    """Offline ``Qwen2Tokenizer`` (Qwen2.5-VL and Qwen3 use this class): byte-level BPE of
    :func:`byte_level_vocab_and_merges` (856 ids) followed by :data:`QWEN_SPECIALS`
    (``<|endoftext|>`` = pad/eos/unk, ``<|im_start|>``, ``<|im_end|>``, vision and think tokens) and a
    ChatML chat template (``enable_thinking=False`` adds Qwen3's empty think block)."""
    from transformers import Qwen2Tokenizer

    tokens, merges = byte_level_vocab_and_merges()
    vocab = {t: i for i, t in enumerate(tokens + QWEN_SPECIALS)}
    return Qwen2Tokenizer(vocab=vocab, merges=list(merges), model_max_length=model_max_length,
                          additional_special_tokens=list(QWEN_SPECIALS[1:]), chat_template=_CHATML_TEMPLATE)


def build_mistral_tokenizer() -> "PreTrainedTokenizerFast":
    """Offline byte-level BPE tokenizer for Flux.2's Mistral 3: Tekken's first 20 special ids
    (:data:`MISTRAL_SPECIALS`; bos ``<s>`` 1, eos 2, ``[IMG]`` 10, pad 11) then the vocabulary of
    :func:`byte_level_vocab_and_merges`, with Mistral's chat template.

    The real Flux.2 ``tokenizer`` is a ``PixtralProcessor``, which transformers only builds with
    torchvision installed; the pipeline calls nothing on it but ``apply_chat_template``, which the
    tokenizer has with the same arguments, so the tiny pipeline uses the tokenizer itself."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens, merges = byte_level_vocab_and_merges()
    vocab = {t: i for i, t in enumerate(MISTRAL_SPECIALS + tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=131072,
                                   additional_special_tokens=[t for t in MISTRAL_SPECIALS[3:] if t != "<pad>"],
                                   chat_template=_MISTRAL_TEMPLATE)


# --------------------------------------------------------------------------------------
# Decoder-only language models used as text encoders
# --------------------------------------------------------------------------------------


def _decoder_text_config(hidden_size: int, num_layers: int, **extra) -> dict:
    return dict(vocab_size=TEXT_VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1,
                max_position_embeddings=4096, rms_norm_eps=1e-6, **extra)


def build_tiny_qwen25vl_text_encoder(seed: int = 0, hidden_size: int = TEXT_HIDDEN,
                                     num_layers: int = 2) -> "Qwen2_5_VLForConditionalGeneration":
    """Tiny ``Qwen2_5_VLForConditionalGeneration`` (Qwen-Image's text encoder): a 2-layer language model
    (2 query heads of ``hidden // 2``, 1 key/value head, M-RoPE sections (2, 3, 3)) and a 1-block vision
    tower, with the real paths (``model.language_model.layers.0.self_attn.q_proj``,
    ``model.visual.blocks.0.attn.qkv``, ``lm_head``). Token ids are :func:`build_qwen_tokenizer`'s."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer_ids = {t: len(byte_level_vocab_and_merges()[0]) + i for i, t in enumerate(QWEN_SPECIALS)}
    head_dim = hidden_size // 2
    # Qwen2.5-VL's M-RoPE sections (16, 24, 24) for head dim 128, scaled to the tiny head
    mrope = [head_dim // 8, 3 * head_dim // 16, head_dim // 2 - head_dim // 8 - 3 * head_dim // 16]
    text = _decoder_text_config(hidden_size, num_layers, rope_parameters={
        "rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
        bos_token_id=tokenizer_ids["<|endoftext|>"], eos_token_id=tokenizer_ids["<|im_end|>"])
    vision = dict(depth=1, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_heads=2,
                  out_hidden_size=hidden_size, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=112, fullatt_block_indexes=[0])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                              image_token_id=tokenizer_ids["<|image_pad|>"],
                              video_token_id=tokenizer_ids["<|video_pad|>"],
                              vision_start_token_id=tokenizer_ids["<|vision_start|>"],
                              vision_end_token_id=tokenizer_ids["<|vision_end|>"])
    with seeded(seed):
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model.eval()


def build_tiny_qwen3_text_encoder(seed: int = 0, hidden_size: int = TEXT_HIDDEN,
                                  num_layers: int = 2) -> "Qwen3Model":
    """Tiny ``Qwen3Model`` (Z-Image's text encoder, no LM head): 2 layers, 2 query heads of
    ``hidden // 2``, 1 key/value head, q/k RMS norms; paths ``layers.0.self_attn.q_proj``,
    ``layers.0.mlp.gate_proj``. Z-Image reads ``hidden_states[-2]``."""
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(**_decoder_text_config(hidden_size, num_layers), head_dim=hidden_size // 2,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    with seeded(seed):
        model = Qwen3Model(config)
    return model.eval()


#: Flux.2 stacks the text encoder's hidden states 10, 20 and 30, so the tiny Mistral needs 30 layers.
MISTRAL_LAYERS = 30


def build_tiny_mistral3_text_encoder(seed: int = 0, hidden_size: int = TEXT_HIDDEN,
                                     num_layers: int = MISTRAL_LAYERS) -> "Mistral3ForConditionalGeneration":
    """Tiny ``Mistral3ForConditionalGeneration`` (Flux.2's text encoder): a Mistral language model with
    30 layers (Flux.2 reads hidden states 10, 20, 30), 2 query heads, 1 key/value head, and a 1-layer
    Pixtral vision tower; paths ``model.language_model.layers.0.self_attn.q_proj``,
    ``model.vision_tower.transformer.layers.0.attention.q_proj``, ``model.multi_modal_projector.linear_1``."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    text = _decoder_text_config(hidden_size, num_layers, head_dim=hidden_size // 2, model_type="mistral",
                                bos_token_id=1, eos_token_id=2, pad_token_id=11, sliding_window=None,
                                rope_parameters={"rope_type": "default", "rope_theta": 1000000000.0})
    vision = dict(model_type="pixtral", hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=16,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=10, spatial_merge_size=2,
                            tie_word_embeddings=False)
    with seeded(seed):
        model = Mistral3ForConditionalGeneration(config)
    return model.eval()
