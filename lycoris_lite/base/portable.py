"""What differs between Linux, macOS and Windows, in one place, each piece with its fallback.

* Flushing a file to disk (:func:`fsync_file`): Windows' ``os.fsync`` (``FlushFileBuffers``) needs a
  handle with write access and raises ``EBADF`` on a read-only one; POSIX takes either.
* The umask (:func:`umask`): read from ``/proc`` on Linux, elsewhere set and restored.
* Flushing a folder, so a rename in it survives a power cut (:func:`fsync_folder`): POSIX only, Windows
  cannot open a folder.
* Swapping two folders in one step (:func:`exchange`): Linux's ``renameat2(RENAME_EXCHANGE)``; elsewhere
  the caller falls back to two renames.
* Whether a process still runs (:func:`process_alive`): ``os.kill(pid, 0)`` on POSIX; on Windows
  ``os.kill`` terminates the process, so ``OpenProcess`` + ``GetExitCodeProcess`` instead.
* Positioned, vectored reads (:func:`read_into`): ``os.preadv`` where the OS has it (Linux, macOS 11+,
  the BSDs), else ``seek`` + ``readinto`` of one buffer at a time.
* ``madvise`` and the pooled anonymous mappings of :mod:`lycoris_lite.core.buffers` (:func:`madvise`,
  :func:`pools_memory`): Linux only.
* float64 (:func:`float64_device`): Apple's MPS has none; float64 work for such a device runs on the CPU.

The C library is opened with ``ctypes.CDLL(None)`` on Linux only (it raises ``TypeError`` on Windows). :data:`WINDOWS` and :data:`LINUX` are read at call time, so a test can emulate another
platform by setting them.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

#: the running platform (read at call time by every function here)
WINDOWS = os.name == "nt"
LINUX = sys.platform.startswith("linux")

#: Linux ``madvise`` advice values (asm-generic/mman-common.h)
MADV_FREE = 8
MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23

#: buffers one ``preadv`` call fills at most (POSIX guarantees 16; Linux and macOS take 1024)
IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") and "SC_IOV_MAX" in os.sysconf_names else 16

_PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
_STILL_ACTIVE = 259
_ERROR_INVALID_PARAMETER = 87  # OpenProcess on a process id nobody has


def _libc_function(name: str):
    """The C library's function ``name`` on Linux; ``None`` elsewhere (so ``ctypes.CDLL(None)`` is never
    called on Windows), where the library cannot be opened, or where it lacks the function."""
    if not LINUX:
        return None
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, TypeError, AttributeError):
        return None


# ---- files and folders ---------------------------------------------------------------------------------
def fsync_file(path: str | os.PathLike) -> None:
    """Flush the file at ``path`` (one this process just wrote) to disk, through a writable handle on
    Windows, where ``os.fsync`` on a read-only one raises ``EBADF``, and a read-only one elsewhere."""
    flags = (os.O_RDWR | getattr(os, "O_BINARY", 0)) if WINDOWS else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename just made in it) to disk where the OS allows; nothing on Windows,
    which cannot open a folder, nor where opening or flushing it fails."""
    if WINDOWS:
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); whether it was done
    (``False`` off Linux, on kernels or file systems without it, and when the C library is unavailable)."""
    renameat2 = _libc_function("renameat2")
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it in ``/proc`` (``os.umask``
    sets it, for a moment, for every thread)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---- processes ---------------------------------------------------------------------------------------
def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs. When that cannot be told it counts as running,
    so a caller never deletes a live writer's files."""
    if WINDOWS:
        return _windows_process_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _windows_process_alive(pid: int) -> bool:
    """``OpenProcess`` + ``GetExitCodeProcess``: running while the exit code is ``STILL_ACTIVE`` (a process
    that exited with code 259 counts as running: the safe side). A process id nobody has makes
    ``OpenProcess`` fail with ``ERROR_INVALID_PARAMETER``; any other failure counts as running."""
    try:
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.OpenProcess.restype = ctypes.c_void_p
        handle = kernel32.OpenProcess(_PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
        if not handle:
            return ctypes.get_last_error() != _ERROR_INVALID_PARAMETER
        try:
            code = ctypes.c_ulong()
            if not kernel32.GetExitCodeProcess(ctypes.c_void_p(handle), ctypes.byref(code)):
                return True
            return code.value == _STILL_ACTIVE
        finally:
            kernel32.CloseHandle(ctypes.c_void_p(handle))
    except Exception:  # noqa: BLE001 - no kernel32 (not Windows), a failed call: count it as running
        return True


# ---- reading -----------------------------------------------------------------------------------------
def read_batch_limit() -> int:
    """How many buffers one :func:`read_into` call may fill: :data:`IOV_MAX` with ``os.preadv``, else 1."""
    return IOV_MAX if hasattr(os, "preadv") else 1


def read_into(fh, buffers: list, offset: int) -> int:
    """Read the bytes of the open binary file ``fh`` from ``offset`` on into ``buffers`` (writable buffers,
    at most :func:`read_batch_limit` of them, filled in order); the number of bytes read, which may be
    fewer than asked (0 at the end of the file)."""
    if hasattr(os, "preadv"):
        return os.preadv(fh.fileno(), buffers, offset)
    fh.seek(offset)
    return fh.readinto(buffers[0])


# ---- memory ------------------------------------------------------------------------------------------
def pools_memory() -> bool:
    """Whether large CPU blocks are pooled anonymous mappings (:mod:`lycoris_lite.core.buffers`): Linux only,
    where ``madvise`` can hand an idle block's pages back and fault new ones in at once."""
    return LINUX


def madvise(address: int, length: int, advice: int) -> bool:
    """``madvise(address, length, advice)`` (Linux; ``address`` page-aligned); whether the kernel took it.
    ``False`` elsewhere, without a C library, or when refused."""
    call = _libc_function("madvise")
    if call is None:
        return False
    call.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return call(address, length, advice) == 0


# ---- float64 -----------------------------------------------------------------------------------------
def supports_float64(device: torch.device | str) -> bool:
    """Whether tensors on ``device`` can be float64 (not on Apple's MPS)."""
    return torch.device(device).type != "mps"


def float64_device(device: torch.device | str) -> torch.device:
    """The device to compute float64 on for work on ``device``: itself, or the CPU where it has no float64.
    Callers move float64 inputs there and their results back."""
    device = torch.device(device)
    return device if supports_float64(device) else torch.device("cpu")
