"""Reading adapter files fast: straight into one packed block that attaching keeps, batched reads that
survive short reads and gaps, and the walks and memos that loading repeats (module tree, name map,
expected shapes) giving what the slow forms give."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lycoris_lite import ALGORITHMS, PRESETS, LoRAConfig, controller_for
from lycoris_lite.core.buffers import is_file_block
from lycoris_lite.io.files import load_adapter, save_adapter
from lycoris_lite.io.formats import safe_io
from lycoris_lite.io.formats.names import build_name_map
from lycoris_lite.io.formats.safe_io import AdapterFileError, read_state_dict
from lycoris_lite.core.layer import AdapterLayer
from lycoris_lite.core.targets import walk_modules
from lycoris_lite.base.layer_kind import LayerSpec
from lycoris_lite.models import build_tiny_sd_pipeline


def mixed_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 3, generator=g),
        "b.half": torch.randn(5, 1, 3, 3, generator=g).half(),
        "c.bf16": torch.randn(11, generator=g).bfloat16(),
        "d.alpha": torch.tensor(4.0),
        "e.empty": torch.empty(0, 3),
        "f.int": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "g.double": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "h.byte": torch.tensor([1, 2, 3], dtype=torch.uint8),
    }


def same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k])
                                      for k in a)


def test_every_dtype_and_shape_reads_as_safetensors_reads_it_each_tensor_aligned_in_one_block(tmp_path):
    path = tmp_path / "mixed.safetensors"
    save_file(mixed_state(), str(path))
    ours = read_state_dict(path)[0]
    assert same(ours, load_file(str(path)))
    filled = [v for v in ours.values() if v.numel()]
    assert len({v.untyped_storage().data_ptr() for v in filled}) == 1  # one block
    assert all(v.data_ptr() % 64 == 0 and v.is_contiguous() and is_file_block(v) for v in filled)
    assert not is_file_block(filled[0].view(-1)) and not is_file_block(filled[0].clone())  # the very tensors only


def _write_raw(path, entries: dict, gap: int = 0):
    """A safetensors file by hand, tensors in the order given, ``gap`` junk bytes after each."""
    header, data = {}, b""
    for key, tensor in entries.items():
        raw = tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        dtype = {torch.float32: "F32", torch.float16: "F16"}[tensor.dtype]
        header[key] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw + b"\xff" * gap  # NaN bytes in the gaps: must never be read into a tensor
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def test_gaps_between_tensors_and_a_header_out_of_file_order_read_right(tmp_path):
    g = torch.Generator().manual_seed(1)
    entries = {"z": torch.randn(3, 4, generator=g), "a": torch.randn(5, generator=g).half(), "m": torch.randn(2, 2, generator=g)}
    path = tmp_path / "gaps.safetensors"
    _write_raw(path, entries, gap=3)
    state = read_state_dict(path)[0]
    assert list(state) == ["z", "a", "m"] and all(torch.equal(state[k], entries[k]) for k in entries)


@pytest.mark.parametrize("how", ["short reads", "no preadv"])
def test_short_reads_and_systems_without_preadv_give_the_same_tensors(tmp_path, monkeypatch, how):
    path = tmp_path / "m.safetensors"
    save_file(mixed_state(), str(path))
    if how == "short reads":  # at most 5 bytes a call: every resume point inside and between buffers
        real = os.preadv

        def stingy(fd, buffers, offset):
            budget, taken = 5, []
            for b in buffers:
                if budget <= 0:
                    break
                taken.append(memoryview(b)[:budget])
                budget -= len(taken[-1])
            return real(fd, taken, offset)

        monkeypatch.setattr(safe_io.os, "preadv", stingy)
    else:
        monkeypatch.delattr(safe_io.os, "preadv")
    assert same(read_state_dict(path)[0], load_file(str(path)))


def test_a_file_that_shrinks_while_it_is_read_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    header, _, start = safe_io._parse_header(path)  # the header as it was validated ...
    with open(path, "r+b") as fh:  # ... then another process truncates the file in place
        fh.truncate(start + 100)
    with pytest.raises(AdapterFileError, match="changed while it was read"):
        safe_io._read_tensors(path, header, start)


def test_attaching_a_read_file_keeps_its_block_without_a_copy_and_renders_as_before(tmp_path):
    pipe = build_tiny_sd_pipeline()
    ctrl = controller_for(pipe.unet)
    ctrl.add_adapter("a", LoRAConfig(r=4, target_modules=PRESETS["unet-attn-ff"], init_weights=False), activate=True)
    path = save_adapter(pipe, "a", tmp_path / "a.safetensors")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, text = torch.tensor([3]), torch.randn(1, 5, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = pipe.unet(x, t, text).sample
    ctrl.unload()
    read = read_state_dict(path)[0]
    pointers = {v.data_ptr() for v in read.values() if v.numel() > 1}
    del read
    load_adapter(pipe, path, "b")
    params = [p for _, layer in controller_for(pipe.unet).layers() for p in layer.adapters["b"].parameters() if p.numel() > 1]
    assert len({p.untyped_storage().data_ptr() for p in params}) == 1  # the file's block, kept
    assert all(p.data_ptr() % 64 == 0 for p in params)
    assert len(pointers) == len(params)
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, t, text).sample, before)  # bit for bit as the adapter saved


def test_walk_modules_is_named_modules_without_the_adapter_slots():
    pipe = build_tiny_sd_pipeline()
    shared = nn.Linear(2, 2)
    pipe.unet.extra_a, pipe.unet.extra_b = shared, shared  # a shared module is seen once, as named_modules does
    controller_for(pipe.unet).add_adapter("a", LoRAConfig(r=2, target_modules=PRESETS["unet-full"]))
    expected = []
    inside = None
    for name, module in pipe.unet.named_modules():
        if inside is not None and name.startswith(inside + "."):
            continue
        inside = name if isinstance(module, AdapterLayer) else None
        expected.append((name, module))
    got = list(walk_modules(pipe.unet))
    assert [n for n, _ in got] == [n for n, _ in expected] and all(a is b for (_, a), (_, b) in zip(got, expected))
    assert [n for n, _ in controller_for(pipe.unet).layers()] == [n for n, m in pipe.unet.named_modules()
                                                                  if isinstance(m, AdapterLayer)]


def test_the_name_map_memo_gives_fresh_equal_maps():
    pipe = build_tiny_sd_pipeline()
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    first, second = build_name_map(components), build_name_map(components)
    assert first == second and first["unet"] is not second["unet"]
    first["unet"].to_module.clear()
    assert build_name_map(components)["unet"].to_module == second["unet"].to_module


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
@pytest.mark.parametrize("spec", [LayerSpec("linear", 24, 16), LayerSpec("conv2d", 16, 8, (3, 3), (2, 2), (1, 1), (1, 1), "zeros")],
                         ids=["linear", "conv3x3"])
def test_expected_shapes_are_those_init_params_gives(algo, spec):
    cls = ALGORITHMS[algo]
    config = cls.config_class(r=4, target_modules=["x"]) if "r" in cls.config_class.__dataclass_fields__ else cls.config_class(target_modules=["x"])
    settings = cls.resolve(config, spec, "x")
    params = cls.init_params(spec, settings, True, None)
    assert cls.param_shapes(spec, settings) == {k: tuple(v.shape) for k, v in params.items()}
    assert cls.param_shapes(spec, settings) is cls.param_shapes(spec, settings)  # remembered
