"""Interop with files of the real LyCORIS package (``lycoris-lora``), both directions.

Their files: networks built by ``lycoris.kohya.create_network`` (``lora_unet_`` / ``lora_te_`` names;
on transformers 5 the text encoder has no ``text_model.`` level, so they write
``lora_te_encoder_layers_0_…``) and by the generic ``lycoris.create_lycoris`` (``lycoris_<path>``), on
the tiny SD pipeline's UNet and text encoder, every weight random and non-zero, saved with their
``save_weights``. We load each with ``files.load_adapter`` and compare the UNet's and the text encoder's
outputs with **their forward** (``apply_to``), never their merge (LoHa/LoKr ``merge_to`` applies
``alpha/r`` twice, formats-and-math-lycoris.md §2.5 #1).

Our files: ``save_adapter(format="kohya")`` loaded by their ``create_network_from_weights`` /
``create_lycoris_from_weights`` give the outputs of our forward.

LyCORIS's OFT/BOFT ``rescale`` is ``(out, 1[, 1, 1])`` in files (ours too, ``(out,)`` in memory), and
its generic wrapper's text-encoder names (``lycoris_encoder_layers_0_…``) load onto a pipeline.

LyCORIS limits met on the way (theirs, not ours): its kohya preset ``full`` wraps
``time_embedding.linear_1`` twice on diffusers UNets (``TimestepEmbedding`` is a target class *and*
``time_embedding.linear_1`` a target name: "duplicated lora name"), so a preset file without
``TimestepEmbedding`` is used; its OFT reload needs ``block_size ≤ out / block_size`` and its BOFT
reload a full butterfly (``log2(blocks) + 1`` stages), so our adapters written for it stay inside those.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

lycoris = pytest.importorskip("lycoris")

import lycoris.kohya as lykohya  # noqa: E402
from lycoris.wrapper import LycorisNetwork, create_lycoris, create_lycoris_from_weights  # noqa: E402

from lycoris_lite import controller_for  # noqa: E402
from lycoris_lite.base.registry import get_algorithm
from lycoris_lite.io.files import load_adapter, save_adapter  # noqa: E402
from lycoris_lite.models import build_tiny_sd_pipeline  # noqa: E402

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

# a slice of the UNet with every layer kind (Linear, 1x1 and 3x3 convs, a stride-2 conv), widths 8..256,
# and the whole text encoder; a regex per module name (their presets match names with re.match)
UNET_NAMES = [r"conv_in$", r"(down_blocks\.1|mid_block)\..*(to_q|to_k|to_v|to_out\.0|proj_in|proj_out|ff\.net\.0\.proj|"
              r"ff\.net\.2|conv1|conv2|conv_shortcut|time_emb_proj|downsamplers\.0\.conv)$"]
TE_MODULES = ["CLIPAttention", "CLIPMLP"]
PRESET_TOML = "\n".join([
    "enable_conv = true",
    "unet_target_module = []",
    "unet_target_name = [" + ", ".join(f"'{n}'" for n in UNET_NAMES) + "]",
    f"text_encoder_target_module = {TE_MODULES!r}".replace("'", '"'),
    "text_encoder_target_name = []",
])
CLASS_ATTRS = ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME", "TEXT_ENCODER_TARGET_REPLACE_MODULE",
               "TEXT_ENCODER_TARGET_REPLACE_NAME", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
               "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME", "LORA_PREFIX")
TOL = 1e-5
_MISSING = object()


@contextmanager
def lycoris_presets_kept():
    """LyCORIS presets are class attributes changed globally by ``apply_preset``: put them back."""
    saved = {(cls, a): cls.__dict__.get(a, _MISSING) for cls in (lykohya.LycorisNetworkKohya, LycorisNetwork)
             for a in CLASS_ATTRS}
    try:
        yield
    finally:
        for (cls, attr), value in saved.items():
            if value is _MISSING:
                if attr in cls.__dict__:
                    delattr(cls, attr)
            else:
                setattr(cls, attr, value)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _restore_lycoris_presets():
    with lycoris_presets_kept():
        yield


@pytest.fixture(scope="module")
def preset_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("preset") / "sd.toml"
    path.write_text(PRESET_TOML)
    return str(path)


@pytest.fixture(scope="module")
def base():
    """The tiny pipeline's outputs without adapters (every build is the same seeded model)."""
    return probe(build_tiny_sd_pipeline())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def probe(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's and the text encoder's outputs on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 6, 32, generator=g)
    ids = torch.randint(0, 900, (1, 7), generator=g)
    with torch.no_grad():
        return pipe.unet(x, 10, context).sample, pipe.text_encoder(ids).last_hidden_state


