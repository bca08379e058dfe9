"""Hostile file bytes: safetensors files taken apart and put back together, and pickles (one of which
runs a command when unpickled)."""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile

import torch
from safetensors.torch import load, save


def split_safetensors(blob: bytes) -> tuple[dict, bytes]:
    """``(header, data)`` of a well-formed safetensors file (the corpus files are)."""
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + length]), blob[8 + length:]


def join_safetensors(header, data: bytes, raw_header: bytes | None = None) -> bytes:
    """A safetensors file from a header (any JSON value) or raw header bytes, padded to 8 bytes."""
    raw = raw_header if raw_header is not None else json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def load_tensors(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    header, _ = split_safetensors(blob)
    return load(blob), dict(header.get("__metadata__") or {})


def save_tensors(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    return save({k: v.detach().clone().contiguous() for k, v in state.items()}, metadata=metadata or None)


def tensor_keys(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


class RunsCode:
    """Unpickling this runs a shell command (it must never happen)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickle_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def deflated(blob: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(blob)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    return out.getvalue()
