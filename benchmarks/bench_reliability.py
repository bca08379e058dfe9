"""Reliability under faults, load and bad input (issue 8): every figure of the "Reliability" section of
``benchmarks/README.md``.

    python benchmarks/bench_reliability.py                      # every section (bounded: ~25 min here)
    python benchmarks/bench_reliability.py --only fuzz,drift    # some sections
    python benchmarks/bench_reliability.py --quick              # the sizes the tests use

Sections (each bounded in count and in time, and each stops by itself):

* ``fuzz``: a seeded mutation fuzzer over real adapter files of every format and algorithm, loaded onto
  the tiny SD pipeline in a forked worker, so a segfault or a hang is seen and counted;
* ``drift``: fuse/unfuse cycles of a mixed stack in float32, float16 and bfloat16;
* ``leaks``: load/unload cycles on the tiny pipeline and on the full-size SD-1.5-shaped UNet;
* ``killwrite``: a process saving adapters SIGKILLed at random moments;
* ``training``: a DreamBooth run SIGKILLed three times and resumed, and a process writing training
  checkpoints SIGKILLed at random moments (needs ``pipelines/train_dreambooth.py``);
* ``ui``: concurrent ``gradio_client`` clients on the web UI (needs ``ui/app.py``);
* ``badargs``: wrong arguments to the command line, the trainer and the UI.

``tests/test_reliability*.py`` run the same functions at small sizes. Nothing here is imported by the
library.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import io
import json
import os
import pickle
import random
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lycoris_lite  # noqa: E402
from lycoris_lite import PRESETS, controller_for  # noqa: E402
from lycoris_lite.base.registry import get_algorithm
from lycoris_lite.io.files import save_adapter  # noqa: E402

LIB_DIR = str(Path(lycoris_lite.__file__).resolve().parent)
ALGOS = ("lora", "loha", "lokr", "oft", "boft", "hra")
#: settings of the corpus adapters (non-identity weights: ``init_weights=False``)
SETTINGS = {"lora": {"r": 4}, "loha": {"r": 4, "alpha": 16}, "lokr": {"r": 4}, "oft": {"block_size": 4},
            "boft": {"block_size": 4, "butterfly_factor": 2}, "hra": {"r": 4}}
#: PEFT rotates the input side only
PEFT_SETTINGS = {**SETTINGS, "oft": {"block_size": 4, "rotation_side": "input"},
                 "boft": {"block_size": 4, "butterfly_factor": 2, "rotation_side": "input"},
                 "hra": {"r": 4, "rotation_side": "input"}}
MiB = 1024 * 1024


# ---- process memory ----------------------------------------------------------------------------------
def _status(field_name: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field_name)


def rss() -> int:
    return _status("VmRSS")


def reset_peak() -> bool:
    """Set the kernel's peak-RSS counter (``VmHWM``) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak() -> int:
    return _status("VmHWM")


_LIBC = None


def malloc_trim() -> None:
    """Give glibc's free heap pages back to the system (no-op elsewhere)."""
    global _LIBC
    try:
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def mmap_large_allocations(threshold: int = 65536) -> None:
    """glibc: serve every allocation above ``threshold`` by its own mmap (returned to the system when
    freed) and never keep a free heap top, so RSS follows the live allocations (``mallopt``)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 0)          # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


# ---- adapters on the tiny pipeline -------------------------------------------------------------------
def tiny_pipe(sdxl: bool = False):
    from lycoris_lite.models import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline

    return lycoris_lite.enable(build_tiny_sdxl_pipeline() if sdxl else build_tiny_sd_pipeline())


#: the fuzzing target: the tiny SD pipeline with a two-level UNet (40 adaptable layers instead of 230),
#: which makes a load ~3× cheaper and exercises the same code
SMALL_UNET = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(8, 16), layers_per_block=1)


def fuzz_pipe():
    from diffusers import UNet2DConditionModel

    from lycoris_lite.models import tiny_unet_config

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


# ---- the fuzzing corpus ------------------------------------------------------------------------------
@dataclass
class Seed:
    """A real adapter: its files (relative path -> bytes; one file, or a PEFT folder's files)."""

    name: str
    format: str
    algo: str
    files: dict[str, bytes]

    @property
    def is_folder(self) -> bool:
        return len(self.files) > 1 or "/" in next(iter(self.files))

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.files.values())


def _read_files(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def build_corpus(pipe, folder: Path, sdxl_pipe=None) -> list[Seed]:
    """Adapter files of every algorithm and format made on ``pipe`` (the tiny SD pipeline): kohya/LyCORIS
    files of all six algorithms (plus DoRA and Tucker LoRA), a diffusers LoRA, PEFT folders of all six
    (rotations on the input side, as PEFT has them); with ``sdxl_pipe`` also SDXL files (SGM names,
    ``lora_te2_``), which are the wrong model family for ``pipe``."""
    folder = Path(folder)
    seeds = []

    def add(name, fmt, algo, path):
        seeds.append(Seed(name, fmt, algo, _read_files(Path(path))))

    for i, algo in enumerate(ALGOS):
        add(f"kohya-{algo}", "kohya", algo, make_adapter(pipe, folder / f"kohya-{algo}.safetensors", algo, seed=i))
    add("kohya-lora-dora", "kohya", "lora", make_adapter(pipe, folder / "dora.safetensors", "lora", seed=10,
                                                         settings={"r": 4, "use_dora": True}))
    add("kohya-lora-tucker", "kohya", "lora", make_adapter(pipe, folder / "tucker.safetensors", "lora", seed=11,
                                                           settings={"r": 4, "use_tucker": True}))
    add("kohya-loha-fp16", "kohya", "loha", make_adapter(pipe, folder / "kohya-loha-fp16.safetensors", "loha", seed=12,
                                                                 dtype=torch.float16))
    add("diffusers-lora", "diffusers", "lora", make_adapter(pipe, folder / "diffusers.safetensors", "lora", "diffusers",
                                                            seed=13, targets="unet-attn-ff"))
    for i, algo in enumerate(ALGOS):
        add(f"peft-{algo}", "peft", algo, make_adapter(pipe, folder / f"peft-{algo}", algo, "peft", seed=20 + i,
                                                       targets="unet-attn-ff"))
    if sdxl_pipe is not None:
        for algo in ("lora", "lokr"):
            add(f"sdxl-kohya-{algo}", "kohya", algo, make_adapter(sdxl_pipe, folder / f"sdxl-{algo}.safetensors", algo,
                                                                  seed=30, targets="unet-attn"))
    return seeds


# ---- safetensors bytes -------------------------------------------------------------------------------
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
    from safetensors.torch import load

    header, _ = split_safetensors(blob)
    return load(blob), dict(header.get("__metadata__") or {})


def save_tensors(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().clone().contiguous() for k, v in state.items()}, metadata=metadata or None)


def _tensor_keys(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


# ---- mutations ---------------------------------------------------------------------------------------
# Each mutation turns a seed's bytes into a hostile variant. Byte mutations work on a whole
# safetensors file, header mutations rewrite its JSON header over the same data, tensor mutations
# write a well-formed file whose tensors are wrong, folder mutations break a PEFT folder's config or
# layout, and pickle mutations put a pickle where safetensors is expected.
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "U16", "U32",
          "U64"]
HUGE = [2 ** 31, 2 ** 32 + 1, 2 ** 40, 2 ** 62, 2 ** 63, 2 ** 64 + 7]
JUNK_VALUES = [None, True, -1, 0, 3.5, 1e309, -1e309, float("nan"), 10 ** 30, "x", "", [], [1, "a"], {}, {"a": 1}]


def _pick_tensor(header, rng) -> str:
    return rng.choice(_tensor_keys(header))


def mut_truncate(blob, rng, ctx):
    (length,) = struct.unpack("<Q", blob[:8])
    cut = rng.choice([rng.randrange(0, 8), rng.randrange(8, 8 + length), 8 + length,
                      rng.randrange(8 + length, len(blob)), len(blob) - 1])
    return blob[:cut]


def mut_bitflip(blob, rng, ctx):
    out = bytearray(blob)
    (length,) = struct.unpack("<Q", blob[:8])
    for _ in range(rng.choice([1, 1, 2, 4, 8, 32])):
        pos = rng.randrange(0, 8 + length) if rng.random() < 0.5 else rng.randrange(len(out))
        out[pos] ^= 1 << rng.randrange(8)
    return bytes(out)


def mut_garbage_span(blob, rng, ctx):
    out = bytearray(blob)
    n = rng.choice([1, 4, 16, 256])
    pos = rng.randrange(len(out))
    out[pos:pos + n] = rng.randbytes(min(n, len(out) - pos))
    return bytes(out)


def mut_header_length(blob, rng, ctx):
    (length,) = struct.unpack("<Q", blob[:8])
    value = rng.choice([0, 1, 2, 7, length - 1, length + 1, length + 8, len(blob) - 8, len(blob) - 7, len(blob),
                        2 ** 31, 2 ** 63, 2 ** 64 - 1, rng.randrange(2 ** 64)])
    return struct.pack("<Q", max(0, value)) + blob[8:]


def mut_tiny_file(blob, rng, ctx):
    return rng.choice([b"", b"\0", rng.randbytes(rng.randrange(1, 8)), struct.pack("<Q", 0),
                       struct.pack("<Q", 2) + b"{}", struct.pack("<Q", 8) + b"{}      ", b"\0" * 8, blob[:8]])


def mut_append(blob, rng, ctx):
    return blob + rng.randbytes(rng.choice([1, 7, 100, 4096]))


def mut_json_garbage(blob, rng, ctx):
    header, data = split_safetensors(blob)
    text = json.dumps(header)
    choice = rng.randrange(11)
    if choice == 0:
        raw = b"\xff\xfe\xfd" + rng.randbytes(32)
    elif choice == 1:
        raw = b"[" * rng.choice([1000, 100_000]) + b"]" * 10
    elif choice == 2:
        raw = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
    elif choice == 3:
        raw = rng.choice([b"[]", b"1", b'"str"', b"null", b"true", b"{}", b"[{}]"])
    elif choice == 4:
        i = rng.randrange(len(text))
        raw = (text[:i] + text[i + 1:]).encode()
    elif choice == 5:
        i = rng.randrange(len(text))
        raw = (text[:i] + rng.choice('{}[],:"\\x0') + text[i:]).encode()
    elif choice == 6:
        raw = b'{"x": NaN, "y": Infinity}'
    elif choice == 7:
        raw = b'{"x": ' + b"9" * 5000 + b"}"
    elif choice == 8:
        raw = b"\xef\xbb\xbf" + text.encode()
    elif choice == 9:
        raw = text.replace('"', "'").encode()
    else:
        raw = text.encode("utf-16")
    return join_safetensors(None, data, raw)


def mut_entry_garbage(blob, rng, ctx):
    header, data = split_safetensors(blob)
    key = _pick_tensor(header, rng)
    entry = dict(header[key])
    options = [
        [], 5, "x", None, {}, {"dtype": "F32"},
        {**entry, "shape": rng.choice([5, "ab", None, {"a": 1}, [True], [1.0], [-1], [[1]], ["1"], [2 ** 70]])},
        {**entry, "data_offsets": rng.choice(["ab", [0], [0, 1, 2], [None, None], [1.5, 2.5], None, 7, [-8, 0],
                                              [True, False], ["0", "4"]])},
        {**entry, "dtype": rng.choice([5, None, ["F32"], {"a": 1}, "f32", "F128", "C64", ""])},
    ]
    header[key] = rng.choice(options)
    return join_safetensors(header, data)


def mut_dtype(blob, rng, ctx):
    header, data = split_safetensors(blob)
    key = _pick_tensor(header, rng)
    entry = header[key]
    new = rng.choice(DTYPES)
    old_size, new_size = _DT[entry["dtype"]], _DT[new]
    entry["dtype"] = new
    if rng.random() < 0.6 and entry["shape"] and old_size != new_size:  # keep the byte count right
        last = entry["shape"][-1] * old_size
        if last % new_size == 0:
            entry["shape"][-1] = last // new_size
    return join_safetensors(header, data)


_DT = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
       "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def mut_shape(blob, rng, ctx):
    header, data = split_safetensors(blob)
    key = _pick_tensor(header, rng)
    entry = header[key]
    shape = list(entry["shape"])
    choice = rng.randrange(8)
    if choice == 0:
        shape = [rng.choice(HUGE) for _ in range(rng.randrange(1, 4))]
    elif choice == 1:
        shape = [0] + shape
    elif choice == 2:
        shape = []
    elif choice == 3:
        shape = [1] * rng.choice([9, 64, 1000])
    elif choice == 4:
        shape = shape[::-1]
    elif choice == 5 and shape:
        shape[rng.randrange(len(shape))] += rng.choice([1, -1, 1000])
    elif choice == 6:
        shape = shape + [rng.choice(HUGE)]
    else:
        shape = [2 ** 32, 2 ** 32, 2 ** 32, 2 ** 32]
    entry["shape"] = shape
    if rng.random() < 0.5:  # make the offsets agree with the lie
        count = 1
        for d in shape:
            count *= max(d, 0)
        entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][0] + count * _DT[entry["dtype"]]]
    return join_safetensors(header, data)


