"""The fuse's memory block (``lycoris_lite.core.buffers``): kept idle for the next fuse, never reused while a
tensor still points into it, handed to the kernel with ``MADV_FREE`` when dropped, released on demand,
and safe against the finaliser that returns it running inside the pool's own code."""

from __future__ import annotations

import sys

import pytest
import torch

from lycoris_lite.core import buffers

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the pool is Linux only")

BIG = (2048, 2048)  # 16 MiB in float32: over the 8 MiB the pool starts at


@pytest.fixture(autouse=True)
def empty_pool(monkeypatch):
    monkeypatch.delenv("LYCORIS_LITE_KEEP_FUSE_MEMORY", raising=False)
    buffers.release_idle()
    yield
    buffers.release_idle()


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def block_of(views) -> int:
    return views[0].untyped_storage().data_ptr()


def test_a_dropped_block_is_reused_by_the_next_fuse_of_a_similar_size_and_released_on_demand():
    first = buffers.packed_empty([BIG, (3, 5)], torch.float32, torch.device("cpu"))
    address = block_of(first)
    assert buffers.idle_bytes() == 0
    del first
    assert buffers.idle_bytes() >= 16 * 2 ** 20
    again = buffers.packed_empty([(1024, 4096)], torch.float32, torch.device("cpu"))  # same bytes, other shape
    assert block_of(again) == address and buffers.idle_bytes() == 0
    assert again[0].data_ptr() % buffers.ALIGN_BYTES == 0 and tuple(again[0].shape) == (1024, 4096)
    del again
    half = buffers.packed_empty([(1024, 2048)], torch.bfloat16, torch.device("cpu"))  # 4 MiB: under the pool
    assert half[0].dtype == torch.bfloat16 and buffers.idle_bytes() >= 16 * 2 ** 20
    held = rss_kib()
    freed = buffers.release_idle()
    assert freed >= 16 * 2 ** 20 and buffers.idle_bytes() == 0
    assert held - rss_kib() >= 12 * 1024  # unmapped now (no decay timer keeps it alive)
    assert buffers.release_idle() == 0


def test_a_block_is_never_handed_out_while_a_tensor_points_into_it():
    held = buffers.packed_empty([BIG, BIG], torch.float32, torch.device("cpu"))
    keep = held[1]  # one view survives: the block must stay with it
    keep.fill_(7.0)
    del held
    assert buffers.idle_bytes() == 0
    other = buffers.packed_empty([BIG, BIG], torch.float32, torch.device("cpu"))
    assert block_of(other) != keep.untyped_storage().data_ptr()
    for view in other:
        view.fill_(-1.0)
    assert torch.all(keep == 7.0)
    del keep
    assert buffers.idle_bytes() > 0  # the last view gone: now idle


def test_blocks_of_other_sizes_are_not_reused_and_at_most_max_idle_are_kept():
    sizes = [(2048, 2048), (2048, 8192), (2048, 32768)]  # 16, 64, 256 MiB: none within 2x of another
    blocks = [buffers.packed_empty([s], torch.float32, torch.device("cpu")) for s in sizes]
    addresses = [block_of(b) for b in blocks]
    assert len(set(addresses)) == 3
    while blocks:
        blocks.pop(0)  # dropped in order: 16, 64, 256 MiB
    assert len(buffers._POOL.idle) == buffers.MAX_IDLE  # the oldest (16 MiB) was unmapped
    kept = {b.address for b in buffers._POOL.idle}
    assert kept == set(addresses[-buffers.MAX_IDLE:])
    small = buffers.packed_empty([(2048, 2048)], torch.float32, torch.device("cpu"))
    assert block_of(small) not in kept  # 64 MiB is more than twice 16 MiB: a new block


def test_without_keeping_each_block_is_unmapped_when_dropped(monkeypatch):
    monkeypatch.setenv("LYCORIS_LITE_KEEP_FUSE_MEMORY", "0")
    views = buffers.packed_empty([BIG], torch.float32, torch.device("cpu"))
    del views
    assert buffers.idle_bytes() == 0 and not buffers._POOL.returned


def test_a_dropped_block_is_handed_to_the_kernel_at_once_and_still_reused():
    views = buffers.packed_empty([BIG], torch.float32, torch.device("cpu"))
    address = block_of(views)
    views[0].fill_(2.0)
    del views
    assert buffers.idle_bytes() > 0 and not buffers._POOL.idle[0].resident  # MADV_FREE done
    views = buffers.packed_empty([BIG], torch.float32, torch.device("cpu"))
    assert block_of(views) == address and buffers._POOL.idle == []
    views[0].fill_(3.0)  # pages the kernel may have taken are zero-filled on write, never an error
    assert torch.all(views[0] == 3.0)


