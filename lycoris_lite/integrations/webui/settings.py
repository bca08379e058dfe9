"""What a session asks for and what it gets back."""

from __future__ import annotations

from dataclasses import dataclass, field

from .tags import StackEntry
from .values import finite, number, whole

MAX_SEED = 2**32 - 1
#: AUTOMATIC1111's sampler names -> diffusers scheduler classes
SCHEDULERS = {
    "DDIM": "DDIMScheduler",
    "Euler": "EulerDiscreteScheduler",
    "Euler a": "EulerAncestralDiscreteScheduler",
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "UniPC": "UniPCMultistepScheduler",
    "PNDM": "PNDMScheduler",
    "Heun": "HeunDiscreteScheduler",
}
DEFAULT_SCHEDULER = "Default"


class GenerationCancelled(Exception):
    """Raised inside a generation whose session pressed Cancel."""


@dataclass
class GenerationSettings:
    """What a session asks for. When it is built, seed, steps, width, height and count become ints and
    guidance a float (``ValueError`` naming the field for a value that is no number, or no whole one);
    :meth:`check` raises ``ValueError`` on anything out of range."""

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1                     # -1: random
    steps: int = 20
    guidance: float = 7.0
    width: int = 512
    height: int = 512
    count: int = 1
    scheduler: str = DEFAULT_SCHEDULER

    def __post_init__(self):
        for name, what in (("seed", "seed"), ("steps", "steps"), ("width", "width"), ("height", "height"),
                           ("count", "the number of images")):
            setattr(self, name, whole(getattr(self, name), what))
        self.guidance = number(self.guidance, "the CFG scale")

    def check(self) -> None:
        if not (-1 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be -1 (random) or 0..{MAX_SEED}, got {self.seed}")
        if not 1 <= self.steps <= 150:
            raise ValueError(f"steps must be 1..150, got {self.steps}")
        if not 1 <= self.count <= 8:
            raise ValueError(f"the number of images must be 1..8, got {self.count}")
        if not 0 <= finite(self.guidance, "the CFG scale") <= 30:
            raise ValueError(f"the CFG scale must be 0..30, got {self.guidance}")
        for what, value in (("width", self.width), ("height", self.height)):
            if not 8 <= value <= 2048 or value % 8:
                raise ValueError(f"{what} must be a multiple of 8 in 8..2048, got {value}")
        if self.scheduler != DEFAULT_SCHEDULER and self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown sampler {self.scheduler!r}; one of {', '.join(SCHEDULERS)}")


@dataclass
class GenerationResult:
    images: list                      # PIL images, each with .info["parameters"]
    parameters: list[str]
    seeds: list[int]
    stack: list[StackEntry]           # what was applied, in composition order
    fused: bool
    loaded_from_disk: list[str]       # adapters read for this generation (empty when all were attached)
    switch_seconds: float
    notes: list[str] = field(default_factory=list)

