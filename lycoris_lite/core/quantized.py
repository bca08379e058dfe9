"""Quantized base layers: what each backend's layer is, how its weight reads as floats, and whether an
adapter may be fused into it.

An adapter on a quantized layer runs unfused: the base op is the quantized layer's own forward (its
kernels, its hooks), the adapter adds its delta on the activations or rotates them around that
forward (:meth:`~lycoris_lite.core.layer.AdapterLayer.forward`). The weight is read as floats only
where the maths needs the weight itself (a DoRA norm, an extraction), into a temporary that is never
kept.

The backends (each detected by the class of the layer or of its weight, never imported here):

* bitsandbytes ``Linear4bit`` (NF4/FP4, ``Params4bit``) and ``Linear8bitLt`` (int8, ``Int8Params``
  with its row scales ``SCB``), as diffusers' ``BitsAndBytesConfig`` loads them;
* torchao tensor subclasses on ``nn.Linear`` (``Int8Tensor``, ``Float8Tensor``, … from ``quantize_``
  or diffusers' ``TorchAoConfig``), which dequantize themselves;
* GGUF: diffusers' ``GGUFLinear`` with a ``GGUFParameter`` (Q8_0, Q4_0, …);
* plain float8 storage (``float8_e4m3fn``/``float8_e5m2`` weights, upcast by diffusers' layerwise
  casting hooks).

Fuse rule (:attr:`QuantizedWeight.fusable`): float8 storage fuses by computing ``W + s·ΔW`` in float32
from the upcast weight and casting back to float8 (the cast is the one rounding, measured in
benchmarks/README); unfusing restores the original float8 tensor bit for bit. Every other backend
refuses to fuse: dequantizing, merging and requantizing would change weights no adapter touched
(blockwise scales are shared), so the adapters stay unfused, which is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

FLOAT8 = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
               if hasattr(torch, name))


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized layer's backend (``"bitsandbytes nf4"``, ``"torchao Int8Tensor"``, ``"gguf Q8_0"``,
    ``"float8 storage"``), the float dtype its forward computes in, whether adapters may be fused into it,
    and its weight as floats (``dequantize(layer)``, a new tensor)."""

    backend: str
    compute_dtype: torch.dtype
    fusable: bool
    dequantize: Callable[[nn.Module], torch.Tensor]


def _bnb_4bit(layer: nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.float32)


def _bnb_int8(layer: nn.Module) -> torch.Tensor:
    """``W = CB · SCB / 127`` per row; the row scales move from the weight to ``layer.state`` at its
    first forward."""
    weight = layer.weight
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
    return weight.data.to(torch.float32) * (scb.to(torch.float32)[:, None] / 127.0)


def _gguf(layer: nn.Module) -> torch.Tensor:
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    return dequantize_gguf_tensor(layer.weight).to(torch.float32)


def quantized_weight(layer: nn.Module) -> QuantizedWeight | None:
    """The :class:`QuantizedWeight` of ``layer``, or ``None`` for a layer with a plain float weight."""
    weight = getattr(layer, "weight", None)
    if weight is None:
        return None
    cls, wcls = type(layer), type(weight)
    if cls.__module__.startswith("bitsandbytes"):
        if wcls.__name__ == "Params4bit":
            kind = getattr(weight, "quant_type", "nf4")
            return QuantizedWeight(f"bitsandbytes {kind}", getattr(layer, "compute_dtype", None) or torch.float32,
                                   False, _bnb_4bit)
        if wcls.__name__ == "Int8Params" and weight.dtype == torch.int8:
            return QuantizedWeight("bitsandbytes int8", torch.float32, False, _bnb_int8)
    if wcls.__name__ == "GGUFParameter":
        kind = getattr(getattr(weight, "quant_type", None), "name", "?")
        return QuantizedWeight(f"gguf {kind}", getattr(layer, "compute_dtype", None) or torch.float32, False, _gguf)
    if wcls.__module__.startswith("torchao"):
        return QuantizedWeight(f"torchao {wcls.__name__}", weight.dtype, False,
                               lambda m: m.weight.dequantize().to(torch.float32))
    if weight.dtype in FLOAT8:
        return QuantizedWeight("float8 storage", torch.float32, True, lambda m: m.weight.detach().to(torch.float32))
    return None


def check_fusable(quant: QuantizedWeight | None, layer_name: str) -> None:
    """Refuse (``ValueError``, nothing changed) to fuse into a layer whose backend has no exact fuse."""
    if quant is not None and not quant.fusable:
        raise ValueError(f"layer {layer_name!r} is {quant.backend}-quantized: fusing would dequantize, merge and "
                         "requantize it, which changes weights the adapter does not touch. Adapters on quantized "
                         "layers run unfused (exact, on the quantized layer's own forward): use them without "
                         "fusing, or load the model unquantized to fuse")


__all__ = ["FLOAT8", "QuantizedWeight", "check_fusable", "quantized_weight"]
