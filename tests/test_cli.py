"""The command line (``python -m lycoris_lite inspect|convert``), LoRA extraction and file metadata.

One run goes through ``python -m lycoris_lite`` in a subprocess; the rest call ``cli.main(argv)`` in
process (the tiny pipeline is rebuilt by each ``convert`` from its seed, as a user's run would).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lycoris_lite import ALGORITHMS, AdapterModel, controller_for
from lycoris_lite.base.registry import get_algorithm
from lycoris_lite.integrations.cli import main
from lycoris_lite.tools.extract import adapter_to_lora, attach_entries, extract_lora
from lycoris_lite.io.files import components_of, load_adapter, save_adapter
from lycoris_lite.io.formats.safe_io import read_state_dict
from lycoris_lite.io.metadata import build_metadata, family_from_metadata, most_frequent_tags, summarize_metadata
from lycoris_lite.models import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline

ROOT = Path(__file__).resolve().parents[1]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "downsamplers.0.conv"]  # Linear, 1x1, 3x3 convs
TE_TARGETS = ["q_proj", "v_proj", "fc1"]
TRIGGERS = ["sks dog", "photo"]


pytestmark = pytest.mark.usefixtures("one_thread")


def attach(pipe, algo, name="a", seed=0, **settings):
    cls = get_algorithm(algo).config_class
    for i, (component, targets) in enumerate((("unet", UNET_TARGETS), ("text_encoder", TE_TARGETS))):
        controller_for(getattr(pipe, component)).add_adapter(
            name, cls(**settings, target_modules=targets, init_weights=False), activate=True,
            generator=torch.Generator().manual_seed(seed + i))


def unload(pipe):
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        if model is not None and controller_for(model, create=False) is not None:
            controller_for(model).unload()


def deltas(pipe, name) -> dict[str, torch.Tensor]:
    return {f"{c}.{p}": layer.effective_weight([name]) - layer.effective_weight([])
            for c, m in components_of(pipe).items() if controller_for(m, create=False)
            for p, layer in controller_for(m).layers() if name in layer.adapters}


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_sd_pipeline()


@pytest.fixture(scope="module")
def loha_file(pipe, tmp_path_factory):
    """``(file, layer names)``: a LoHa (alpha ≠ r) on the tiny SD UNet and text encoder, with metadata
    from build_metadata."""
    attach(pipe, "loha", r=4, alpha=16)
    cfg = controller_for(pipe.unet).configs["a"]
    meta = build_metadata("loha", cfg, base_model="SD 1.x", trigger_words=TRIGGERS, output_name="dog",
                          training={"learning_rate": 1e-4, "max_train_steps": 100, "optimizer": "AdamW"})
    path = save_adapter(pipe, "a", tmp_path_factory.mktemp("loha") / "loha.safetensors", metadata=meta)
    layers = set(deltas(pipe, "a"))
    unload(pipe)
    return path, layers


# ---- inspect ------------------------------------------------------------------------------------------
def test_inspect_json_through_python_m(loha_file):
    path, layers = loha_file
    done = subprocess.run([sys.executable, "-m", "lycoris_lite", "inspect", str(path), "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    n = len(layers)
    assert info["format"] == "kohya" and info["modules"] == n
    assert info["algorithms"] == {"loha": n} and info["ranks"] == {"loha": {"r=4": n}} and info["alphas"] == {"16": n}
    assert info["components"] == {"unet": sum(k.startswith("unet.") for k in layers),
                                  "text_encoder": sum(k.startswith("text_encoder.") for k in layers)}
    assert info["family"] == "SD 1.x" and info["family_evidence"] == "metadata"  # the tiny UNet is 32 wide
    assert info["trigger_words"] == TRIGGERS
    meta = info["metadata"]
    assert meta["network_module"] == "lycoris.kohya" and meta["network_args"]["algo"] == "loha"
    assert meta["network_dim"] == 4 and meta["network_alpha"] == 16
    assert meta["output_name"] == "dog" and meta["base_model"] == "SD 1.x"
    assert meta["training"]["learning_rate"] == 1e-4 and meta["training"]["optimizer"] == "AdamW"


def test_inspect_text(loha_file, capsys):
    code, out, _ = run(["inspect", loha_file[0]], capsys)
    n = len(loha_file[1])
    assert code == 0
    assert "format:        kohya" in out and f"algorithms:    loha ({n} layers)" in out
    assert f"ranks:         loha: r=4 ×{n}" in out and f"alphas:        16 ×{n}" in out
    assert "family:        SD 1.x (metadata)" in out and "trigger words: sks dog, photo" in out
    assert "network args:   algo=loha" in out and "output name:    dog" in out


def test_inspect_family_from_keys_and_widths(tmp_path, capsys):
    xl = build_tiny_sdxl_pipeline()
    controller_for(xl.text_encoder_2).add_adapter("a", get_algorithm("lora").config_class(r=2, target_modules=["q_proj"]))
    path = save_adapter(xl, "a", tmp_path / "xl.safetensors")
    info = json.loads(run(["inspect", path, "--json"], capsys)[1])
    assert info["family"] == "SDXL" and info["family_evidence"] == "lora_te2_ keys"
    assert info["components"] == {"text_encoder_2": sum(n.endswith("q_proj") for n, _ in xl.text_encoder_2.named_modules())}

    # widths beat the metadata; kohya tag frequencies are summed over datasets
    tags = {"set1": {"sks": 5, " dog": 3, "grass": 1}, "set2": {"dog": 4, "sks": 1, "bad": "x"}}
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    state = {f"{name}.lora_down.weight": torch.zeros(8, 1024), f"{name}.lora_up.weight": torch.zeros(640, 8),
             f"{name}.alpha": torch.tensor(4.0)}
    save_file(state, str(tmp_path / "sd2.safetensors"), {"ss_base_model_version": "sdxl_base_v1-0",
                                                           "ss_tag_frequency": json.dumps(tags),
                                                           "ss_network_args": json.dumps({"algo": "locon", "conv_dim": "8"})})
    info = json.loads(run(["inspect", tmp_path / "sd2.safetensors", "--json"], capsys)[1])
    assert info["family"] == "SD 2.x" and info["family_evidence"] == "1024-wide cross-attention"
    assert info["metadata"]["family"] == "SDXL"  # what the metadata says, kept apart
    assert info["trigger_words"] == ["dog", "sks", "grass"] and info["alphas"] == {"4": 1}
    assert info["metadata"]["network_args"] == {"algo": "locon", "conv_dim": "8"}

    # a diffusers LoRA file (dotted names, lora_A/lora_B)
    dotted = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.zeros(4, 768),
              "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.zeros(320, 4)}
    save_file(dotted, str(tmp_path / "d.safetensors"))
    info = json.loads(run(["inspect", tmp_path / "d.safetensors", "--json"], capsys)[1])
    assert info["format"] == "diffusers" and info["algorithms"] == {"lora": 1} and info["ranks"] == {"lora": {"r=4": 1}}
    assert info["family"] == "SD 1.x" and info["components"] == {"unet": 1}


def test_inspect_peft_folder(pipe, tmp_path, capsys):
    attach(pipe, "hra", r=4)  # input side (PEFT's, HRA's default)
    try:
        folder = save_adapter(pipe, "a", tmp_path / "peft", format="peft", metadata=build_metadata("hra", trigger_words=["zzz"]))
    finally:
        unload(pipe)
    code, out, _ = run(["inspect", folder, "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["format"] == "peft" and set(info["algorithms"]) == {"hra"}
    assert set(info["adapter_config"]) == {"unet", "text_encoder"} and info["adapter_config"]["unet"]["peft_type"] == "HRA"
    assert info["ranks"] == {"hra": {"r=4": info["modules"]}} and info["trigger_words"] == ["zzz"]


# ---- convert --------------------------------------------------------------------------------------------
def test_convert_loha_at_full_rank_reproduces_the_effective_weights(loha_file, tmp_path, capsys):
    path, layers = loha_file
    out_path = tmp_path / "lora.safetensors"
    code, out, err = run(["convert", path, out_path, "--to", "kohya", "--rank", 1000, "--model", "tiny-sd"], capsys)
    assert code == 0, err
    assert float(re.search(r"max ([0-9.e+-]+)", out).group(1)) < 1e-5
    fresh = build_tiny_sd_pipeline()
    load_adapter(fresh, path, "loha")
    info = load_adapter(fresh, out_path, "lora")
    assert info.algorithms == {"lora": len(layers)}
    want, got = deltas(fresh, "loha"), deltas(fresh, "lora")
    assert got.keys() == want.keys() == set(layers)
    assert max(rel(got[k], want[k]) for k in want) < 1e-5
    meta = read_state_dict(out_path)[1]
    assert meta["ss_output_name"] == "dog" and json.loads(meta["lycoris_lite.trigger_words"]) == TRIGGERS
    assert json.loads(meta["ss_network_args"]) == {"algo": "locon"}
    assert json.loads(meta["lycoris_lite.converted_from"]) == {"format": "kohya", "algorithms": {"loha": len(layers)}}


def test_convert_at_low_rank_reports_the_honest_error(loha_file, tmp_path, capsys):
    path, layers = loha_file
    out_path = tmp_path / "lora1.safetensors"
    code, out, err = run(["convert", path, out_path, "--to", "kohya", "--rank", 1, "--model", "tiny-sd"], capsys)
    assert code == 0, err
    reported = {m[1]: float(m[2]) for m in re.finditer(r"^  (\S+): ([0-9.e+-]+)$", out, re.M)}
    assert reported.keys() == set(layers)
    fresh = build_tiny_sd_pipeline()
    load_adapter(fresh, path, "loha")
    load_adapter(fresh, out_path, "lora1")
    want, got = deltas(fresh, "loha"), deltas(fresh, "lora1")
    measured = {k: rel(got[k], want[k]) for k in want}
    assert all(abs(measured[k] - reported[k]) < 1e-4 * max(1.0, measured[k]) for k in want)
    assert min(measured.values()) > 0.05  # a Hadamard product of rank-4 factors is far from rank 1
    summary = re.search(r"max ([0-9.e+-]+), mean ([0-9.e+-]+)", out)
    assert float(summary[1]) == pytest.approx(max(measured.values()), rel=1e-3)
    assert float(summary[2]) == pytest.approx(sum(measured.values()) / len(measured), rel=1e-3)
    assert json.loads(read_state_dict(out_path)[1]["lycoris_lite.extraction"])["rank"] == 1


def test_convert_without_rank_is_lossless(loha_file, tmp_path, capsys):
    """kohya -> PEFT folders -> kohya: the same tensors, and the descriptive metadata kept."""
    path, _ = loha_file
    code, out, err = run(["convert", path, tmp_path / "peft", "--to", "peft", "--model", "tiny-sd"], capsys)
    assert code == 0 and "lossless" in out, err
    assert (tmp_path / "peft" / "unet" / "adapter_config.json").is_file()
    code, out, err = run(["convert", tmp_path / "peft", tmp_path / "back.safetensors", "--to", "kohya", "--model", "tiny-sd"],
                         capsys)
    assert code == 0 and "loaded" in out and "peft" in out, err
    before, meta_before = read_state_dict(path)
    after, meta_after = read_state_dict(tmp_path / "back.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for key in ("ss_tag_frequency", "ss_output_name", "ss_base_model_version", "lycoris_lite.training"):
        assert meta_after[key] == meta_before[key]


def test_convert_orthogonal_adapter_to_a_diffusers_lora(pipe, tmp_path, capsys):
    """OFT (multiplicative, with rescale) into a diffusers LoRA: the full-rank extraction renders the
    same UNet and text-encoder outputs; without --rank the CLI refuses and writes nothing."""
    attach(pipe, "oft", block_size=4, rescale=True)
    try:
        src = save_adapter(pipe, "a", tmp_path / "oft.safetensors")
    finally:
        unload(pipe)
    code, _, err = run(["convert", src, tmp_path / "d.safetensors", "--to", "diffusers", "--model", "tiny-sd"], capsys)
    assert code == 2 and "--rank" in err and not (tmp_path / "d.safetensors").exists()
    code, out, err = run(["convert", src, tmp_path / "d.safetensors", "--to", "diffusers", "--rank", 4096,
                          "--model", "tiny-sd"], capsys)
    assert code == 0, err
    assert float(re.search(r"max ([0-9.e+-]+)", out).group(1)) < 1e-5
    a, b = build_tiny_sd_pipeline(), build_tiny_sd_pipeline()
    load_adapter(a, src, "oft")
    assert load_adapter(b, tmp_path / "d.safetensors", "lora").format == "diffusers"
    g = torch.Generator().manual_seed(0)
    x, context, ids = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 6, 32, generator=g), torch.randint(0, 900, (1, 7), generator=g)
    with torch.no_grad():
        assert rel(b.unet(x, 10, context).sample, a.unet(x, 10, context).sample) < 1e-5
        assert rel(b.text_encoder(ids).last_hidden_state, a.text_encoder(ids).last_hidden_state) < 1e-5


BAD = [
    pytest.param(["convert", "{missing}", "{out}", "--to", "kohya", "--model", "tiny-sd"], "no such file", id="missing-input"),
    pytest.param(["convert", "{loha}", "{out}", "--to", "onnx", "--model", "tiny-sd"], "invalid choice", id="unknown-format"),
    pytest.param(["convert", "{loha}", "{out}", "--to", "kohya", "--rank", "0", "--model", "tiny-sd"], "positive integer", id="rank-0"),
    pytest.param(["convert", "{loha}", "{out}", "--to", "kohya", "--rank", "-3", "--model", "tiny-sd"], "positive integer", id="rank-negative"),
    pytest.param(["convert", "{loha}", "{out}", "--to", "kohya", "--rank", "two", "--model", "tiny-sd"], "positive integer", id="rank-text"),
    pytest.param(["convert", "{loha}", "{out}", "--to", "kohya"], "--model", id="no-model"),
    pytest.param(["convert", "{loha}", "{out}", "--to", "kohya", "--model", "{missing}"], "cannot load the model", id="bad-model"),
    pytest.param(["convert", "{loha}", "{out}", "--to", "kohya", "--model", "tiny-sdxl"], "match no layer", id="wrong-family"),
    pytest.param(["convert", "{junk}", "{out}", "--to", "kohya", "--model", "tiny-sd"], "not a safetensors file", id="corrupt-input"),
    pytest.param(["convert", "{loha}", "{loha}", "--to", "kohya", "--model", "tiny-sd"], "OUT is IN", id="out-is-in"),
    pytest.param(["convert", "{loha}", "{out}", "--to", "peft", "--model", "tiny-sd"], "folder", id="peft-needs-a-folder"),
    pytest.param(["inspect", "{missing}"], "no such file", id="inspect-missing"),
    pytest.param(["inspect", "{junk}"], "not a safetensors file", id="inspect-corrupt"),
    pytest.param([], "required", id="no-command"),
]


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_arguments_exit_2_and_write_nothing(loha_file, tmp_path, capsys, argv, message):
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04 this is not a safetensors file at all")
    names = {"missing": tmp_path / "missing.safetensors", "out": tmp_path / "out.safetensors", "loha": loha_file[0],
             "junk": tmp_path / "junk.safetensors"}
    before = sorted(tmp_path.rglob("*"))
    loha_bytes = loha_file[0].read_bytes()
    code, out, err = run([a.format(**names) for a in argv], capsys)
    assert code == 2
    assert message in err, err
    assert sorted(tmp_path.rglob("*")) == before and loha_file[0].read_bytes() == loha_bytes


# ---- extraction -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(40, 24), (16, 8, 3, 3)], ids=["linear", "conv3x3"])
def test_extract_a_planted_low_rank_delta_exactly(shape):
    g = torch.Generator().manual_seed(0)
    out_dim, flat_in = shape[0], int(torch.tensor(shape[1:]).prod())
    delta = (torch.randn(out_dim, 3, generator=g) @ torch.randn(3, flat_in, generator=g)).reshape(shape)
    down, up, error = extract_lora(delta, 3)
    if len(shape) == 4:  # LoCon layout: k×k down conv, 1×1 up conv
        assert down.shape == (3, *shape[1:]) and up.shape == (out_dim, 3, 1, 1)
    else:
        assert down.shape == (3, shape[1]) and up.shape == (out_dim, 3)
    assert error < 1e-6 and rel((up.flatten(1) @ down.flatten(1)).reshape(shape), delta) < 1e-6
    # a lower rank: the Eckart-Young error, reported as measured
    s = torch.linalg.svdvals(delta.reshape(out_dim, -1).double())
    _, _, error2 = extract_lora(delta, 2)
    assert error2 == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-4)
    # the rank is capped by the matrix; a zero delta has no error
    assert extract_lora(torch.randn(4, 6, generator=g), 100)[0].shape == (4, 6)
    assert extract_lora(torch.zeros(5, 7), 2)[2] == 0.0
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            extract_lora(delta, bad)


SMALL = {"lora": {"r": 3, "alpha": 2}, "loha": {"r": 3, "alpha": 2}, "lokr": {"r": 2, "factor": 4},
         "oft": {"block_size": 4, "rescale": True, "constraint": 0.05}, "boft": {"block_size": 4, "butterfly_factor": 2},
         "hra": {"r": 3}}


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_adapter_to_lora_reproduces_every_algorithm_at_full_rank(algo):
    """Every registered algorithm (orthogonal ones included, through W_eff − W) on a Linear and a
    strided 3×3 conv: the full-rank LoRA has the same effective weight and the same outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Conv2d(16, 16, 3, stride=2, padding=1))
    wrapped = AdapterModel(model, get_algorithm(algo).config_class(**SMALL[algo], target_modules=["0", "1"],
                                                                   init_weights=False))
    wrapped.set_scale("default", 0.7)  # the effective change at the current multiplier
    entries, errors = adapter_to_lora({"unet": model}, "default", 10_000)
    assert max(errors["unet"].values()) < 1e-5 and set(entries["unet"]) == {"0", "1"}
    assert entries["unet"]["1"].tensors["lora_down"].shape[1:] == (16, 3, 3)
    attach_entries({"unet": model}, "lora", entries)
    ctrl = controller_for(model)
    for name, layer in ctrl.layers():
        assert rel(layer.effective_weight(["lora"]), layer.effective_weight(["default"])) < 1e-6
    x = torch.randn(2, 16)
    img = torch.randn(1, 16, 9, 9)
    with torch.no_grad():
        ctrl.set_adapter("default")
        y = (model[0](x), model[1](img))
        ctrl.set_adapter("lora")
        z = (model[0](x), model[1](img))
    assert rel(z[0], y[0]) < 1e-5 and rel(z[1], y[1]) < 1e-5


