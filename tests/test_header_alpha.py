"""An alpha stated only in a kohya-style file's header (``ss_network_alpha``, ``conv_alpha`` in
``ss_network_args``) is honoured for the modules without an ``.alpha`` tensor, and ``inspect`` says where
each module's scale comes from, or that the file does not state it (ComfyUI #15830 ignored the header:
users made up for it with strength 3-4)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lycoris_lite import LoRAConfig, controller_for
from lycoris_lite.io.files import load_adapter, save_adapter
from lycoris_lite.io.formats.safe_io import read_state_dict
from lycoris_lite.io.inspect import describe, format_report
from lycoris_lite.io.metadata import header_alphas
from lycoris_lite.models import build_tiny_sd_pipeline

TARGETS = ["to_q", "to_v", "conv1"]  # linear layers and 3x3 convolutions


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A LoRA file with alpha tensors (alpha 2 on every module, r=4: scale 0.5) and the same file with the
    alpha tensors removed."""
    pipe = build_tiny_sd_pipeline()
    ctrl = controller_for(pipe.unet)
    ctrl.add_adapter("a", LoRAConfig(r=4, alpha=2.0, target_modules=TARGETS, init_weights=False),
                     generator=torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("alpha")
    with_alpha = folder / "with_alpha.safetensors"
    save_adapter({"unet": pipe.unet}, "a", with_alpha)
    ctrl.unload()
    state, metadata = read_state_dict(with_alpha)
    bare = {k: v.clone() for k, v in state.items() if not k.endswith(".alpha")}
    assert len(bare) < len(state)
    return pipe, with_alpha, bare, metadata, folder


def scales(pipe, source) -> dict[str, float]:
    load_adapter({"unet": pipe.unet}, source, "x")
    ctrl = controller_for(pipe.unet)
    try:
        return {path: s.scale for path, s in ctrl.adapter_settings("x").items()}
    finally:
        ctrl.delete_adapter("x")


def test_header_alphas_parse_only_positive_numbers():
    assert header_alphas({"ss_network_alpha": "8", "ss_network_args": json.dumps({"conv_alpha": "2"})}) == (8.0, 2.0)
    assert header_alphas({"ss_network_alpha": "8.5"}) == (8.5, None)
    for bad in ("0", "-1", "nan", "inf", "many", ""):
        assert header_alphas({"ss_network_alpha": bad}) == (None, None)
    assert header_alphas({"ss_network_args": "not json"}) == (None, None)
    assert header_alphas(None) == (None, None)


def test_an_alpha_in_the_header_only_gives_the_scale_the_alpha_tensors_gave(saved):
    pipe, with_alpha, bare, metadata, folder = saved
    expected = scales(pipe, with_alpha)
    assert set(expected.values()) == {0.5}
    header_only = folder / "header_only.safetensors"
    save_file(bare, str(header_only), {"ss_network_alpha": "2", "ss_network_dim": "4"})
    assert scales(pipe, header_only) == expected
    nothing = folder / "nothing.safetensors"
    save_file(bare, str(nothing), {})
    assert set(scales(pipe, nothing).values()) == {1.0}  # alpha = rank: kohya's and LyCORIS's rule


def test_conv_alpha_applies_to_kxk_convolutions_and_an_alpha_tensor_wins(saved):
    pipe, with_alpha, bare, metadata, folder = saved
    mixed = dict(bare)
    kept = next(k for k in read_state_dict(with_alpha)[0] if k.endswith("to_q.alpha"))
    mixed[kept] = torch.tensor(1.0)  # this module states its own alpha: 1/4
    path = folder / "conv_alpha.safetensors"
    save_file(mixed, str(path), {"ss_network_alpha": "2", "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "8"})})
    got = scales(pipe, path)
    own = kept[:-len(".alpha")]
    for module, scale in got.items():
        if module.endswith("conv1"):
            assert scale == 2.0  # conv_alpha 8 / r 4
        elif own.endswith(module.replace(".", "_")):
            assert scale == 0.25
        else:
            assert scale == 0.5
    assert sorted(set(got.values())) == [0.25, 0.5, 2.0]


def test_inspect_says_where_the_scale_comes_from_or_that_the_file_does_not_state_it(saved):
    pipe, with_alpha, bare, metadata, folder = saved
    assert describe(str(with_alpha))["alpha_note"] is None
    header_only = folder / "header_only_inspect.safetensors"
    save_file(bare, str(header_only), {"ss_network_alpha": "2"})
    info = describe(str(header_only))
    assert "take the header's ss_network_alpha=2" in info["alpha_note"]
    assert "ss_network_alpha=2" in format_report(info)
    nothing = folder / "nothing_inspect.safetensors"
    save_file(bare, str(nothing), {})
    info = describe(str(nothing))
    assert "the scale is not stated" in info["alpha_note"] and "alpha = rank" in format_report(info)
