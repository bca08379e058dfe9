"""Which tools read our files, measured: every algorithm on the tiny Flux.1 transformer and on the tiny
SD 1.5 UNet, saved in every format we write, loaded by the tools installed here (diffusers'
``load_lora_weights``, PEFT's ``PeftModel.from_pretrained``, LyCORIS's ``create_lycoris_from_weights``),
and the denoiser's output compared with ours.

    python benchmarks/interop.py            # prints two markdown tables (README "Interoperability")

A cell says ``exact`` (the output differs from ours by less than 1e-4 of the adapter's effect: float32
rounding through the blocks), ``differs (e)``, ``adapts nothing`` (the tool loads the
file and leaves the model as it was: the worst case), or ``refuses`` with the tool's reason. ComfyUI,
AUTOMATIC1111/Forge and sd-scripts cannot be installed here; the README gives their columns from their
code (shared/reference), marked so.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lycoris_lite import controller_for, models  # noqa: E402
from lycoris_lite.base.registry import get_algorithm  # noqa: E402
from lycoris_lite.io.files import save_adapter  # noqa: E402
from tests.test_dit_oracles import transformer_inputs  # noqa: E402

CASES = {"lora": ("lora", {"r": 4, "alpha": 2.0}), "lora+dora": ("lora", {"r": 4, "use_dora": True}),
         "loha": ("loha", {"r": 4, "alpha": 2.0}), "lokr": ("lokr", {"r": 4, "factor": 4}),
         "oft": ("oft", {"block_size": 4}),  # LyCORIS reloads block_size <= out / block_size only
         "boft": ("boft", {"block_size": 4}),
         "hra": ("hra", {"r": 4})}
#: the double blocks' attention and MLP layers (diffusers' kohya-Flux converter splits single blocks'
#: ``linear1`` at Flux's full widths, 3072/12288, so a tiny model's single blocks would only measure that)
FLUX_TARGETS = (r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)"
           r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))")


#: the UNet's attention, feed-forward and resnet convolutions (3×3 and 1×1)
UNET_TARGETS = r"down_blocks\.1\..*(to_q|to_k|to_v|to_out\.0|ff\.net\.0\.proj|ff\.net\.2|conv1|conv2|conv_shortcut)"
FAMILIES = {"Flux.1 transformer": ("transformer", models.build_tiny_flux_pipeline, FLUX_TARGETS),
            "SD 1.5 UNet": ("unet", models.build_tiny_sd_pipeline, UNET_TARGETS)}


def inputs(model) -> dict:
    """One seeded forward's inputs: the UNet's, or the tiny Flux transformer's (the oracle tests' own)."""
    config = model.config
    if not hasattr(config, "joint_attention_dim"):  # the UNet
        g = torch.Generator().manual_seed(0)
        return dict(sample=torch.randn(1, 4, 8, 8, generator=g), timestep=10,
                    encoder_hidden_states=torch.randn(1, 6, config.cross_attention_dim, generator=g))
    return transformer_inputs(model)


def output(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(model)).sample


def not_written(exc: Exception) -> str:
    """Our save refused this format for this adapter (the format cannot hold it exactly)."""
    return "we do not write it (" + str(exc).split(";")[0].split(": ")[-1][:50] + "…)"


def verdict(got: torch.Tensor | None, ours: torch.Tensor, base: torch.Tensor, error: str | None = None) -> str:
    if error is not None:
        return f"refuses ({error[:70]})"
    if (got - base).abs().max() < 1e-7:
        return "adapts nothing"
    e = float((got - ours).abs().max() / (ours - base).abs().max())
    return "exact" if e < 1e-4 else f"differs ({e:.2g})"


def make(family: str, case: str, folder: Path):
    """Our adapter of ``case`` on the family's tiny denoiser, its output, the base output, its files and
    the names our kohya file uses."""
    component, build, targets = FAMILIES[family]
    algo, fields = CASES[case]
    torch.manual_seed(0)  # the adapter's initialisation
    pipe = build()
    model = getattr(pipe, component)
    base = output(model)
    config = get_algorithm(algo).config_class(target_modules=targets, init_weights=False, **fields)
    ctrl = controller_for(model)
    ctrl.add_adapter("a", config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in ctrl.layers():
            for p in layer.adapters["a"].parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ctrl.set_adapters("a")
    ours = output(model)
    files, names = {}, "original"
    for fmt, kwargs in (("kohya", {}), ("kohya-diffusers-names", {"format": "kohya", "layout": "diffusers"}),
                        ("comfyui", {"format": "comfyui"}), ("diffusers", {"format": "diffusers"}),
                        ("peft", {"format": "peft"})):
        kwargs = kwargs or {"format": fmt}
        target = folder / family / case / (fmt if fmt == "peft" else f"{fmt}.safetensors")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                files[fmt] = save_adapter(pipe, "a", target, **kwargs)
            if fmt == "kohya" and component == "unet":
                names = "kohya UNet names"
            elif fmt == "kohya" and caught:
                names = "diffusers paths (" + str(caught[0].message).split(": ", 2)[-1][:60] + "…)"
        except ValueError as exc:
            files[fmt] = exc
    return files, ours, base, names


def diffusers_reads(family, path, ours, base) -> str:
    if isinstance(path, Exception):
        return not_written(path)
    component, build, _ = FAMILIES[family]
    pipe = build()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.load_lora_weights(str(path))
    except Exception as exc:  # noqa: BLE001 - the tool's own error is the result
        return verdict(None, ours, base, f"{type(exc).__name__}: {exc}".splitlines()[0])
    return verdict(output(getattr(pipe, component)), ours, base)


def peft_reads(family, path, ours, base) -> str:
    if isinstance(path, Exception):
        return not_written(path)
    import peft

    component, build, _ = FAMILIES[family]
    model = getattr(build(), component)
    folder = path / component if (path / component).is_dir() else path
    try:
        wrapped = peft.PeftModel.from_pretrained(model, str(folder))
    except Exception as exc:  # noqa: BLE001
        return verdict(None, ours, base, f"{type(exc).__name__}: {exc}".splitlines()[0])
    with torch.no_grad():
        return verdict(wrapped(**inputs(model)).sample, ours, base)


def lycoris_reads(family, path, ours, base) -> str:
    """LyCORIS's generic wrapper on the denoiser, reading ``lycoris_<path>`` names (our transformer
    files with ``layout="diffusers"``; our UNet files' ``lora_unet_`` names renamed so)."""
    if isinstance(path, Exception):
        return not_written(path)
    from lycoris.wrapper import create_lycoris_from_weights
    from safetensors.torch import load_file

    component, build, _ = FAMILIES[family]
    model = getattr(build(), component)
    state = {("lycoris_" + k[len("lora_unet_"):] if k.startswith("lora_unet_") else k): v
             for k, v in load_file(str(path)).items()}
    try:
        net, _ = create_lycoris_from_weights(1.0, "", model, weights_sd=state)
        net.apply_to()
    except Exception as exc:  # noqa: BLE001
        return verdict(None, ours, base, f"{type(exc).__name__}: {exc}".splitlines()[0])
    return verdict(output(model), ours, base)


def main() -> None:
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            rows = []
            for case in CASES:
                files, ours, base, names = make(family, case, Path(tmp))
                rows.append((case, {
                    "our kohya file's names": names,
                    "diffusers: kohya file": diffusers_reads(family, files["kohya"], ours, base),
                    "diffusers: ComfyUI file": diffusers_reads(family, files["comfyui"], ours, base),
                    "diffusers: diffusers file": diffusers_reads(family, files["diffusers"], ours, base),
                    "PEFT: PEFT folder": peft_reads(family, files["peft"], ours, base),
                    "LyCORIS: lycoris_ file": lycoris_reads(family, files["kohya-diffusers-names"], ours, base),
                }))
            columns = list(rows[0][1])
            print(f"\n{family}\n")
            print("| algorithm | " + " | ".join(columns) + " |")
            print("|---|" + "---|" * len(columns))
            for case, cells in rows:
                print(f"| {case} | " + " | ".join(cells[c] for c in columns) + " |")


if __name__ == "__main__":
    main()