def randomise(net, std: float) -> None:
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("rescale"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, std)


def their_kohya_file(tmp_path, preset_file, algo, dim, alpha, std, **kwargs):
    """``(path, their outputs, their network)``: a kohya-style LyCORIS network on the tiny SD UNet and
    text encoder, random, saved with their ``save_weights``."""
    pipe = build_tiny_sd_pipeline()
    net = lykohya.create_network(1.0, dim, alpha, None, pipe.text_encoder, pipe.unet, algo=algo, preset=preset_file,
                                 **kwargs)
    net.apply_to(pipe.text_encoder, pipe.unet, True, True)  # registers the modules (their state dict)
    randomise(net, std)
    path = tmp_path / f"theirs_{algo}.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    return path, probe(pipe), net


def assert_same_outputs(ours, theirs, base):
    for name, o, t, b in zip(("unet", "text_encoder"), ours, theirs, base):
        assert rel(t, b) > 1e-3, f"{name}: their adapter does nothing"
        assert rel(o, t) < TOL, f"{name}: ours differs from theirs by {rel(o, t):.2e}"


# ---- their files -> ours -------------------------------------------------------------------------------
THEIRS = [
    pytest.param("locon", 4, 2, 0.1, {}, "lora", id="locon"),
    pytest.param("locon", 4, 2, 0.1, {"use_tucker": True}, "lora", id="locon-tucker"),
    pytest.param("loha", 4, 2, 0.3, {}, "loha", id="loha"),
    pytest.param("lokr", 2, 1, 0.3, {"factor": 2}, "lokr", id="lokr-factor2"),
    pytest.param("lokr", 100_000, 1, 0.1, {"full_matrix": True}, "lokr", id="lokr-full-matrix-huge-dim"),
    pytest.param("diag-oft", 4, 0, 0.1, {"constraint": 0.01}, "oft", id="diag-oft-constraint"),
    pytest.param("boft", 4, 0, 0.05, {}, "boft", id="boft"),
]


@pytest.mark.parametrize("algo,dim,alpha,std,kwargs,ours_algo", THEIRS)
def test_their_kohya_files_load_with_the_same_outputs(tmp_path, preset_file, base, algo, dim, alpha, std, kwargs,
                                                      ours_algo):
    path, theirs, net = their_kohya_file(tmp_path, preset_file, algo, dim, alpha, std, **kwargs)
    state = load_file(str(path))
    assert any(k.startswith("lora_te_encoder_layers_0_") for k in state), "transformers 5 spelling expected"
    if kwargs.get("use_tucker"):
        assert any(k.endswith("lora_mid.weight") for k in state)
    if kwargs.get("full_matrix"):
        assert not any(".lokr_w1_a" in k or ".lokr_w2_a" in k for k in state)
        assert float(state[next(k for k in state if k.endswith(".alpha"))]) == dim  # the huge placeholder
    if algo == "lokr" and not kwargs.get("full_matrix"):
        assert any(k.endswith("lokr_w2_a") for k in state)  # some w2 decomposed: alpha/r applies there

    ours = build_tiny_sd_pipeline()
    info = load_adapter(ours, path)
    assert info.algorithms == {ours_algo: len(net.loras)} and not info.skipped_keys
    assert info.components == {"unet": len(net.unet_loras), "text_encoder": len(net.text_encoder_loras)}
    assert_same_outputs(probe(ours), theirs, base)


@pytest.fixture(scope="module")
def their_rescaled_oft(tmp_path_factory, preset_file):
    with lycoris_presets_kept():
        return their_kohya_file(tmp_path_factory.mktemp("oft"), preset_file, "diag-oft", 4, 0, 0.1, constraint=0.01,
                                rescaled=True)


def test_their_rescaled_oft_file_loads(their_rescaled_oft, base):
    path, theirs, _ = their_rescaled_oft
    ours = build_tiny_sd_pipeline()
    load_adapter(ours, path)
    assert_same_outputs(probe(ours), theirs, base)


def test_their_rescaled_oft_maths_matches_once_rescale_is_flattened(their_rescaled_oft, base):
    """The rescale bug above is only the tensor's shape: flattened, their file gives their outputs."""
    path, theirs, _ = their_rescaled_oft
    state = {k: (v.reshape(-1) if k.endswith(".rescale") else v) for k, v in load_file(str(path)).items()}
    assert any(k.endswith(".rescale") and v.dim() == 1 for k, v in state.items())
    ours = build_tiny_sd_pipeline()
    load_adapter(ours, state, "flat")
    assert_same_outputs(probe(ours), theirs, base)


