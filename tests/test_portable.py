"""Windows and macOS on a Linux machine (``lycoris_lite.base.portable``): each platform rule the code depends on
is emulated here (Windows' fsync through a writable handle only, no ``os.preadv``, no ``ctypes.CDLL(None)``,
``os.kill`` that terminates, no renaming onto a folder; no ``madvise``; a device without float64), and
saving, reading, fusing and extracting must give what they give on Linux."""

from __future__ import annotations

import ctypes
import errno
import os
import types

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lycoris_lite import PRESETS, AdapterModel, LoRAConfig, OFTConfig, controller_for
from lycoris_lite.core import buffers
from lycoris_lite.base import portable
from lycoris_lite.tools.extract import adapter_delta, extract_lora
from lycoris_lite.tools.svd import full_svd
from lycoris_lite.io.files import save_adapter
from lycoris_lite.io.formats import safe_io
from lycoris_lite.io.formats.safe_io import read_state_dict
from lycoris_lite.core.layer import AdapterLayer
from lycoris_lite.models import build_tiny_sd_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    """The tiny SD pipeline with two LoRAs ("a", "b": other values) on its UNet and text encoder."""
    pipe = build_tiny_sd_pipeline()
    for name, seed in (("a", 1), ("b", 2)):
        for component, preset in (("unet", "unet-attn"), ("text_encoder", "text-encoder")):
            controller_for(getattr(pipe, component)).add_adapter(
                name, LoRAConfig(r=4, target_modules=PRESETS[preset], init_weights=False),
                generator=torch.Generator().manual_seed(seed))
    return pipe


def windows_fsync_rule(monkeypatch) -> None:
    """``os.fsync`` as on Windows: ``EBADF`` for a descriptor opened read-only (``FlushFileBuffers``
    needs write access)."""
    fcntl = pytest.importorskip("fcntl")  # a descriptor's access mode is read this way (POSIX)
    fsync = os.fsync

    def checked(fd):
        fd = fd if isinstance(fd, int) else fd.fileno()
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", checked)


@pytest.fixture
def windows(monkeypatch):
    """This machine made to follow Windows' rules where the code could notice; yields the count of calls
    that must never happen there (``os.kill`` terminates a process, ``ctypes.CDLL(None)`` raises)."""
    forbidden = {"os.kill": 0, "ctypes.CDLL": 0}

    def kill(pid, sig):
        forbidden["os.kill"] += 1
        raise AssertionError("os.kill(pid, 0) terminates the process on Windows")

    def cdll(*args, **kwargs):
        forbidden["ctypes.CDLL"] += 1
        raise TypeError("LoadLibrary() argument 1 must be str, not None")

    replace = os.replace

    def windows_replace(src, dst):  # MoveFileEx cannot replace a folder, even an empty one
        if os.path.isdir(dst):
            raise PermissionError(errno.EACCES, "Access is denied", str(dst))
        return replace(src, dst)

    monkeypatch.setattr(portable, "WINDOWS", True)
    monkeypatch.setattr(portable, "LINUX", False)
    monkeypatch.setattr(os, "kill", kill)
    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setattr(os, "replace", windows_replace)
    monkeypatch.delattr(os, "preadv", raising=False)
    windows_fsync_rule(monkeypatch)
    return forbidden


def same_file(path) -> bool:
    """Our reader gives the tensors safetensors gives."""
    ours, theirs = read_state_dict(path)[0], load_file(str(path))
    return list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def same_peft_folders(a, b) -> bool:
    """Both PEFT folders hold the same tensors and configs, read by our reader as safetensors reads them."""
    for component in ("unet", "text_encoder"):
        x, y = a / component / "adapter_model.safetensors", b / component / "adapter_model.safetensors"
        assert same_file(x) and same_file(y)
        mine, theirs = load_file(str(x)), load_file(str(y))
        if list(mine) != list(theirs) or not all(torch.equal(mine[k], theirs[k]) for k in theirs):
            return False
        if (a / component / "adapter_config.json").read_text() != (b / component / "adapter_config.json").read_text():
            return False
    return True


def temporaries(folder) -> list:
    return sorted(p.name for p in folder.rglob(".*.tmp"))


