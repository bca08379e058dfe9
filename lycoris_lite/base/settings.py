"""Per-layer settings: what an algorithm's ``resolve`` (and its file readers) give for one layer.

Each algorithm declares a frozen dataclass (``Algorithm.settings_class``) next to its config, built on
:class:`Settings`. Its fields are typed and immutable (shapes are tuples), so a settings value is
hashable, may be shared by layers and adapters, and a change is a new value (``dataclasses.replace``);
``dataclasses.asdict`` gives it as a plain dict. Fields are keyword-only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The base of every algorithm's per-layer settings. All that every algorithm has is :attr:`rank`."""

    @property
    def rank(self) -> int | None:
        """The adapter's rank on the layer (the LoRA family's ``r``, HRA's number of reflections);
        ``None`` where it has none (block rotations)."""
        return None


@dataclass(frozen=True, kw_only=True)
class ScaledSettings(Settings):
    """Settings of an additive algorithm scaled by ``alpha / r`` (the LoRA family). Its ``ΔW`` is linear in
    :attr:`scale`, which :meth:`~lycoris_lite.base.registry.Algorithm.forward_gain` relies on.

    * ``r``: the rank (of the low-rank factors).
    * ``alpha``: the alpha a file or config gives (kohya's ``alpha`` tensor, PEFT's ``lora_alpha``).
    * ``scale``: the factor in ``ΔW`` (dimensionless): ``alpha / r``, or ``alpha / √r`` rank-stabilised
      (LoKr with both factors full: 1).
    """

    r: int
    alpha: float
    scale: float

    @property
    def rank(self) -> int:
        return self.r
