"""Shared pieces of the adapter benchmarks: shapes, adapter builders for three libraries, one training
step, interleaved timing and a peak-memory probe.

Libraries compared (each wraps the same kind of frozen base layer):

* ``ours``: ``lycoris_lite.AdapterModel``;
* ``peft``: ``peft.get_peft_model`` on an ``nn.Sequential`` holding the layer;
* ``lyco``: the ``lycoris`` package's modules (``LoConModule`` …), hooked onto the layer with ``apply_to()``.

Nothing here is imported by the library or its tests.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo: the tests' harness
from tests.reliability import memory  # noqa: E402

from lycoris_lite.base import dtypes

# ---- shapes (Stable Diffusion 1.x UNet layers, batch 2) ----------------------------------------------

SHAPES = {
    # name: (layer factory, input shape)
    "linear640x1024": (lambda: nn.Linear(640, 640), (2, 1024, 640)),
    "linear320x4096": (lambda: nn.Linear(320, 320), (2, 4096, 320)),
    "conv3x3_320@64": (lambda: nn.Conv2d(320, 320, 3, padding=1), (2, 320, 64, 64)),
}

DTYPES = dtypes.DTYPES


# ---- one benchmarked configuration ----------------------------------------------------------------

@dataclass
class Case:
    """A library's adapter on a fresh copy of the base layer."""

    lib: str  # "ours" | "peft" | "lyco"
    algo: str  # "lora" | "loha" | "lokr" | "oft" | "boft" | "hra"
    variant: str = ""  # e.g. "output", "input", "f1 (as run)"
    note: str = ""
    module: nn.Module | None = None
    params: list = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.lib}/{self.algo}" + (f"[{self.variant}]" if self.variant else "")


def make_base(shape: str, device, dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = SHAPES[shape][0]()
    return layer.to(device=device, dtype=dtype)


def make_input(shape: str, device, dtype, requires_grad: bool, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPES[shape][1], generator=g).to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


# ---- builders -----------------------------------------------------------------------------------------

def build_ours(algo: str, layer: nn.Module, side: str | None = None) -> tuple[nn.Module, list, str]:
    from lycoris_lite import (AdapterModel, BOFTConfig, HRAConfig, LoHaConfig, LoKrConfig, LoRAConfig,
                              OFTConfig)

    common = dict(target_modules=["0"], init_weights=False)
    extra = {} if side is None else {"rotation_side": side}
    config = {
        "lora": lambda: LoRAConfig(r=16, **common),
        "loha": lambda: LoHaConfig(r=8, **common),
        "lokr": lambda: LoKrConfig(r=8, **common),
        "oft": lambda: OFTConfig(block_size=32, use_cayley_neumann=False, **extra, **common),
        "boft": lambda: BOFTConfig(block_size=8, butterfly_factor=2, **extra, **common),
        "hra": lambda: HRAConfig(r=8, **extra, **common),
    }[algo]()
    model = AdapterModel(nn.Sequential(layer), config)
    params = list(model.controller.trainable_parameters())
    for p in params:
        p.requires_grad_(True)
    settings = model.controller.adapter_settings("default")["0"]
    note = ""
    if algo in ("oft", "boft"):
        note = f"{settings.block_num}x{settings.block_size} blocks on {settings.dim}"
        if algo == "boft":
            note += f", {settings.stages} stages"
    elif algo == "hra":
        note = f"r={settings.r} on {settings.dim}"
    elif algo == "lokr":
        note = "shape (a,b,c,d)=" + ",".join(map(str, settings.shape))
    return model, params, note


class _EmulatedFastBlockDiag:
    """Stand-in for PEFT's CUDA ``FastBlockDiag`` (``(N, D, b, b)`` -> ``(N, D·b, D·b)`` block diagonal),
    so PEFT's BOFT can run with the butterfly factor it was asked for on a machine without the
    extension. Same output as the kernel; autograd goes through ``torch.block_diag``."""

    @staticmethod
    def apply(blocks: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.block_diag(*stage.unbind(0)) for stage in blocks])


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def build_peft(algo: str, layer: nn.Module, force_factor: bool = False) -> tuple[nn.Module, list, str]:
    import peft
    from peft import BOFTConfig, HRAConfig, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, get_peft_model

    common = dict(target_modules=["0"], init_weights=False)
    config = {
        "lora": lambda: LoraConfig(r=16, lora_alpha=16, target_modules=["0"], init_lora_weights=False),
        "loha": lambda: LoHaConfig(r=8, alpha=8, **common),
        "lokr": lambda: LoKrConfig(r=8, alpha=8, **common),
        "oft": lambda: OFTConfig(r=0, oft_block_size=32, use_cayley_neumann=False, **common),
        "boft": lambda: BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, **common),
        "hra": lambda: HRAConfig(r=8, **common),
    }[algo]()
    note = ""
    if algo == "boft":
        boft_layer = peft.tuners.boft.layer
        if force_factor:
            with _quiet():  # try the real extension first (CUDA + ninja); CPU: fails, returns None
                boft_layer.get_fbd_cuda()
        saved = boft_layer._FBD_CUDA
        emulated = force_factor and saved is None
        if emulated:
            # pretend the extension loaded (so update_layer keeps the factor) and build the block
            # diagonal with torch instead of the kernel; layers built "as run" have
            # fbd_cuda_available=False and never call FastBlockDiag, so the patch does not touch them
            boft_layer._FBD_CUDA = object()
            boft_layer.FastBlockDiag = _EmulatedFastBlockDiag
        try:
            with _quiet():  # "Failed to load the CUDA extension ... Setting boft_n_butterfly_factor to 1"
                model = get_peft_model(nn.Sequential(layer), config)
        finally:
            boft_layer._FBD_CUDA = saved
        inner = model.base_model.model[0]
        stages = inner.boft_R["default"].shape[0]
        how = "emulated FastBlockDiag" if emulated else ("CUDA extension" if inner.fbd_cuda_available else "fallback, no extension")
        note = f"factor {stages} ran ({how})"
        note += f", rotation {inner.boft_P.shape[-1]}x{inner.boft_P.shape[-1]} dense"
    else:
        with _quiet():
            model = get_peft_model(nn.Sequential(layer), config)
    if algo == "oft" and isinstance(layer, nn.Conv2d):
        from packaging.version import Version

        # PEFT 0.22 rotates the conv's weight (its merged weight) instead of unfolding/folding the input
        if Version(peft.__version__) < Version("0.22"):
            note = "conv: unfold/rotate/fold of the input, not exact for k>1"
        else:
            note = "conv: rotates the weight, exact"
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, note