def _generic(pipe_module, algo, modules, names, dim=4, alpha=2, **kwargs):
    LycorisNetwork.apply_preset({"target_module": modules, "target_name": names})
    net = create_lycoris(pipe_module, 1.0, dim, alpha, algo=algo, **kwargs)
    net.apply_to()
    return net


@pytest.mark.parametrize("algo,kwargs,ours_algo", [("loha", {}, "loha"), ("lokr", {"factor": 2}, "lokr")])
def test_their_generic_wrapper_unet_files_load(tmp_path, base, algo, kwargs, ours_algo):
    """``lycoris.create_lycoris`` names modules ``lycoris_<path with _>`` (SimpleTuner's files)."""
    pipe = build_tiny_sd_pipeline()
    net = _generic(pipe.unet, algo, [], UNET_NAMES, dim=2 if algo == "lokr" else 4, **kwargs)
    randomise(net, 0.3)
    path = tmp_path / "generic.safetensors"
    net.save_weights(str(path), torch.float32, None)
    theirs = probe(pipe)[0]
    assert all(k.startswith("lycoris_") for k in load_file(str(path)))
    ours = build_tiny_sd_pipeline()
    info = load_adapter(ours, path)
    assert info.algorithms == {ours_algo: len(net.loras)} and info.components == {"unet": len(net.loras)}
    assert rel(theirs, base[0]) > 1e-3 and rel(probe(ours)[0], theirs) < TOL


@pytest.fixture(scope="module")
def their_generic_text_encoder_file(tmp_path_factory):
    """``(path, their text-encoder output)``: the generic wrapper on the text encoder alone."""
    with lycoris_presets_kept():
        pipe = build_tiny_sd_pipeline()
        net = _generic(pipe.text_encoder, "loha", TE_MODULES, [])
        randomise(net, 0.3)
        path = tmp_path_factory.mktemp("generic_te") / "generic_te.safetensors"
        net.save_weights(str(path), torch.float32, None)
        return path, probe(pipe)[1]


def test_their_generic_wrapper_text_encoder_file_loads(their_generic_text_encoder_file):
    path, theirs = their_generic_text_encoder_file
    assert any(k.startswith("lycoris_encoder_layers_0_") for k in load_file(str(path)))
    ours = build_tiny_sd_pipeline()
    load_adapter({"text_encoder": ours.text_encoder}, path)
    assert rel(probe(ours)[1], theirs) < TOL


def test_their_generic_wrapper_text_encoder_file_loads_onto_the_module_alone(their_generic_text_encoder_file, base):
    """Today's workaround: a bare module target gets the generic ``lycoris_<path>`` names of any model."""
    path, theirs = their_generic_text_encoder_file
    ours = build_tiny_sd_pipeline()
    info = load_adapter(ours.text_encoder, path)
    assert info.algorithms == {"loha": 12}
    assert rel(theirs, base[1]) > 1e-3 and rel(probe(ours)[1], theirs) < TOL


# ---- our files -> theirs -------------------------------------------------------------------------------
# module sets LyCORIS can rebuild from a file: OFT blocks no larger than the number of blocks (widths
# 16..256 with block 4), BOFT a full butterfly (32-wide layers, block 4: 8 blocks, 4 stages)
WIDE_UNET = r"(down_blocks\.1|mid_block)\..*(to_q|to_k|to_v|to_out\.0|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2|conv1|conv2|conv_shortcut|time_emb_proj)"
BOFT_UNET = r"mid_block\..*(attn[12]\.(to_q|to_v|to_out\.0)|resnets\.0\.conv1)"
TE_ALL = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
TE_32 = ["q_proj", "k_proj", "v_proj", "out_proj", "fc2"]
OURS = [
    pytest.param("lora", {"r": 4, "alpha": 2}, WIDE_UNET, TE_ALL, id="lora"),
    pytest.param("loha", {"r": 4, "alpha": 2}, WIDE_UNET, TE_ALL, id="loha"),
    pytest.param("lokr", {"r": 2, "alpha": 1, "factor": 2}, WIDE_UNET, TE_ALL, id="lokr"),
    pytest.param("oft", {"block_size": 4, "constraint": 0.01}, WIDE_UNET, TE_ALL, id="oft-constraint"),
    pytest.param("boft", {"block_size": 4, "butterfly_factor": 4}, BOFT_UNET, TE_32, id="boft-full-butterfly"),
]