def test_a_block_returned_while_the_pool_is_locked_is_filed_when_the_lock_is_let_go():
    """The finaliser runs wherever the last tensor dies, the pool's own locked code included (a garbage
    collection inside ``take``): it queues the block instead of waiting for the lock (which deadlocked)."""
    views = buffers.packed_empty([BIG], torch.float32, torch.device("cpu"))
    pool = buffers._POOL
    pool.lock.acquire()
    del views  # the finaliser runs now, with the lock held by this very thread
    assert len(pool.returned) == 1 and not pool.idle
    pool._unlock()
    assert not pool.returned and len(pool.idle) == 1 and not pool.lock.locked()


def test_fusing_into_a_reused_block_gives_the_same_weights_as_into_a_fresh_one():
    """The reused block holds the last fuse's weights (and here NaNs): every element is overwritten."""
    from lycoris_lite import AdapterModel, LoRAConfig

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.Linear(2048, 1024))
    originals = [m.weight.detach().clone() for m in net]
    model = AdapterModel(net, LoRAConfig(r=4, target_modules=["0", "1"], init_weights=False),
                         generator=torch.Generator().manual_seed(1))
    model.merge_adapter()
    fresh = [m.weight.detach().clone() for m in net]
    address = net[0].weight.untyped_storage().data_ptr()
    model.unmerge_adapter()
    assert all(torch.equal(m.weight, w) for m, w in zip(net, originals))
    stale = buffers.packed_empty([(4 * 2 ** 20,)], torch.float32, torch.device("cpu"))
    assert block_of(stale) == address
    stale[0].fill_(float("nan"))
    del stale
    model.merge_adapter()
    assert net[0].weight.untyped_storage().data_ptr() == address
    assert all(torch.equal(m.weight, w) for m, w in zip(net, fresh))
    model.unmerge_adapter()
    assert all(torch.equal(m.weight, w) for m, w in zip(net, originals))


def test_file_reads_have_a_pool_of_their_own_and_never_push_out_the_idle_fuse_block():
    fused = buffers.packed_empty([BIG], torch.float32, torch.device("cpu"))
    fuse_block = block_of(fused)
    del fused
    for mib in (9, 20, 45):  # files of other sizes, read and dropped: more than MAX_IDLE of them
        block, offsets = buffers.read_block([mib * 2 ** 20, 100])
        assert offsets == [0, mib * 2 ** 20] and block.numel() >= mib * 2 ** 20 + 100
        assert block.data_ptr() % buffers.ALIGN_BYTES == 0
        del block
    assert [b.address for b in buffers._POOL.idle] == [fuse_block]
    read_idle = {b.nbytes // 2 ** 20: b.address for b in buffers._READ_POOL.idle}
    assert sorted(read_idle) == [20, 45]  # the oldest (9 MiB) was unmapped
    again = buffers.read_block([44 * 2 ** 20])[0]  # a file of a similar size takes the 45 MiB block
    assert again.untyped_storage().data_ptr() == read_idle[45]
    assert [b.address for b in buffers._READ_POOL.idle] == [read_idle[20]]
    del again
    fresh = buffers.read_block([44 * 2 ** 20], pooled=False)[0]  # outside the pool: the idle block stays
    assert fresh.untyped_storage().data_ptr() != read_idle[45] and fresh.data_ptr() % buffers.ALIGN_BYTES == 0
    del fresh
    held = buffers.idle_bytes()
    assert held >= (16 + 20 + 45) * 2 ** 20
    assert buffers.release_idle() == held and buffers.idle_bytes() == 0


def test_lora_inference_is_bit_for_bit_the_training_forward():
    from torch import nn

    from lycoris_lite import AdapterModel, LoRAConfig

    torch.manual_seed(0)
    model = AdapterModel(nn.Sequential(nn.Linear(32, 48)), LoRAConfig(r=4, alpha=3.0, target_modules=["0"], init_weights=False))
    model.requires_grad_(False)
    x = torch.randn(3, 50, 32)
    for scale in (1.0, 0.37):
        model.set_scale("default", scale)
        with_grad = model(x)  # the route with autograd on: y + Δy, Δy a tensor of its own
        with torch.no_grad():
            inference = model(x)
        assert torch.equal(inference, with_grad)