# ---- metadata --------------------------------------------------------------------------------------------
def test_build_and_summarize_metadata_round_trip():
    cfg = get_algorithm("lokr").config_class(r=8, alpha=4, factor=8, target_modules=["to_q"])
    meta = build_metadata("lokr", cfg, base_model="SDXL", target_modules=["to_q"], trigger_words=["a b", "c", "a b"],
                          training={"learning_rate": 2e-4, "resolution": [1024, 1024], "custom": "x"}, output_name="n")
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert json.loads(meta["ss_network_args"]) == {"algo": "lokr", "factor": "8"}
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "4.0" and meta["ss_learning_rate"] == "0.0002"
    assert "ss_custom" not in meta
    s = summarize_metadata(meta)
    assert s.family == "SDXL" and s.trigger_words == ["a b", "c"] and s.output_name == "n"
    assert s.config["algo"] == "lokr" and s.target_modules == ["to_q"] and s.training["custom"] == "x"
    assert s.network_dim == 8 and s.network_alpha == 4 and s.network_args["algo"] == "lokr"
    assert json.loads(meta["ss_tag_frequency"]) == {"trigger_words": {"a b": 2, "c": 1}}
    oft = build_metadata("oft", get_algorithm("oft").config_class(block_size=16, constraint=1e-3), base_model="SD 2.x")
    assert json.loads(oft["ss_network_args"]) == {"algo": "diag-oft", "constraint": "0.001", "block_size": "16"}
    assert oft["ss_network_dim"] == "16" and oft["ss_v2"] == "True"
    with pytest.raises(ValueError, match="unknown algorithm"):
        build_metadata("ia3")


