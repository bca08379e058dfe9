"""``python -m lycoris_lite fuse|combine|extract`` on the tiny Stable Diffusion pipeline, and README's
"Combine, extract, fuse" commands as written.

``fuse`` output must reload (``DiffusionPipeline.from_pretrained`` for the folder,
``lycoris_lite.tools.fused.load_fused`` for ``--single-file``) with bit-identical weights and render exactly
(``np.array_equal``) what the pipeline with the same adapters attached and fused renders.

One caveat, measured here and true of any diffusers folder: ``from_pretrained`` leaves each tensor a view
into the safetensors buffer at an address that is 8- but not 64-byte aligned, and the CPU kernels
(oneDNN convolutions, at one thread) then round differently: the tiny base pipeline itself, saved and
reloaded with no adapter anywhere, renders up to 1.4e-6 away from the in-memory one. So the folder test
compares the plain reload within 1e-5 and, with the reloaded weights copied into fresh (aligned) storage
like the in-memory pipeline's, exactly. ``load_fused`` copies into the base model's own parameters.

Bad input exits 2 and writes nothing.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from lycoris_lite import LoKrConfig, LoRAConfig, OFTConfig, controller_for
from lycoris_lite.tools.fused import FUSED_KEY, OLD_FUSED_KEY, load_fused
from lycoris_lite.integrations.cli import build_parser, fuse, main
from lycoris_lite.tools.extract import adapter_delta
from lycoris_lite.io.files import components_of, load_adapter, save_adapter
from lycoris_lite.io.formats.safe_io import read_state_dict, write_state_dict
from lycoris_lite.models import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline

ROOT = Path(__file__).resolve().parents[1]
UNET = ["to_q", "to_v", "proj_in", "conv1", "ff.net.2"]  # Linear, 1x1 and 3x3 convs
TE = ["q_proj", "fc1"]

pytestmark = pytest.mark.usefixtures("one_thread")


def render(pipe) -> np.ndarray:
    return pipe("a photo of sks dog", num_inference_steps=2, guidance_scale=6.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Adapter files for tiny-sd: a LoRA (UNet and text encoder), an OFT (UNet, multiplicative), a
    rank-2 LoRA, and a LoKr for tiny-sdxl."""
    folder = tmp_path_factory.mktemp("adapters")
    pipe = build_tiny_sd_pipeline()
    for name, cfg, seed in (("lora", LoRAConfig(r=4, alpha=2, target_modules=UNET, init_weights=False), 1),
                            ("oft", OFTConfig(block_size=4, target_modules=UNET, init_weights=False), 2),
                            ("lora2", LoRAConfig(r=2, target_modules=UNET, init_weights=False), 3)):
        controller_for(pipe.unet).add_adapter(name, cfg, generator=torch.Generator().manual_seed(seed))
    controller_for(pipe.text_encoder).add_adapter("lora", LoRAConfig(r=4, target_modules=TE, init_weights=False),
                                                  generator=torch.Generator().manual_seed(4))
    paths = {name: save_adapter(pipe, name, folder / f"{name}.safetensors") for name in ("lora", "oft", "lora2")}
    xl = build_tiny_sdxl_pipeline()
    controller_for(xl.unet).add_adapter("xl", LoKrConfig(r=2, target_modules=["to_q"], init_weights=False))
    paths["sdxl"] = save_adapter(xl, "xl", folder / "sdxl.safetensors")
    return paths


@pytest.fixture(scope="module")
def fused(files):
    """``(base render, fused render, fused pipeline)``: the LoRA at 0.8 and the OFT at 0.5 attached and
    fused (merge_adapter, PEFT's name), as a user would run them."""
    pipe = build_tiny_sd_pipeline()
    base = render(pipe)
    load_adapter(pipe, files["lora"], "lora", scale=0.8)
    load_adapter(pipe, files["oft"], "oft", scale=0.5)
    for model in components_of(pipe).values():
        ctrl = controller_for(model, create=False)
        if ctrl is not None:
            ctrl.merge_adapter(list(ctrl.configs))
    return base, render(pipe), pipe


def same_weights(a, b) -> bool:
    """Every tensor of ``b``'s UNet, text encoder and VAE is bitwise ``a``'s (adapter tensors of ``a`` aside)."""
    for component in ("unet", "text_encoder", "vae"):
        mine, theirs = getattr(a, component).state_dict(), getattr(b, component).state_dict()
        if not all(torch.equal(mine[k], v) for k, v in theirs.items()):
            return False
    return True