def build_lyco(algo: str, layer: nn.Module) -> tuple[nn.Module, list, str]:
    from lycoris.modules import ButterflyOFTModule, DiagOFTModule, LoConModule, LohaModule, LokrModule

    layer.requires_grad_(False)
    with _quiet():
        if algo == "lora":
            module = LoConModule("b", layer, 1.0, lora_dim=16, alpha=16)
        elif algo == "loha":
            module = LohaModule("b", layer, 1.0, lora_dim=8, alpha=8)
        elif algo == "lokr":
            module = LokrModule("b", layer, 1.0, lora_dim=8, alpha=8, factor=-1)
        elif algo == "oft":
            module = DiagOFTModule("b", layer, 1.0, lora_dim=32, alpha=0)
        elif algo == "boft":
            # LyCORIS's BOFT needs a power-of-two number of blocks and always uses all log2 stages:
            # block 8 does not fit 640 or 320; the smallest block it accepts (>= 8) is used
            module = None
            for dim in range(8, 65, 2):
                try:
                    module = ButterflyOFTModule("b", layer, 1.0, lora_dim=dim, alpha=0)
                    break
                except (ValueError, TypeError):
                    continue
            if module is None:
                raise ValueError("no BOFT geometry fits")
        else:
            raise KeyError(algo)
    # LyCORIS keeps no float32 copy of its own: on half layers its tensors take the layer's dtype
    module = module.to(device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():  # random, non-identity weights (LyCORIS zero-initialises some)
        g = torch.Generator().manual_seed(2)
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.05)
    module.apply_to()
    note = ""
    if algo in ("oft", "boft"):
        note = f"{module.block_num}x{module.block_size} blocks on {module.dim}"
        if algo == "boft":
            note += f", {module.boft_m} stages"
    params = [p for p in module.parameters() if p.requires_grad]
    return _LycoHolder(layer, module), params, note


class _LycoHolder(nn.Module):
    """The hooked layer plus the LyCORIS module that owns the hook (registered, so ``.parameters()``
    sees it, but not called: ``layer.forward`` already runs it)."""

    def __init__(self, layer: nn.Module, lyco: nn.Module):
        super().__init__()
        self.layer = layer
        self.lyco = lyco

    def forward(self, x):
        return self.layer(x)


def case_specs(libs: list[str], algos: list[str], peft_boft_f2: bool = True) -> list[tuple[str, str, str]]:
    """``(lib, algo, variant)`` in a fixed order; our LoRA (the reference) first. ``peft_boft_f2``: also
    PEFT's BOFT with the butterfly factor it was asked for (emulated kernel on CPU)."""
    specs = []
    for algo in algos:
        if "ours" in libs:
            if algo in ("oft", "boft"):
                specs += [("ours", algo, "output"), ("ours", algo, "input")]
            elif algo == "hra":
                specs += [("ours", algo, "input"), ("ours", algo, "output")]
            else:
                specs.append(("ours", algo, ""))
        if "peft" in libs:
            if algo == "boft":
                specs += [("peft", algo, "as run")] + ([("peft", algo, "f2 emulated")] if peft_boft_f2 else [])
            else:
                specs.append(("peft", algo, ""))
        if "lyco" in libs and algo != "hra":
            specs.append(("lyco", algo, ""))
    return specs


