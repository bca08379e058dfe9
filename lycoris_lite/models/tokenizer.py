"""The offline byte-level CLIP tokenizer of the tiny models, and saving a pipeline that uses it.

The BPE merges are learned from a small prompt corpus at first use (a few milliseconds), so nothing is
downloaded; ``transformers`` is imported only when a tokenizer is built.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

#: Number of learned BPE merges of the tiny tokenizer: 512 byte symbols + merges + 2
#: special tokens = 914 ids, below the tiny text encoders' ``vocab_size`` of 1000.
TINY_NUM_MERGES = 400
MODEL_MAX_LENGTH = 77

# Small English corpus (prompt-style) the tiny BPE merges are learned from (deterministically,
# at first use, in a few milliseconds; cached).
PROMPT_CORPUS = """
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


def learn_bpe_merges(words: Counter[tuple[str, ...]], num_merges: int) -> tuple[tuple[str, str], ...]:
    """Learn ``num_merges`` BPE merges from ``words`` (symbol tuple -> count).

    Each round merges the most frequent adjacent pair everywhere; ties are broken
    lexicographically, so the result is a pure function of ``words``.  Raises
    ``RuntimeError`` if the words run out of pairs first.
    """
    merges: list[tuple[str, str]] = []
    vocab = Counter(words)
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
    if len(merges) < num_merges:
        raise RuntimeError(f"the corpus only supports {len(merges)} merges, wanted {num_merges}")
    return tuple(merges)


@functools.lru_cache(maxsize=None)
def _learn_merges(num_merges: int = TINY_NUM_MERGES) -> tuple[tuple[str, str], ...]:
    """CLIP-style merges (``</w>`` marks the end of a word) learned on the prompt corpus."""
    byte_enc = bytes_to_unicode()
    words: Counter[tuple[str, ...]] = Counter()
    for w in re.findall(r"[a-z]+", PROMPT_CORPUS.lower()):
        syms = [byte_enc[b] for b in w.encode("utf-8")]
        syms[-1] = syms[-1] + "</w>"
        words[tuple(syms)] += 1
    return learn_bpe_merges(words, num_merges)


def vocab_and_merges(num_merges: int = TINY_NUM_MERGES) -> tuple[dict[str, int], list[str]]:
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


def write_vocab_and_merges(folder: Path, overwrite: bool = True) -> None:
    vocab, merges = vocab_and_merges()
    if overwrite or not (folder / "vocab.json").exists():
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    if overwrite or not (folder / "merges.txt").exists():
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def write_clip_tokenizer_files(path: str | os.PathLike, pad_token: str = EOS_TOKEN) -> Path:
    """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and
    ``special_tokens_map.json`` of the tiny CLIP tokenizer into ``path`` (created)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_vocab_and_merges(path)
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


def is_tiny_clip_tokenizer(tokenizer) -> bool:
    """Whether ``tokenizer`` is a ``CLIPTokenizer`` with the vocabulary of :func:`build_clip_tokenizer`."""
    from transformers import CLIPTokenizer

    return isinstance(tokenizer, CLIPTokenizer) and tokenizer.get_vocab() == vocab_and_merges()[0]


def save_pipeline(pipe, path: str | os.PathLike, tokenizer_dirs: tuple[str, ...] | None = None) -> None:
    """``save_pretrained`` plus the slow-tokenizer files of our tiny CLIP tokenizers.

    transformers 5 saves a ``CLIPTokenizer`` as ``tokenizer.json`` only; transformers 4's
    (slow) ``CLIPTokenizer`` -- what diffusers instantiates from ``model_index.json`` --
    needs ``vocab.json`` / ``merges.txt``, so they are written too (when missing) for each
    component of ``tokenizer_dirs`` (default: every ``tokenizer*`` component) that
    :func:`is_tiny_clip_tokenizer`. Other tokenizers (T5, Qwen, Mistral, a real CLIP) are
    saved by ``save_pretrained`` alone.
    """
    pipe.save_pretrained(os.fspath(path), safe_serialization=True)
    if tokenizer_dirs is None:
        tokenizer_dirs = tuple(name for name in pipe.components if name.startswith("tokenizer"))
    for sub in tokenizer_dirs:
        if is_tiny_clip_tokenizer(getattr(pipe, sub, None)):
            write_vocab_and_merges(Path(path) / sub, overwrite=False)
