"""Value checks shared by loading, attaching and fusing."""

from __future__ import annotations

import math

import torch
from torch.utils.weak import WeakTensorKeyDictionary

_MAGNITUDES = WeakTensorKeyDictionary()


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


def max_magnitude(tensor: torch.Tensor) -> float | None:
    """``max |tensor|`` (one ``aminmax`` pass, no temporary), or None when it holds a NaN/Inf.

    Remembered for this tensor object while its storage, shape and version counter are unchanged, so
    the base weights a UI fuses again and again are looked at once (an in-place write through
    ``.data``, which bypasses the version counter, is not seen)."""
    key = (tensor.data_ptr(), tensor._version, tuple(tensor.shape), tensor.dtype)
    known = _MAGNITUDES.get(tensor)
    if known is not None and known[0] == key:
        return known[1]
    if tensor.numel() == 0:
        value = 0.0
    else:
        low, high = torch.aminmax(tensor.detach())
        value = max(-float(low), float(high))
        value = value if value < float("inf") else None  # NaN compares False: None too
    _MAGNITUDES[tensor] = (key, value)
    return value


def within_range(bound: float | None, dtype: torch.dtype) -> bool:
    """Whether values bounded by ``bound`` in magnitude are certainly finite in ``dtype`` (a factor of
    2 covers the rounding of the sums and products the bound was taken over)."""
    return bound is not None and 2 * bound < torch.finfo(dtype).max