def build_case(lib: str, algo: str, variant: str, shape: str, device, dtype) -> Case:
    layer = make_base(shape, device, dtype)
    if lib == "ours":
        side = variant or None
        module, params, note = build_ours(algo, layer, side)
    elif lib == "peft":
        module, params, note = build_peft(algo, layer, force_factor=(variant == "f2 emulated"))
    else:
        module, params, note = build_lyco(algo, layer)
    for p in module.parameters():
        if not any(p is q for q in params):
            p.requires_grad_(False)
    return Case(lib, algo, variant, note, module, params)


# ---- the step ---------------------------------------------------------------------------------------

def train_step(case: Case, x: torch.Tensor) -> None:
    """Zero the adapter's gradients, forward, ``loss = mean(y²)``, backward (no optimizer step)."""
    for p in case.params:
        p.grad = None
    if x.grad is not None:
        x.grad = None
    y = case.module(x)
    loss = y.float().square().mean()
    loss.backward()


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(cases: list[Case], x: torch.Tensor, rounds: int, warmup: int = 2, device="cpu",
                     steps_per_sample: int = 1, budget_s: float | None = None,
                     progress: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Seconds per step for every case: ``rounds`` rounds, each timing every case once (A, B, C, A, B, C…),
    the order rotated every round so no case always follows the same one."""
    for case in cases:
        for _ in range(warmup):
            train_step(case, x)
    synchronize(device)
    samples: dict[str, list[float]] = {c.key: [] for c in cases}
    start = time.perf_counter()
    for r in range(rounds):
        order = cases[r % len(cases):] + cases[:r % len(cases)]
        for case in order:
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(steps_per_sample):
                train_step(case, x)
            synchronize(device)
            samples[case.key].append((time.perf_counter() - t0) / steps_per_sample)
        if progress:
            progress(f"round {r + 1}/{rounds}")
        if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
            break
    return samples


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of ``num[i] / den[i]`` (both timed in the same round)."""
    n = min(len(num), len(den))
    return statistics.median(a / b for a, b in zip(num[:n], den[:n]))


# ---- memory -----------------------------------------------------------------------------------------

def _status_kb(field_name: str) -> int:
    """A ``/proc/self/status`` field in KiB (the harness's reader, :mod:`tests.reliability.memory`)."""
    return memory._status(field_name) // 1024


reset_peak_rss = memory.reset_peak  # VmHWM (peak RSS) back to the current RSS


def step_peak_memory(case: Case, x: torch.Tensor, device="cpu") -> float:
    """Extra bytes at the peak of one training step over the resting state (after a warm-up step).

    CUDA: ``max_memory_allocated`` − ``memory_allocated`` before the step. CPU: peak RSS (VmHWM, reset
    just before the step) − RSS at rest; run in a process started with ``MALLOC_MMAP_THRESHOLD_`` set
    low, so every large tensor is its own mapping, returned to the system when freed, and RSS follows
    the live tensors instead of glibc's retained heap.
    """
    train_step(case, x)
    for p in case.params:
        p.grad = None
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        rest = torch.cuda.memory_allocated()
        train_step(case, x)
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - rest)
    if not reset_peak_rss():
        raise RuntimeError("cannot reset peak RSS (/proc/self/clear_refs); memory not measured")
    rest = _status_kb("VmRSS")
    train_step(case, x)
    peak = _status_kb("VmHWM")
    return float(peak - rest) * 1024.0


def env_for_memory_child() -> dict[str, str]:
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # fixed threshold: no dynamic raise, big blocks always mmapped
    env["MALLOC_TRIM_THRESHOLD_"] = "0"
    return env


def library_files() -> list[str]:
    """The ``lycoris_lite`` source files this process has imported."""
    import sys

    files = {getattr(m, "__file__", None) for n, m in list(sys.modules.items()) if n.split(".")[0] == "lycoris_lite"}
    return sorted(f for f in files if f)


def library_fingerprint(files: list[str] | None = None) -> str:
    """Short hash of the imported ``lycoris_lite`` files (read now). Others may edit the library while a
    run is going; the report warns when the code under test moved during the run."""
    digest = hashlib.sha1()
    for path in files if files is not None else library_files():
        digest.update(os.path.basename(path).encode())
        try:
            with open(path, "rb") as f:
                digest.update(f.read())
        except OSError:
            digest.update(b"<missing>")
    return digest.hexdigest()[:10]
