"""What users do to a diffusers pipeline with an adapter, as checks that return numbers.

The checks, on the tiny SD pipeline, per device, dtype and algorithm (one adapter file each, random
non-identity weights on the whole UNet and the text encoder):

* ``cast_after_loading``: ``pipe.load_adapter(file)`` then ``pipe.to(device, dtype)``; the render is
  finite, differs from the base model's and the base weights are in ``dtype``;
* ``fuse``: ``fuse_adapters()`` renders what the unfused adapter rendered (within :data:`TOLERANCE`);
* ``unfuse_bitexact``: ``unfuse_adapters()`` gives back every tensor bit for bit (``torch.equal``);
* ``disable_enable_fused``: while fused, ``disable_adapters()`` renders the base model and
  ``enable_adapters()`` the fused one;
* ``compile``: ``torch.compile(pipe.unet)`` renders what eager did at weights 1, 0.5 and 0.8, with no
  graph break and no recompile when the weight changes (``set_adapters``);
* ``model_offload`` / ``sequential_offload``: ``enable_model_cpu_offload()`` and
  ``enable_sequential_cpu_offload()`` render what the pipeline on the device did (sequential offload may
  instead refuse with an error that names offload); both need an accelerator.

Each check starts from its own copy of a float32 CPU pipeline, so a failure in one leaves the others
alone; :func:`run_check` turns any outcome, an unexpected exception included, into a :class:`Result`.
Used by ``tests/test_gpu.py`` and ``benchmarks/gpu_check.py`` (benchmarks import this harness, never
the reverse), and for its helpers (:func:`make_file`, :func:`render`, :func:`state_of`) by other tests.
"""

from __future__ import annotations

import copy
import functools
import gc
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch._dynamo.utils import counters

import lycoris_lite
from lycoris_lite import ALGORITHMS, PRESETS, controller_for
from lycoris_lite.base.registry import get_algorithm
from lycoris_lite.io.files import save_adapter
from lycoris_lite.models import build_tiny_sd_pipeline

SETTINGS = {"lora": {"r": 4}, "loha": {"r": 4, "alpha": 16}, "lokr": {"r": 4}, "oft": {"block_size": 4},
            "boft": {"block_size": 4, "butterfly_factor": 2}, "hra": {"r": 4}}

#: Largest max |a − b| between two renders (values 0..1) that should be the same image up to rounding:
#: fused against unfused, compiled against eager, offloaded against on the device. It is the tiny random
#: model's own rounding noise in that dtype (on the CPU a bfloat16 render of the base model differs from
#: the float32 one by up to 0.04, fusing moves bfloat16 renders by up to 0.08 and float16 ones by up to
#: 0.011); an adapter's own effect is 0.2 to 0.6.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 1.5e-1}
#: smallest max |adapted − base| for an adapter to count as applied
MIN_EFFECT = 0.05
#: the weights the compile check switches through (the first is the loaded weight)
COMPILE_WEIGHTS = (1.0, 0.5, 0.8)


# ---- pipelines and files ----------------------------------------------------------------------------
def render(pipe, **kwargs) -> np.ndarray:
    """Two steps of "a photo of sks dog" at seed 0 (a CPU generator, so every device starts from the same
    noise), as float images ``(1, H, W, 3)`` in 0..1."""
    generator = torch.Generator().manual_seed(0)
    return pipe("a photo of sks dog", num_inference_steps=2, generator=generator, output_type="np", **kwargs).images


def parts(pipe) -> list[str]:
    return [c for c in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]


def state_of(pipe) -> dict[str, dict[str, torch.Tensor]]:
    """A copy of every component's state dict (adapter tensors included)."""
    return {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in parts(pipe)}


def make_file(pipe, path, algo="lora", unet_targets="unet-full", text_encoder=True, seed=0, fmt="kohya",
              amplify=1.0):
    """An adapter file with non-trivial weights, made on ``pipe`` (left as it was)."""
    cls = get_algorithm(algo).config_class
    gen = torch.Generator().manual_seed(seed)
    for c in parts(pipe):
        if c != "unet" and not text_encoder:
            continue
        targets = PRESETS[unet_targets] if c == "unet" else PRESETS["text-encoder"]
        ctrl = controller_for(getattr(pipe, c))
        ctrl.add_adapter("tmp", cls(**SETTINGS[algo], target_modules=targets, init_weights=False), generator=gen)
        if amplify != 1.0:
            with torch.no_grad():
                for p in ctrl.trainable_parameters(["tmp"]):
                    p.mul_(amplify)
    out = save_adapter(pipe, "tmp", path, format=fmt)
    for c in parts(pipe):
        ctrl = controller_for(getattr(pipe, c), create=False)
        if ctrl is not None:
            ctrl.unload()
    return out