def mut_offsets(blob, rng, ctx):
    header, data = split_safetensors(blob)
    keys = _tensor_keys(header)
    key = rng.choice(keys)
    start, end = header[key]["data_offsets"]
    other = header[rng.choice(keys)]["data_offsets"]
    header[key]["data_offsets"] = rng.choice([
        [end, start], [0, 2 ** 64], [-4, end - start - 4], [start + 1, end + 1], [start, start], other,
        [len(data), len(data) + end - start], [start, len(data) + 1], [2 ** 63, 2 ** 63 + end - start]])
    return join_safetensors(header, data)


def mut_duplicate_key(blob, rng, ctx):
    header, data = split_safetensors(blob)
    keys = _tensor_keys(header)
    key, other = rng.choice(keys), rng.choice(keys)
    items = [f"{json.dumps(k)}:{json.dumps(v)}" for k, v in header.items()]
    items.insert(rng.randrange(len(items) + 1), f"{json.dumps(key)}:{json.dumps(header[other])}")
    return join_safetensors(None, data, ("{" + ",".join(items) + "}").encode())


def mut_metadata(blob, rng, ctx):
    header, data = split_safetensors(blob)
    meta = dict(header.get("__metadata__") or {})
    choice = rng.randrange(4)
    if choice == 0:
        header["__metadata__"] = rng.choice([[], 5, "x", None, {"a": 5}, {"a": None}, {"a": {"b": 1}}, {"a": [1]}])
    elif choice == 1:
        meta[rng.choice(["ss_tag_frequency", "x"])] = "y" * rng.choice([1000, 1_000_000])
        header["__metadata__"] = meta
    else:
        key = rng.choice(["lycoris_lite.rotation_sides", "lycoris_lite.config", "lycoris_lite.algorithms",
                          "lora_adapter_metadata", "ss_network_args", "ss_network_dim", "ss_network_alpha",
                          "ss_tag_frequency", "modelspec.architecture", "lycoris_lite.trigger_words",
                          "lycoris_lite.training", "lycoris_lite.base_model"])
        meta[key] = rng.choice([
            "not json", "[1, 2]", '{"oft": 5}', '{"oft": "sideways", "hra": null}', "null", "1e999", "NaN",
            '{"unet.r": "abc", "unet.lora_alpha": -1}', '{"r": 1000000000, "lora_alpha": 0}',
            '{"unet.target_modules": 5, "unet.rank_pattern": {"(": 3}}', "{" * 10_000, "[" * 100_000,
            '{"a": ' + "9" * 5000 + "}", '{"sks": {"dog": "many"}}', ""])
        header["__metadata__"] = meta
    return join_safetensors(header, data)


def mut_many_entries(blob, rng, ctx):
    header, data = split_safetensors(blob)
    for i in range(rng.choice([1000, 20_000])):
        header[f"{rng.choice(['lora_unet_x', 'lora_te_y', 'z'])}{i}.lora_down.weight"] = {
            "dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    return join_safetensors(header, data)


BLOB_MUTATIONS = {
    "truncate": mut_truncate, "bitflip": mut_bitflip, "garbage-span": mut_garbage_span,
    "header-length-lie": mut_header_length, "tiny-file": mut_tiny_file, "trailing-bytes": mut_append,
    "header-not-json": mut_json_garbage, "header-entry-garbage": mut_entry_garbage, "dtype-lie": mut_dtype,
    "shape-lie": mut_shape, "offset-lie": mut_offsets, "duplicate-key": mut_duplicate_key,
    "metadata-garbage": mut_metadata, "many-entries": mut_many_entries,
}


def st_nan_inf(state, meta, rng, ctx):
    key = rng.choice(list(state))
    t = state[key].clone()
    if t.is_floating_point() and t.numel():
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
    state[key] = t
    return state, meta


def st_drop_key(state, meta, rng, ctx):
    for _ in range(rng.choice([1, 1, 3])):
        if state:
            del state[rng.choice(list(state))]
    return state, meta


def st_drop_module(state, meta, rng, ctx):
    module = _module(rng.choice(list(state)))
    return {k: v for k, v in state.items() if _module(k) != module}, meta


def _module(key: str) -> str:
    for marker in (".lora_", ".hada_", ".lokr_", ".oft_", ".boft_", ".hra_", ".alpha", ".dora_scale"):
        if marker in key:
            return key.split(marker)[0]
    return key.rsplit(".", 1)[0]


def st_extra_key(state, meta, rng, ctx):
    key = rng.choice(list(state))
    module = _module(key)
    new = rng.choice([f"{module}.lora_bogus", f"{module}.hada_w3_a", "loose_key", f"{module}x.lora_down.weight",
                      "lora_unet_not_a_layer.lora_down.weight", f"{module}.lora_mid.weight", f"{module}.lokr_t1",
                      f"{module}.dora_scale", "lora_te_text_model_encoder_layers_99_mlp_fc1.lora_down.weight",
                      "unet.not.a.layer.lora_A.weight", f"{key}.extra"])
    state[new] = torch.randn(rng.choice([(4,), (4, 4), (2, 3, 1, 1)]))
    return state, meta


def st_rename_key(state, meta, rng, ctx):
    key = rng.choice(list(state))
    swaps = [("lora_up", "lora_down"), ("lora_down", "lora_up"), ("lora_A", "lora_B"), ("lora_B", "lora_A"),
             ("hada_w1_a", "hada_w2_a"), ("lokr_w1", "lokr_w2"), ("lora_unet_", "lora_te_"), ("lora_te_", "lora_unet_"),
             ("unet.", "text_encoder."), ("text_encoder.", "unet."), ("base_model.model.", ""), ("_", "."), (".", "_"),
             ("to_q", "to_k"), ("attn1", "attn2"), ("down_blocks", "up_blocks"), ("oft_blocks", "oft_diag"),
             ("hra_u", "hra_v"), ("weight", "bias")]
    old, new = rng.choice(swaps)
    value = state.pop(key)
    state[key.replace(old, new, 1) if old in key else key + "x"] = value
    return state, meta


def st_reshape(state, meta, rng, ctx):
    key = rng.choice(list(state))
    t = state[key]
    choice = rng.randrange(7)
    if choice == 0 and t.dim() >= 2:
        t = t.transpose(0, 1).contiguous()
    elif choice == 1:
        t = t.unsqueeze(0)
    elif choice == 2 and t.dim() >= 1:
        t = t.reshape(-1) if rng.random() < 0.5 else t.reshape(-1)[:1].reshape(())
    elif choice == 3 and t.dim() >= 1:
        t = torch.cat([t, t[:1]], 0)
    elif choice == 4 and t.dim() >= 1:
        t = t[:0]
    elif choice == 5 and t.dim() >= 1 and t.shape[0] > 1:
        t = t[:-1]
    else:
        t = torch.randn(rng.choice([(0,), (1,), (3, 5), (2, 2, 2), (1, 1, 1, 1, 1)]))
    state[key] = t
    return state, meta


def st_retype(state, meta, rng, ctx):
    key = rng.choice(list(state))
    dtype = rng.choice([torch.int8, torch.int64, torch.uint8, torch.bool, torch.float64, torch.float16,
                        torch.bfloat16, torch.float8_e4m3fn, torch.int32])
    for k in (list(state) if rng.random() < 0.2 else [key]):
        state[k] = state[k].to(dtype)
    return state, meta


def st_alpha(state, meta, rng, ctx):
    keys = [k for k in state if k.endswith(".alpha")] or list(state)
    key = rng.choice(keys)
    state[key] = rng.choice([torch.tensor(0.0), torch.tensor(-4.0), torch.tensor(1e30), torch.tensor(float("nan")),
                             torch.tensor([1.0, 2.0]), torch.tensor([]), torch.tensor(3), torch.tensor(True),
                             torch.zeros(4, 4), torch.tensor(1e-45)])
    return state, meta


def st_magnitude(state, meta, rng, ctx):
    scale = rng.choice([1e30, 1e38, 1e-30, 0.0, -1.0, 65504.0 * 4])
    for k in (list(state) if rng.random() < 0.5 else [rng.choice(list(state))]):
        if state[k].is_floating_point():
            state[k] = state[k] * scale
    return state, meta


def st_wrong_family(state, meta, rng, ctx):
    if rng.random() < 0.5:
        return {k.replace("lora_te_", "lora_te2_").replace("text_encoder.", "text_encoder_2."): v
                for k, v in state.items()}, meta
    down = [k for k in state if "attn2_to_k" in k or "attn2.to_k" in k]
    width = rng.choice([768, 1024, 2048])
    for k in down or [rng.choice(list(state))]:
        state[k] = torch.randn(state[k].shape[0] if state[k].dim() else 1, width)
    return state, meta


def st_swap_component(state, meta, rng, ctx):
    pairs = [("lora_unet_", "lora_te_"), ("lora_te_", "lora_unet_"), ("unet.", "text_encoder."),
             ("text_encoder.", "unet.")]
    old, new = rng.choice(pairs)
    return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in state.items()}, meta


def st_mix_formats(state, meta, rng, ctx):
    other = rng.choice([s for s in ctx["corpus"] if not s.is_folder])
    other_state, _ = load_tensors(next(iter(other.files.values())))
    for k in rng.sample(list(other_state), min(len(other_state), rng.choice([1, 5, 50]))):
        state[k] = other_state[k]
    return state, meta


def st_empty(state, meta, rng, ctx):
    return {}, meta


def st_move_module(state, meta, rng, ctx):
    """One module's tensors on another layer (of another shape, usually)."""
    modules = sorted({_module(k) for k in state})
    a, b = rng.choice(modules), rng.choice(modules)
    moved = {k.replace(a, b, 1): v for k, v in state.items() if _module(k) == a}
    state = {k: v for k, v in state.items() if _module(k) != b}
    state.update(moved)
    return state, meta


def st_zero_rank(state, meta, rng, ctx):
    module = _module(rng.choice(list(state)))
    for k in [k for k in state if _module(k) == module]:
        t = state[k]
        if t.dim() >= 2:
            dim = rng.randrange(t.dim())
            state[k] = t.narrow(dim, 0, 0).contiguous()
    return state, meta


STATE_MUTATIONS = {
    "nan-inf": st_nan_inf, "missing-key": st_drop_key, "missing-module": st_drop_module, "extra-key": st_extra_key,
    "renamed-key": st_rename_key, "wrong-shape": st_reshape, "wrong-dtype": st_retype, "alpha-games": st_alpha,
    "extreme-values": st_magnitude, "wrong-family": st_wrong_family, "swapped-component": st_swap_component,
    "mixed-formats": st_mix_formats, "no-tensors": st_empty, "module-on-other-layer": st_move_module,
    "zero-rank": st_zero_rank,
}