# ---- Windows -----------------------------------------------------------------------------------------
def test_every_save_works_under_windows_rules_and_reads_back_the_same(pipe, windows, tmp_path, monkeypatch):
    with monkeypatch.context() as posix:  # the read-only-handle flush, as on Linux, fails under Windows' rule
        posix.setattr(portable, "WINDOWS", False)
        with pytest.raises(OSError) as failed:
            save_adapter(pipe, "a", tmp_path / "posix.safetensors")
        assert failed.value.errno == errno.EBADF and os.listdir(tmp_path) == []

    kohya = save_adapter(pipe, "a", tmp_path / "a.safetensors")
    diffusers = save_adapter(pipe, "a", tmp_path / "diffusers", format="diffusers")
    assert same_file(kohya) and same_file(diffusers)

    folder = save_adapter(pipe, "a", tmp_path / "peft", format="peft")
    assert all(same_file(folder / c / "adapter_model.safetensors") for c in ("unet", "text_encoder"))
    dead = tmp_path / f".peft.{safe_io._HOST}-99999999.x.tmp"  # a writer's leftover: liveness unknown here
    dead.mkdir()
    save_adapter(pipe, "b", folder, format="peft")  # over the existing folder: two renames
    assert same_peft_folders(folder, save_adapter(pipe, "b", tmp_path / "fresh", format="peft"))
    assert not same_peft_folders(folder, save_adapter(pipe, "a", tmp_path / "a", format="peft"))
    assert dead.is_dir()  # not known to be dead (no kernel32 here): kept
    assert temporaries(tmp_path) == [dead.name]
    assert windows == {"os.kill": 0, "ctypes.CDLL": 0}


def fake_kernel32(processes: dict[int, int], denied: set[int]) -> types.SimpleNamespace:
    """``OpenProcess``/``GetExitCodeProcess``/``CloseHandle`` over a table ``{pid: exit code}``; a pid in
    ``denied`` cannot be opened (``ERROR_ACCESS_DENIED``), one in neither does not exist
    (``ERROR_INVALID_PARAMETER``). ``open`` holds the handles not closed yet."""
    kernel = types.SimpleNamespace(open=set(), last_error=0)

    def open_process(access, inherit, pid):
        assert access == 0x1000 and inherit is False  # PROCESS_QUERY_LIMITED_INFORMATION
        if pid not in processes:
            kernel.last_error = 5 if pid in denied else 87
            return None
        kernel.open.add(1000 + pid)
        return 1000 + pid

    def get_exit_code_process(handle, code):
        code._obj.value = processes[handle.value - 1000]
        return 1

    def close_handle(handle):
        kernel.open.remove(handle.value)
        return 1

    kernel.OpenProcess, kernel.GetExitCodeProcess, kernel.CloseHandle = open_process, get_exit_code_process, close_handle
    return kernel


def test_liveness_on_windows_asks_the_kernel_never_os_kill_and_counts_the_unknown_as_running(windows, monkeypatch, tmp_path):
    kernel = fake_kernel32({10: 259, 11: 0}, denied={12})  # running, exited, someone else's
    monkeypatch.setattr(ctypes, "WinDLL", lambda name, use_last_error=False: kernel, raising=False)
    monkeypatch.setattr(ctypes, "get_last_error", lambda: kernel.last_error, raising=False)
    assert [portable.process_alive(pid) for pid in (10, 11, 12, 13)] == [True, False, True, False]
    assert kernel.open == set()  # every handle closed

    target = tmp_path / "x.safetensors"
    for pid in (10, 11, 12, 13):
        (tmp_path / f".x.safetensors.{safe_io._HOST}-{pid}.abc.tmp").mkdir()
    removed = safe_io.remove_stale_temporaries(target)
    assert sorted(p.name.split("-")[-1].split(".")[0] for p in removed) == ["11", "13"]
    assert temporaries(tmp_path) == [f".x.safetensors.{safe_io._HOST}-{pid}.abc.tmp" for pid in (10, 12)]

    monkeypatch.setattr(ctypes, "WinDLL", lambda *a, **k: (_ for _ in ()).throw(OSError("no kernel32")))
    assert portable.process_alive(11)  # the kernel cannot be asked: running
    assert windows == {"os.kill": 0, "ctypes.CDLL": 0}


# ---- no madvise, no renameat2, no pool ---------------------------------------------------------------
def fused_weights(net: nn.Module) -> tuple[list[torch.Tensor], bool]:
    """The weights of ``net`` with its adapter fused (8 MiB and more: the pooled size on Linux), and
    whether unfusing gave the originals back bit for bit."""
    originals = [m.weight.detach().clone() for m in net]
    controller_for(net).merge_adapter()
    fused = [m.weight.detach().clone() for m in net]
    controller_for(net).unmerge_adapter()
    return fused, all(torch.equal(m.weight, w) for m, w in zip(net, originals))


