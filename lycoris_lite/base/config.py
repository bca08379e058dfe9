"""Adapter configurations: typed dataclasses that round-trip through JSON.

Every algorithm's config derives from :class:`AdapterConfig` (the common fields) and adds its own.
Configs are validated when built; unknown fields are an error that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar


class _PeftSpellings(type):
    """Configs take PEFT's field names as keywords too (``LoRAConfig(lora_alpha=16)``, the class's
    ``aliases``), so PEFT code ports by changing the import; giving both spellings is an error."""

    def __call__(cls, *args, **kwargs):
        for old, new in cls.aliases.items():
            if old in kwargs:
                if new in kwargs:
                    raise TypeError(f"{cls.__name__} got both {old!r} and {new!r} (the same field)")
                kwargs[new] = kwargs.pop(old)
        return super().__call__(*args, **kwargs)


@dataclass
class AdapterConfig(metaclass=_PeftSpellings):
    """Fields every algorithm understands (PEFT's names for them are accepted as keywords too).

    * ``r``: rank (LoRA/LoHa/LoKr), number of reflections (HRA), number of blocks (OFT/BOFT, 0 = derive
      from ``block_size``).
    * ``alpha``: scale numerator, ``scale = alpha / r`` (``None`` means ``alpha = r``, scale 1).
    * ``target_modules``: list of exact names or dotted suffixes (``"to_q"`` matches
      ``...attn1.to_q``), a string matched as a full regex, or ``"all-linear"``.
    * ``exclude_modules``: same forms, applied first.
    * ``layers_to_transform`` + ``layers_pattern``: keep only matches whose layer index (the number after
      ``.{pattern}.``) is listed.
    * ``rank_pattern`` / ``alpha_pattern``: ``{regex: value}``; the first key with
      ``re.match(rf"(.*\\.)?({key})$", name)`` wins.
    * ``init_weights``: ``True`` starts as the exact identity (the layer is unchanged); ``False`` gives
      random non-identity weights (for tests).
    * ``modules_to_save``: names of modules trained fully (a copy per adapter).
    """

    algo: ClassVar[str] = ""
    aliases: ClassVar[dict[str, str]] = {}

    r: int = 8
    alpha: float | None = None
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    init_weights: bool = True
    modules_to_save: list[str] | None = None

    def __post_init__(self):
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules) if isinstance(self.target_modules, set) else list(self.target_modules)
        if isinstance(self.exclude_modules, (tuple, set)):
            self.exclude_modules = list(self.exclude_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if isinstance(self.layers_pattern, str):
            self.layers_pattern = [self.layers_pattern]
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("layers_pattern needs layers_to_transform")
        if self.layers_to_transform and isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            raise ValueError("layers_to_transform works with a list of target_modules, not a regex")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 0:
            raise ValueError(f"{type(self).__name__}.r must be a non-negative integer, got {self.r!r}")
        if self.alpha is not None and not isinstance(self.alpha, (int, float)):
            raise ValueError(f"alpha must be a number or None, got {self.alpha!r}")
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"rank_pattern[{key!r}] must be a positive integer, got {value!r}")
        self.validate()

    def validate(self) -> None:
        """Algorithm-specific checks (override)."""

    # ---- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {"algo": self.algo}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = json.loads(json.dumps(value))  # plain JSON types, deep copy
        return data

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        data = dict(data)
        algo = data.pop("algo", cls.algo)
        if algo and cls.algo and algo != cls.algo:
            raise ValueError(f"config is for algorithm {algo!r}, not {cls.algo!r}")
        for old, new in cls.aliases.items():
            if old in data:
                data.setdefault(new, data.pop(old))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown field(s) for {cls.__name__}: {', '.join(unknown)}; valid fields: {', '.join(sorted(known))}"
            )
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "AdapterConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