class _RunsCode:
    """Unpickling this runs a shell command (it must never happen)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickle_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def mut_pickle(files, name, rng, ctx):
    """A pickle where safetensors is expected (same name), or under a pickle suffix, read with or
    without ``allow_pickle``; half of them would run code when unpickled."""
    state, _ = load_tensors(files[name])
    choice = rng.randrange(6)
    if choice == 5:  # a zip bomb: torch.save's archive re-packed with deflate (16 MiB of zeros in ~20 KiB)
        blob = _deflated(_pickle_bytes({**state, "padding": torch.zeros(4 * MiB)}))
    elif choice == 0:
        blob = _pickle_bytes(state)
    elif choice == 1:
        blob = _pickle_bytes({"state_dict": state, "hook": _RunsCode(ctx["marker"])})
    elif choice == 2:
        blob = pickle.dumps(_RunsCode(ctx["marker"]), protocol=2)
    elif choice == 3:
        blob = _pickle_bytes({"state_dict": state})
    else:
        blob = pickle.dumps({k: v.numpy() for k, v in state.items()}, protocol=4)
    if rng.random() < 0.5:
        return {**files, name: blob}, {}
    files = dict(files)
    del files[name]
    stem = name.rsplit(".", 1)[0]
    if "/" in name:  # a PEFT folder: its pickle weights file
        new = name.rsplit("/", 1)[0] + "/adapter_model.bin"
    else:
        new = stem + rng.choice([".ckpt", ".pt", ".bin", ".pth"])
    files[new] = blob
    return files, {"allow_pickle": rng.random() < 0.7, "load": new if "/" not in name else None}


def _deflated(blob: bytes) -> bytes:
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(blob)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    return out.getvalue()


def _config_names(files):
    return [n for n in files if n.endswith("adapter_config.json")]


def mut_config_garbage(files, name, rng, ctx):
    target = rng.choice(_config_names(files))
    config = json.loads(files[target])
    raw = rng.choice([b"", b"{", b"[]", b"5", b"null", b"\xff\xfe", b"[" * 100_000, b'{"a":' * 50_000,
                      b'{"peft_type": "LORA", "r": ' + b"9" * 5000 + b"}",
                      json.dumps({k: v for k, v in config.items() if k != "peft_type"}).encode(),
                      json.dumps({**config, "peft_type": rng.choice(["NOPE", 5, None, ["LORA"], "", "ADALORA", "IA3",
                                                                     "lora"])}).encode()])
    return {**files, target: raw}, {}


CONFIG_FIELDS = ["r", "lora_alpha", "alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora",
                 "oft_block_size", "r", "boft_block_size", "boft_block_num", "boft_n_butterfly_factor",
                 "use_cayley_neumann", "num_cayley_neumann_terms", "module_dropout", "decompose_both",
                 "decompose_factor", "apply_GS", "use_dora", "layers_to_transform", "layers_pattern",
                 "exclude_modules", "modules_to_save", "bias", "init_weights", "coft", "eps", "block_share",
                 "peft_type", "fan_in_fan_out", "use_effective_conv2d", "rank_dropout", "lora_dropout"]


def mut_config_fields(files, name, rng, ctx):
    target = rng.choice(_config_names(files))
    config = json.loads(files[target])
    for _ in range(rng.choice([1, 1, 3])):
        key = rng.choice(CONFIG_FIELDS)
        value = rng.choice(JUNK_VALUES + [1, 2, 4, 3, 64, 10 ** 9, -4, ["nope"], ["to_q", 5], "(", ".*",
                                          {"(": 3}, {"to_q": "x"}, {"to_q": 10 ** 9}, "all-linear",
                                          rng.choice(["LORA", "LOHA", "LOKR", "OFT", "BOFT", "HRA"])])
        config[key] = value
    text = json.dumps(config, allow_nan=True)
    return {**files, target: text.encode()}, {}


def mut_folder_layout(files, name, rng, ctx):
    files = dict(files)
    choice = rng.randrange(5)
    names = sorted(files)
    if choice == 0:
        del files[rng.choice(names)]
    elif choice == 1:
        part = rng.choice(sorted({n.split("/")[0] for n in names if "/" in n}))
        files = {n: b for n, b in files.items() if not n.startswith(part + "/")}
    elif choice == 2:
        for n, b in list(files.items()):
            if n.startswith("text_encoder/"):
                files["text_encoder_2/" + n.split("/", 1)[1]] = b
    elif choice == 3:
        files = {n.split("/", 1)[1] if n.startswith("unet/") else n: b for n, b in files.items()}
    else:
        unet_weights = next(n for n in names if n.endswith(".safetensors") and n.startswith("unet/"))
        te_weights = next((n for n in names if n.endswith(".safetensors") and n.startswith("text_encoder/")), None)
        if te_weights:
            files[unet_weights], files[te_weights] = files[te_weights], files[unet_weights]
    return files, {}


FOLDER_MUTATIONS = {"pickle": mut_pickle, "config-not-json": mut_config_garbage,
                    "config-wrong-values": mut_config_fields, "folder-layout": mut_folder_layout}
MUTATIONS = [*BLOB_MUTATIONS, *STATE_MUTATIONS, *FOLDER_MUTATIONS]


@dataclass
class Case:
    index: int
    seed: str
    mutation: str
    files: dict[str, bytes]
    load: str | None = None          # the file to load (default: the seed's file, or the folder)
    allow_pickle: bool = False


def case_plan(index: int, corpus: list[Seed], master_seed: int) -> tuple[random.Random, Seed, str]:
    """``(rng, seed file, mutation)`` of case ``index``: a PEFT-folder mutation only on a PEFT seed."""
    rng = random.Random(f"{master_seed}:{index}")
    while True:
        seed = rng.choice(corpus)
        mutation = rng.choice(MUTATIONS)
        if mutation in ("config-not-json", "config-wrong-values", "folder-layout") and seed.format != "peft":
            continue
        return rng, seed, mutation


def make_case(index: int, corpus: list[Seed], master_seed: int, marker: str) -> Case:
    """Case ``index`` of the run with ``master_seed`` (the same case every time)."""
    rng, seed, mutation = case_plan(index, corpus, master_seed)
    files = dict(seed.files)
    weights = [n for n in files if n.endswith(".safetensors")]
    target = rng.choice(weights)
    ctx = {"corpus": corpus, "marker": marker}
    options = {}
    if mutation in BLOB_MUTATIONS:
        files[target] = BLOB_MUTATIONS[mutation](files[target], rng, ctx)
    elif mutation in STATE_MUTATIONS:
        state, meta = load_tensors(files[target])
        state, meta = STATE_MUTATIONS[mutation](state, meta, rng, ctx)
        files[target] = save_tensors(state, meta)
    else:
        files, options = FOLDER_MUTATIONS[mutation](files, target, rng, ctx)
    load = options.get("load") or (None if seed.is_folder else target)
    return Case(index, seed.name, mutation, files, load, options.get("allow_pickle", False))


# ---- one fuzz case -----------------------------------------------------------------------------------
#: exception types a load documents (``AdapterFileError`` and ``FamilyMismatch`` are ``ValueError``s)
DOCUMENTED = (ValueError, FileNotFoundError)


def error_origin(exc: BaseException) -> str:
    """``file:line`` of the innermost frame of ``exc``'s traceback (where it was raised)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "?"
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"


def is_clean(exc: BaseException) -> bool:
    """A *clean* error: a documented type (``ValueError`` — ``AdapterFileError`` is one — or
    ``FileNotFoundError``), exactly that class or one of ours (not, e.g., ``json.JSONDecodeError``
    leaking from a parser), raised by a ``raise`` in lycoris_lite (the innermost frame of the traceback
    is in the package), with a message."""
    cls = type(exc)
    documented = cls in DOCUMENTED or (issubclass(cls, DOCUMENTED) and cls.__module__.startswith("lycoris_lite"))
    return documented and error_origin(exc).startswith(LIB_DIR) and bool(str(exc).strip())


def _use(pipe, fuse: bool = True) -> None:
    """Run the UNet and the text encoder with the adapter; fuse it and unfuse it."""
    unet, te = pipe.unet, pipe.text_encoder
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
        context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
        unet(sample, 10, encoder_hidden_states=context)
        te(torch.arange(8)[None])
    if not fuse:
        return
    try:
        pipe.fuse_adapters()
    except ValueError as exc:  # extreme values: NaN/Inf weights refused, nothing fused
        if "NaN/Inf" not in str(exc):
            raise
    pipe.unfuse_adapters()


