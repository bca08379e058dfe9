"""Loading a pipeline by name: the built-in tiny ones, a local folder or a hub id."""

from __future__ import annotations

import os
import re
from typing import Any, Callable

from .tiny import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline
from .tiny_dit import (build_tiny_flux2_pipeline, build_tiny_flux_kontext_pipeline, build_tiny_flux_pipeline,
                       build_tiny_qwen_image_pipeline, build_tiny_sd3_pipeline, build_tiny_wan22_pipeline,
                       build_tiny_wan_pipeline, build_tiny_z_image_pipeline)
from .world_flux import load_tiny_world_flux_pipeline
from .world_model import load_tiny_world_pipeline

TINY_WORLD_NAME = "tiny-world"
TINY_WORLD_FLUX_NAME = "tiny-world-flux"
TINY_SD_NAME = "tiny-sd"
TINY_SDXL_NAME = "tiny-sdxl"
TINY_FLUX_NAME = "tiny-flux"
TINY_FLUX_KONTEXT_NAME = "tiny-flux-kontext"
TINY_FLUX2_NAME = "tiny-flux2"
TINY_SD3_NAME = "tiny-sd3"
TINY_QWEN_IMAGE_NAME = "tiny-qwen-image"
TINY_Z_IMAGE_NAME = "tiny-z-image"
TINY_WAN_NAME = "tiny-wan"
TINY_WAN22_NAME = "tiny-wan22"

#: every built-in tiny pipeline: name -> builder (each takes ``path``; the random-weight ones ``seed`` too)
TINY_PIPELINES: dict[str, Callable[..., Any]] = {
    TINY_WORLD_NAME: load_tiny_world_pipeline,
    TINY_WORLD_FLUX_NAME: load_tiny_world_flux_pipeline,
    TINY_SD_NAME: build_tiny_sd_pipeline,
    TINY_SDXL_NAME: build_tiny_sdxl_pipeline,
    TINY_FLUX_NAME: build_tiny_flux_pipeline,
    TINY_FLUX_KONTEXT_NAME: build_tiny_flux_kontext_pipeline,
    TINY_FLUX2_NAME: build_tiny_flux2_pipeline,
    TINY_SD3_NAME: build_tiny_sd3_pipeline,
    TINY_QWEN_IMAGE_NAME: build_tiny_qwen_image_pipeline,
    TINY_Z_IMAGE_NAME: build_tiny_z_image_pipeline,
    TINY_WAN_NAME: build_tiny_wan_pipeline,
    TINY_WAN22_NAME: build_tiny_wan22_pipeline,
}

#: the built-in pipelines with committed (pretrained) weights: no ``seed``
PRETRAINED = (TINY_WORLD_NAME, TINY_WORLD_FLUX_NAME)

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def _looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID_RE.match(name)) and ".." not in name and not name.endswith((".", "-"))


def load_pipeline(name_or_path: str | os.PathLike, **kwargs: Any):
    """Load a diffusion pipeline by name.

    * a name of :data:`TINY_PIPELINES` -> its builder: ``"tiny-world"`` and ``"tiny-world-flux"`` are the
      embedded *pretrained* pipelines (:mod:`.world_model`, :mod:`.world_flux`: they draw what their prompt
      says; kwarg ``path``); ``"tiny-sd"``,
      ``"tiny-sdxl"``, ``"tiny-flux"``, ``"tiny-flux-kontext"``, ``"tiny-flux2"``, ``"tiny-sd3"``,
      ``"tiny-qwen-image"``, ``"tiny-z-image"``, ``"tiny-wan"``, ``"tiny-wan22"`` have random weights
      (kwargs ``seed``, ``path``). ``torch_dtype`` / ``dtype`` and ``device`` are applied with ``pipe.to``.
    * an existing local folder or a hub id (``owner/name``) ->
      ``diffusers.DiffusionPipeline.from_pretrained(name_or_path, **kwargs)``.
    * anything else (a missing local path) -> ``FileNotFoundError``.
    """
    name = os.fspath(name_or_path)
    if name in TINY_PIPELINES:
        dtype = kwargs.pop("torch_dtype", None) or kwargs.pop("dtype", None)
        device = kwargs.pop("device", None)
        build_kwargs = {k: kwargs.pop(k) for k in (("path",) if name in PRETRAINED else ("seed", "path"))
                        if k in kwargs}
        if kwargs:
            raise TypeError(f"unexpected arguments for {name!r}: {sorted(kwargs)}")
        pipe = TINY_PIPELINES[name](**build_kwargs)
        if dtype is not None or device is not None:
            pipe = pipe.to(device=device, dtype=dtype)
        return pipe

    if not os.path.exists(name) and not _looks_like_hub_id(name):
        raise FileNotFoundError(
            f"pipeline {name!r} not found: it is not a local folder, not a hub id of the form "
            f"'owner/name', and not one of the built-in tiny pipelines "
            f"({', '.join(map(repr, TINY_PIPELINES))})"
        )
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(name, **kwargs)
