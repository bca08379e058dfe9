"""The fuzzing corpus (real adapter files of every format and algorithm) and the cases drawn from it:
case ``i`` of a run is a pure function of ``(master seed, i)``."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .file_bytes import load_tensors, save_tensors
from .folder_mutations import FOLDER_MUTATIONS
from .mutations import BLOB_MUTATIONS, STATE_MUTATIONS
from .subjects import ALGOS, make_adapter


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