@pytest.mark.parametrize("platform", ["Linux without the C library", "Linux libc without the symbols", "not Linux"])
def test_without_madvise_renameat2_or_the_pool_fuse_is_bit_exact_and_a_folder_resaves(pipe, platform, monkeypatch, tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1024, 2048), nn.Linear(2048, 1024))
    AdapterModel(net, LoRAConfig(r=4, target_modules=["0", "1"], init_weights=False), generator=torch.Generator().manual_seed(1))
    linux, _ = fused_weights(net)
    buffers.release_idle()

    if platform == "Linux without the C library":
        monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: (_ for _ in ()).throw(TypeError("no C library")))
    elif platform == "Linux libc without the symbols":
        monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: types.SimpleNamespace())
    else:
        monkeypatch.setattr(portable, "LINUX", False)
    assert not portable.madvise(0, 4096, portable.MADV_FREE) and not portable.exchange(tmp_path, tmp_path)
    fused, restored = fused_weights(net)
    assert restored and all(torch.equal(a, b) for a, b in zip(fused, linux))
    if platform == "not Linux":
        assert buffers.idle_bytes() == 0  # plain tensors, freed with the last view
    buffers.release_idle()

    folder = save_adapter(pipe, "a", tmp_path / "peft", format="peft")
    save_adapter(pipe, "b", folder, format="peft")
    assert same_peft_folders(folder, save_adapter(pipe, "b", tmp_path / "fresh", format="peft"))
    assert temporaries(tmp_path) == []


# ---- no float64 on the device ------------------------------------------------------------------------
def test_without_float64_the_float64_work_runs_on_the_cpu_and_gives_the_same_results(monkeypatch):
    assert not portable.supports_float64("mps") and portable.float64_device("mps") == torch.device("cpu")
    assert portable.float64_device("cpu") == torch.device("cpu")

    g = torch.Generator().manual_seed(3)
    base = nn.Sequential(nn.Linear(96, 64), nn.Linear(64, 48))
    tuned = {k: v.clone() for k, v in base.state_dict().items()}
    tuned["0.weight"] += torch.randn(64, 5, generator=g) @ torch.randn(5, 96, generator=g) * 0.1
    tuned["1.weight"] += torch.randn(48, 64, generator=g) * 0.01  # full rank: energy needs the Gram matrix
    tuned["1.bias"] += 0.5  # a bias: its relative change is measured in float64
    net = nn.Sequential(nn.Linear(16, 24))
    AdapterModel(net, OFTConfig(block_size=4, target_modules=["0"], init_weights=False), generator=torch.Generator().manual_seed(1))
    layer, flat = net[0], torch.randn(40, 30, generator=g)

    svd = torch.linalg.svd

    def float32_fails(a, *args, **kwargs):  # the rare float32 non-convergence: full_svd retries in float64
        if a.dtype == torch.float32:
            raise RuntimeError("linalg.svd: The algorithm failed to converge")
        return svd(a, *args, **kwargs)

    def run():
        extraction = extract_lora(base, tuned, energy=0.9, method="randomized")
        with monkeypatch.context() as failing:
            failing.setattr(torch.linalg, "svd", float32_fails)
            factors = full_svd(flat)
        return extraction, factors, adapter_delta(layer, "default", 0.7)

    expected = run()
    asked = []
    computed_on = []
    effective = AdapterLayer.effective_weight
    monkeypatch.setattr(portable, "supports_float64", lambda device: asked.append(torch.device(device).type) or False)
    monkeypatch.setattr(AdapterLayer, "effective_weight", lambda self, *a, **k: computed_on.append(self) or effective(self, *a, **k))
    got = run()

    assert asked and set(asked) == {"cpu"}
    assert computed_on and all(c is not layer for c in computed_on)  # a copy of the layer on the float64 device
    assert got[0].entries.keys() == expected[0].entries.keys() and got[0].errors == expected[0].errors
    for component, layers in expected[0].entries.items():
        for path, entry in layers.items():
            assert all(torch.equal(entry.tensors[k], got[0].entries[component][path].tensors[k]) for k in entry.tensors)
    assert got[0].unrepresented == expected[0].unrepresented and got[0].unrepresented["transformer"]["1.bias"] > 0
    assert all(torch.equal(a, b) and a.dtype == torch.float32 for a, b in zip(got[1], expected[1]))
    assert torch.equal(got[2], expected[2]) and got[2].device == layer.weight.device and got[2].abs().max() > 0