def write_case(case: Case, folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, blob in case.files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    return folder / case.load if case.load else folder


def run_case(pipe, case: Case, folder: Path, before: dict, marker: Path, fuse: bool = True) -> dict:
    """Load ``case`` onto ``pipe`` and judge the outcome (see :func:`is_clean`, :func:`model_changes`)."""
    source = write_case(case, folder)
    size = sum(len(b) for b in case.files.values())
    result = {"case": case.index, "seed": case.seed, "mutation": case.mutation, "size": size}
    gc.collect()
    measured = reset_peak()
    rest = rss()
    start = time.perf_counter()
    try:
        pipe.load_adapter(source, "fuzz", allow_pickle=case.allow_pickle)
    except Exception as exc:  # noqa: BLE001 - judging every exception is the point
        result.update(outcome="clean" if is_clean(exc) else "crash", error=type(exc).__name__,
                      message=str(exc)[:300], origin=error_origin(exc).replace(str(ROOT) + "/", ""))
        if result["outcome"] == "crash":
            result["traceback"] = "".join(traceback.format_exception(exc))[-3000:]
    else:
        result["outcome"] = "accepted"
    result["seconds"] = time.perf_counter() - start
    result["peak_extra"] = peak() - rest if measured else None
    if result["outcome"] == "accepted":
        try:
            _use(pipe, fuse)
        except Exception as exc:  # noqa: BLE001
            result.update(outcome="crash", error=type(exc).__name__, message=f"using the loaded adapter: {exc}"[:300],
                          origin=error_origin(exc).replace(str(ROOT) + "/", ""),
                          traceback="".join(traceback.format_exception(exc))[-3000:])
        pipe.unload_adapters()
    result["changed"] = model_changes(pipe, before)  # the worker then ends: the next one starts pristine
    result["code_ran"] = marker.exists()
    if result["code_ran"]:
        marker.unlink()
    return result


# ---- the fuzz run: forked workers --------------------------------------------------------------------
def _fuzz_child(write_fd: int, pipe, corpus, before, indices: range, master_seed: int, deadline: float,
                folder: Path) -> None:
    """Runs in a forked child: the cases ``indices`` until ``deadline``, one JSON line per event."""
    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork()
    mmap_large_allocations()
    gc.collect()
    gc.freeze()  # the pipeline and the corpus: never scanned again, so each case's gc.collect() is cheap
    out = os.fdopen(write_fd, "w", buffering=1)
    marker = folder / "CODE_RAN"
    # one pristine seed first, not reported: a forked worker's first load and fuse pay one-time costs
    # (the thread pool, the allocator's arenas: ~17 MiB) that would be charged to whichever case came first
    for fmt in ("kohya", "peft"):
        seed = next(s for s in corpus if s.format == fmt)
        run_case(pipe, Case(-1, seed.name, "none", dict(seed.files), None if seed.is_folder else next(iter(seed.files))),
                 folder / "warm-up", before, marker, fuse=True)
    for index in indices:
        if time.time() > deadline:
            break
        out.write(json.dumps({"start": index}) + "\n")
        case = make_case(index, corpus, master_seed, str(marker))
        result = run_case(pipe, case, folder / "case", before, marker, fuse=index % 4 == 0)
        out.write(json.dumps({"result": result}) + "\n")
        if result["changed"]:
            break
    out.write(json.dumps({"done": True}) + "\n")
    out.flush()


@dataclass
class FuzzReport:
    results: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    workers: int = 1
    spawned: int = 0

    def add(self, result: dict) -> None:
        self.results.append(result)

    @property
    def crashes(self) -> list[dict]:
        return [r for r in self.results if r["outcome"] == "crash"]

    @property
    def changed(self) -> list[dict]:
        return [r for r in self.results if r.get("changed")]

    @property
    def code_ran(self) -> list[dict]:
        return [r for r in self.results if r.get("code_ran")]

    def counts(self, key: str = "outcome") -> Counter:
        return Counter(r[key] for r in self.results)

    def summary(self) -> dict:
        by_mutation = {}
        for r in self.results:
            row = by_mutation.setdefault(r["mutation"], Counter())
            row["cases"] += 1
            row[r["outcome"]] += 1
        peaks = [r for r in self.results if r.get("peak_extra") is not None]
        worst = max(peaks, key=lambda r: r["peak_extra"], default=None)
        refused = [r for r in peaks if r["outcome"] != "accepted"]
        return {
            "cases": len(self.results), "seconds": round(self.seconds, 1), "workers": self.workers,
            "worker_processes": self.spawned,
            "outcomes": dict(self.counts()), "crashes": len(self.crashes), "model_changed": len(self.changed),
            "code_ran": len(self.code_ran), "by_mutation": {m: dict(c) for m, c in sorted(by_mutation.items())},
            "max_file_bytes": max((r["size"] for r in self.results), default=0),
            "max_peak_extra_bytes": worst["peak_extra"] if worst else None,
            "max_peak_extra_case": {k: worst[k] for k in ("case", "seed", "mutation", "size", "outcome")} if worst else None,
            "max_peak_extra_refused_bytes": max((r["peak_extra"] for r in refused), default=None),
            "max_peak_over_size": max((r["peak_extra"] / max(r["size"], 1) for r in peaks if r["size"] >= 64 * 1024),
                                      default=None),
            "peak_measured": bool(peaks),
            "max_peak_extra_mib_by_mutation": {
                m: round(max(r["peak_extra"] for r in peaks if r["mutation"] == m) / MiB, 2)
                for m in sorted({r["mutation"] for r in peaks})},
            "mean_case_ms": round(1000 * sum(r["seconds"] for r in self.results) / max(len(self.results), 1), 1),
        }


def fuzz(pipe, corpus: list[Seed], cases: int, master_seed: int = 0, time_limit: float = 1200.0,
         case_timeout: float = 120.0, workers: int = 1, log=None) -> FuzzReport:
    """Run cases ``0..cases-1`` in forked children of this process (which keeps the pristine pipeline),
    ``workers`` at a time, worker ``w`` taking the cases ``w, w + workers, …``. A child that dies (a
    signal: segfault, abort, the kernel's out-of-memory killer) or hangs past ``case_timeout`` costs one
    case, recorded as a crash, and a new child goes on from the case after it; so does a case that left
    the model changed (the next child starts from the pristine copy). Stops after ``time_limit`` s."""
    report = FuzzReport(workers=workers)
    before = model_state(pipe)
    root = Path(tempfile.mkdtemp(prefix="fuzz-"))
    start = time.time()
    deadline = start + time_limit
    slots = {}  # read fd -> [pid, next index, pending index, buffer, done, folder]

    def spawn(w: int, first: int) -> None:
        if first >= cases or time.time() >= deadline:
            return
        folder = root / f"w{w}"
        folder.mkdir(exist_ok=True)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(read_fd)
            for fd in slots:
                os.close(fd)
            code = 0
            try:
                _fuzz_child(write_fd, pipe, corpus, before, range(first, cases, workers), master_seed, deadline,
                            folder)
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        os.close(write_fd)
        report.spawned += 1
        slots[read_fd] = {"pid": pid, "worker": w, "next": first, "pending": None, "buffer": b"", "done": False,
                          "folder": folder, "last": time.time()}

    def finish(fd: int, hung: bool) -> None:
        slot = slots.pop(fd)
        if hung:
            os.kill(slot["pid"], signal.SIGKILL)
        os.close(fd)
        _, status = os.waitpid(slot["pid"], 0)
        if slot["pending"] is not None:
            how = (f"killed by {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status)
                   else f"exit status {os.WEXITSTATUS(status)}")
            case = make_case(slot["pending"], corpus, master_seed, "")
            report.add({"case": case.index, "seed": case.seed, "mutation": case.mutation,
                        "size": sum(len(b) for b in case.files.values()), "outcome": "crash",
                        "error": "hang" if hung else "worker died",
                        "message": f"the worker was {how}" + (f" after {case_timeout:.0f} s without an answer"
                                                               if hung else ""),
                        "seconds": case_timeout if hung else 0.0, "peak_extra": None, "changed": [],
                        "code_ran": (slot["folder"] / "CODE_RAN").exists()})
            slot["next"] = slot["pending"] + workers
        elif not slot["done"] and time.time() < deadline and slot["next"] < cases:
            raise RuntimeError(f"fuzz worker {slot['worker']} ended without reporting (status {status})")
        spawn(slot["worker"], slot["next"])

    try:
        for w in range(min(workers, cases)):
            spawn(w, w)
        while slots:
            ready, _, _ = select.select(list(slots), [], [], 1.0)
            now = time.time()
            for fd in list(slots):
                if fd not in ready:
                    if now - slots[fd]["last"] > case_timeout:
                        finish(fd, hung=True)
                    continue
                slot = slots[fd]
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    finish(fd, hung=False)
                    continue
                slot["last"] = now
                slot["buffer"] += chunk
                while b"\n" in slot["buffer"]:
                    line, slot["buffer"] = slot["buffer"].split(b"\n", 1)
                    event = json.loads(line)
                    if "start" in event:
                        slot["pending"] = event["start"]
                    elif "result" in event:
                        report.add(event["result"])
                        slot["pending"] = None
                        slot["next"] = event["result"]["case"] + workers
                        if log and len(report.results) % 500 == 0:
                            log(f"  fuzz: {len(report.results)} cases, {dict(report.counts())}, "
                                f"{time.time() - start:.0f} s")
                    elif "done" in event:
                        slot["done"] = True
    finally:
        for fd, slot in list(slots.items()):
            os.kill(slot["pid"], signal.SIGKILL)
            os.waitpid(slot["pid"], 0)
            os.close(fd)
        report.seconds = time.time() - start
        report.results.sort(key=lambda r: r["case"])
        shutil.rmtree(root, ignore_errors=True)
    return report


# ---- drift: fuse/unfuse cycles -------------------------------------------------------------------------
DRIFT_STACK = ("lora", "lokr", "oft", "hra")


def make_stack_files(pipe, folder: Path, algos=DRIFT_STACK, targets: str = "unet-attn-ff") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [make_adapter(pipe, folder / f"stack-{a}.safetensors", a, seed=40 + i, targets=targets)
            for i, a in enumerate(algos)]


def _max_difference(model_tensors: dict, reference: dict) -> tuple[float, bool]:
    """``(max |a − b| over every tensor, bitwise equal)``."""
    worst, same = 0.0, True
    for c, tensors in reference.items():
        for k, ref in tensors.items():
            now = model_tensors[c][k]
            if not torch.equal(now, ref):
                same = False
                worst = max(worst, float((now.double() - ref.double()).abs().max()))
    return worst, same


def drift(pipe, files: list[Path], dtype: torch.dtype, cycles: int, seed: int = 0, time_limit: float = 600.0) -> dict:
    """``cycles`` fuse/unfuse cycles of the mixed stack in ``files`` on a copy of ``pipe`` in ``dtype``.

    Each cycle draws new weights for the stack (``set_adapters``), fuses the whole stack or a random
    part of it, and unfuses; every tensor of the UNet and the text encoder (base weights and adapter
    tensors) is then compared with its value before the first cycle. The figure is the maximum
    difference over all cycles (bitwise equality is the claim). After the cycles the adapters are
    unloaded and the model is compared with the pristine copy."""
    import copy

    rng = random.Random(seed)
    work = copy.deepcopy(pipe).to(dtype=dtype)
    parts = components(work)
    pristine = {c: {k: v.clone() for k, v in getattr(work, c).state_dict().items()} for c in parts}
    names = [work.load_adapter(f, f"a{i}") for i, f in enumerate(files)]
    original = {c: {k: v.clone() for k, v in getattr(work, c).state_dict().items()} for c in parts}
    worst, bitwise, fused_moved, done = 0.0, True, False, 0
    start = time.time()
    for i in range(cycles):
        if time.time() - start > time_limit:
            break
        work.set_adapters(names, [rng.choice([0.5, 0.8, 1.0, 1.3, -0.7]) for _ in names])
        subset = names if i % 2 == 0 else sorted(rng.sample(names, rng.randint(1, len(names))))
        work.fuse_adapters(subset)
        if not fused_moved:
            now = {c: getattr(work, c).state_dict() for c in parts}
            fused_moved = _max_difference(now, original)[0] > 0
        work.unfuse_adapters()
        diff, same = _max_difference({c: getattr(work, c).state_dict() for c in parts}, original)
        worst, bitwise, done = max(worst, diff), bitwise and same, i + 1
    work.unload_adapters()
    after_unload, unload_bitwise = _max_difference({c: getattr(work, c).state_dict() for c in parts}, pristine)
    return {"dtype": str(dtype).removeprefix("torch."), "cycles": done, "stack": [Path(f).stem for f in files],
            "max_difference": worst, "bitwise": bitwise, "fusing_changed_weights": fused_moved,
            "unload_max_difference": after_unload, "unload_bitwise": unload_bitwise,
            "seconds": round(time.time() - start, 1)}


# ---- leaks: load/unload cycles -------------------------------------------------------------------------
def live_tensors() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def leak_cycles(target, source: Path, cycles: int, fuse: bool = True, time_limit: float = 900.0) -> dict:
    """``cycles`` × (load ``source``, [fuse, unfuse,] unload) on ``target``: a pipeline given
    ``lycoris_lite.enable`` (its API) or a bare UNet (:func:`lycoris_lite.io.files.load_adapter` and the
    controller's ``unload``). After each cycle: ``gc.collect()``, then VmRSS (*raw*), then
    ``malloc_trim(0)`` and VmRSS again (*trimmed*: glibc's free heap pages given back, so what is left is
    memory in use), and the number of live tensors. Growth is measured from the end of the first cycle
    (which allocates the caches, the name maps and the allocator's arenas for good)."""
    from lycoris_lite.io.files import load_adapter

    is_pipe = hasattr(target, "load_adapter")
    raw, trimmed, tensors, seconds = [], [], [], []
    start = time.time()
    for i in range(cycles):
        if i >= 2 and time.time() - start > time_limit:
            break
        t0 = time.perf_counter()
        if is_pipe:
            name = target.load_adapter(source, "leak")
            if fuse:
                target.fuse_adapters()
                target.unfuse_adapters()
            target.unload_adapters()
        else:
            load_adapter({"unet": target}, source, "leak")
            ctrl = controller_for(target)
            if fuse:
                ctrl.merge_adapter(["leak"])
                ctrl.unmerge_adapter()
            ctrl.unload()
        seconds.append(time.perf_counter() - t0)
        gc.collect()
        raw.append(rss())
        malloc_trim()
        trimmed.append(rss())
        tensors.append(live_tensors())
    growth = lambda series: (series[-1] - series[0]) / series[0]  # noqa: E731
    return {"cycles": len(raw), "rss_after_first_mib": round(raw[0] / MiB, 1),
            "growth_raw": growth(raw), "growth_trimmed": growth(trimmed),
            "growth_raw_mib": round((raw[-1] - raw[0]) / MiB, 2), "growth_trimmed_mib": round((trimmed[-1] - trimmed[0]) / MiB, 2),
            "max_growth_trimmed": max((t - trimmed[0]) / trimmed[0] for t in trimmed),
            "live_tensors_first": tensors[0], "live_tensors_last": tensors[-1], "live_tensors_max": max(tensors),
            "seconds_per_cycle": round(sum(seconds) / len(seconds), 3), "adapter_bytes": Path(source).stat().st_size,
            "rss_raw_mib": [round(r / MiB, 1) for r in raw], "rss_trimmed_mib": [round(r / MiB, 1) for r in trimmed]}


# ---- killed mid-write ---------------------------------------------------------------------------------
def _content(file: Path):
    """What a file holds, compared by meaning: a safetensors file's metadata and each tensor's dtype,
    shape and bytes (safetensors writes its metadata map in a random order), a JSON file's value, or
    the raw bytes (also of anything that does not parse)."""
    blob = file.read_bytes()
    try:
        if file.suffix == ".safetensors":
            header, data = split_safetensors(blob)
            tensors = {k: (v["dtype"], tuple(v["shape"]), data[v["data_offsets"][0]:v["data_offsets"][1]])
                       for k, v in header.items() if k != "__metadata__"}
            if sum(len(t[2]) for t in tensors.values()) != len(data):
                return ("unreadable", blob)
            return (header.get("__metadata__"), tensors)
        if file.suffix == ".json":
            return json.loads(blob)
    except (ValueError, KeyError, TypeError, struct.error):
        return ("unreadable", blob)
    return blob


def _snapshot(path: Path) -> dict | None:
    """The content of the file at ``path``, or of every (non-hidden) file under the folder ``path``."""
    if path.is_file():
        return {"": _content(path)}
    if path.is_dir():
        return {str(p.relative_to(path)): _content(p) for p in sorted(path.rglob("*"))
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)}
    return None


def _temporaries(folder: Path) -> list[Path]:
    """Hidden entries in ``folder``: what a killed writer leaves beside its target."""
    return [p for p in folder.glob(".*")]