def test_summaries_of_foreign_and_broken_metadata():
    assert most_frequent_tags('{"d": {"x": 2, "y": 2, "z": 5}}', top=2) == ["z", "x"]
    assert most_frequent_tags("not json") == [] and most_frequent_tags('["a"]') == []
    assert family_from_metadata({"ss_v2": "True"}) == "SD 2.x"
    assert family_from_metadata({"modelspec.architecture": "stable-diffusion-v1/lora"}) == "SD 1.x"
    assert family_from_metadata({"ss_base_model_version": "sd_v1", "ss_v2": "False"}) == "SD 1.x"
    assert family_from_metadata({"ss_base_model_version": "flux1"}) is None
    s = summarize_metadata({"ss_network_args": "{broken", "ss_network_dim": "x", "lycoris_lite.algorithms": "[]",
                            "ss_num_epochs": "10", "modelspec.title": "T", "modelspec.trigger_phrase": "zz top",
                            "sshs_model_hash": "0xab"})
    assert s.network_args == {"raw": "{broken"} and s.network_dim == "x" and s.algorithms == {}
    assert s.training["num_epochs"] == 10 and s.modelspec == {"title": "T", "trigger_phrase": "zz top"}
    assert s.output_name == "T" and s.trigger_words == ["zz top"] and s.other_keys == ["sshs_model_hash"]
    assert summarize_metadata({}).is_empty()
