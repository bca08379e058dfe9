"""Loading a pipeline by name: the built-in tiny ones, a local folder or a hub id."""

from __future__ import annotations

import os
import re
from typing import Any

from .tiny import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline

TINY_SD_NAME = "tiny-sd"
TINY_SDXL_NAME = "tiny-sdxl"

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