def _fork_writer(write, first: int) -> int:
    """Fork a child that calls ``write(first)``, ``write(first + 1)``, … until it is killed; its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            torch.set_num_threads(1)
            i = first
            while True:
                write(i)
                i += 1
        finally:
            os._exit(1)
    return pid


def kill_during_writes(write, versions: list, target: Path, kills: int, seed: int = 0, max_delay: float | None = None,
                       verify=None, time_limit: float = 600.0) -> dict:
    """SIGKILL a process that writes ``target`` over and over, at random moments, ``kills`` times.

    ``write(version)`` writes one complete version of ``target``; the killed process (a fork of this
    one) writes ``versions[0], versions[1], versions[0], …`` without pause. Before the first kill
    ``target`` holds ``versions[0]``. After each kill the content of ``target`` (:func:`_content`) must
    equal one of the versions' (each version written once beforehand to learn them); ``verify(target)`` may check
    more (e.g. that the file loads). The delay before each kill is uniform in ``[0, max_delay]``
    (default: three times the time one write takes), so kills land in every phase of a write:
    converting, writing the bytes, flushing, renaming. Hidden temporaries a kill leaves beside
    ``target`` are counted; the library removes them at the next write, which the end checks."""
    rng = random.Random(seed)
    expected = []
    for v in versions:
        write(v)
        expected.append(_snapshot(target))
    t0 = time.perf_counter()
    write(versions[0])
    one_write = time.perf_counter() - t0
    max_delay = max_delay if max_delay is not None else 3 * one_write
    found, most_temporaries, problems, done = Counter(), 0, [], 0
    start = time.time()
    for k in range(kills):
        if time.time() - start > time_limit:
            break
        pid = _fork_writer(lambda i: write(versions[i % len(versions)]), 1)
        time.sleep(rng.uniform(0, max_delay))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        done += 1
        now = _snapshot(target)
        match = next((i for i, e in enumerate(expected) if e == now), None)
        if match is None:
            problems.append(f"kill {k}: {target.name} is neither version "
                            f"({'missing' if now is None else sorted(now)})")
        else:
            found[match] += 1
        if verify is not None and match is not None:
            try:
                verify(target)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"kill {k}: {target.name} does not load: {exc}")
        most_temporaries = max(most_temporaries, len(_temporaries(target.parent)))
    write(versions[0])  # a later save removes what killed writers left
    return {"kills": done, "versions_found": {f"v{i}": found[i] for i in range(len(versions))},
            "partial_or_mixed": len(problems), "problems": problems[:10],
            "most_temporaries_at_once": most_temporaries,
            "temporaries_after_next_save": len(_temporaries(target.parent)),
            "write_seconds": round(one_write, 3), "max_delay_seconds": round(max_delay, 3)}


def adapter_versions(pipe, folder: Path, fmt: str = "kohya", big_metadata: int = 4 * MiB) -> tuple[list, Path]:
    """Two adapters on ``pipe`` (different algorithms, ranks and values) and the file that takes turns
    holding them; a large ``ss_tag_frequency`` makes the bytes-writing phase long enough to be hit."""
    folder.mkdir(parents=True, exist_ok=True)
    algos = ("lora", "lokr") if fmt == "kohya" else ("lora", "lora")
    settings = [{"r": 4}, {"r": 8} if fmt != "kohya" else SETTINGS["lokr"]]
    paths = [make_adapter(pipe, folder / f"v{i}" / ("v.safetensors" if fmt != "peft" else "v"), algo, fmt,
                          seed=50 + i, settings=s, targets="unet-attn-ff")
             for i, (algo, s) in enumerate(zip(algos, settings))]
    for i, path in enumerate(paths):
        pipe.load_adapter(path, f"v{i}")
    metadata = {"ss_tag_frequency": json.dumps({"tags": "x" * big_metadata})}
    target = folder / ("adapter.safetensors" if fmt != "peft" else "adapter")
    return [(f"v{i}", metadata) for i in range(2)], target


# ---- bad arguments: the command line ---------------------------------------------------------------------
#: (id, argv, what stderr must say). ``{name}`` is replaced by a path from :func:`bad_input_files`.
CLI_BAD_ARGUMENTS = [
    ("no-command", [], r"required"),
    ("unknown-command", ["frobnicate"], r"invalid choice: 'frobnicate'"),
    ("unknown-option", ["inspect", "{lora}", "--bogus"], r"unrecognized arguments: --bogus"),
    ("inspect-no-file", ["inspect"], r"required: FILE"),
    ("inspect-missing", ["inspect", "{missing}"], r"missing\.safetensors: no such file"),
    ("inspect-corrupt", ["inspect", "{junk}"], r"junk\.safetensors: not a safetensors file"),
    ("inspect-truncated", ["inspect", "{truncated}"], r"truncated\.safetensors: .*(truncated|corrupt|exceeds)"),
    ("inspect-top-tags-0", ["inspect", "{lora}", "--top-tags", "0"], r"--top-tags: must be a positive integer, got 0"),
    ("inspect-top-tags-text", ["inspect", "{lora}", "--top-tags", "many"], r"--top-tags: must be a positive integer"),
    ("inspect-pickle", ["inspect", "{ckpt}"], r"ckpt is a pickle file.*refused"),
    ("inspect-code-pickle", ["inspect", "{evil}", "--allow-pickle"], r"evil\.ckpt: .*(weights_only|archive)"),
    ("inspect-empty-folder", ["inspect", "{empty}"], r"a folder without an adapter"),
    ("inspect-peft-no-weights", ["inspect", "{peft_no_weights}"], r"not found: .*adapter_model\.safetensors"),
    ("convert-missing", ["convert", "{missing}", "{out}", "--to", "kohya", "--model", "tiny-sd"], r"no such file"),
    ("convert-no-to", ["convert", "{lora}", "{out}", "--model", "tiny-sd"], r"required: --to"),
    ("convert-bad-format", ["convert", "{lora}", "{out}", "--to", "onnx", "--model", "tiny-sd"],
     r"invalid choice: 'onnx'"),
    ("convert-bad-dtype", ["convert", "{lora}", "{out}", "--to", "kohya", "--model", "tiny-sd", "--dtype", "float8"],
     r"invalid choice: 'float8'"),
    ("convert-rank-0", ["convert", "{lora}", "{out}", "--to", "kohya", "--model", "tiny-sd", "--rank", "0"],
     r"--rank: must be a positive integer, got 0"),
    ("convert-rank-float", ["convert", "{lora}", "{out}", "--to", "kohya", "--model", "tiny-sd", "--rank", "2.5"],
     r"--rank: must be a positive integer"),
    ("convert-unknown-model", ["convert", "{lora}", "{out}", "--to", "kohya", "--model", "tiny-sd3"],
     r"cannot load the model 'tiny-sd3'"),
    ("convert-nan", ["convert", "{nan}", "{out}", "--to", "kohya", "--model", "tiny-sd"], r"NaN/Inf"),
    ("convert-wrong-family", ["convert", "{sdxl}", "{out}", "--to", "kohya", "--model", "tiny-sd"],
     r"for SDXL"),
    ("convert-out-under-a-file", ["convert", "{lora}", "{notes}/out.safetensors", "--to", "kohya", "--model",
                                  "tiny-sd"], r"notes\.txt is a file, not a folder"),
    ("convert-out-is-in", ["convert", "{lora}", "{lora}", "--to", "kohya", "--model", "tiny-sd"], r"OUT is IN"),
    ("convert-oft-to-diffusers", ["convert", "{oft}", "{out}", "--to", "diffusers", "--model", "tiny-sd"],
     r"cannot hold this adapter.*--rank"),
    ("combine-weight-nan", ["combine", "--model", "tiny-sd", "--adapter", "{lora}:nan", "--out", "{out}"],
     r"must be a finite number, got 'nan'"),
    ("combine-weight-text", ["combine", "--model", "tiny-sd", "--adapter", "{lora}:heavy", "--out", "{out}"],
     r"lora\.safetensors:heavy: no such file"),
    ("combine-no-out", ["combine", "--model", "tiny-sd", "--adapter", "{lora}"], r"required: --out"),
    ("combine-bad-type", ["combine", "--model", "tiny-sd", "--adapter", "{lora}", "--type", "mean", "--out", "{out}"],
     r"invalid choice: 'mean'"),
    ("combine-density-text", ["combine", "--model", "tiny-sd", "--adapter", "{lora}", "--type", "ties", "--density",
                              "half", "--out", "{out}"], r"--density: invalid float value: 'half'"),
    ("combine-density-0", ["combine", "--model", "tiny-sd", "--adapter", "{lora}", "--adapter", "{oft}", "--type",
                           "ties", "--density", "0", "--out", "{out}"], r"density must be a number in \(0, 1\]"),
    ("combine-density-nan", ["combine", "--model", "tiny-sd", "--adapter", "{lora}", "--adapter", "{oft}", "--type",
                             "ties", "--density", "nan", "--out", "{out}"], r"density must be a number in \(0, 1\]"),
    ("combine-clamp-2", ["combine", "--model", "tiny-sd", "--adapter", "{lora}", "--clamp", "2", "--out", "{out}"],
     r"svd_clamp must be a quantile in \(0, 1\]"),
    ("combine-seed-text", ["combine", "--model", "tiny-sd", "--adapter", "{lora}", "--seed", "x", "--out", "{out}"],
     r"--seed: invalid int value: 'x'"),
    ("combine-sign", ["combine", "--model", "tiny-sd", "--adapter", "{lora}", "--majority-sign", "most", "--out",
                      "{out}"], r"invalid choice: 'most'"),
    ("combine-peft-file", ["combine", "--model", "tiny-sd", "--adapter", "{lora}", "--to", "peft", "--out",
                           "{out}"], r"peft format is a folder"),
    ("combine-nan", ["combine", "--model", "tiny-sd", "--adapter", "{nan}", "--out", "{out}"], r"NaN/Inf"),
    ("extract-no-size", ["extract", "--base", "tiny-sd", "--tuned", "tiny-sd", "--out", "{out}"],
     r"one of the arguments --rank --energy is required"),
    ("extract-energy-0", ["extract", "--base", "tiny-sd", "--tuned", "tiny-sd", "--energy", "0", "--out", "{out}"],
     r"energy must be a number in \(0, 1\]"),
    ("extract-energy-nan", ["extract", "--base", "tiny-sd", "--tuned", "tiny-sd", "--energy", "nan", "--out",
                            "{out}"], r"energy must be a number in \(0, 1\]"),
    ("extract-max-rank-0", ["extract", "--base", "tiny-sd", "--tuned", "tiny-sd", "--energy", "0.5", "--max-rank",
                            "0", "--out", "{out}"], r"--max-rank: must be a positive integer"),
    ("extract-bad-method", ["extract", "--base", "tiny-sd", "--tuned", "tiny-sd", "--rank", "4", "--method", "qr",
                            "--out", "{out}"], r"invalid choice: 'qr'"),
    ("extract-tuned-is-a-file", ["extract", "--base", "tiny-sd", "--tuned", "{lora}", "--rank", "4", "--out",
                                 "{out}"], r"cannot load the model"),
    ("merge-missing-adapter", ["merge", "--model", "tiny-sd", "--adapter", "{missing}", "--out", "{outdir}"],
     r"no such file"),
    ("merge-weight-inf", ["merge", "--model", "tiny-sd", "--adapter", "{lora}:inf", "--out", "{outdir}"], r"finite"),
    ("merge-out-exists", ["merge", "--model", "tiny-sd", "--adapter", "{lora}", "--out", "{full}"], r"exists"),
    ("merge-single-file-suffix", ["merge", "--model", "tiny-sd", "--adapter", "{lora}", "--single-file", "--out",
                                  "{out_bin}"], r"\.safetensors"),
    ("merge-nan", ["merge", "--model", "tiny-sd", "--adapter", "{nan}", "--out", "{outdir}"], r"NaN/Inf"),
    ("merge-pickle", ["merge", "--model", "tiny-sd", "--adapter", "{ckpt}", "--out", "{outdir}"], r"pickle.*refused"),
]


def bad_input_files(pipe, folder: Path) -> dict[str, Path]:
    """The inputs :data:`CLI_BAD_ARGUMENTS` names, made on ``pipe`` (the tiny SD pipeline) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    lora = make_adapter(pipe, folder / "lora.safetensors", "lora", seed=60, targets="unet-attn")
    oft = make_adapter(pipe, folder / "oft.safetensors", "oft", seed=61, targets="unet-attn")
    state, meta = load_tensors(lora.read_bytes())
    key = next(k for k in state if k.endswith("lora_up.weight"))
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    (folder / "nan.safetensors").write_bytes(save_tensors(state, meta))
    clean, _ = load_tensors(lora.read_bytes())
    (folder / "sdxl.safetensors").write_bytes(save_tensors(
        {k.replace("lora_te_", "lora_te2_"): v for k, v in clean.items()}, meta))
    (folder / "model.ckpt").write_bytes(_pickle_bytes(clean))
    (folder / "evil.ckpt").write_bytes(_pickle_bytes({"state_dict": clean, "x": _RunsCode(str(folder / "CODE_RAN"))}))
    (folder / "junk.safetensors").write_bytes(b"\x80\x04 this is not a safetensors file at all")
    (folder / "truncated.safetensors").write_bytes(lora.read_bytes()[:5000])
    (folder / "notes.txt").write_text("a file, not a folder")
    (folder / "empty").mkdir(exist_ok=True)
    (folder / "full").mkdir(exist_ok=True)
    (folder / "full" / "keep.txt").write_text("mine")
    peft = make_adapter(pipe, folder / "peft_no_weights", "lora", "peft", seed=62, targets="unet-attn")
    for p in peft.rglob("adapter_model.safetensors"):
        p.unlink()
    peft = peft / "unet"
    return {"lora": lora, "oft": oft, "nan": folder / "nan.safetensors", "sdxl": folder / "sdxl.safetensors",
            "ckpt": folder / "model.ckpt", "evil": folder / "evil.ckpt", "junk": folder / "junk.safetensors",
            "truncated": folder / "truncated.safetensors", "notes": folder / "notes.txt", "empty": folder / "empty",
            "full": folder / "full", "peft_no_weights": peft, "missing": folder / "missing.safetensors",
            "out": folder / "out.safetensors", "outdir": folder / "merged", "out_bin": folder / "merged.bin"}


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.rglob("*"))}