def our_file(tmp_path, algo, settings, unet_targets, te_targets, outputs=True):
    """``(path, our outputs)``: our adapter, random, on the tiny SD UNet and text encoder, saved as kohya."""
    pipe = build_tiny_sd_pipeline()
    cls = get_algorithm(algo).config_class
    for component, targets, seed in (("unet", unet_targets, 1), ("text_encoder", te_targets, 2)):
        controller_for(getattr(pipe, component)).add_adapter(
            "a", cls(**settings, target_modules=targets, init_weights=False), activate=True,
            generator=torch.Generator().manual_seed(seed))
    path = save_adapter(pipe, "a", tmp_path / f"ours_{algo}.safetensors")
    return path, probe(pipe) if outputs else None


class _TextModel(nn.Module):
    """transformers 4's ``text_model.`` level around a transformers 5 CLIP text encoder, so LyCORIS's
    loader (which names modules from the live model) finds the community ``lora_te_text_model_…`` names."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_model = text_encoder


@pytest.mark.parametrize("algo,settings,unet_targets,te_targets", OURS)
def test_our_kohya_files_load_into_lycoris(tmp_path, base, algo, settings, unet_targets, te_targets):
    path, ours = our_file(tmp_path, algo, settings, unet_targets, te_targets)
    state = load_file(str(path))
    modules = {k.split(".", 1)[0] for k in state}
    lykohya.LycorisNetworkKohya.apply_preset({"unet_target_module": [], "unet_target_name": UNET_NAMES,
                                              "text_encoder_target_module": TE_MODULES})
    pipe = build_tiny_sd_pipeline()
    holder = _TextModel(pipe.text_encoder)
    net, _ = lykohya.create_network_from_weights(1.0, str(path), None, holder, pipe.unet, for_inference=True)
    assert {m.lora_name for m in net.unet_loras + net.text_encoder_loras} == modules  # every module found
    net.apply_to(holder, pipe.unet, True, True)
    assert_same_outputs(probe(pipe), ours, base)


def test_our_unet_file_loads_into_the_generic_wrapper(tmp_path, base):
    """``create_lycoris_from_weights`` reads ``lycoris_<path>``: our SD names with that prefix."""
    path, ours = our_file(tmp_path, "lokr", {"r": 2, "alpha": 1, "factor": 2}, WIDE_UNET, TE_ALL)
    unet_state = {"lycoris_" + k[len("lora_unet_"):]: v for k, v in load_file(str(path)).items() if k.startswith("lora_unet_")}
    pipe = build_tiny_sd_pipeline()
    net, _ = create_lycoris_from_weights(1.0, "", pipe.unet, weights_sd=unet_state)
    assert len(net.loras) == len({k.split(".", 1)[0] for k in unet_state})
    net.apply_to()
    assert rel(ours[0], base[0]) > 1e-3 and rel(probe(pipe)[0], ours[0]) < TOL


def test_lycoris_on_transformers5_misses_our_text_encoder_names(tmp_path):
    """Their kohya loader names text-encoder modules from the live model: on transformers 5 (no
    ``text_model.`` level) it silently finds none of the community ``lora_te_text_model_…`` names we
    write (what AUTOMATIC1111 and ComfyUI read); the UNet part still loads."""
    from lycoris_lite.models import build_tiny_text_encoder

    if any(n.startswith("text_model.") for n, _ in build_tiny_text_encoder().named_modules()):
        pytest.skip("transformers 4 text encoders have the text_model level")
    path, _ = our_file(tmp_path, "lora", {"r": 4}, WIDE_UNET, TE_ALL, outputs=False)
    lykohya.LycorisNetworkKohya.apply_preset({"unet_target_module": [], "unet_target_name": UNET_NAMES})
    pipe = build_tiny_sd_pipeline()
    net, _ = lykohya.create_network_from_weights(1.0, str(path), None, pipe.text_encoder, pipe.unet, for_inference=True)
    assert net.text_encoder_loras == [] and len(net.unet_loras) > 0


def test_our_rescaled_oft_file_loads_into_lycoris(tmp_path, base):
    path, ours = our_file(tmp_path, "oft", {"block_size": 4, "rescale": True}, WIDE_UNET, TE_ALL)
    lykohya.LycorisNetworkKohya.apply_preset({"unet_target_module": [], "unet_target_name": UNET_NAMES,
                                              "text_encoder_target_module": TE_MODULES})
    pipe = build_tiny_sd_pipeline()
    holder = _TextModel(pipe.text_encoder)
    net, _ = lykohya.create_network_from_weights(1.0, str(path), None, holder, pipe.unet, for_inference=True)
    net.apply_to(holder, pipe.unet, True, True)
    assert_same_outputs(probe(pipe), ours, base)