def test_fuse_to_a_diffusers_folder_reloads_and_renders_the_fused_pipeline(files, fused, tmp_path, capsys):
    from diffusers import DiffusionPipeline

    out = tmp_path / "fused"
    code, text, err = run(["fuse", "--model", "tiny-sd", "--adapter", f"{files['lora']}:0.8",
                           "--adapter", f"{files['oft']}:0.5", "--out", out], capsys)
    assert code == 0, err
    assert "fused" in text and "lora (" in text and "oft (" in text
    reloaded = DiffusionPipeline.from_pretrained(out)
    assert not any(controller_for(m, create=False) for m in components_of(reloaded).values())
    base, want, pipe = fused
    assert same_weights(pipe, reloaded)
    got = render(reloaded)
    assert np.abs(got - want).max() < 1e-5 and np.abs(got - base).max() > 1e-3
    with torch.no_grad():
        for model in components_of(reloaded).values():
            for p in model.parameters():
                p.data = p.data.clone()  # aligned storage, as in the fused pipeline
    assert np.array_equal(render(reloaded), want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused"]  # no temporary folder left


def test_fuse_to_one_safetensors_file_reloads_through_load_fused(files, fused, tmp_path, capsys):
    out = tmp_path / "fused.safetensors"
    code, _, err = run(["fuse", "--model", "tiny-sd", "--adapter", f"{files['lora']}:0.8",
                        "--adapter", f"{files['oft']}:0.5", "--single-file", "--out", out], capsys)
    assert code == 0, err
    state, metadata = read_state_dict(out)
    assert {k.split(".", 1)[0] for k in state} == {"unet", "vae", "text_encoder"}
    reloaded = load_fused(out)  # the base recorded: tiny-sd
    assert same_weights(fused[2], reloaded) and np.array_equal(render(reloaded), fused[1])
    with pytest.raises(ValueError, match="does not fit"):
        load_fused(out, base="tiny-sdxl")
    with pytest.raises(ValueError, match="not a fused checkpoint"):
        load_fused(files["lora"], base="tiny-sd")
    old = tmp_path / "old.safetensors"  # written before the metadata key was renamed
    write_state_dict(old, state, {OLD_FUSED_KEY: metadata[FUSED_KEY]})
    assert same_weights(fused[2], load_fused(old))


def test_merge_is_kohyas_name_for_the_fuse_command():
    args = build_parser().parse_args(["merge", "--model", "tiny-sd", "--adapter", "a.safetensors", "--out", "out"])
    assert args.func is fuse


def test_combine_writes_the_weighted_combination(files, tmp_path, capsys):
    """``cat`` of a LoRA and an OFT is exactly ``0.8·ΔW_lora + 0.5·ΔW_oft``; ``dare_linear_svd`` has the
    rank asked for and is the same file for the same seed."""
    out = tmp_path / "cat.safetensors"
    code, text, err = run(["combine", "--model", "tiny-sd", "--adapter", f"{files['lora']}:0.8",
                           "--adapter", f"{files['oft']}:0.5", "--type", "cat", "--out", out], capsys)
    assert code == 0 and "combined with cat" in text, err
    pipe = build_tiny_sd_pipeline()
    for name in ("lora", "oft"):
        load_adapter(pipe, files[name], name)
    load_adapter(pipe, out, "cat")
    for path, layer in controller_for(pipe.unet).layers():
        want = 0.8 * adapter_delta(layer, "lora") + 0.5 * adapter_delta(layer, "oft")
        assert rel(adapter_delta(layer, "cat"), want) < 1e-5, path
    te_layer = next(layer for _, layer in controller_for(pipe.text_encoder).layers())
    assert rel(adapter_delta(te_layer, "cat"), 0.8 * adapter_delta(te_layer, "lora")) < 1e-6

    args = ["combine", "--model", "tiny-sd", "--adapter", files["lora"], "--adapter", f"{files['lora2']}:-0.5",
            "--type", "dare_linear_svd", "--density", "0.5", "--seed", "3", "--rank", "3"]
    for i in (1, 2):
        code, text, err = run(args + ["--out", tmp_path / f"dare{i}.safetensors"], capsys)
        assert code == 0 and "rank 3" in text, err
    first, second = read_state_dict(tmp_path / "dare1.safetensors")[0], read_state_dict(tmp_path / "dare2.safetensors")[0]
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_extract_from_a_fine_tuned_folder(tmp_path, capsys):
    tuned = build_tiny_sd_pipeline()
    g = torch.Generator().manual_seed(0)
    changed = {"unet": ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.1.resnets.0.conv1"],
               "text_encoder": ["text_model.encoder.layers.0.mlp.fc1"]}
    with torch.no_grad():
        for component, paths in changed.items():
            model = getattr(tuned, component)
            for path in paths:
                path = path if component == "unet" or hasattr(model, "text_model") else path.removeprefix("text_model.")
                weight = model.get_submodule(path).weight
                weight.add_(0.01 * (torch.randn(weight.shape[0], 2, generator=g) @ torch.randn(2, weight[0].numel(), generator=g)).reshape(weight.shape))
        tuned.unet.conv_in.bias.add_(0.1)
    tuned.save_pretrained(tmp_path / "tuned")
    out = tmp_path / "extracted.safetensors"
    code, text, err = run(["extract", "--base", "tiny-sd", "--tuned", tmp_path / "tuned", "--rank", 4, "--out", out], capsys)
    assert code == 0, err
    errors = {m[1]: float(m[2]) for m in re.finditer(r"^  (\S+): ([0-9.e+-]+) \(r=", text, re.M)}
    assert len(errors) == 3 and max(errors.values()) < 1e-5
    assert "not in the LoRA: unet.conv_in.bias changed by" in text
    fresh = build_tiny_sd_pipeline()
    load_adapter(fresh, out, "extracted")
    for component, model in components_of(fresh).items():
        for path, layer in controller_for(model).layers():
            want = getattr(tuned, component).get_submodule(path).weight.detach()
            assert rel(layer.effective_weight(["extracted"]), want) < 1e-6, path


BAD = [
    (["fuse", "--model", "tiny-sd", "--adapter", "{missing}", "--out", "{out}"], "no such file"),
    (["fuse", "--model", "tiny-sd", "--adapter", "{lora}", "--single-file", "--out", "{tmp}/m.bin"], ".safetensors"),
    (["fuse", "--model", "tiny-sd", "--adapter", "{lora}", "--out", "{full}"], "exists"),
    (["fuse", "--model", "tiny-sd", "--adapter", "{sdxl}:0.5", "--out", "{out}"], "cannot fuse"),
    (["fuse", "--model", "tiny-sd", "--adapter", "{lora}:inf", "--out", "{out}"], "finite"),
    (["combine", "--model", "tiny-sd", "--adapter", "{lora}", "--adapter", "{oft}", "--type", "ties",
      "--density", "1.5", "--out", "{out}.safetensors"], "density must be a number in (0, 1]"),
    (["combine", "--model", "tiny-sd", "--adapter", "{lora}", "--adapter", "{oft}", "--type", "ties",
      "--out", "{out}.safetensors"], "needs a density"),
    (["combine", "--model", "tiny-sd", "--adapter", "{lora}", "--adapter", "{lora2}", "--type", "linear",
      "--out", "{out}.safetensors"], "same shapes"),
    (["combine", "--model", "tiny-sd", "--adapter", "{lora}", "--adapter", "{oft}", "--type", "average",
      "--out", "{out}.safetensors"], "invalid choice"),
    (["combine", "--model", "tiny-sd", "--adapter", "{lora}", "--adapter", "{sdxl}", "--out", "{out}.safetensors"],
     "do not fit"),
    (["combine", "--model", "tiny-sd", "--adapter", "{lora}", "--out", "{lora}"], "one of the inputs"),
    (["extract", "--base", "tiny-sd", "--tuned", "tiny-sd", "--rank", "4", "--energy", "0.5", "--out", "{out}"],
     "not allowed with"),
    (["extract", "--base", "tiny-sd", "--tuned", "tiny-sd", "--energy", "1.5", "--out", "{out}"], "energy must be"),
    (["extract", "--base", "tiny-sd", "--tuned", "{missing}", "--rank", "4", "--out", "{out}"], "cannot load the model"),
    (["extract", "--base", "tiny-sd", "--tuned", "tiny-sd", "--rank", "4", "--out", "{out}"], "nothing to extract"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[f"{a[0]}-{i}" for i, (a, _) in enumerate(BAD)])
def test_bad_input_exits_2_and_writes_nothing(files, tmp_path, capsys, argv, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    names = {"missing": tmp_path / "missing.safetensors", "out": tmp_path / "out", "full": tmp_path / "full",
             "tmp": tmp_path, **files}
    before = sorted(tmp_path.rglob("*"))
    inputs = {k: Path(v).read_bytes() for k, v in files.items()}
    code, _, err = run([a.format(**names) for a in argv], capsys)
    assert code == 2 and message in err, err
    assert sorted(tmp_path.rglob("*")) == before
    assert {k: Path(v).read_bytes() for k, v in files.items()} == inputs


def test_readme_combine_extract_fuse_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """The section's Python block, then each of its commands, in a scratch folder."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Combine, extract, fuse", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    commands = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    lines = [line.split("#")[0].strip() for line in commands.replace("\\\n", " ").splitlines()]
    lines = [line for line in lines if line]
    assert len(lines) >= 4
    for line in lines:
        argv = shlex.split(line)
        assert argv[:3] == ["python", "-m", "lycoris_lite"], line
        status, _, err = run(argv[3:], capsys)
        assert status == 0, f"{line}\n{err}"
    assert (tmp_path / "outputs" / "fused" / "model_index.json").is_file()