@contextlib.contextmanager
def cached_tiny_models():
    """``tiny-sd``/``tiny-sdxl`` built once and deep-copied for each command (building takes seconds)."""
    import copy
    from unittest import mock

    from lycoris_lite import models

    built = {}

    def cached(builder):
        def build(*args, **kwargs):
            if args or kwargs:
                return builder(*args, **kwargs)
            if builder not in built:
                built[builder] = builder()
            return copy.deepcopy(built[builder])
        return build

    with mock.patch.object(models, "build_tiny_sd_pipeline", cached(models.build_tiny_sd_pipeline)), \
            mock.patch.object(models, "build_tiny_sdxl_pipeline", cached(models.build_tiny_sdxl_pipeline)):
        yield


def run_cli_bad_arguments(names: dict[str, Path], cases=None) -> list[dict]:
    """Each bad command line through ``lycoris_lite.integrations.cli.main`` in this process: its exit status, whether
    stderr says what :data:`CLI_BAD_ARGUMENTS` expects, and whether anything was written (every file
    under the inputs' folder compared before and after)."""
    import re

    from lycoris_lite.integrations import cli

    folder = names["lora"].parent
    results = []
    for case_id, argv, message in cases or CLI_BAD_ARGUMENTS:
        before = _tree(folder)
        argv = [a.format(**names) for a in argv]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = cli.main(argv)
            except BaseException as exc:  # noqa: BLE001 - an escaping exception is a finding
                code = f"raised {type(exc).__name__}: {exc}"
        text = err.getvalue()
        after = _tree(folder)
        written = sorted(set(after) - set(before)) + sorted(k for k in before if after.get(k) != before[k])
        results.append({"id": case_id, "exit": code, "message_ok": bool(re.search(message, text, re.S)),
                        "written": written, "stderr": text.strip().splitlines()[-1][:300] if text.strip() else "",
                        "code_ran": (folder / "CODE_RAN").exists()})
        for p in set(after) - set(before):  # undo, so the next case starts from the same tree
            path = folder / p
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
    return results


