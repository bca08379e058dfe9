"""Training checkpoints: ``output_dir/checkpoint-<step>/``, written whole or not at all.

A checkpoint folder holds

* ``adapter_state.safetensors``: every trainable tensor, float32, as ``<component>.<layer>.<key>``;
* ``optimizer.pt`` (the optimizer's state dict; a sharded run's whole, keyed by parameter name:
  :mod:`.sharding`), ``scheduler.pt`` (and ``scaler.pt`` with fp16 loss scaling);
* ``state.json``: the step, the seed and the adapter configs;
* whatever ``extra(folder)`` writes (the trainer puts the adapter file there, ready to use).

It is written to a hidden temporary folder next to it and renamed into place
(:func:`lycoris_lite.io.formats.safe_io.atomic_write_folder`), so a run killed at any moment leaves either
the complete checkpoint or none (plus a hidden temporary, removed by :func:`remove_temporaries` on the next
start). No RNG state is stored: every random draw of a run is a
function of ``(seed, sample position)`` or ``(seed, step)``, so the step and the seed resume it exactly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ...io.formats.safe_io import atomic_write, atomic_write_folder, read_state_dict, write_state_dict

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_TEMP_PREFIX = ".tmp-"
STATE_FILE = "state.json"
ADAPTER_STATE = "adapter_state.safetensors"


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict
    adapter_state: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    scaler: dict | None


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = CHECKPOINT.match(entry.name)
        if match and entry.is_dir() and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest(output_dir: str | Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1][1] if found else None


def remove_temporaries(output_dir: str | Path) -> None:
    """Delete hidden temporaries a killed run left in ``output_dir`` (never a complete file)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return
    for entry in sorted(folder.rglob(".*"), key=lambda p: len(p.parts)):
        if not entry.exists():  # inside a folder removed above
            continue
        if entry.is_dir() and (entry.name.startswith(_TEMP_PREFIX) or entry.name.endswith(".tmp")):
            shutil.rmtree(entry, ignore_errors=True)  # ours, and the temporary folders of safe_io's atomic writes
        elif entry.is_file() and entry.name.endswith(".tmp"):
            entry.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    """Rename to a temporary name first, so a half-deleted folder never carries a checkpoint's name."""
    doomed = path.with_name(f"{_TEMP_PREFIX}removed-{path.name}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _torch_save(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save(output_dir: str | Path, step: int, *, adapter_state: dict[str, torch.Tensor], optimizer_state: dict,
         scheduler, scaler=None, state: dict | None = None, extra: Callable[[Path], None] | None = None,
         total_limit: int | None = None) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically, then keep only the newest ``total_limit``."""
    output_dir = Path(output_dir)

    def write(folder: Path) -> None:
        write_state_dict(folder / ADAPTER_STATE, {k: v.detach().float() for k, v in adapter_state.items()})
        _torch_save(folder / "optimizer.pt", optimizer_state)
        _torch_save(folder / "scheduler.pt", scheduler.state_dict())
        if scaler is not None:
            _torch_save(folder / "scaler.pt", scaler.state_dict())
        if extra is not None:
            extra(folder)
        body = json.dumps({"step": step, **(state or {})}, indent=2, default=str)
        atomic_write(folder / STATE_FILE, lambda t: Path(t).write_text(body, encoding="utf-8"))

    final = atomic_write_folder(output_dir / f"checkpoint-{step}", write, replaceable=lambda _: True)
    if total_limit is not None:
        for _, path in checkpoints(output_dir)[:-total_limit]:
            _remove(path)
    return final


def load(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint folder (no {STATE_FILE})")
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    tensors, _ = read_state_dict(path / ADAPTER_STATE)

    def read(name):
        file = path / name
        return torch.load(file, map_location="cpu", weights_only=True) if file.is_file() else None

    return Checkpoint(path, int(state["step"]), state, tensors, read("optimizer.pt"), read("scheduler.pt"),
                      read("scaler.pt"))


def find(spec: str, output_dir: str | Path) -> Checkpoint | None:
    """The checkpoint ``--resume_from_checkpoint`` names: ``"latest"`` (``None`` when ``output_dir`` has
    none), a folder, or a folder name inside ``output_dir``; ``FileNotFoundError`` for anything else."""
    if spec == "latest":
        path = latest(output_dir)
        return load(path) if path else None
    path = Path(spec)
    if not path.is_dir() and (Path(output_dir) / spec).is_dir():
        path = Path(output_dir) / spec
    return load(path)
