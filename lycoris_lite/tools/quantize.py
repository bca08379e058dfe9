"""Quantize a model's linear layers the way diffusers' quantizers do, so adapters train and run on a
quantized base (QLoRA-style): :func:`quantize_base`.

* ``"nf4"``: bitsandbytes ``Linear4bit`` (NF4, blocks of 64, as ``BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_quant_type="nf4")`` builds them; the layers are swapped as diffusers' bnb loader swaps them);
* ``"int8"``: torchao ``Int8WeightOnlyConfig`` (``quantize_``, as ``TorchAoConfig`` applies it);
* ``"fp8"``: torchao ``Float8WeightOnlyConfig``.

Each backend is an optional extra, detected when asked for, with an error naming the extra. Only
``nn.Linear`` layers are quantized (every backend's kernels are for linear layers); convolutions, norms and
embeddings keep their dtype. The weights are replaced, not copied: no float weight of a quantized layer
is left.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

#: --base_quantization choice -> (backend package, pip extra)
KINDS = {"nf4": ("bitsandbytes", "bitsandbytes"), "int8": ("torchao", "torchao"), "fp8": ("torchao", "torchao")}


def require_backend(kind: str) -> None:
    """``ValueError`` for an unknown kind, ``ImportError`` naming the extra when its package is missing."""
    if kind not in KINDS:
        raise ValueError(f"unknown base quantization {kind!r}; one of {', '.join(KINDS)}")
    package, extra = KINDS[kind]
    if importlib.util.find_spec(package) is None:
        raise ImportError(f"{kind} quantization needs {package}: pip install 'lycoris-lite[{extra}]'")


def _linear_children(model: nn.Module):
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                yield parent, name, child


def quantize_base(model: nn.Module, kind: str, compute_dtype: torch.dtype | None = None) -> int:
    """Quantize every ``nn.Linear`` of ``model`` in place (``kind``: :data:`KINDS`); returns how many.

    ``compute_dtype``: the dtype the NF4 kernels compute in (default: the layers' weight dtype). Run it
    before adapters are attached (a quantized layer then carries them unfused).
    """
    require_backend(kind)
    if kind == "nf4":
        import bitsandbytes as bnb

        count = 0
        for parent, name, child in list(_linear_children(model)):
            device = child.weight.device
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype or child.weight.dtype, quant_type="nf4",
                                      device="cpu")
            layer.load_state_dict(child.state_dict())
            layer = layer.to(device)  # Params4bit quantizes as it moves (bitsandbytes' rule)
            layer.requires_grad_(False)
            setattr(parent, name, layer)
            count += 1
        return count
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    count = sum(1 for _ in _linear_children(model))
    quantize_(model, Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig(),
              filter_fn=lambda module, fqn: type(module) is nn.Linear)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.requires_grad_(False)
    return count


__all__ = ["KINDS", "quantize_base", "require_backend"]