def adapter_file(source, folder: Path, algo: str) -> Path:
    """``folder/<algo>.safetensors`` made on ``source`` by :func:`make_file` with the algorithm's own seed
    (the same file whichever algorithms are picked)."""
    return make_file(source, Path(folder) / f"{algo}.safetensors", algo, seed=list(ALGORITHMS).index(algo))


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max())


# ---- results ----------------------------------------------------------------------------------------
class CheckFailed(AssertionError):
    """A property did not hold; ``numbers`` are what was measured up to then."""

    def __init__(self, message: str, numbers: dict):
        super().__init__(message)
        self.numbers = numbers


class NotApplicable(Exception):
    """The check means nothing here (e.g. CPU offload on the CPU)."""


@dataclass
class Result:
    check: str
    dtype: str
    algo: str
    status: str                                  # PASS, FAIL or SKIP
    numbers: dict = field(default_factory=dict)
    message: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        numbers = " ".join(f"{k}={_short(v)}" for k, v in self.numbers.items())
        details = "  ".join(part for part in (numbers, self.message) if part)
        return f"{self.status:4}  {self.dtype:8}  {self.algo:4}  {self.check:20}  {details}  ({self.seconds:.1f} s)"


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def require(condition: bool, message: str, numbers: dict) -> None:
    if not condition:
        raise CheckFailed(message, numbers)


# ---- one algorithm in one dtype on one device ----------------------------------------------------------
@dataclass
class Case:
    """``source``: the float32 CPU pipeline every check copies; ``file``: the adapter file;
    ``compile_backend``: what ``torch.compile`` uses in the compile check."""

    source: object
    file: Path
    algo: str
    device: str
    dtype: torch.dtype
    compile_backend: str = "inductor"

    @property
    def tolerance(self) -> float:
        return TOLERANCE[self.dtype]

    def fresh(self):
        pipe = lycoris_lite.enable(copy.deepcopy(self.source))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def loaded(self, on_device: bool = True):
        """A copy of the source with the adapter loaded, then cast: ``pipe.to(device, dtype)`` (or, to be
        offloaded, ``pipe.to(dtype=dtype)`` on the CPU). Returns ``(pipe, adapter name)``."""
        pipe = self.fresh()
        name = pipe.load_adapter(self.file)
        if on_device:
            pipe.to(self.device, self.dtype)
        else:
            pipe.to(dtype=self.dtype)
        return pipe, name

    @functools.cached_property
    def base(self) -> np.ndarray:
        """The render of the model without adapters on the device, in the dtype."""
        return render(self.fresh().to(self.device, self.dtype))


def check_cast_after_loading(case: Case) -> dict:
    pipe, _ = case.loaded()
    image = render(pipe)
    base_dtypes, adapter_dtypes = Counter(), Counter()
    for c in parts(pipe):
        for key, tensor in getattr(pipe, c).state_dict().items():
            if tensor.is_floating_point():
                (adapter_dtypes if ".adapters." in key else base_dtypes)[str(tensor.dtype)] += 1
    numbers = {"finite": bool(np.isfinite(image).all()), "max_abs_diff_vs_base": max_diff(image, case.base),
               "base_dtypes": dict(base_dtypes), "adapter_dtypes": dict(adapter_dtypes)}
    require(numbers["finite"], "the render has NaN or Inf", numbers)
    require(numbers["max_abs_diff_vs_base"] >= MIN_EFFECT, f"the render is the base model's (< {MIN_EFFECT})",
            numbers)
    require(set(base_dtypes) == {str(case.dtype)}, f"the base weights are not all {case.dtype}", numbers)
    return numbers


def check_fuse(case: Case) -> dict:
    pipe, _ = case.loaded()
    unfused = render(pipe)
    pipe.fuse_adapters()
    fused = render(pipe)
    numbers = {"max_abs_diff": max_diff(fused, unfused), "tolerance": case.tolerance,
               "fused_vs_base": max_diff(fused, case.base)}
    require(bool(np.isfinite(fused).all()), "the fused render has NaN or Inf", numbers)
    require(numbers["max_abs_diff"] <= case.tolerance, "fused renders differently from unfused", numbers)
    require(numbers["fused_vs_base"] >= MIN_EFFECT, f"the fused render is the base model's (< {MIN_EFFECT})", numbers)
    return numbers


