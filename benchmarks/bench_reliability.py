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
from lycoris_lite import PRESETS, controller_for, get_algorithm  # noqa: E402
from lycoris_lite.files import save_adapter  # noqa: E402

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


def make_case(index: int, corpus: list[Seed], master_seed: int, marker: str) -> Case:
    """Case ``index`` of the run with ``master_seed`` (the same case every time)."""
    rng = random.Random(f"{master_seed}:{index}")
    while True:
        seed = rng.choice(corpus)
        mutation = rng.choice(MUTATIONS)
        if mutation in ("config-not-json", "config-wrong-values", "folder-layout") and seed.format != "peft":
            continue
        break
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
    ``lycoris_lite.enable`` (its API) or a bare UNet (:func:`lycoris_lite.files.load_adapter` and the
    controller's ``unload``). After each cycle: ``gc.collect()``, then VmRSS (*raw*), then
    ``malloc_trim(0)`` and VmRSS again (*trimmed*: glibc's free heap pages given back, so what is left is
    memory in use), and the number of live tensors. Growth is measured from the end of the first cycle
    (which allocates the caches, the name maps and the allocator's arenas for good)."""
    from lycoris_lite.files import load_adapter

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
    return [p for p in folder.rglob(".*")]


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
    ``target`` are counted and removed."""
    rng = random.Random(seed)
    expected = []
    t0 = time.perf_counter()
    for v in versions:
        write(v)
        expected.append(_snapshot(target))
    one_write = (time.perf_counter() - t0) / len(versions)
    write(versions[0])
    max_delay = max_delay if max_delay is not None else 3 * one_write
    found, leftovers, problems, done = Counter(), 0, [], 0
    start = time.time()
    for k in range(kills):
        if time.time() - start > time_limit:
            break
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                torch.set_num_threads(1)
                i = 1
                while True:
                    write(versions[i % len(versions)])
                    i += 1
            finally:
                os._exit(1)
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
        temps = _temporaries(target.parent)
        leftovers += len(temps)
        for p in temps:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return {"kills": done, "versions_found": {f"v{i}": found[i] for i in range(len(versions))},
            "partial_or_mixed": len(problems), "problems": problems[:10], "temporaries_left": leftovers,
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
