"""A session's adapter stack and AUTOMATIC1111's text forms of it.

* :class:`StackEntry` / :func:`parse_prompt`: a session's stack (adapter, weight, optional separate UNet
  and text-encoder weights, optional block weights, on/off) and AUTOMATIC1111's ``<lora:name:w>`` /
  ``<lora:name:te:unet>`` (also ``<lyco:…>``, ``te=``/``unet=``, and ``blocks=`` for block weights) prompt
  tags, which add to the stack and are stripped from the text that is encoded.
* :func:`parse_block_weights`: block weights as text (``down=0.5; mid=1; up=1,0,1,1``, or a transformer's
  ``transformer_blocks=1; single_transformer_blocks=0``): multipliers of the denoiser's weight per block
  group, a number for the whole group or one per block.
* :func:`format_parameters` / :func:`parse_parameters`: AUTOMATIC1111's "parameters" text (the PNG
  ``parameters`` chunk): the prompt line with the applied stack as ``<lora:…>`` tags, ``Negative prompt:``,
  then ``Steps: …, Sampler: …, CFG scale: …, Seed: …, Size: WxH, Model: …, Lora hashes: "name: hash"``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ... import __version__
from .values import finite, number


@dataclass
class StackEntry:
    """One adapter of a session's stack. ``unet`` / ``text_encoder`` override ``weight`` for that part.

    The weights become floats when the entry is built (``ValueError`` naming the weight for one that is no
    number); whether they are finite is checked when the stack is applied."""

    name: str
    weight: float = 1.0
    unet: float | None = None
    text_encoder: float | None = None
    enabled: bool = True
    blocks: dict | None = None     # block group -> multiplier (or one per block) of the denoiser's weight

    def __post_init__(self):
        self.weight = number(self.weight, f"the weight of {self.name}")
        if isinstance(self.blocks, str):
            self.blocks = parse_block_weights(self.blocks, f"the block weights of {self.name}")
        if self.unet is not None:
            self.unet = number(self.unet, f"the UNet weight of {self.name}")
        if self.text_encoder is not None:
            self.text_encoder = number(self.text_encoder, f"the text-encoder weight of {self.name}")
        self.enabled = bool(self.enabled)

    @property
    def unet_weight(self) -> float:
        return self.weight if self.unet is None else self.unet

    @property
    def text_encoder_weight(self) -> float:
        return self.weight if self.text_encoder is None else self.text_encoder

    def pipeline_weight(self, denoiser: str = "unet", groups=()):
        """The weight for ``pipe.set_adapters``: one number, or one per component, the ``denoiser``
        (``"unet"`` or ``"transformer"``) block-wise when the entry has block weights: each of ``groups``
        (the denoiser's block groups) gets its multiplier (1 when not named) times the UNet weight."""
        if self.unet is None and self.text_encoder is None and not self.blocks:
            return float(self.weight)
        te = float(self.text_encoder_weight)
        denoised = float(self.unet_weight)
        if self.blocks:
            unknown = sorted(set(self.blocks) - set(groups))
            if unknown:
                raise ValueError(f"the block weights of {self.name} name {', '.join(unknown)}; this model's block "
                                 f"groups are {', '.join(groups)}")
            scaled = lambda v: [x * denoised for x in v] if isinstance(v, list) else v * denoised  # noqa: E731
            denoised = {g: scaled(self.blocks.get(g, 1.0)) for g in groups}
        return {denoiser: denoised, "text_encoder": te, "text_encoder_2": te, "text_encoder_3": te}

    def is_zero(self) -> bool:
        return self.unet_weight == 0 and self.text_encoder_weight == 0

    def tag(self) -> str:
        """The AUTOMATIC1111 tag: ``<lora:name:w>``, or ``<lora:name:te:unet>`` with separate weights."""
        blocks = f":blocks={format_block_weights(self.blocks)}" if self.blocks else ""
        if self.unet is None and self.text_encoder is None:
            return f"<lora:{self.name}:{_num(self.weight)}{blocks}>"
        return f"<lora:{self.name}:{_num(self.text_encoder_weight)}:{_num(self.unet_weight)}{blocks}>"


_GROUP = re.compile(r"[A-Za-z_]\w*")


def parse_block_weights(text: str, what: str = "block weights") -> dict | None:
    """``"down=0.5; mid=1; up=1,0,1,1"`` as ``{"down": 0.5, "mid": 1.0, "up": [1.0, 0.0, 1.0, 1.0]}``
    (``None`` for blank text); ``ValueError`` naming ``what`` for anything else. Whether the groups exist
    is the model's to say (:meth:`StackEntry.pipeline_weight`)."""
    blocks = {}
    for part in (text or "").split(";"):
        if not part.strip():
            continue
        group, eq, values = (p.strip() for p in part.partition("="))
        if not eq or not _GROUP.fullmatch(group) or not values:
            raise ValueError(f"{what}: {part.strip()!r} is not group=value (e.g. down=0.5; up=1,0,1)")
        if group in blocks:
            raise ValueError(f"{what}: {group} is given twice")
        numbers = [finite(v, f"a {group} weight in {what}") for v in values.split(",")]
        blocks[group] = numbers if len(numbers) > 1 else numbers[0]
    return blocks or None


def format_block_weights(blocks: dict) -> str:
    """The text :func:`parse_block_weights` reads back."""
    return ";".join(f"{g}={','.join(map(_num, v)) if isinstance(v, list) else _num(v)}" for g, v in blocks.items())


def _num(x: float) -> str:
    """The shortest text that reads back as the same float (``1`` for 1.0)."""
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


_TAG = re.compile(r"<(lora|lyco):([^<>]*)>", re.IGNORECASE)


def parse_prompt(prompt: str) -> tuple[str, list[StackEntry]]:
    """``(prompt without tags, entries)`` for AUTOMATIC1111's extra-network tags.

    ``<lora:NAME>`` (weight 1), ``<lora:NAME:W>``, ``<lora:NAME:TE:UNET>`` and the named forms
    ``te=``/``unet=`` (``<lyco:…>`` is the same). Raises ``ValueError`` for a malformed tag.
    """
    entries = []
    for match in _TAG.finditer(prompt or ""):
        name, *args = [part.strip() for part in match.group(2).split(":")]
        if not name:
            raise ValueError(f"{match.group(0)}: the tag names no adapter")
        positional, named = [], {}
        for arg in args:
            key, eq, value = arg.partition("=")
            if eq and key.strip() == "blocks":
                named["blocks"] = parse_block_weights(value, f"the block weights in {match.group(0)}")
            elif eq:
                if key.strip() not in ("te", "unet"):
                    raise ValueError(f"{match.group(0)}: {key.strip()}= is not supported (te=, unet= and blocks= are)")
                named[key.strip()] = finite(value, f"{key.strip()} in {match.group(0)}")
            else:
                positional.append(finite(arg, f"a weight in {match.group(0)}"))
        if len(positional) > 2:
            raise ValueError(f"{match.group(0)}: at most two weights (text encoder, UNet); "
                             "dynamic rank (a third one) is not supported")
        te = named.get("te", positional[0] if positional else 1.0)
        unet = named.get("unet", positional[1] if len(positional) > 1 else te)
        entries.append(StackEntry(name, te, unet=None if unet == te else unet, blocks=named.get("blocks")))
    cleaned = re.sub(r"[ \t]{2,}", " ", _TAG.sub("", prompt or "")).strip()
    return cleaned, entries


def effective_stack(stack: list[StackEntry], tags: list[StackEntry]) -> list[StackEntry]:
    """The stack a generation applies: the session's enabled entries, then the prompt's tags (a tag for
    an adapter already in the stack replaces its weights in place); entries whose weights are all zero
    are left out. Raises when the session's stack names an adapter twice."""
    out: dict[str, StackEntry] = {}
    for entry in stack:
        if not entry.enabled:
            continue
        if entry.name in out:
            raise ValueError(f"adapter {entry.name!r} is twice in the stack")
        out[entry.name] = entry
    for entry in tags:
        out[entry.name] = entry
    return [e for e in out.values() if not e.is_zero()]



def insert_tag(prompt: str, name: str, trigger_words=(), weight: float = 1.0) -> str:
    """``prompt`` with the adapter's trigger words (those not in it yet) and its ``<lora:name:w>`` tag
    appended, as AUTOMATIC1111's extra-networks cards do; ``ValueError`` when the prompt has a tag for it."""
    if any(e.name == name for e in parse_prompt(prompt)[1]):
        raise ValueError(f"the prompt has a tag for {name} already")
    text = (prompt or "").rstrip()
    words = [w for w in trigger_words if w.lower() not in text.lower()]
    addition = ", ".join(words)
    tag = StackEntry(name, weight).tag()
    return " ".join(part for part in (text + ("," if text and addition else ""), addition, tag) if part)


def has_tags(text: str) -> bool:
    """Whether ``text`` holds a ``<lora:…>`` / ``<lyco:…>`` tag."""
    return bool(_TAG.search(text or ""))


_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _quote(text) -> str:
    text = str(text)
    return text if not any(c in text for c in ",\n:") else json.dumps(text, ensure_ascii=False)


def format_parameters(prompt: str, negative_prompt: str, *, steps: int, sampler: str, guidance: float, seed: int,
                      width: int, height: int, model: str, stack: list[StackEntry],
                      hashes: dict[str, str] | None = None, fused: bool = False) -> str:
    """AUTOMATIC1111's infotext. The prompt line is the encoded prompt followed by the applied stack as
    ``<lora:…>`` tags (in order), so pasting it back reproduces the stack."""
    tags = " ".join(e.tag() for e in stack)
    lines = [f"{prompt} {tags}".strip() if tags else prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    fields = {"Steps": steps, "Sampler": sampler, "CFG scale": _num(guidance), "Seed": seed,
              "Size": f"{width}x{height}", "Model": model}
    known = {e.name: hashes[e.name] for e in stack if hashes and hashes.get(e.name)}
    if known:
        fields["Lora hashes"] = ", ".join(f"{n}: {h}" for n, h in known.items())
    if fused:
        fields["Lora fused"] = "True"
    fields["Version"] = f"lycoris-lite {__version__}"
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items()))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict[str, str]:
    """The fields of an infotext (AUTOMATIC1111's reader): ``Prompt``, ``Negative prompt`` and the
    ``key: value`` pairs of the last line (quoted values unquoted)."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        value = value.strip()
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key] = value
    return out
