"""Model-level behaviour: injection by pattern, management API, bad input (model unchanged)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

import lycoris_lite as L
from lycoris_lite import ALGORITHMS, AdapterModel
from lycoris_lite.algos.lora import FUSE_BLOCK, add_low_rank
from lycoris_lite.core.layer import AdapterLayer
from lycoris_lite.base.registry import get_algorithm
from lycoris_lite.core.controller import controller_for
from tests.test_contract import SMALL


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(16, 16, bias=False)
        self.to_k = nn.Linear(16, 16, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(16, 16), nn.Dropout(0.0)])
        self.proj_in = nn.Conv2d(16, 16, 1)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):  # x: (n, 16, h, w)
        h = self.proj_in(x).flatten(2).transpose(1, 2)
        h = self.to_out[0](self.to_q(h) + self.to_k(self.norm(h)))
        return h


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block() for _ in range(3)])
        self.head = nn.Linear(16, 4)
        self.grouped = nn.Conv2d(16, 16, 3, groups=4, padding=1)

    def forward(self, x):
        h = x
        for block in self.layers:
            h = block(h).transpose(1, 2).reshape(x.shape) + h
        return self.head(h.mean((2, 3)))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, snap):
    state = model.state_dict()
    return state.keys() == snap.keys() and all(
        torch.equal(state[k].nan_to_num(7.0), snap[k].nan_to_num(7.0)) for k in snap)


def net_and_input():
    torch.manual_seed(0)
    return Net(), torch.randn(2, 16, 3, 3)


def test_targets_by_suffix_regex_and_all_linear():
    net, _ = net_and_input()
    ctrl = controller_for(net)
    assert len(ctrl.add_adapter("a", L.LoRAConfig(r=2, target_modules=["to_q", "to_out.0"]))) == 6
    assert len(ctrl.add_adapter("b", L.LoRAConfig(r=2, target_modules=r"layers\.[01]\.to_k"))) == 2
    linear = ctrl.add_adapter("c", L.LoRAConfig(r=2, target_modules="all-linear"))
    assert "head" in linear and len(linear) == 10
    only = ctrl.add_adapter("d", L.LoRAConfig(r=2, target_modules=["to_q"], layers_to_transform=[2], layers_pattern="layers"))
    assert only == ["layers.2.to_q"]
    excluded = ctrl.add_adapter("e", L.LoRAConfig(r=2, target_modules=["to_q", "to_k"], exclude_modules=["to_k"]))
    assert all(n.endswith("to_q") for n in excluded)


def test_rank_and_alpha_patterns():
    net, _ = net_and_input()
    cfg = L.LoRAConfig(r=2, alpha=2, target_modules=["to_q", "to_k"], rank_pattern={"to_k": 6}, alpha_pattern={r"layers\.1\.to_q": 8})
    ctrl = controller_for(net)
    ctrl.add_adapter("a", cfg)
    settings = ctrl.adapter_settings("a")
    assert settings["layers.0.to_k"].r == 6 and settings["layers.0.to_q"].r == 2
    assert settings["layers.1.to_q"].scale == 4.0 and settings["layers.0.to_q"].scale == 1.0


@pytest.mark.parametrize("make_config,message", [
    (lambda: L.LoRAConfig(target_modules=["to_qq"]), "to_q"),  # typo: nearest names listed
    (lambda: L.LoRAConfig(target_modules=["norm"]), "LayerNorm"),
    (lambda: L.LoRAConfig(target_modules=["grouped"]), "grouped Conv2d"),
    (lambda: L.OFTConfig(block_size=5, target_modules=["to_q"]), "sizes that fit"),
    (lambda: L.BOFTConfig(block_size=4, butterfly_factor=4, target_modules=["to_q"]), "butterfly factor"),
    (lambda: L.HRAConfig(r=32, target_modules=["to_q"]), "exceeds"),
    (lambda: L.LoRAConfig(target_modules=r"nothing\.here"), "matches no module"),
])
def test_bad_config_for_the_model_changes_nothing(make_config, message):
    net, x = net_and_input()
    snap, out = snapshot(net), net(x)
    with pytest.raises((ValueError, TypeError), match=message):
        controller_for(net).add_adapter("a", make_config())
    assert same_state(net, snap) and torch.equal(net(x), out)
    assert not any(isinstance(m, AdapterLayer) for m in net.modules())


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_config_json_round_trip_and_unknown_fields(algo):
    cls = get_algorithm(algo).config_class
    cfg = cls(**SMALL[algo], target_modules=["to_q"], rank_pattern={"to_k": 2})
    again = L.config_from_dict(json.loads(cfg.to_json()))
    assert again == cfg and type(again) is cls
    with pytest.raises(ValueError, match="unknown field"):
        cls.from_dict({"target_modules": ["x"], "bogus": 1})
    with pytest.raises(ValueError, match="unknown algorithm"):
        L.config_from_dict({"algo": "ia4"})


def test_peft_field_names_are_accepted():
    cfg = L.LoRAConfig.from_dict({"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": ["q"]})
    assert cfg.alpha == 8 and cfg.init_weights is False
    assert L.OFTConfig.from_dict({"oft_block_size": 16}).block_size == 16
    assert L.BOFTConfig.from_dict({"boft_block_size": 4, "boft_n_butterfly_factor": 2}).butterfly_factor == 2


@pytest.mark.parametrize("bad", [
    lambda: L.OFTConfig(rotation_side="left"),
    lambda: L.LoRAConfig(r=0),
    lambda: L.LoRAConfig(r=4, layers_pattern="layers"),
    lambda: L.BOFTConfig(block_size=3),
    lambda: L.LoKrConfig(factor=0),
    lambda: L.LoRAConfig(rank_pattern={"x": -1}),
])
def test_invalid_configs_raise(bad):
    with pytest.raises(ValueError):
        bad()


def test_duplicate_and_unknown_adapter_names():
    net, _ = net_and_input()
    model = AdapterModel(net, L.LoRAConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", L.LoRAConfig(r=2, target_modules=["to_q"]))
    for call in (lambda: model.set_adapter("nope"), lambda: model.delete_adapter("nope"),
                 lambda: model.set_adapters(["default", "nope"], [1, 1]), lambda: model.merge_adapter(["nope"])):
        with pytest.raises(ValueError, match="unknown adapter"):
            call()


def test_only_active_adapter_parameters_are_trainable():
    net, _ = net_and_input()
    model = AdapterModel(net, L.LoKrConfig(r=2, target_modules=["to_q", "to_k"]))
    model.add_adapter("other", L.OFTConfig(block_size=4, target_modules=["to_q"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n for n in trainable)
    model.set_adapter("other")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.other." in n for n in trainable)
    n_train, n_all = model.get_nb_trainable_parameters()
    assert n_train == sum(p.numel() for p in model.controller.trainable_parameters()) and n_all > n_train


def test_safe_merge_names_the_broken_adapter_and_writes_nothing():
    net, x = net_and_input()
    model = AdapterModel(net, L.LoRAConfig(r=2, target_modules=["to_q", "to_k"], init_weights=False))
    model.add_adapter("bad", L.OFTConfig(block_size=4, target_modules=["to_k"], init_weights=False))
    model.set_adapter(["default", "bad"])
    layer = model.model.layers[2].to_k
    with torch.no_grad():
        layer.adapters["bad"].oft_blocks[0, 0, 1] = float("nan")
    snap = snapshot(net)
    with pytest.raises(ValueError, match=r"'bad'.*layers\.2\.to_k"):
        model.merge_adapter(safe_merge=True)
    assert same_state(net, snap) and model.controller.merged_adapters == []
    with pytest.raises(ValueError, match="NaN"):
        model.merge_and_unload(safe_merge=True)
    assert same_state(net, snap)


def test_fp16_overflow_is_caught_by_safe_merge():
    lin = nn.Sequential(nn.Linear(8, 8)).half()
    model = AdapterModel(lin, L.LoRAConfig(r=2, alpha=2, target_modules=["0"], init_weights=False))
    with torch.no_grad():
        model.model[0].adapters["default"].lora_up.fill_(1e6)
    with pytest.raises(ValueError, match="NaN/Inf"):
        model.merge_adapter(safe_merge=True)
    assert model.controller.merged_adapters == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_a_fuse_packs_the_fused_weights_into_one_aligned_block(dtype):
    """The fused weights of one fuse are views of one block (exactly one copy of the fused layers),
    each 64-byte aligned, bitwise what each layer fuses on its own; unfusing restores the originals."""
    net, x = net_and_input()
    net = net.to(dtype)
    model = AdapterModel(net, L.LoRAConfig(r=2, target_modules=["to_q", "to_k", "to_out.0", "proj_in"], init_weights=False))
    model.add_adapter("lokr", L.LoKrConfig(r=2, target_modules=["to_q"], init_weights=False))
    model.add_adapter("oft", L.OFTConfig(block_size=4, target_modules=["to_k"], init_weights=False))
    model.set_adapters(["default", "lokr", "oft"], [0.5, 1.0, 0.7])
    layers = [layer for _, layer in model.controller.layers()]
    expected = [layer.fused_weight(layer.ordered(["default", "lokr", "oft"])) for layer in layers]
    snap = snapshot(net)
    model.merge_adapter(safe_merge=True)
    fused = [layer.weight for layer in layers]
    assert len({w.untyped_storage().data_ptr() for w in fused}) == 1
    block = fused[0].untyped_storage().nbytes()
    assert block < sum(w.numel() * w.element_size() + 64 for w in fused) + 64
    assert all(w.data_ptr() % 64 == 0 and w.dtype == dtype for w in fused)
    assert all(torch.equal(w, e) for w, e in zip(fused, expected))
    model.unmerge_adapter()
    assert same_state(net, snap)
    baked = model.merge_and_unload(safe_merge=True)  # weights that stay get storage of their own
    owners = [m.weight for n, m in baked.named_modules() if n.endswith(("to_q", "to_k"))]
    assert len({w.untyped_storage().data_ptr() for w in owners}) == len(owners)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE is Linux only")
def test_a_fuse_block_is_populated_at_once():
    """The block's pages are faulted in by one MADV_POPULATE_WRITE where the kernel has it: writing it
    traps no more."""
    import resource

    from lycoris_lite.core import buffers

    supported = buffers._populate(torch.empty(16 * 2 ** 20 // 4))  # Linux 5.14+
    views = buffers.packed_empty([(2048, 2048), (3, 5)], torch.float32, torch.device("cpu"))
    assert [tuple(v.shape) for v in views] == [(2048, 2048), (3, 5)] and all(v.data_ptr() % 64 == 0 for v in views)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    views[0].fill_(1.0)  # 16 MiB: 4096 pages of 4 KiB
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 64 or not supported, faults


def test_safe_merge_looks_at_every_fused_weight_and_sees_writes_through_data():
    """A safe fuse checks each fused weight itself (no remembered magnitude of the base weight), so a
    NaN written into the base weight through ``.data`` (which does not bump the version counter, as an
    EMA copy writes) is caught and nothing is fused."""
    net, x = net_and_input()
    model = AdapterModel(net, L.LoRAConfig(r=2, target_modules=["to_q", "to_k"], init_weights=False))
    model.merge_adapter(safe_merge=True)
    model.unmerge_adapter()
    target = model.model.layers[1].to_q.weight
    version = target._version
    target.data[0, 0] = float("nan")
    assert target._version == version  # invisible to anything keyed on the version counter
    snap = snapshot(net)
    with pytest.raises(ValueError, match=r"layers\.1\.to_q. gives NaN/Inf"):
        model.merge_adapter(safe_merge=True)
    assert same_state(net, snap) and model.controller.merged_adapters == []


def test_low_rank_fuse_in_blocks_equals_one_product():
    torch.manual_seed(0)
    rows = 3 * (FUSE_BLOCK // 40) + 7  # blocks of FUSE_BLOCK // 40 rows and a short last one
    w, up, down = torch.randn(rows, 40), torch.randn(rows, 3), torch.randn(3, 40)
    expected = w.double() + 0.3 * up.double() @ down.double()
    with torch.no_grad():
        out = add_low_rank(w, up, down, 0.3)
        assert (out.double() - expected).abs().max() < 1e-5 and out.data_ptr() != w.data_ptr()
        again = add_low_rank(out, up, down, -0.3, out=out)  # in place onto itself
        assert again is out and (out - w).abs().max() < 1e-5
    up.requires_grad_(True)
    add_low_rank(w, up, down, 0.3).sum().backward()  # with autograd: one differentiable addmm
    assert torch.allclose(up.grad, 0.3 * down.sum(1).expand(rows, 3))


def test_unload_restores_the_original_modules_and_bits():
    net, x = net_and_input()
    modules_before = dict(net.named_modules())
    snap, out = snapshot(net), net(x)
    grads_before = {n: p.requires_grad for n, p in net.named_parameters()}
    model = AdapterModel(net, L.HRAConfig(r=4, target_modules=["to_q", "proj_in"], init_weights=False))
    model.add_adapter("lokr", L.LoKrConfig(r=2, target_modules=["to_out.0"], init_weights=False))
    model.set_adapters(["default", "lokr"], [0.5, 1.0])
    model.merge_adapter()
    restored = model.unload()
    assert restored is net
    assert dict(net.named_modules()).keys() == modules_before.keys()
    assert all(net.get_submodule(n) is m for n, m in modules_before.items() if n)
    assert same_state(net, snap) and torch.equal(net(x), out)
    assert {n: p.requires_grad for n, p in net.named_parameters()} == grads_before
    assert controller_for(net, create=False) is None


def test_merge_and_unload_bakes_the_adapter_in():
    net, x = net_and_input()
    model = AdapterModel(net, L.BOFTConfig(block_size=4, butterfly_factor=2, target_modules=["to_q", "proj_in"], init_weights=False))
    adapted = model(x)
    fused = model.merge_and_unload(progressbar=True)
    assert not any(isinstance(m, AdapterLayer) for m in fused.modules())
    assert isinstance(fused.layers[0].to_q, nn.Linear)
    assert torch.allclose(fused(x), adapted, atol=1e-5)


def test_delete_adapter_refuses_fused_and_cleans_up():
    net, x = net_and_input()
    out = net(x)
    model = AdapterModel(net, L.LoRAConfig(r=2, target_modules=["to_q"], init_weights=False))
    model.merge_adapter()
    with pytest.raises(ValueError, match="fused"):
        model.delete_adapter("default")
    model.unmerge_adapter()
    model.delete_adapter("default")
    assert not any(isinstance(m, AdapterLayer) for m in net.modules())
    assert torch.equal(model(x), out)


def test_disable_adapter_context_and_scales():
    net, x = net_and_input()
    base = net(x)
    model = AdapterModel(net, L.OFTConfig(block_size=4, target_modules=["to_q"], init_weights=False))
    adapted = model(x)
    with model.disable_adapter():
        assert torch.equal(model(x), base)
    assert torch.equal(model(x), adapted)
    model.merge_adapter()
    with model.disable_adapter():
        assert torch.equal(model(x), base)
    with pytest.raises(ValueError, match="fused"):
        model.set_scale("default", 0.5)
    model.unmerge_adapter()
    model.set_scale("default", 0.5, layers=["layers.0.to_q"])
    assert model.model.layers[0].to_q.adapters["default"].scale == 0.5
    assert model.model.layers[1].to_q.adapters["default"].scale == 1.0


def test_modules_to_save_trains_a_copy_per_adapter():
    net, x = net_and_input()
    base = net(x)
    model = AdapterModel(net, L.LoRAConfig(r=2, target_modules=["to_q"], modules_to_save=["head"]))
    assert all(p.requires_grad for p in model.model.head.modules_to_save["default"].parameters())
    with torch.no_grad():
        model.model.head.modules_to_save["default"].bias.add_(1.0)
    assert not torch.allclose(model(x), base)
    with model.disable_adapter():
        assert torch.equal(model(x), base)
    model.unload()
    assert isinstance(net.head, nn.Linear) and torch.equal(net(x), base)


def test_hra_regulariser_and_lora_dropout():
    net, x = net_and_input()
    model = AdapterModel(net, L.HRAConfig(r=4, target_modules=["to_q"], init_weights=False))
    penalty = model.regularization_loss()
    assert penalty.item() > 0 and penalty.requires_grad
    net2, _ = net_and_input()
    drop = AdapterModel(net2, L.LoRAConfig(r=2, dropout=0.5, target_modules=["to_q"], init_weights=False))
    drop.eval()
    assert torch.equal(drop(x), drop(x))
    drop.train()
    assert not torch.equal(drop(x), drop(x))


def test_base_state_dict_keys_are_unchanged():
    net, _ = net_and_input()
    keys = set(net.state_dict())
    model = AdapterModel(net, L.LoRAConfig(r=2, target_modules=["to_q", "proj_in"]))
    inner = set(model.model.state_dict())
    assert keys <= inner and all(".adapters.default." in k for k in inner - keys)


def test_saving_the_base_with_adapters_attached_is_refused():
    class Saver(Net):
        saved = False

        def save_pretrained(self, path):
            Saver.saved = True

    torch.manual_seed(0)
    net = Saver()
    model = AdapterModel(net, L.LoRAConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(RuntimeError, match="adapters attached"):
        model.save_pretrained("somewhere")
    model.unload()
    net.save_pretrained("somewhere")
    assert Saver.saved


def test_presets_are_data():
    assert "to_q" in L.PRESETS["unet-attn"] and "conv1" in L.PRESETS["unet-full"]
    assert set(L.PRESETS["text-encoder"]) == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}


def test_backup_on_another_device_is_restored_exactly():
    lin = nn.Sequential(nn.Linear(8, 8))
    original = lin[0].weight.detach().clone()
    model = AdapterModel(lin, L.LoRAConfig(r=2, target_modules=["0"], init_weights=False))
    layer = model.model[0]
    layer.backup_device = "meta" if False else "cpu"
    model.merge_adapter()
    assert layer._backup is not None and layer._backup.data_ptr() != layer.weight.data_ptr()
    model.unmerge_adapter()
    assert torch.equal(layer.weight, original)


@pytest.mark.parametrize("algo", ["oft", "loha", "hra", "boft"])
def test_inference_cache_follows_weight_changes(algo):
    """Transforms are memoised at inference; an in-place change or a new state dict invalidates them."""
    net, x = net_and_input()
    cfg = get_algorithm(algo).config_class(**SMALL[algo], target_modules=["to_q"], init_weights=False)
    model = AdapterModel(net, cfg)
    with torch.no_grad():
        first = model(x)
        assert torch.equal(model(x), first)
        param = next(iter(model.model.layers[0].to_q.adapters["default"].parameters()))
        param.add_(torch.randn_like(param))
        changed = model(x)
    assert not torch.allclose(changed, first)
    with torch.enable_grad():
        assert torch.allclose(model(x), changed)  # the graph path computes the same thing
