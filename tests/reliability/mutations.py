"""Byte, header and tensor mutations: each turns a seed file's bytes into a hostile variant.

Byte mutations work on a whole safetensors file, header mutations rewrite its JSON header over the same
data, tensor mutations write a well-formed file whose tensors are wrong (see :mod:`.folder_mutations`
for PEFT folders and pickles). Each is ``mutation(blob | (state, metadata), rng, ctx)``; ``ctx`` holds the
corpus and the marker file that code run by a pickle would create.
"""

from __future__ import annotations

import json
import struct

import torch

from .file_bytes import join_safetensors, load_tensors, split_safetensors, tensor_keys

DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "U16", "U32",
          "U64"]
HUGE = [2 ** 31, 2 ** 32 + 1, 2 ** 40, 2 ** 62, 2 ** 63, 2 ** 64 + 7]
JUNK_VALUES = [None, True, -1, 0, 3.5, 1e309, -1e309, float("nan"), 10 ** 30, "x", "", [], [1, "a"], {}, {"a": 1}]


def _pick_tensor(header, rng) -> str:
    return rng.choice(tensor_keys(header))


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
    keys = tensor_keys(header)
    key = rng.choice(keys)
    start, end = header[key]["data_offsets"]
    other = header[rng.choice(keys)]["data_offsets"]
    header[key]["data_offsets"] = rng.choice([
        [end, start], [0, 2 ** 64], [-4, end - start - 4], [start + 1, end + 1], [start, start], other,
        [len(data), len(data) + end - start], [start, len(data) + 1], [2 ** 63, 2 ** 63 + end - start]])
    return join_safetensors(header, data)


def mut_duplicate_key(blob, rng, ctx):
    header, data = split_safetensors(blob)
    keys = tensor_keys(header)
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
