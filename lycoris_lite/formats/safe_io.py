"""Reading and writing adapter files safely.

User-supplied files are read as safetensors. The header is validated against the file size before any
tensor is materialised, so no file can make us allocate more than its size justifies. Pickles
(``.ckpt``, ``.pt``, ``.bin``, ``.pth``) are refused unless ``allow_pickle=True``, and then read with
``torch.load(weights_only=True)``. Writes are atomic: a temporary file in the same folder, then a rename.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import torch

PICKLE_SUFFIXES = {".ckpt", ".pt", ".bin", ".pth"}
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
MAX_HEADER = 100 * 1024 * 1024


class AdapterFileError(ValueError):
    """A file that cannot be read as an adapter (corrupt, truncated, lying header, pickle refused)."""


def check_safetensors_header(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(tensor entries, metadata)`` of a safetensors file, validated against the file's size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise AdapterFileError(f"{path.name}: too short to be a safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER, size - 8):
            raise AdapterFileError(
                f"{path.name}: not a safetensors file (header length {length} exceeds the file size {size}); "
                "a pickle or a truncated download?"
            )
        raw = fh.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"{path.name}: the safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path.name}: the safetensors header is not a mapping")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - length
    spans = []
    for key, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise AdapterFileError(f"{path.name}: malformed header entry for {key!r}") from None
        if dtype not in _DTYPE_SIZES:
            raise AdapterFileError(f"{path.name}: tensor {key!r} has an unknown dtype {dtype!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise AdapterFileError(f"{path.name}: tensor {key!r} has an invalid shape {shape}")
        count = 1
        for d in shape:
            count *= d
        if not (0 <= start <= end <= data_size) or end - start != count * _DTYPE_SIZES[dtype]:
            raise AdapterFileError(
                f"{path.name}: tensor {key!r} declares shape {shape} ({dtype}) but its bytes {start}..{end} "
                f"do not match (data section is {data_size} bytes); the file is truncated or corrupt"
            )
        spans.append((start, end, key))
    spans.sort()
    for (s1, e1, k1), (s2, e2, k2) in zip(spans, spans[1:]):
        if s2 < e1:
            raise AdapterFileError(f"{path.name}: tensors {k1!r} and {k2!r} overlap")
    return header, {str(k): str(v) for k, v in metadata.items()}


def read_state_dict(path: str | os.PathLike, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state dict, metadata)`` from a safetensors file (or, when allowed, a pickle)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise AdapterFileError(
                f"{path.name} is a pickle file, which can run arbitrary code when loaded; refused. "
                "Convert it to safetensors, or pass allow_pickle=True to read it with torch.load(weights_only=True)."
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
            raise AdapterFileError(f"{path.name}: cannot be read with weights_only=True ({exc})") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterFileError(f"{path.name}: the pickle does not hold a flat dict of tensors")
        return dict(state), {}
    check_safetensors_header(path)
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise AdapterFileError(f"{path.name}: cannot be read as safetensors ({exc})") from None
    _, metadata = check_safetensors_header(path)
    return state, metadata


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: the file is either the old or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_state_dict(path: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
