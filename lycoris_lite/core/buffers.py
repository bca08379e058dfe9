"""One allocation for the fused weights of a fuse, kept for the next fuse (and one for each adapter file read).

Fusing keeps every original weight (for the bit-exact unfuse) and writes the fused weights into new
memory: exactly one copy of the targeted weights. :func:`packed_empty` carves the tensors out of one
block, each view 64-byte aligned (as :func:`~lycoris_lite.core.slot._own_storage` keeps adapter
tensors, so GEMMs round the same as on separately allocated tensors), its pages faulted in by one
``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14+) rather than one trap per 4 KiB page during the fuse.

On Linux a CPU block of 8 MiB or more is an anonymous mapping of this module's (:class:`_Block`). When
the last tensor on it is dropped (every layer unfused) it is handed to the kernel at once with
``madvise(MADV_FREE)`` (its pages count as available memory, not as used; the kernel takes them
whenever it needs memory, no swap involved) but stays mapped, idle, for the next fuse of a similar
size (``n ≤ size ≤ 2n`` bytes), which writes into the pages still in place instead of faulting fresh
ones in. At most :data:`MAX_IDLE` blocks are kept (the oldest is unmapped); :func:`release_idle`
unmaps them now, and ``LYCORIS_LITE_KEEP_FUSE_MEMORY=0`` unmaps each block when it is dropped.
``benchmarks/bench_machinery.py`` measures what this buys on a fused stack switch (benchmarks/README,
"Memory machinery").

Adapter files are read into one block per file too (:func:`read_block`): its tensors are 64-byte
aligned views that the adapter keeps as its parameters (no copy at attach). Those blocks are pooled the
same way in a pool of their own (a load after an unload reuses the pages; loading files of other sizes
never pushes out the idle fuse block).
"""

from __future__ import annotations

import collections
import mmap
import os
import threading

import numpy as np
import torch

from ..base import portable

ALIGN_BYTES = 64
#: idle blocks kept for reuse (the rest are unmapped, oldest first)
MAX_IDLE = 2
#: smallest block worth a mapping and ``madvise`` (8 MiB)
_MIN_ADVISED = 8 * 1024 * 1024


def keep_fuse_memory() -> bool:
    """Whether a dropped block is kept idle for the next fuse (default; ``LYCORIS_LITE_KEEP_FUSE_MEMORY=0``
    unmaps it at once)."""
    return _flag("LYCORIS_LITE_KEEP_FUSE_MEMORY", True)


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    return default if not value else value in ("1", "true", "yes", "on")


def _madvise_range(start: int, nbytes: int, page: int, advice: int) -> bool:
    """``madvise(advice)`` on the ``page``-aligned interior of ``[start, start + nbytes)`` (at least 8 MiB;
    :func:`lycoris_lite.base.portable.madvise`: Linux); whether the kernel took it. Silently ``False``
    elsewhere or when refused."""
    if nbytes < _MIN_ADVISED:
        return False
    first = (start + page - 1) // page * page
    length = (start + nbytes - first) // page * page
    return portable.madvise(first, length, advice)


def _madvise(block: torch.Tensor, page: int, advice: int) -> bool:
    """:func:`_madvise_range` over a CPU tensor's memory."""
    if block.device.type != "cpu":
        return False
    return _madvise_range(block.data_ptr(), block.numel() * block.element_size(), page, advice)


def _populate(block: torch.Tensor) -> bool:
    """Fault ``block``'s pages in at once (``MADV_POPULATE_WRITE``, Linux 5.14+): the kernel zeroes
    them in one call instead of one trap per 4 KiB page on first write (benchmarks/README
    "Measurements behind the code")."""
    return _madvise(block, mmap.PAGESIZE, portable.MADV_POPULATE_WRITE)


# ---- the pool of mapped blocks -----------------------------------------------------------------------
class _Block:
    """An anonymous private mapping of ``nbytes``; unmapped when this object and every array on it are
    gone (``numpy`` holds the mapping's buffer)."""

    def __init__(self, nbytes: int, pool: "_Pool | None" = None):
        self.nbytes = nbytes
        self.pool = pool  # where it goes back when dropped
        self.map = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.array = np.frombuffer(self.map, dtype=np.uint8)
        self.address = self.array.ctypes.data
        self.resident = False  # every page in place (populated, not handed back since)


class _Lease(np.ndarray):
    """The array torch's tensor holds on a pooled block (``torch.from_numpy`` keeps a reference to it
    until the storage dies); its finaliser hands the block back to the pool."""

    def __array_finalize__(self, obj):
        self._block = None  # views of a lease (none are made) own nothing

    def __del__(self):
        block, self._block = self._block, None
        if block is not None and block.pool is not None:
            try:
                block.pool.give_back(block)
            except Exception:  # pragma: no cover - interpreter shutdown
                pass


