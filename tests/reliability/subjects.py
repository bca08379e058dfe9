"""What the reliability runs act on: the tiny pipelines, adapters made on them (and what must not change
when a load fails), the trainer's and the web UI's scripts."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

import lycoris_lite
from lycoris_lite import PRESETS, controller_for
from lycoris_lite.base.registry import get_algorithm
from lycoris_lite.integrations.training.options import to_argv
from lycoris_lite.io.files import save_adapter
from lycoris_lite.models import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline, tiny_unet_config

ROOT = Path(__file__).resolve().parents[2]
LIB_DIR = str(Path(lycoris_lite.__file__).resolve().parent)
ALGOS = ("lora", "loha", "lokr", "oft", "boft", "hra")
#: settings of the corpus adapters (non-identity weights: ``init_weights=False``)
SETTINGS = {"lora": {"r": 4}, "loha": {"r": 4, "alpha": 16}, "lokr": {"r": 4}, "oft": {"block_size": 4},
            "boft": {"block_size": 4, "butterfly_factor": 2}, "hra": {"r": 4}}
#: PEFT rotates the input side only
PEFT_SETTINGS = {**SETTINGS, "oft": {"block_size": 4, "rotation_side": "input"},
                 "boft": {"block_size": 4, "butterfly_factor": 2, "rotation_side": "input"},
                 "hra": {"r": 4, "rotation_side": "input"}}
TRAINER = ROOT / "pipelines" / "train_dreambooth.py"
UI_APP = ROOT / "ui" / "app.py"
UI_SLOTS = 3  # stack rows of the UI under test


def tiny_pipe(sdxl: bool = False):
    return lycoris_lite.enable(build_tiny_sdxl_pipeline() if sdxl else build_tiny_sd_pipeline())


#: the fuzzing target: the tiny SD pipeline with a two-level UNet (40 adaptable layers instead of 230),
#: which makes a load ~3× cheaper and exercises the same code
SMALL_UNET = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(8, 16), layers_per_block=1)


def fuzz_pipe():
    from diffusers import UNet2DConditionModel

    pipe = tiny_pipe()
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(**{**tiny_unet_config(), **SMALL_UNET}).eval()
    return pipe


def components(pipe) -> list[str]:
    return [c for c in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]


def make_adapter(pipe, path, algo: str = "lora", fmt: str = "kohya", seed: int = 0, targets: str = "unet-full",
                 settings: dict | None = None, text_encoder: bool = True, dtype: torch.dtype | None = None) -> Path:
    """Save an adapter with random (non-identity) weights made on ``pipe``, which is left as it was."""
    cls = get_algorithm(algo).config_class
    settings = settings if settings is not None else (PEFT_SETTINGS if fmt == "peft" else SETTINGS)[algo]
    gen = torch.Generator().manual_seed(seed)
    parts = [c for c in components(pipe) if c == "unet" or text_encoder]
    try:
        for c in parts:
            config = cls(**settings, target_modules=PRESETS[targets if c == "unet" else "text-encoder"],
                         init_weights=False)
            controller_for(getattr(pipe, c)).add_adapter("tmp", config, generator=gen)
        return save_adapter({c: getattr(pipe, c) for c in parts}, "tmp", path, format=fmt, dtype=dtype)
    finally:
        for c in parts:
            ctrl = controller_for(getattr(pipe, c), create=False)
            if ctrl is not None:
                ctrl.unload()


def model_state(pipe) -> dict:
    """What must not change when a load fails: every tensor (by value), every module's type, the
    pipeline's adapter bookkeeping."""
    return {
        "tensors": {c: {k: v.detach().clone() for k, v in getattr(pipe, c).state_dict().items()}
                    for c in components(pipe)},
        "modules": {c: [(n, type(m).__name__) for n, m in getattr(pipe, c).named_modules()] for c in components(pipe)},
    }


def model_changes(pipe, before: dict) -> list[str]:
    """How ``pipe`` differs from ``before`` (empty: bitwise the same model)."""
    problems = []
    for c in components(pipe):
        model = getattr(pipe, c)
        modules = [(n, type(m).__name__) for n, m in model.named_modules()]
        if modules != before["modules"][c]:
            problems.append(f"{c}: module tree changed")
        state = model.state_dict()
        if state.keys() != before["tensors"][c].keys():
            problems.append(f"{c}: state-dict keys changed")
            continue
        for k, v in state.items():
            old = before["tensors"][c][k]
            if v.dtype != old.dtype or v.shape != old.shape or not torch.equal(v, old):
                problems.append(f"{c}.{k} changed")
                break
        if controller_for(model, create=False) is not None:
            problems.append(f"{c}: an adapter controller is left on the model")
    if getattr(pipe, "list_adapters", None) and pipe.list_adapters():
        problems.append(f"adapters left loaded: {list(pipe.list_adapters())}")
    return problems


def trainer_args(out: Path, **overrides) -> list[str]:
    """A short, valid DreamBooth run on the tiny model and ``samples/instance`` (options override)."""
    settings = {"pretrained_model_name_or_path": "tiny-sd", "instance_data_dir": ROOT / "samples" / "instance",
                "instance_prompt": "a photo of sks duck", "resolution": 64, "train_batch_size": 1,
                "max_train_steps": 2, "learning_rate": 1e-2, "seed": 0, "output_dir": out,
                "checkpointing_steps": 1000, **overrides}
    return to_argv(settings)


def child_env(**extra: str) -> dict:
    """The environment of a script run as a child process: one thread, this checkout importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def load_script(path: Path, module_name: str):
    """A script (``ui/app.py``, the trainer) imported as a module under ``module_name``."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script