def check_unfuse_bitexact(case: Case) -> dict:
    pipe, _ = case.loaded()
    before = state_of(pipe)
    pipe.fuse_adapters()
    fused = state_of(pipe)
    pipe.unfuse_adapters()
    after = state_of(pipe)
    keys = [(c, k) for c in before for k in before[c]]
    numbers = {"tensors": len(keys),
               "moved_by_fuse": sum(not torch.equal(fused[c][k], before[c][k]) for c, k in keys),
               "differing_after_unfuse": sum(k not in after[c] or not torch.equal(after[c][k], before[c][k])
                                             for c, k in keys)}
    require(numbers["moved_by_fuse"] > 0, "fusing changed no weight", numbers)
    require(numbers["differing_after_unfuse"] == 0 and after.keys() == before.keys()
            and all(after[c].keys() == before[c].keys() for c in before), "unfuse did not restore every tensor", numbers)
    return numbers


def check_disable_enable_fused(case: Case) -> dict:
    pipe, _ = case.loaded()
    pipe.fuse_adapters()
    fused = render(pipe)
    pipe.disable_adapters()
    disabled = render(pipe)
    pipe.enable_adapters()
    enabled = render(pipe)
    numbers = {"disabled_vs_base": max_diff(disabled, case.base), "enabled_vs_fused": max_diff(enabled, fused),
               "tolerance": case.tolerance}
    require(numbers["disabled_vs_base"] <= case.tolerance, "disabled while fused is not the base model", numbers)
    require(numbers["enabled_vs_fused"] <= case.tolerance, "enabled again is not the fused render", numbers)
    return numbers


def check_compile(case: Case) -> dict:
    pipe, name = case.loaded()
    eager = {}
    for weight in COMPILE_WEIGHTS:
        pipe.set_adapters([name], weight)
        eager[weight] = render(pipe)
    pipe.set_adapters([name], COMPILE_WEIGHTS[0])
    torch._dynamo.reset()
    breaks_before, graphs_before = Counter(counters["graph_break"]), counters["stats"]["unique_graphs"]
    pipe.unet = torch.compile(pipe.unet, backend=case.compile_backend)
    numbers = {"backend": case.compile_backend}
    try:
        start = time.perf_counter()
        for i, weight in enumerate(COMPILE_WEIGHTS):
            if i:
                pipe.set_adapters([name], weight)
            numbers[f"max_abs_diff_w{weight}"] = max_diff(render(pipe), eager[weight])
            if i == 0:
                numbers["first_render_s"] = time.perf_counter() - start
                first_graphs = counters["stats"]["unique_graphs"]
        breaks = Counter(counters["graph_break"]) - breaks_before
        numbers.update(graphs=first_graphs - graphs_before, graph_breaks=sum(breaks.values()),
                       recompiles_on_weight_change=counters["stats"]["unique_graphs"] - first_graphs)
        if breaks:
            numbers["graph_break_reasons"] = [reason[:120] for reason, _ in breaks.most_common(3)]
    finally:
        torch._dynamo.reset()
    worst = max(numbers[f"max_abs_diff_w{w}"] for w in COMPILE_WEIGHTS)
    require(worst <= case.tolerance, f"compiled renders differ from eager (tolerance {case.tolerance})", numbers)
    require(numbers["graph_breaks"] == 0, "graph breaks", numbers)
    require(numbers["recompiles_on_weight_change"] == 0, "set_adapters recompiled the UNet", numbers)
    return numbers


def _reference_and_offloadable(case: Case):
    """``(render of the pipeline on the device, a pipeline cast on the CPU, ready to be offloaded)``."""
    if torch.device(case.device).type == "cpu":
        raise NotApplicable("CPU offload needs an accelerator device")
    return render(case.loaded()[0]), case.loaded(on_device=False)[0]


def check_model_offload(case: Case) -> dict:
    reference, pipe = _reference_and_offloadable(case)
    pipe.enable_model_cpu_offload(device=case.device)
    numbers = {"max_abs_diff": max_diff(render(pipe), reference), "tolerance": case.tolerance}
    require(numbers["max_abs_diff"] <= case.tolerance, "the offloaded render differs", numbers)
    return numbers


def check_sequential_offload(case: Case) -> dict:
    """Works (renders what the device did) or refuses with an error that names offload."""
    reference, pipe = _reference_and_offloadable(case)
    try:
        pipe.enable_sequential_cpu_offload(device=case.device)
        image = render(pipe)
    except Exception as exc:  # noqa: BLE001 - refusing is allowed, if the error says why
        numbers = {"mode": "refused", "error": f"{type(exc).__name__}: {exc}"[:300]}
        require("offload" in str(exc).lower(), "failed with an error that does not mention offload", numbers)
        return numbers
    numbers = {"mode": "works", "max_abs_diff": max_diff(image, reference), "tolerance": case.tolerance}
    require(numbers["max_abs_diff"] <= case.tolerance, "the offloaded render differs", numbers)
    return numbers


