"""Reading and writing adapter files safely.

User-supplied files are read as safetensors. The header is validated against the file size before any
tensor is materialised, so no file can make us allocate more than its size justifies. Pickles
(``.ckpt``, ``.pt``, ``.bin``, ``.pth``) are refused unless ``allow_pickle=True``, and then read with
``torch.load(weights_only=True)``, from a ``torch.save`` zip archive only. Writes are atomic: a file is
written to a hidden temporary beside it and renamed; a folder (a PEFT adapter) is written to a hidden
temporary folder and swapped in. A process killed at any moment leaves the old or the new version,
never a mixture; the hidden temporaries it leaves are removed by the next write of the same name.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

from ...base import portable
from ...core.buffers import mark_file_block, read_block

PICKLE_SUFFIXES = {".ckpt", ".pt", ".bin", ".pth"}
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
MAX_HEADER = 100 * 1024 * 1024


class AdapterFileError(ValueError):
    """A file that cannot be read as an adapter (corrupt, truncated, lying header, pickle refused)."""


def _no_duplicates(pairs):
    """``json`` hook: a header that names a tensor twice is refused (parsers disagree on which one wins)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise AdapterFileError(f"the safetensors header names {key!r} twice")
        out[key] = value
    return out


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_safetensors_header(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(tensor entries, metadata)`` of a safetensors file, validated against the file's size
    (:func:`_parse_header`)."""
    header, metadata, _ = _parse_header(path)
    return header, metadata


def _parse_header(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """``(tensor entries, metadata, offset of the data section)`` of a safetensors file, validated.

    Only the header is read (at most ``min(file size, MAX_HEADER)`` bytes). Every entry must declare a
    known dtype, a shape of non-negative integers and a ``[start, end]`` byte span inside the data
    section whose length is exactly ``prod(shape) * itemsize``; spans may not overlap and no name may
    appear twice; the metadata must map strings to strings. So a header cannot make a later reader
    allocate more than the file holds. Raises :class:`AdapterFileError` naming the problem.
    """
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
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except AdapterFileError as exc:
        raise AdapterFileError(f"{path.name}: {exc}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit, nesting
        raise AdapterFileError(f"{path.name}: the safetensors header is not valid JSON "
                               f"({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path.name}: the safetensors header is not a mapping")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFileError(f"{path.name}: the safetensors __metadata__ must map strings to strings")
    data_size = size - 8 - length
    spans = []
    for key, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise AdapterFileError(f"{path.name}: malformed header entry for {key!r} "
                                   "(needs dtype, shape and data_offsets)")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPE_SIZES:
            raise AdapterFileError(f"{path.name}: tensor {key!r} has an unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise AdapterFileError(f"{path.name}: tensor {key!r} has an invalid shape {shape!r}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
            raise AdapterFileError(f"{path.name}: tensor {key!r} has invalid data_offsets {offsets!r}")
        start, end = offsets
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
    return header, {str(k): v for k, v in metadata.items()}, 8 + length


#: safetensors dtype names -> torch dtypes (the names torch lacks are left out: refused on reading)
_TORCH_DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
    ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"),
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"), ("U32", "uint32"),
    ("U64", "uint64")) if hasattr(torch, attr)}


def _read_tensors(path: Path, header: dict, data_start: int) -> dict[str, torch.Tensor]:
    """The tensors of a validated safetensors file, each read straight from the file into its place in
    one block holding this file's tensors (64-byte aligned views: :func:`lycoris_lite.core.buffers.read_block`),
    so nothing is copied twice and attaching keeps them as they are. The reads are batched:
    tensors that lie back to back in the file fill in one ``preadv`` call (up to ``IOV_MAX`` buffers).
    No mapping of the file is kept, so a file rewritten in place while it is read gives an error, not
    a ``SIGBUS``. safetensors' own ``load_file``/``get_tensor`` (0.8) keep about 60 bytes of Python
    memory per tensor read, for good: a UI loading adapters all day would grow without bound."""
    if sys.byteorder != "little":  # the format is little-endian: let safetensors swap the bytes
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001
            raise AdapterFileError(f"{path.name}: cannot be read as safetensors ({exc})") from None
    for key, entry in header.items():
        if entry["dtype"] not in _TORCH_DTYPES:
            raise AdapterFileError(f"{path.name}: tensor {key!r} has dtype {entry['dtype']}, which this torch lacks")
    filled = [(k, e) for k, e in header.items() if e["data_offsets"][0] < e["data_offsets"][1]]
    block, offsets = read_block([e["data_offsets"][1] - e["data_offsets"][0] for _, e in filled])
    memory, typed = memoryview(block.numpy()), {}
    state, spans = {}, []
    for (key, entry), offset in zip(filled, offsets):
        dtype, shape = _TORCH_DTYPES[entry["dtype"]], entry["shape"]
        start, end = entry["data_offsets"]
        if dtype not in typed:
            typed[dtype] = block.view(dtype)
        view = typed[dtype]
        strides, step = [], 1
        for d in reversed(shape):
            strides.append(step)
            step *= d
        state[key] = mark_file_block(view.as_strided(shape, strides[::-1], view.storage_offset() + offset // view.element_size()))
        spans.append((start, memory[offset:offset + end - start]))
    for key, entry in header.items():
        if key not in state:  # empty tensors
            state[key] = torch.empty(entry["shape"], dtype=_TORCH_DTYPES[entry["dtype"]])
    state = {key: state[key] for key in header}  # the file's order
    spans.sort(key=lambda s: s[0])
    with open(path, "rb") as fh:
        _read_spans(fh, path, data_start, spans)
    return state


def _read_spans(fh, path: Path, data_start: int, spans: list) -> None:
    """Fill each ``(start, writable memoryview)`` of ``spans`` (sorted, not overlapping) with its bytes of
    the data section: runs of adjacent spans in one :func:`lycoris_lite.base.portable.read_into` (one
    ``os.preadv`` where the OS has it, else one span a call). A short read (the file shrank) raises
    :class:`AdapterFileError`."""
    limit = portable.read_batch_limit()
    i = 0
    while i < len(spans):
        start, first = spans[i]
        run, stop = [first], start + len(first)
        while i + len(run) < len(spans) and len(run) < limit and spans[i + len(run)][0] == stop:
            run.append(spans[i + len(run)][1])
            stop += len(run[-1])
        done = 0
        while done < stop - start:  # a read may return less than asked (signals, 2 GiB caps)
            pending, skip = [], done
            for view in run:
                if skip >= len(view):
                    skip -= len(view)
                    continue
                pending.append(view[skip:] if skip else view)
                skip = 0
            got = portable.read_into(fh, pending, data_start + start + done)
            if not got:
                raise AdapterFileError(f"{path.name}: the file changed while it was read (it ends early)")
            done += got
        i += len(run)


def _check_pickle_archive(path: Path) -> None:
    """A pickle is read only from ``torch.save``'s zip archive with stored (uncompressed) records whose
    sizes add up to no more than the file: a compressed record (a zip bomb) or the legacy format,
    whose stream declares storage sizes that ``torch.load`` allocates before reading, could make us
    allocate far more than the file holds."""
    import zipfile

    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise AdapterFileError(f"{path.name}: not a torch.save zip archive ({exc}); legacy and bare pickles "
                               "are refused") from None
    packed = [r.filename for r in records if r.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise AdapterFileError(f"{path.name}: compressed records {packed[:3]} in a torch.save archive "
                               "(torch.save never compresses); refused")
    if sum(r.file_size for r in records) > size:
        raise AdapterFileError(f"{path.name}: the archive's records declare more bytes than the file holds")


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
        _check_pickle_archive(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
            raise AdapterFileError(f"{path.name}: cannot be read with weights_only=True ({exc})") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterFileError(f"{path.name}: the pickle does not hold a flat dict of tensors")
        return dict(state), {}
    header, metadata, data_start = _parse_header(path)
    return _read_tensors(path, header, data_start), metadata


_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"


def _temporary_prefix(path: Path) -> str:
    """``.NAME.HOST-PID.``: whose temporary it is, so a later write can tell a dead writer's leftovers."""
    return f".{path.name}.{_HOST}-{os.getpid()}."


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the hidden temporaries of ``path`` left by writers on this host that no longer run
    (killed mid-write); returns what was removed. Temporaries of live writers are kept."""
    path = Path(path)
    removed = []
    prefix = f".{path.name}."
    for entry in map(Path, glob.glob(glob.escape(str(path.parent / prefix)) + "*.tmp")):
        owner = entry.name[len(prefix):].split(".", 1)[0]
        host, _, pid = owner.rpartition("-")
        if host != _HOST or not pid.isdigit() or portable.process_alive(int(pid)):
            continue
        try:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        except OSError:
            continue
        removed.append(entry)
    return removed


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: the file is either the old or the new one.

    ``tmp_path`` has ``path``'s name inside a hidden temporary folder beside it (``.NAME.HOST-PID.*.tmp/``),
    so whatever the writer makes there (safetensors writes through a ``.tmpXXXXXX`` file of its own) is
    removed with that folder, by this call or, after a kill, by the next write of the same name. The
    file is flushed to disk before the rename and gets the permissions a plain ``open(path, "w")`` would
    give; the folder is flushed after the rename so the new name survives a power cut."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    folder = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent))
    tmp = folder / path.name
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~portable.umask())
        portable.fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    portable.fsync_folder(path.parent)
    return path


def atomic_write_folder(path: str | os.PathLike, write: Callable[[Path], None],
                        replaceable: Callable[[Path], bool] | None = None) -> Path:
    """Call ``write(tmp_folder)`` then put that folder at ``path``: the folder is the old or the new one.

    An existing folder at ``path`` is swapped out in one step (Linux: :func:`lycoris_lite.base.portable.exchange`;
    elsewhere two renames, between which the folder is briefly absent) and deleted, so it must hold nothing but a
    previous version: ``replaceable(path)`` says so. When it holds other files too, the new files are
    written into it one by one instead (each atomically, the set not)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file; this writes a folder")
    if path.is_dir() and any(path.iterdir()) and not (replaceable is not None and replaceable(path)):
        write(path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~portable.umask())
        if not path.is_dir():
            os.replace(tmp, path)
        elif portable.exchange(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # the old folder, now under the temporary name
        else:
            # moved into a temporary folder under its own name: Windows cannot rename onto an existing folder
            old = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    portable.fsync_folder(path.parent)
    return path


def write_state_dict(path: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