class _Pool:
    """Idle blocks, most recently dropped last, each handed to the kernel with ``MADV_FREE`` when filed.

    A block comes back from a finaliser, which may run inside any allocation, this pool's own code
    included: :meth:`give_back` only queues it and never waits for the lock; whoever holds the lock
    files the queue before letting go (:meth:`_unlock`)."""

    def __init__(self):
        self.idle: list[_Block] = []
        self.returned: collections.deque[_Block] = collections.deque()
        self.lock = threading.Lock()

    def give_back(self, block: _Block) -> None:
        if not keep_fuse_memory():
            return  # unmapped with the last reference
        self.returned.append(block)
        if self.lock.acquire(blocking=False):
            self._unlock()

    def _unlock(self) -> None:
        """File the returned blocks, then release the lock; again if more came back meanwhile and the
        lock is free (a holder elsewhere files them itself)."""
        while True:
            while self.returned:
                self._file(self.returned.popleft())
            self.lock.release()
            if not self.returned or not self.lock.acquire(blocking=False):
                return

    def _file(self, block: _Block) -> None:
        """Keep ``block`` idle, its pages handed to the kernel (without ``MADV_FREE`` it is unmapped:
        no memory is held that the kernel cannot take)."""
        block.resident = False
        if not _madvise_range(block.address, block.nbytes, mmap.PAGESIZE, portable.MADV_FREE):
            return
        self.idle.append(block)
        del self.idle[:-MAX_IDLE]

    def take(self, nbytes: int) -> _Block:
        self.lock.acquire()
        try:
            fits = [b for b in self.idle if nbytes <= b.nbytes <= 2 * nbytes]
            if fits:
                block = min(fits, key=lambda b: b.nbytes)
                self.idle.remove(block)
                return block
        finally:
            self._unlock()
        return _Block(nbytes, self)

    def release(self) -> int:
        self.lock.acquire()
        try:
            while self.returned:
                self._file(self.returned.popleft())
            freed = sum(b.nbytes for b in self.idle)
            self.idle.clear()
        finally:
            self._unlock()
        return freed


_POOL = _Pool()  # fuse blocks
_READ_POOL = _Pool()  # blocks of adapter files read (:func:`read_block`): kept apart, so loading files of
# other sizes never pushes out the idle fuse block a fused stack switch reuses


def release_idle() -> int:
    """Unmap the idle blocks kept for the next fuse or file read now; the number of bytes they held."""
    return _POOL.release() + _READ_POOL.release()


def idle_bytes() -> int:
    """Bytes held by idle blocks (their pages may already have been taken back by the kernel)."""
    return sum(b.nbytes for pool in (_POOL, _READ_POOL) for b in list(pool.idle))


def _pooled_block(nbytes: int, dtype: torch.dtype, pool: _Pool) -> torch.Tensor:
    """A 1-D tensor of ``dtype`` on a block of at least ``nbytes`` from ``pool``, its pages populated.
    The setting is read first, so a bad one fails the fuse before anything is written."""
    keep_fuse_memory()
    block = pool.take(nbytes)
    lease = block.array.view(_Lease)
    lease._block = block
    tensor = torch.from_numpy(lease)[:nbytes].view(dtype)
    del lease  # the tensor's storage holds it now
    if not block.resident:
        block.resident = _populate(tensor)
    return tensor


def packed_empty(shapes: list[torch.Size], dtype: torch.dtype, device: torch.device,
                 pool: _Pool | None = _POOL) -> list[torch.Tensor]:
    """Uninitialised contiguous tensors of ``shapes``, views into one block of memory, each starting on
    a 64-byte boundary. The block lives as long as any of the views (then, on Linux, it is kept idle in
    ``pool`` for the next call, unless ``pool`` is ``None``: see the module's notes)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    step = max(1, ALIGN_BYTES // itemsize)
    sizes = [torch.Size(s).numel() for s in shapes]
    total = sum(-(-n // step) * step for n in sizes) + step
    device = torch.device(device)
    if pool is not None and device.type == "cpu" and portable.pools_memory() and total * itemsize >= _MIN_ADVISED:
        block = _pooled_block(total * itemsize, dtype, pool)
    else:
        block = torch.empty(total, dtype=dtype, device=device)
        _populate(block)
    offset = (-(block.data_ptr() // block.element_size())) % step  # first aligned element
    views = []
    for shape, n in zip(shapes, sizes):
        views.append(block[offset:offset + n].view(shape))
        offset += -(-n // step) * step
    return views


#: attribute set on the tensors of a file read into one packed block (:func:`read_block`)
_FILE_BLOCK = "_lycoris_lite_file_block"


def read_block(nbytes: list[int], pooled: bool = True) -> tuple[torch.Tensor, list[int]]:
    """``(block, offsets)``: an uninitialised 1-D ``uint8`` CPU tensor from :func:`packed_empty`
    (64-byte aligned; pooled on Linux from 8 MiB in the pool for reads, unless ``pooled=False``) with room
    for pieces of ``nbytes`` each, and the byte offset of each piece in it (64-byte aligned too), for the
    tensors of one adapter file. The block holds nothing else, so attaching keeps views of it as the
    adapter's parameters rather than copying them (:func:`is_file_block`), and a load after an unload
    reuses the block's pages instead of faulting fresh ones in (``benchmarks/bench_machinery.py``)."""
    offsets, total = [], 0
    for n in nbytes:
        offsets.append(total)
        total += -(-n // ALIGN_BYTES) * ALIGN_BYTES
    block = packed_empty([torch.Size([max(total, ALIGN_BYTES)])], torch.uint8, torch.device("cpu"), _READ_POOL if pooled else None)[0]
    return block, offsets


def mark_file_block(tensor: torch.Tensor) -> torch.Tensor:
    """Mark ``tensor`` (a view of :func:`read_block`'s) as one a file owns whole; returns it."""
    setattr(tensor, _FILE_BLOCK, True)
    return tensor


def is_file_block(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is this very tensor object of a file read (:func:`mark_file_block`): views or
    copies made from it afterwards are not."""
    return tensor.__dict__.get(_FILE_BLOCK, False)
