"""Process memory as the kernel reports it (``/proc/self/status``), and glibc's allocator settings."""

from __future__ import annotations

import ctypes
import gc

import torch

MiB = 1024 * 1024


def _status(field_name: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field_name)


def rss() -> int:
    return _status("VmRSS")


def reset_peak() -> bool:
    """Set the kernel's peak-RSS counter (``VmHWM``) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak() -> int:
    return _status("VmHWM")


_LIBC = None


def malloc_trim() -> None:
    """Give glibc's free heap pages back to the system (no-op elsewhere)."""
    global _LIBC
    try:
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def mmap_large_allocations(threshold: int = 65536) -> None:
    """glibc: serve every allocation above ``threshold`` by its own mmap (returned to the system when
    freed) and never keep a free heap top, so RSS follows the live allocations (``mallopt``)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 0)          # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def live_tensors() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))
