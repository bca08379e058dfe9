"""A seventh algorithm is one new module: a toy algorithm defined entirely here (its config, its maths
and its file facts) goes through attaching, every file format that holds other algorithms than LoRA
(kohya/LyCORIS files and PEFT folders), ``lycoris-lite inspect`` and ``convert``, with no change to the
library. It is registered only while these tests run (the ``toy`` fixture), so the registry-generated
tests elsewhere never see it.

The toy: ``ΔW = s · diag(g) · u · v`` with ``s = alpha / r``, ``u`` ``(out, r)``, ``v`` ``(r, in·kh·kw)``,
``g`` ``(out,)``; its tensor names differ from every other algorithm's in both formats.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from lycoris_lite import ALGORITHMS, AdapterModel, controller_for
from lycoris_lite.algos import peft
from lycoris_lite.algos.common import kaiming_
from lycoris_lite.base.config import AdapterConfig
from lycoris_lite.base.registry import Algorithm, file_alpha, pattern_value, register
from lycoris_lite.base.settings import ScaledSettings
from lycoris_lite.integrations.cli import main
from lycoris_lite.io.files import load_adapter, save_adapter
from lycoris_lite.io.formats.safe_io import read_state_dict
from lycoris_lite.models import build_tiny_sd_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class ToyConfig(AdapterConfig):
    """The toy's config: ``r`` and ``alpha`` of :class:`AdapterConfig`, and the gain's spread at random
    (non-identity) initialisation."""

    gain_spread: float = 0.1


@dataclass(frozen=True, kw_only=True)
class ToySettings(ScaledSettings):
    """The toy's per-layer settings: ``r``, ``alpha``, ``scale`` and the gain's spread at random
    initialisation."""

    spread: float = 0.1


class Toy(Algorithm):
    name = "toy"
    config_class = ToyConfig
    settings_class = ToySettings
    activation_route = False  # the layer folds W + s·ΔW into its op
    # kohya/LyCORIS files
    kohya_keys = {"toy_u": "toy_up.weight", "toy_v": "toy_down.weight", "toy_g": "toy_gain"}
    detect_keys = ("toy_up.weight",)
    # PEFT folders (our own peft_type: PEFT has no such method, but the folder layout holds any)
    peft_type = "TOY"
    peft_keys = ("toy_A.weight", "toy_B.weight", "toy_gain")
    peft_fields = {"alpha": float}
    file_keys = frozenset({*kohya_keys.values(), *peft_keys})

    # ---- maths
    @classmethod
    def resolve(cls, config, spec, name):
        r = pattern_value(config.rank_pattern, name, config.r)
        alpha = float(pattern_value(config.alpha_pattern, name, config.alpha if config.alpha is not None else r))
        return ToySettings(r=r, alpha=alpha, scale=alpha / r, spread=config.gain_spread)

    @classmethod
    def init_params(cls, spec, settings, init_weights, generator):
        r = settings.r
        u, v, g = torch.empty(spec.out_features, r), torch.empty(r, spec.flat_in), torch.ones(spec.out_features)
        kaiming_(v, generator)
        if init_weights is False:
            kaiming_(u, generator)
            if not g.is_meta:
                g.normal_(1.0, settings.spread, generator=generator)
        elif not u.is_meta:
            u.zero_()
        return {"toy_u": u, "toy_v": v, "toy_g": g}

    @classmethod
    def delta_weight(cls, params, spec, settings):
        delta = params["toy_g"][:, None] * (params["toy_u"] @ params["toy_v"])
        return (delta * settings.scale).reshape(spec.weight_shape)

    # ---- every format
    @classmethod
    def settings_from_tensors(cls, spec, tensors, alpha, name, side=None):
        r = tensors["toy_u"].shape[1]
        a = file_alpha(alpha, r)
        return ToySettings(r=r, alpha=a, scale=a / r)

    @classmethod
    def describe_size(cls, tensors):
        u = tensors.get("toy_up.weight", tensors.get("toy_B.weight"))
        return "?" if u is None else f"r={u.shape[1]}"

    @classmethod
    def input_width(cls, file_tensors):
        v = file_tensors.get("toy_down.weight", file_tensors.get("toy_A.weight"))
        return None if v is None else v.shape[1]

    # ---- kohya/LyCORIS
    @classmethod
    def to_kohya(cls, params, settings):
        return super().to_kohya(params, settings)[0], settings.alpha

    # ---- PEFT
    @classmethod
    def from_peft(cls, spec, tensors, config, names):
        params = {"toy_u": tensors["toy_B.weight"], "toy_v": tensors["toy_A.weight"],
                  "toy_g": tensors["toy_gain"].reshape(-1)}
        return peft.rank_scaled(cls, spec, params, config, names, "alpha")

    @classmethod
    def to_peft(cls, layers, specs, component):
        r, rank_pattern = peft.common_and_patterns({p: e.settings.r for p, e in layers.items()}, int)
        alpha, alpha_pattern = peft.common_and_patterns({p: e.settings.alpha for p, e in layers.items()})
        tensors = {p: {"toy_A.weight": e.tensors["toy_v"], "toy_B.weight": e.tensors["toy_u"],
                       "toy_gain": e.tensors["toy_g"].reshape(1, -1)} for p, e in layers.items()}
        return tensors, {"r": r, "alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}

    @classmethod
    def peft_config_fields(cls, config, layers):
        return {"r": config.get("r", 8), "alpha": config.get("alpha")}


@pytest.fixture
def toy():
    register(Toy)
    try:
        yield Toy
    finally:
        del ALGORITHMS[Toy.name]


# ---- the maths, through the one layer wrapper ---------------------------------------------------------
LAYERS = {"linear": (lambda: nn.Linear(12, 10), (2, 12)), "conv3x3": (lambda: nn.Conv2d(6, 10, 3, stride=2, padding=1), (2, 6, 7, 7))}


@pytest.mark.parametrize("layer", LAYERS)
def test_toy_attaches_and_computes_its_formula(toy, layer):
    factory, shape = LAYERS[layer]
    x = torch.randn(shape, dtype=torch.float64)
    model = AdapterModel(nn.Sequential(factory()).double(), ToyConfig(r=2, alpha=3.0, target_modules=["0"],
                                                                      init_weights=False))
    wrapped = model.model[0]
    p = wrapped.adapters["default"].tensors()
    want = wrapped.weight + 1.5 * (p["toy_g"][:, None] * (p["toy_u"] @ p["toy_v"])).reshape(wrapped.weight.shape)
    assert torch.allclose(model(x), wrapped.spec.op(x, want, wrapped.bias), atol=1e-12)
    assert (want - wrapped.weight).abs().max() > 1e-3  # not the identity
    base = nn.Sequential(factory()).double()
    expected = base(x)
    assert torch.equal(AdapterModel(base, ToyConfig(r=2, target_modules=["0"]))(x), expected)  # zero init: identity


# ---- files, inspect and convert -----------------------------------------------------------------------
UNET_TARGETS = ["to_q", "to_k", "proj_in", "conv1"]  # Linear, 1x1 and 3x3 convs
TE_TARGETS = ["q_proj", "fc1"]


def outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (1, 77), generator=g)
    x, ehs = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return pipe.text_encoder(ids).last_hidden_state, pipe.unet(x, torch.tensor([10]), encoder_hidden_states=ehs).sample


def reloaded(path) -> tuple[torch.Tensor, torch.Tensor]:
    pipe = build_tiny_sd_pipeline()
    info = load_adapter(pipe, path, "again")
    assert set(info.algorithms) <= {"toy", "lora"}
    return outputs(pipe)


def close(a, b) -> bool:
    return all(float((x - y).abs().max()) <= 1e-5 * float(y.abs().max()) for x, y in zip(a, b))


def cli(*argv) -> tuple[int, str]:
    out = io.StringIO()
    return main([str(a) for a in argv], out=out), out.getvalue()


def test_toy_round_trips_through_every_format_inspect_and_convert(toy, tmp_path):
    pipe = build_tiny_sd_pipeline()
    base = outputs(pipe)
    for i, (component, targets) in enumerate((("unet", UNET_TARGETS), ("text_encoder", TE_TARGETS))):
        controller_for(getattr(pipe, component)).add_adapter(
            "toy", ToyConfig(r=2, alpha=3.0, target_modules=targets, init_weights=False),
            generator=torch.Generator().manual_seed(i))
    want = outputs(pipe)
    assert not close(want, base)  # the adapter changes both components
    layers = sum(1 for c in (pipe.unet, pipe.text_encoder) for _, layer in controller_for(c).layers())

    kohya_file = save_adapter(pipe, "toy", tmp_path / "toy.safetensors")
    peft_folder = save_adapter(pipe, "toy", tmp_path / "toy_peft", format="peft")
    state, meta = read_state_dict(kohya_file)
    assert any(k.endswith(".toy_up.weight") for k in state) and any(k.endswith(".alpha") for k in state)
    assert json.loads(meta["ss_network_args"]) == {"algo": "toy"} and meta["ss_network_dim"] == "2"
    assert json.loads((peft_folder / "unet" / "adapter_config.json").read_text())["peft_type"] == "TOY"
    with pytest.raises(ValueError, match="LoRA only"):
        save_adapter(pipe, "toy", tmp_path / "toy_diffusers.safetensors", format="diffusers")
    assert close(reloaded(kohya_file), want) and close(reloaded(peft_folder), want)

    for source, fmt in ((kohya_file, "kohya"), (peft_folder, "peft")):
        code, out = cli("inspect", source, "--json")
        info = json.loads(out)
        assert code == 0 and info["format"] == fmt and info["algorithms"] == {"toy": layers}
        assert info["ranks"] == {"toy": {"r=2": layers}} and info["alphas"] == {"3": layers}
        assert info["unrecognised_modules"] == [] and info["loose_keys"] == []
        code, out = cli("inspect", source)
        assert code == 0 and f"algorithms:    toy ({layers} layers)" in out

    code, _ = cli("convert", kohya_file, tmp_path / "converted_peft", "--to", "peft", "--model", "tiny-sd")
    assert code == 0 and close(reloaded(tmp_path / "converted_peft"), want)
    code, _ = cli("convert", tmp_path / "converted_peft", tmp_path / "back.safetensors", "--to", "kohya",
                  "--model", "tiny-sd")
    assert code == 0 and close(reloaded(tmp_path / "back.safetensors"), want)
    # the diffusers format holds LoRA only: convert asks for --rank, and a LoRA of the toy's rank is exact
    code, _ = cli("convert", kohya_file, tmp_path / "lora.safetensors", "--to", "diffusers", "--model", "tiny-sd")
    assert code == 2 and not (tmp_path / "lora.safetensors").exists()
    code, out = cli("convert", kohya_file, tmp_path / "lora.safetensors", "--to", "diffusers", "--rank", 2,
                    "--model", "tiny-sd")
    assert code == 0 and close(reloaded(tmp_path / "lora.safetensors"), want)


def test_toy_is_registered_only_inside_its_tests():
    assert "toy" not in ALGORITHMS