# ---- bad arguments: the trainer --------------------------------------------------------------------------
TRAINER = ROOT / "pipelines" / "train_dreambooth.py"
#: (id, options changed in a valid short run (None: left out), what stderr must say). Every one must stop
#: with exit status 2 before anything is written.
TRAINER_BAD_ARGUMENTS = [
    ("learning-rate-text", {"learning_rate": "fast"}, r"--learning_rate: invalid float value: 'fast'"),
    ("learning-rate-negative", {"learning_rate": -1}, r"--learning_rate"),
    ("learning-rate-nan", {"learning_rate": "nan"}, r"--learning_rate"),
    ("learning-rate-inf", {"learning_rate": "inf"}, r"--learning_rate"),
    ("text-encoder-lr-negative", {"train_text_encoder": True, "text_encoder_lr": -1}, r"--text_encoder_lr"),
    ("rank-0", {"rank": 0}, r"r >= 1"),
    ("rank-negative", {"rank": -4}, r"non-negative integer, got -4"),
    ("alpha-nan", {"alpha": "nan"}, r"alpha"),
    ("unknown-algo", {"algo": "dora"}, r"invalid choice: 'dora'"),
    ("block-size-0", {"algo": "oft", "block_size": 0}, r"block_size >= 1"),
    ("dropout-1.5", {"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
    ("resolution-60", {"resolution": 60}, r"multiple of 8"),
    ("batch-0", {"train_batch_size": 0}, r"--train_batch_size must be >= 1"),
    ("steps-0", {"max_train_steps": 0}, r"--max_train_steps must be >= 1"),
    ("epochs-0", {"max_train_steps": None, "num_train_epochs": 0}, r"--num_train_epochs"),
    ("warmup-negative", {"lr_warmup_steps": -5}, r"--lr_warmup_steps"),
    ("max-grad-norm-nan", {"max_grad_norm": "nan"}, r"--max_grad_norm"),
    ("adam-beta1-1.5", {"adam_beta1": 1.5}, r"beta"),
    ("adam-epsilon-negative", {"adam_epsilon": -1}, r"epsilon"),
    ("snr-gamma-negative", {"snr_gamma": -1}, r"--snr_gamma"),
    ("prior-loss-weight-nan", {"prior_loss_weight": "nan"}, r"--prior_loss_weight"),
    ("workers-negative", {"dataloader_num_workers": -1}, r"num_workers"),
    ("seed-too-big", {"seed": 2 ** 70}, r"--seed"),
    ("output-name-with-folder", {"output_name": "../escaped"}, r"--output_name"),
    ("save-precision", {"save_precision": "fp8"}, r"invalid choice: 'fp8'"),
    ("unknown-preset", {"unet_targets": "unet-atention"}, r"unknown preset 'unet-atention'"),
    ("target-matching-nothing", {"unet_targets": "to_qq"}, r"match no module"),
    ("missing-images", {"instance_data_dir": "{tmp}/nowhere"}, r"no such folder"),
    ("missing-model", {"pretrained_model_name_or_path": "{tmp}/no-model"}, r"not found"),
    ("resume-missing", {"resume_from_checkpoint": "{tmp}/no-checkpoint"}, r"--resume_from_checkpoint"),
    ("config-missing", {"config": "{tmp}/nope.toml"}, r"--config .*nope\.toml: no such file"),
    ("config-bad-key", {"config": "{tmp}/bad.toml"}, r"unknown option 'learning_rat'"),
]


def trainer_args(out: Path, **overrides) -> list[str]:
    """A short, valid DreamBooth run on the tiny model and ``samples/instance`` (options override)."""
    from lycoris_lite.integrations.training.options import to_argv

    settings = {"pretrained_model_name_or_path": "tiny-sd", "instance_data_dir": ROOT / "samples" / "instance",
                "instance_prompt": "a photo of sks duck", "resolution": 64, "train_batch_size": 1,
                "max_train_steps": 2, "learning_rate": 1e-2, "seed": 0, "output_dir": out,
                "checkpointing_steps": 1000, **overrides}
    return to_argv(settings)


def run_trainer_bad_arguments(folder: Path, cases=None, in_process: bool = True) -> list[dict]:
    """Each bad trainer option: exit status, message, and whether anything was written under
    ``folder`` (the output folder, the config files and the scratch paths all live there)."""
    import re

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bad.toml").write_text('learning_rat = 0.1\n')
    results = []
    for case_id, overrides, message in cases or TRAINER_BAD_ARGUMENTS:
        out = folder / "out"
        argv = trainer_args(out, **{k: v.format(tmp=folder) if isinstance(v, str) else v for k, v in overrides.items()})
        before = _tree(folder)
        if in_process:
            code, text = _trainer_in_process(argv)
        else:
            proc = subprocess.run([sys.executable, str(TRAINER), *argv], capture_output=True, text=True, timeout=600,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            code, text = proc.returncode, proc.stderr
        after = _tree(folder)
        written = sorted(set(after) - set(before)) + sorted(k for k in before if after.get(k) != before[k])
        results.append({"id": case_id, "exit": code, "message_ok": bool(re.search(message, text, re.S)),
                        "written": written[:5],
                        "stderr": text.strip().splitlines()[-1][:300] if text.strip() else ""})
        shutil.rmtree(out, ignore_errors=True)
    return results


def _trainer_in_process(argv: list[str]) -> tuple[object, str]:
    """``main(argv)`` of the trainer in this process (accelerate's process state reset first)."""
    import importlib.util

    from accelerate.state import AcceleratorState, GradientState

    spec = importlib.util.spec_from_file_location("train_dreambooth_for_reliability", TRAINER)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = script.main(argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException as exc:  # noqa: BLE001 - an escaping exception is a finding
            code = f"raised {type(exc).__name__}"
            err.write(f"{type(exc).__name__}: {exc}")
    return code, err.getvalue()


# ---- killed mid-training and mid-checkpoint --------------------------------------------------------------
def _trainer_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def killed_training(folder: Path, kills: int = 3, steps: int = 24, every: int = 2, algo: str = "lora",
                    seed: int = 0, time_limit: float = 1500.0, log=None) -> dict:
    """A DreamBooth run SIGKILLed ``kills`` times at random moments (each time after a random checkpoint
    of the ones still to come has been written, leaving room for the kills after it, plus a random delay
    of up to one checkpoint interval, as measured in the uninterrupted run, so a kill lands anywhere in a
    step or a checkpoint write), resumed
    with ``--resume_from_checkpoint latest`` each time (without ``--seed``: it comes back from the
    checkpoint), against the same run uninterrupted. float32; the figure is the largest difference
    between the two adapters' tensors."""
    from safetensors.torch import load_file

    rng = random.Random(seed)
    options = dict(max_train_steps=steps, checkpointing_steps=every, checkpoints_total_limit=2, algo=algo,
                   train_batch_size=1)
    name = f"dreambooth_{algo}.safetensors"
    start = time.time()
    reference = folder / "reference"
    t0 = time.time()
    folder.mkdir(parents=True, exist_ok=True)
    errors = open(folder / "reference.log", "w+b")
    proc = subprocess.Popen([sys.executable, str(TRAINER), *trainer_args(reference, **options)], env=_trainer_env(),
                            stdout=errors, stderr=errors)
    seen = {}  # checkpoint step -> when it appeared: the interval between checkpoints bounds the delays
    while proc.poll() is None:
        if time.time() - start > time_limit:
            proc.kill()
            raise TimeoutError("killed_training ran out of time")
        now = time.time()
        for p in reference.glob("checkpoint-*"):
            seen.setdefault(int(p.name.split("-")[1]), now)
        time.sleep(0.01)
    with errors:
        errors.seek(0)
        if proc.returncode:
            raise RuntimeError(f"the uninterrupted run failed: {errors.read().decode()[-2000:]}")
    run_seconds = time.time() - t0
    times = [seen[s] for s in sorted(seen)]
    interval = statistics.median(b - a for a, b in zip(times, times[1:])) if len(times) > 2 else run_seconds / steps
    out = folder / "killed"
    killed_at, partial = [], []
    for k in range(kills + 1):
        resume = {"resume_from_checkpoint": "latest", "seed": None} if k else {}
        proc = subprocess.Popen([sys.executable, str(TRAINER), *trainer_args(out, **options, **resume)],
                                env=_trainer_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if k == kills:
            proc.wait(timeout=max(60.0, time_limit - (time.time() - start)))
            break
        done = [int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")] if out.exists() else []
        # a kill lands at most one checkpoint past its target: two intervals of room for each later kill
        first, last = max(done, default=0) + every, steps - 2 * every * (kills - k)
        target = rng.randrange(first, last + 1, every) if first <= last else first
        while not (out / f"checkpoint-{target}").is_dir() and proc.poll() is None:
            if time.time() - start > time_limit:
                proc.kill()
                raise TimeoutError("killed_training ran out of time")
            time.sleep(0.02)
        time.sleep(rng.uniform(0, interval))
        proc.kill()
        proc.wait()
        if proc.returncode != -signal.SIGKILL:
            raise RuntimeError(f"the run ended (status {proc.returncode}) before it could be killed")
        latest = max((int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")), default=0)
        killed_at.append(latest)
        for p in out.rglob("*.safetensors"):  # every visible file is complete
            if not any(part.startswith(".") for part in p.relative_to(out).parts):
                try:
                    load_file(str(p))
                except Exception as exc:  # noqa: BLE001
                    partial.append(f"{p.relative_to(out)}: {exc}")
        if log:
            log(f"  training: kill {k + 1} after checkpoint-{latest}")
    a, b = load_file(str(reference / name)), load_file(str(out / name))
    worst = max(float((a[key] - b[key]).abs().max()) for key in a) if a.keys() == b.keys() else float("inf")
    return {"steps": steps, "checkpoint_every": every, "algo": algo, "kills": len(killed_at),
            "killed_after_checkpoints": killed_at, "max_difference": worst, "same_keys": a.keys() == b.keys(),
            "partial_files_seen": partial, "hidden_leftovers": sorted(str(p.relative_to(out)) for p in out.rglob(".*")),
            "uninterrupted_run_seconds": round(run_seconds, 1), "checkpoint_interval_seconds": round(interval, 3),
            "seconds": round(time.time() - start, 1)}


def checkpoint_kill_writes(folder: Path, kills: int, seed: int = 0, size: int = 1 << 20,
                           time_limit: float = 600.0) -> dict:
    """A process writing training checkpoints (``lycoris_lite.integrations.training.checkpoint.save``: adapter state,
    optimizer, scheduler, state.json and the adapter file, keeping the newest two) SIGKILLed at random
    moments, ``kills`` times. After each kill every ``checkpoint-N`` folder must load and hold exactly
    step N's content, and ``latest()`` must name a complete one; the next process resumes from it."""
    from lycoris_lite.integrations.training import checkpoint

    rng = random.Random(seed)
    out = folder / "checkpoints"

    def content(step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(step)
        return {"unet.layer.lora_down": torch.randn(size // 8, 2, generator=g),
                "unet.layer.lora_up": torch.full((size // 8, 2), float(step))}

    def write(step: int) -> None:
        param = torch.nn.Parameter(torch.zeros(4))
        optimizer = torch.optim.AdamW([param], lr=0.1)
        param.grad = torch.full((4,), float(step))
        optimizer.step()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        state = content(step)
        checkpoint.save(out, step, adapter_state=state, optimizer=optimizer, scheduler=scheduler,
                        state={"seed": 0}, total_limit=2,
                        extra=lambda f: save_tensors_file(f / "adapter.safetensors", state))

    write(1)  # warm-up (imports)
    t0 = time.perf_counter()
    write(1)
    one = time.perf_counter() - t0
    step, problems, done, found = 2, [], 0, Counter()
    start = time.time()
    for k in range(kills):
        if time.time() - start > time_limit:
            break
        pid = _fork_writer(write, step)
        time.sleep(rng.uniform(0, 3 * one))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        done += 1
        visible = sorted(p for p in out.glob("checkpoint-*"))
        complete = dict((p, s) for s, p in checkpoint.checkpoints(out))
        for p in visible:
            if p not in complete:
                problems.append(f"kill {k}: {p.name} has no state.json (a partial checkpoint)")
                continue
            try:
                loaded = checkpoint.load(p)
                expected = content(complete[p])
                same = loaded.step == complete[p] and loaded.adapter_state.keys() == expected.keys() and all(
                    torch.equal(loaded.adapter_state[key], expected[key]) for key in expected)
                adapter, _ = load_tensors((p / "adapter.safetensors").read_bytes())
                same = same and all(torch.equal(adapter[key], expected[key]) for key in expected)
                if not same:
                    problems.append(f"kill {k}: {p.name} holds other content than step {complete[p]}")
            except Exception as exc:  # noqa: BLE001
                problems.append(f"kill {k}: {p.name} does not load: {exc}")
        latest = checkpoint.latest(out)
        if latest is None:
            problems.append(f"kill {k}: no complete checkpoint")
        else:
            found["newest"] += 1
            step = int(latest.name.split("-")[1]) + 1
    checkpoint.remove_temporaries(out)
    return {"kills": done, "problems": len(problems), "examples": problems[:5], "write_seconds": round(one, 3),
            "checkpoints_written": step - 1, "hidden_leftovers_after_cleanup": len(list(out.rglob(".*")))}


def save_tensors_file(path: Path, state: dict[str, torch.Tensor]) -> None:
    from lycoris_lite.io.formats.safe_io import write_state_dict

    write_state_dict(path, state)


# ---- the web UI under load -------------------------------------------------------------------------------
UI_APP = ROOT / "ui" / "app.py"
UI_SLOTS = 3
#: one stack per client (the example adapters ``ui/app.py`` writes for the tiny model), in slot order
UI_STACKS = [
    [("watercolor", 0.8)],
    [("tilt", 0.6), ("watercolor", 1.0)],
    [("mirror", -1.0), ("butterfly", 1.0)],
    [("sks_dog", 1.2), ("tilt", 0.5), ("mirror", 0.7)],
    [("butterfly", 0.4), ("sks_dog", 0.9)],
    [("watercolor", 0.3), ("mirror", 1.1), ("butterfly", -0.5)],
    [("sks_dog", 0.6)],
    [("tilt", 1.0), ("sks_dog", -0.8), ("watercolor", 0.5)],
]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ui_server(folder: Path, timeout: float = 300.0):
    """``python ui/app.py`` on the tiny model, on a free loopback port, in its own process: yields the URL."""
    import httpx

    port = _free_port()
    log = open(folder / "ui-server.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_TEMP_DIR": str(folder / "gradio"),
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(UI_APP), "--model", "tiny-sd", "--adapters", str(folder / "adapters"),
                             "--port", str(port), "--slots", str(UI_SLOTS), "--max-loaded", "16"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the UI exited ({proc.returncode}); see {folder / 'ui-server.log'}")
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise TimeoutError("the UI did not start")
            time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _slots(stack) -> list:
    values = []
    for i in range(UI_SLOTS):
        name, weight = stack[i] if i < len(stack) else (None, 1.0)
        values += [True, name, weight, None, None]
    return values


def _generate_args(seed: int, steps: int) -> list:
    return ["a photo of sks dog", "", seed, steps, 7, 64, 64, 1, "Default"]


def _image(result) -> "object":
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(result[0][0]["image"]).convert("RGB"))


def ui_load(folder: Path, clients: int = 8, generations: int = 25, steps: int = 2, time_limit: float = 900.0,
            request_timeout: float = 300.0) -> dict:
    """``clients`` gradio_client sessions on the UI (its own process, loopback), each with its own stack
    (:data:`UI_STACKS`) and seed: first each session's image alone (one session at a time), then all
    sessions at once, ``generations`` requests each; every image must equal its session's image alone.
    Latency is per request, from ``predict`` to its answer."""
    import statistics
    import threading

    import numpy as np
    from gradio_client import Client

    folder.mkdir(parents=True, exist_ok=True)
    with ui_server(folder) as (url, proc):
        sessions = [Client(url, verbose=False, download_files=str(folder / f"downloads-{i}")) for i in range(clients)]
        try:
            alone = []
            for i, client in enumerate(sessions):
                client.predict(*_slots(UI_STACKS[i % len(UI_STACKS)]), api_name="/set_stack")
                alone.append(_image(client.predict(*_generate_args(100 + i, steps), api_name="/generate")))
            distinct = len({a.tobytes() for a in alone})
            latencies, mismatches, errors = [], Counter(), []
            deadline = time.time() + time_limit
            lock = threading.Lock()

            def work(i: int) -> None:
                client = sessions[i]
                for _ in range(generations):
                    if time.time() > deadline:
                        with lock:
                            errors.append(f"client {i}: out of time")
                        return
                    t0 = time.perf_counter()
                    try:
                        job = client.submit(*_generate_args(100 + i, steps), api_name="/generate")
                        image = _image(job.result(timeout=request_timeout))
                    except Exception as exc:  # noqa: BLE001 - a failed request is the figure
                        with lock:
                            errors.append(f"client {i}: {type(exc).__name__}: {str(exc)[:200]}")
                        continue
                    elapsed = time.perf_counter() - t0
                    with lock:
                        latencies.append(elapsed)
                        if not np.array_equal(image, alone[i]):
                            mismatches[i] += 1

            start = time.time()
            threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.time() - start
        finally:
            for client in sessions:
                client.close()
        alive = proc.poll() is None
    latencies.sort()
    q = (lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))]) if latencies else (lambda p: None)
    return {"clients": clients, "generations_each": generations, "steps": steps, "requests_served": len(latencies),
            "mismatches": sum(mismatches.values()), "errors": len(errors), "error_examples": errors[:5],
            "p50_seconds": round(q(0.5), 3) if latencies else None, "p95_seconds": round(q(0.95), 3) if latencies else None,
            "mean_seconds": round(statistics.fmean(latencies), 3) if latencies else None,
            "throughput_per_second": round(len(latencies) / wall, 2), "wall_seconds": round(wall, 1),
            "distinct_reference_images": distinct, "server_alive_after": alive}


#: (id, handler, arguments, what the message must say): wrong types, out-of-range numbers, unknown names
UI_BAD_INPUTS = [
    ("weight-text", "set_stack", {"slot": (True, "watercolor", "heavy", None, None)}, r"weight"),
    ("weight-nan", "set_stack", {"slot": (True, "watercolor", float("nan"), None, None)}, r"finite"),
    ("weight-inf", "set_stack", {"slot": (True, "watercolor", float("inf"), None, None)}, r"finite"),
    ("unet-weight-text", "set_stack", {"slot": (True, "watercolor", 1.0, "x", None)}, r"weight"),
    ("unknown-adapter", "set_stack", {"slot": (True, "nope", 1.0, None, None)}, r"no adapter named 'nope'"),
    ("path-as-adapter", "set_stack", {"slot": (True, "../tilt", 1.0, None, None)}, r"no adapter named '\.\./tilt'"),
    ("seed-text", "generate", {"seed": "x"}, r"seed"),
    ("seed-negative", "generate", {"seed": -5}, r"seed must be"),
    ("seed-huge", "generate", {"seed": 2 ** 70}, r"seed must be"),
    ("steps-0", "generate", {"steps": 0}, r"steps must be"),
    ("steps-huge", "generate", {"steps": 10_000}, r"steps must be"),
    ("steps-text", "generate", {"steps": "many"}, r"steps"),
    ("steps-nan", "generate", {"steps": float("nan")}, r"steps"),
    ("cfg-nan", "generate", {"guidance": float("nan")}, r"CFG scale must be a finite number"),
    ("cfg-negative", "generate", {"guidance": -1}, r"CFG scale must be"),
    ("cfg-text", "generate", {"guidance": "x"}, r"CFG"),
    ("width-63", "generate", {"width": 63}, r"width must be a multiple of 8"),
    ("width-huge", "generate", {"width": 100_000}, r"width must be"),
    ("width-text", "generate", {"width": "wide"}, r"width"),
    ("count-0", "generate", {"count": 0}, r"number of images must be"),
    ("sampler-unknown", "generate", {"sampler": "nope"}, r"unknown sampler 'nope'"),
    ("tag-weight-text", "generate", {"prompt": "a <lora:watercolor:abc>"}, r"must be a number, got 'abc'"),
    ("tag-unknown-adapter", "generate", {"prompt": "a <lora:nope:1>"}, r"no adapter named 'nope'"),
    ("tag-weight-nan", "generate", {"prompt": "a <lora:watercolor:nan>"}, r"finite"),
    ("upload-none", "add_adapter", {"file": None}, r"Choose a \.safetensors file"),
    ("upload-unsafe-name", "add_adapter", {"file": "{tilt}", "name": "../../evil.safetensors"}, r"unsafe file name"),
    ("upload-corrupt", "add_adapter", {"file": "{corrupt}"}, r"truncated|corrupt|not a safetensors"),
    ("upload-pickle", "add_adapter", {"file": "{pickle}", "name": "model.ckpt"}, r"safetensors|pickle"),
]


def run_ui_bad_inputs(engine, folder: Path, max_upload_bytes: int = 600_000, cases=None) -> list[dict]:
    """Each bad input through the UI's handlers (what a page event calls; a stack row is followed by a
    generation with that stack, as the Generate button does): a ``gr.Error`` whose message says what
    :data:`UI_BAD_INPUTS` expects (any other exception shows as a bare "Error" on the page), and the
    adapters folder unchanged."""
    import importlib.util
    import re

    import gradio as gr

    spec = importlib.util.spec_from_file_location("lycoris_ui_app_for_reliability", UI_APP)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    handlers = app.Handlers(engine, max_upload_bytes)
    library = engine.library.folder
    tilt = next(library.rglob("tilt.safetensors"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corrupt.safetensors").write_bytes(tilt.read_bytes()[:3000])
    state, _ = load_tensors(tilt.read_bytes())
    (folder / "model.ckpt").write_bytes(_pickle_bytes(state))
    files = {"tilt": str(tilt), "corrupt": str(folder / "corrupt.safetensors"), "pickle": str(folder / "model.ckpt")}
    generate = {"prompt": "a photo of sks dog", "negative": "", "seed": 3, "steps": 2, "guidance": 7, "width": 64,
                "height": 64, "count": 1, "sampler": "Default"}
    results = []
    for case_id, handler, args, message in cases or UI_BAD_INPUTS:
        before = _tree(library)
        if handler == "set_stack":  # the Generate button: set_stack, then generate with its stack
            def call():
                stack, _ = handlers.set_stack(*args["slot"], *[v for _ in range(UI_SLOTS - 1)
                                                               for v in (True, None, 1.0, None, None)])
                return handlers.generate(*generate.values(), stack, progress=lambda *a, **k: None)
        elif handler == "generate":
            values = {**generate, **args}
            call = lambda: handlers.generate(*values.values(), [], progress=lambda *a, **k: None)  # noqa: E731
        else:
            file = args["file"].format(**files) if args["file"] else None
            call = lambda: handlers.add_adapter(file, args.get("name", ""))  # noqa: E731
        try:
            call()
            outcome, text = "accepted", ""
        except gr.Error as exc:
            outcome, text = "gr.Error", str(exc.message if hasattr(exc, "message") else exc)
        except Exception as exc:  # noqa: BLE001 - the page would show a bare "Error"
            outcome, text = f"raised {type(exc).__name__}", str(exc)
        written = _tree(library) != before
        results.append({"id": case_id, "outcome": outcome, "message_ok": outcome == "gr.Error" and
                        bool(re.search(message, text, re.S)), "written": written, "message": text[:200]})
    return results


# ---- the full-size UNet (a worker process of its own) ----------------------------------------------------
def sd15_leaks(cycles: int, folder: Path) -> dict:
    """``cycles`` load/unload cycles of a LoRA (r=16, attention + feed-forward) on the full-size
    SD-1.5-shaped UNet (859M parameters, float32), and the peak memory of one load against the file."""
    from lycoris_lite import LoRAConfig
    from lycoris_lite.io.files import load_adapter
    from lycoris_lite.models import build_sd15_unet

    t0 = time.time()
    unet = build_sd15_unet(seed=0)
    built = time.time() - t0
    ctrl = controller_for(unet)
    ctrl.add_adapter("tmp", LoRAConfig(r=16, target_modules=PRESETS["unet-attn-ff"], init_weights=False),
                     generator=torch.Generator().manual_seed(0))
    path = save_adapter({"unet": unet}, "tmp", folder / "sd15-lora.safetensors")
    ctrl.unload()
    del ctrl
    gc.collect()
    malloc_trim()
    measured = reset_peak()
    rest = rss()
    load_adapter({"unet": unet}, path, "probe")
    peak_extra = peak() - rest if measured else None
    controller_for(unet).unload()
    result = leak_cycles(unet, path, cycles, fuse=False)
    result.update(model_parameters=sum(p.numel() for p in unet.parameters()), build_seconds=round(built, 1),
                  load_peak_extra_mib=round(peak_extra / MiB, 1) if peak_extra is not None else None,
                  load_peak_over_file=round(peak_extra / path.stat().st_size, 2) if peak_extra is not None else None)
    return result


def _worker(kind: str, cycles: int) -> dict:
    """Runs in a fresh process: a leak measurement that nothing else in this benchmark disturbs."""
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="leaks-"))
    try:
        if kind == "leaks-tiny":
            pipe = tiny_pipe()
            path = make_adapter(pipe, folder / "loha.safetensors", "loha", seed=3)
            return {"model": "tiny SD pipeline (UNet + text encoder)", "adapter": "LoHa r=4, unet-full + text encoder",
                    **leak_cycles(pipe, path, cycles, fuse=True)}
        if kind == "leaks-sd15":
            return {"model": "SD-1.5-shaped UNet", "adapter": "LoRA r=16, unet-attn-ff", **sd15_leaks(cycles, folder)}
        raise ValueError(kind)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_worker(kind: str, cycles: int, timeout: float) -> dict:
    """:func:`_worker` in a child Python process (default glibc malloc settings)."""
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--cycles", str(cycles)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise RuntimeError(f"{kind} worker failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the whole run -----------------------------------------------------------------------------------------
SECTIONS = ("fuzz", "drift", "leaks", "killwrite", "training", "ui", "badargs")
FULL = {"fuzz_cases": 10_000, "fuzz_minutes": 40, "drift_cycles": 1000, "leak_cycles_tiny": 200,
        "leak_cycles_sd15": 20, "kills": 50, "training_kills": 3, "ui_clients": 8, "ui_generations": 25}
QUICK = {"fuzz_cases": 240, "fuzz_minutes": 5, "drift_cycles": 50, "leak_cycles_tiny": 30, "leak_cycles_sd15": 0,
         "kills": 6, "training_kills": 0, "ui_clients": 2, "ui_generations": 3}


def _landed(*paths: Path) -> bool:
    return all(p.exists() for p in paths)


def run(sections, sizes: dict, log=print, results: dict | None = None) -> dict:
    """Run ``sections``; the figures go into ``results`` (a new dict by default) as each section ends, so
    a caller keeps what finished if a later section fails."""
    results = {} if results is None else results
    results.update({"sizes": sizes, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
                    "threads": torch.get_num_threads()})
    scratch = Path(tempfile.mkdtemp(prefix="reliability-"))
    try:
        if "fuzz" in sections:
            log("fuzz: building the corpus")
            pipe = fuzz_pipe()
            corpus = build_corpus(pipe, scratch / "corpus", sdxl_pipe=tiny_pipe(sdxl=True))
            report = fuzz(pipe, corpus, sizes["fuzz_cases"], master_seed=2026, workers=2,
                          time_limit=60 * sizes["fuzz_minutes"], log=log)
            results["fuzz"] = {**report.summary(), "corpus": {s.name: s.size for s in corpus},
                               "crash_examples": [{k: r.get(k) for k in ("case", "seed", "mutation", "error", "message",
                                                                           "origin")} for r in report.crashes[:10]]}
            log(f"fuzz: {json.dumps({k: results['fuzz'][k] for k in ('cases', 'outcomes', 'crashes', 'model_changed')})}")
        if "drift" in sections:
            pipe = fuzz_pipe()
            files = make_stack_files(pipe, scratch / "stack")
            results["drift"] = [drift(pipe, files, dtype, sizes["drift_cycles"], seed=i)
                                for i, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16))]
            log(f"drift: {json.dumps(results['drift'])}")
        if "leaks" in sections:
            results["leaks"] = [run_worker("leaks-tiny", sizes["leak_cycles_tiny"], 3600)]
            if sizes["leak_cycles_sd15"]:
                results["leaks"].append(run_worker("leaks-sd15", sizes["leak_cycles_sd15"], 3600))
            log(f"leaks: {json.dumps([{k: v for k, v in r.items() if not k.startswith('rss_')} for r in results['leaks']])}")
        if "killwrite" in sections:
            pipe = tiny_pipe()
            results["killwrite"] = {}
            for fmt in ("kohya", "diffusers", "peft"):
                versions, target = adapter_versions(pipe, scratch / f"write-{fmt}", fmt)

                def write(v, target=target, fmt=fmt):
                    pipe.save_adapter(v[0], target, format=fmt, metadata=v[1])

                def verify(path):
                    lycoris_lite.io.files.read_adapter(pipe, path, "check")

                results["killwrite"][fmt] = kill_during_writes(write, versions, target, sizes["kills"], seed=1,
                                                               verify=verify)
                pipe.unload_adapters()
            log(f"killwrite: {json.dumps(results['killwrite'])}")
        if "training" in sections:
            if not _landed(TRAINER, ROOT / "lycoris_lite" / "training" / "checkpoint.py"):
                results["training"] = "not landed"
            else:
                results["training"] = {
                    "checkpoint_writes": checkpoint_kill_writes(scratch / "ckpt", sizes["kills"], seed=2)}
                if sizes["training_kills"]:
                    results["training"]["killed_runs"] = killed_training(scratch / "train", sizes["training_kills"],
                                                                         log=log)
            log(f"training: {json.dumps(results['training'])}")
        if "ui" in sections:
            if not _landed(UI_APP, ROOT / "lycoris_lite" / "webui.py"):
                results["ui"] = "not landed"
            else:
                results["ui"] = ui_load(scratch / "ui", sizes["ui_clients"], sizes["ui_generations"])
            log(f"ui: {json.dumps(results['ui'])}")
        if "badargs" in sections:
            pipe = tiny_pipe()
            names = bad_input_files(pipe, scratch / "cli")
            with cached_tiny_models():
                results["badargs"] = {"cli": run_cli_bad_arguments(names)}
            if _landed(TRAINER):
                results["badargs"]["trainer"] = run_trainer_bad_arguments(scratch / "trainer")
            if _landed(UI_APP):
                import importlib.util

                spec = importlib.util.spec_from_file_location("lycoris_ui_app_engine", UI_APP)
                app = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(app)
                engine = app.open_engine("tiny-sd", scratch / "ui-bad" / "adapters")
                results["badargs"]["ui"] = run_ui_bad_inputs(engine, scratch / "ui-bad")
            log("badargs: " + json.dumps({k: _bad_summary(v) for k, v in results["badargs"].items()}))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def _bad_summary(rows: list[dict]) -> dict:
    refused = [r for r in rows if (r.get("exit") == 2 if "exit" in r else r["outcome"] == "gr.Error")]
    return {"cases": len(rows), "refused": len(refused), "message_names_the_problem": sum(r["message_ok"] for r in rows),
            "wrote_something": sum(bool(r["written"]) for r in rows),
            "failing": [r["id"] for r in rows if not (r in refused and r["message_ok"] and not r["written"])]}


def markdown(results: dict) -> str:
    """The figures as the README's tables."""
    lines = []
    f = results.get("fuzz")
    if f:
        o = f["outcomes"]
        lines += ["| cases | accepted | clean errors | crashes | model changed | code run | max file | max peak extra |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {f['cases']:,} | {o.get('accepted', 0):,} | {o.get('clean', 0):,} | {f['crashes']} | "
                  f"{f['model_changed']} | {f['code_ran']} | {f['max_file_bytes'] / MiB:.2f} MiB | "
                  f"{(f['max_peak_extra_bytes'] or 0) / MiB:.1f} MiB |", ""]
        lines += ["| mutation | cases | accepted | clean | crash | max peak extra (MiB) |", "|---|---|---|---|---|---|"]
        for m, c in f["by_mutation"].items():
            lines.append(f"| {m} | {c.get('cases', 0)} | {c.get('accepted', 0)} | {c.get('clean', 0)} | "
                         f"{c.get('crash', 0)} | {f['max_peak_extra_mib_by_mutation'].get(m, '–')} |")
        lines.append("")
    if results.get("drift"):
        lines += ["| dtype | cycles | max difference | bitwise | fusing moved the weights | after unload |",
                  "|---|---|---|---|---|---|"]
        for d in results["drift"]:
            lines.append(f"| {d['dtype']} | {d['cycles']} | {d['max_difference']} | {d['bitwise']} | "
                         f"{d['fusing_changed_weights']} | {d['unload_max_difference']} |")
        lines.append("")
    if results.get("leaks"):
        lines += ["| model | cycles | RSS after cycle 1 | growth (raw) | growth (after malloc_trim) | live tensors "
                  "first → last | s/cycle |", "|---|---|---|---|---|---|---|"]
        for r in results["leaks"]:
            lines.append(f"| {r['model']} | {r['cycles']} | {r['rss_after_first_mib']} MiB | "
                         f"{100 * r['growth_raw']:.3f}% ({r['growth_raw_mib']} MiB) | "
                         f"{100 * r['growth_trimmed']:.3f}% ({r['growth_trimmed_mib']} MiB) | "
                         f"{r['live_tensors_first']} → {r['live_tensors_last']} | {r['seconds_per_cycle']} |")
        lines.append("")
    if results.get("killwrite"):
        lines += ["| format | kills | old version | new version | partial or mixed | most temporaries | "
                  "temporaries after the next save |", "|---|---|---|---|---|---|---|"]
        for fmt, r in results["killwrite"].items():
            v = list(r["versions_found"].values())
            lines.append(f"| {fmt} | {r['kills']} | {v[0]} | {v[1]} | {r['partial_or_mixed']} | "
                         f"{r['most_temporaries_at_once']} | {r['temporaries_after_next_save']} |")
        lines.append("")
    t = results.get("training")
    if isinstance(t, dict):
        c = t["checkpoint_writes"]
        lines.append(f"Checkpoint writes: {c['kills']} kills, {c['problems']} partial or wrong checkpoints, "
                     f"{c['checkpoints_written']} checkpoints written, {c['hidden_leftovers_after_cleanup']} "
                     "temporaries left after the trainer's clean-up.")
        if "killed_runs" in t:
            k = t["killed_runs"]
            lines.append(f"Killed runs: {k['kills']} kills after checkpoints {k['killed_after_checkpoints']} of "
                         f"{k['steps']} steps; max difference to the uninterrupted run {k['max_difference']:.3g}; "
                         f"partial files seen {len(k['partial_files_seen'])}.")
        lines.append("")
    u = results.get("ui")
    if isinstance(u, dict):
        lines += ["| clients | generations each | served | mismatches | errors | p50 | p95 | throughput |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {u['clients']} | {u['generations_each']} | {u['requests_served']} | {u['mismatches']} | "
                  f"{u['errors']} | {u['p50_seconds']} s | {u['p95_seconds']} s | {u['throughput_per_second']}/s |", ""]
    if results.get("badargs"):
        lines += ["| surface | cases | refused | message names the problem | wrote something | failing |",
                  "|---|---|---|---|---|---|"]
        for k, rows in results["badargs"].items():
            b = _bad_summary(rows)
            lines.append(f"| {k} | {b['cases']} | {b['refused']} | {b['message_names_the_problem']} | "
                         f"{b['wrote_something']} | {', '.join(b['failing']) or '–'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="the sizes the tests use")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--cycles", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.cycles)))
        return 0
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    start, results = time.time(), {}
    try:
        run(sections, QUICK if args.quick else FULL, log=lambda m: print(m, flush=True), results=results)
    finally:  # what finished is written even when a section fails
        results["seconds"] = round(time.time() - start, 1)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1, default=str))
    print(markdown(results))
    print(f"\n{results['seconds']:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
