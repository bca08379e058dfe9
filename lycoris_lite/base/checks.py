"""Value checks shared by loading, attaching and fusing."""

from __future__ import annotations

import math

import torch


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite, in one pass and without a mask tensor.

    A sum is finite only if every term is (NaN and ±Inf propagate; +Inf and −Inf give NaN), so a finite
    float32 sum proves the tensor finite; a non-finite sum (an overflow of large finite values, or a
    real NaN/Inf) falls back to the exact elementwise test.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if tensor.element_size() == 1:  # float8: no sum or isfinite kernels
        tensor = tensor.float()
    if math.isfinite(tensor.sum(dtype=torch.float32 if tensor.dtype != torch.float64 else None).item()):
        return True  # a Python float test: a third of the cost of torch.isfinite on a 0-d tensor
    return bool(torch.isfinite(tensor).all())


def non_finite_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The keys of ``tensors`` whose values hold a NaN or an Inf."""
    return [k for k, v in tensors.items() if not all_finite(v)]
