"""Mutations of a whole adapter: a pickle where safetensors is expected, a PEFT folder's config that is
not JSON or holds wrong values, a folder whose layout is broken. Each is ``mutation(files, name, rng,
ctx) -> (files, load options)``."""

from __future__ import annotations

import json
import pickle

import torch

from .file_bytes import RunsCode, deflated, load_tensors, pickle_bytes
from .memory import MiB
from .mutations import JUNK_VALUES


def mut_pickle(files, name, rng, ctx):
    """A pickle where safetensors is expected (same name), or under a pickle suffix, read with or
    without ``allow_pickle``; half of them would run code when unpickled."""
    state, _ = load_tensors(files[name])
    choice = rng.randrange(6)
    if choice == 5:  # a zip bomb: torch.save's archive re-packed with deflate (16 MiB of zeros in ~20 KiB)
        blob = deflated(pickle_bytes({**state, "padding": torch.zeros(4 * MiB)}))
    elif choice == 0:
        blob = pickle_bytes(state)
    elif choice == 1:
        blob = pickle_bytes({"state_dict": state, "hook": RunsCode(ctx["marker"])})
    elif choice == 2:
        blob = pickle.dumps(RunsCode(ctx["marker"]), protocol=2)
    elif choice == 3:
        blob = pickle_bytes({"state_dict": state})
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
