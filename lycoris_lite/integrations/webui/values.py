"""Values from the page (a number, text of one, a slider's ``20.0``) as floats and ints, or a ``ValueError``
that names the field."""

from __future__ import annotations

import math


def number(value, what: str) -> float:
    """``value`` (a number, or text of one) as a float, or ``ValueError`` naming ``what``."""
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None


def finite(value, what: str) -> float:
    x = number(value, what)
    if not math.isfinite(x):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return x


def whole(value, what: str) -> int:
    """``value`` as an int (``20.0`` from a slider too), or ``ValueError`` naming ``what``."""
    if isinstance(value, int):
        return int(value)
    x = number(value, what)
    if not x.is_integer():
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    return int(x)