def check_quantized_nf4(case: Case) -> dict:
    """The UNet loaded through diffusers' own ``BitsAndBytesConfig`` (NF4, computing in the case's dtype;
    CUDA only: diffusers refuses it without a GPU), then the adapter file loaded: the adapter changes the
    render by what it changes on the float pipeline (to NF4's own error), fusing is refused, and unload
    gives the quantized render back exactly."""
    if torch.device(case.device).type != "cuda":
        raise NotApplicable("diffusers' BitsAndBytesConfig loader needs CUDA")
    import tempfile

    from diffusers import BitsAndBytesConfig, UNet2DConditionModel

    with tempfile.TemporaryDirectory() as folder:
        case.source.unet.save_pretrained(folder)
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=case.dtype)
        unet = UNet2DConditionModel.from_pretrained(folder, quantization_config=config, torch_dtype=case.dtype)
    pipe = case.fresh()
    pipe.to(case.device, case.dtype)
    pipe.unet = unet  # bitsandbytes places the quantized model on the GPU as it loads (it cannot be moved after)
    quantized_base = render(pipe)
    pipe.load_adapter(case.file)
    adapted = render(pipe)
    float_pipe, _ = case.loaded()
    numbers = {"effect": max_diff(adapted, quantized_base), "float_effect": max_diff(render(float_pipe), case.base),
               "tolerance": max(case.tolerance, 0.1)}
    try:
        pipe.fuse_adapters()
        numbers["fuse"] = "fused (should have been refused)"
    except ValueError as exc:
        numbers["fuse"] = "refused" if "quantized" in str(exc) else f"refused: {exc}"[:80]
    pipe.unload_adapters()
    numbers["after_unload"] = max_diff(render(pipe), quantized_base)
    require(numbers["effect"] >= MIN_EFFECT, "the adapter does not change the NF4 render", numbers)
    require(abs(numbers["effect"] - numbers["float_effect"]) <= numbers["tolerance"],
            "the adapter's effect on NF4 differs from its effect in float", numbers)
    require(numbers["fuse"] == "refused", "fusing into NF4 was not refused with the reason", numbers)
    require(numbers["after_unload"] == 0.0, "unload did not give the quantized render back", numbers)
    return numbers


CHECKS: dict[str, Callable[[Case], dict]] = {
    "cast_after_loading": check_cast_after_loading,
    "fuse": check_fuse,
    "unfuse_bitexact": check_unfuse_bitexact,
    "disable_enable_fused": check_disable_enable_fused,
    "compile": check_compile,
    "model_offload": check_model_offload,
    "sequential_offload": check_sequential_offload,
    "quantized_nf4": check_quantized_nf4,
}
#: The checks that pass on the CPU in float32 today (the CI smoke test). The others wait on fixes in
#: progress (casting to half precision after loading, compile without graph breaks or recompiles,
#: sequential offload), take minutes on a CPU (compile) or need an accelerator (offload).
CPU_SMOKE = ("cast_after_loading", "fuse", "unfuse_bitexact", "disable_enable_fused")


def run_check(name: str, case: Case) -> Result:
    """Run ``CHECKS[name]`` on ``case``: PASS with its numbers, FAIL with the message (any exception),
    or SKIP; device memory is handed back afterwards."""
    start = time.perf_counter()
    dtype = str(case.dtype).removeprefix("torch.")
    try:
        numbers = CHECKS[name](case)
        result = Result(name, dtype, case.algo, "PASS", numbers)
    except CheckFailed as exc:
        result = Result(name, dtype, case.algo, "FAIL", exc.numbers, str(exc))
    except NotApplicable as exc:
        result = Result(name, dtype, case.algo, "SKIP", message=str(exc))
    except Exception as exc:  # noqa: BLE001 - a crash is a failed check, and the next check runs
        result = Result(name, dtype, case.algo, "FAIL", message=f"{type(exc).__name__}: {exc}"[:500])
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result.seconds = time.perf_counter() - start
    return result


def run_checks(folder: Path, device: str, dtypes: list[torch.dtype], algos: list[str], checks: list[str],
               compile_algos: list[str] | None = None, compile_backend: str = "inductor",
               report: Callable[[Result], None] = lambda result: None) -> list[Result]:
    """Every check in ``checks`` for every dtype and algorithm (``compile`` only for ``compile_algos``,
    default all), each adapter file written into ``folder`` first; ``report`` sees each result."""
    source = build_tiny_sd_pipeline()
    files = {algo: adapter_file(source, folder, algo) for algo in algos}
    results = []
    for dtype in dtypes:
        for algo in algos:
            case = Case(source, files[algo], algo, device, dtype, compile_backend)
            for name in checks:
                if name == "compile" and compile_algos is not None and algo not in compile_algos:
                    continue
                result = run_check(name, case)
                report(result)
                results.append(result)
    return results
