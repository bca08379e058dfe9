"""Module names in files versus module names in models.

Files use underscore names under a prefix (``lora_unet_down_blocks_0_attentions_0_…``), sometimes in
SGM/LDM spelling (``lora_unet_input_blocks_1_1_…``, kohya's SDXL files), and text-encoder names with or
without transformers 4's ``text_model.`` level. Underscores are ambiguous (``to_q`` vs ``to.q``), so
names are never rebuilt by string surgery on a key: :func:`build_name_map` walks the live model's
module paths and registers every spelling a file may use for each one.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from torch import nn

from ...core.layer import AdapterLayer
from ...core.targets import walk_modules

#: the pipeline components adapters sit on, in the order files and folders list them
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# component -> (prefix written, prefixes read)
UNET_PREFIXES = ("lora_unet_", "lycoris_", "oft_unet_")
TE_PREFIXES = {"text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}
#: kohya/LyCORIS module-name prefix -> component (text encoders first: ``lycoris_`` alone means the UNet)
KOHYA_PREFIXES = {**{p: c for c, ps in TE_PREFIXES.items() for p in ps}, **{p: "unet" for p in UNET_PREFIXES}}
_RESNET_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "norm1": "in_layers.0", "norm2": "out_layers.0",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def diffusers_to_sgm(path: str, layers_per_block: int, up_has_attention: list[bool]) -> str | None:
    """The SGM/LDM (CompVis) path of a diffusers UNet module path, or ``None`` if it has none.

    ``down_blocks.i.{attentions|resnets}.j.rest -> input_blocks.{1+(L+1)i+j}.{1|0}.rest``,
    ``up_blocks.i.… -> output_blocks.{(L+1)i+j}.…``, samplers, mid block and embeddings as in
    AUTOMATIC1111's ``convert_diffusers_name_to_compvis`` (generalised to ``L = layers_per_block``).
    """
    step = layers_per_block + 1
    fixed = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
             "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    if path in fixed:
        return fixed[path]

    def resnet_rest(rest):
        head, _, tail = rest.partition(".")
        return _RESNET_SGM.get(head, head) + (f".{tail}" if tail else "")

    m = re.fullmatch(r"down_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)", path)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{1 + step * i + j}.{1 if kind == 'attentions' else 0}." + (rest if kind == "attentions" else resnet_rest(rest))
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path)
    if m:
        return f"input_blocks.{step * (int(m[1]) + 1)}.0.op"
    m = re.fullmatch(r"mid_block\.(attentions|resnets)\.(\d+)\.(.+)", path)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        return f"middle_block.1.{rest}" if kind == "attentions" else f"middle_block.{2 * j}.{resnet_rest(rest)}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)", path)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{step * i + j}.{1 if kind == 'attentions' else 0}." + (rest if kind == "attentions" else resnet_rest(rest))
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path)
    if m:
        i = int(m[1])
        return f"output_blocks.{step * i + layers_per_block}.{2 if up_has_attention[i] else 1}.conv"
    return None


def underscore(path: str) -> str:
    return path.replace(".", "_")


@dataclass
class ComponentNames:
    """Every file spelling of one component's adapter-capable modules."""

    component: str
    write_prefix: str
    to_module: dict[str, str] = field(default_factory=dict)  # full file name (with prefix) -> module path
    to_file: dict[str, str] = field(default_factory=dict)    # module path -> name we write

    def add(self, path: str, file_name: str, canonical: bool = False) -> None:
        self.to_module.setdefault(file_name, path)
        if canonical or path not in self.to_file:
            self.to_file[path] = file_name


def adapter_capable_paths(model: nn.Module) -> list[str]:
    """Paths of the modules an adapter may sit on (wrapped ones by their original path)."""
    out = []
    for name, module in walk_modules(model):
        if not name or ".modules_to_save." in f".{name}.":
            continue
        if isinstance(module, (nn.Linear, nn.Conv2d, AdapterLayer)):
            out.append(name)
    return out


def _copy(names: ComponentNames) -> ComponentNames:
    return ComponentNames(names.component, names.write_prefix, dict(names.to_module), dict(names.to_file))


def unet_names(unet: nn.Module, sgm: bool = False) -> ComponentNames:
    """Names for a diffusers UNet; ``sgm=True`` writes SGM names (kohya's SDXL convention)."""
    config = getattr(unet, "config", None)
    layers = getattr(config, "layers_per_block", 2) if config is not None else 2
    layers = layers if isinstance(layers, int) else layers[0]
    up_types = list(getattr(config, "up_block_types", ()) or ())
    return _copy(_unet_names(tuple(adapter_capable_paths(unet)), layers, tuple("CrossAttn" in t for t in up_types), sgm))


@functools.lru_cache(maxsize=16)
def _unet_names(paths: tuple[str, ...], layers: int, up_attn: tuple[bool, ...], sgm: bool) -> ComponentNames:
    """:func:`unet_names` from what it depends on (remembered: every load of a file builds the map)."""
    names = ComponentNames("unet", "lora_unet_")
    for path in paths:
        diffusers_name = underscore(path)
        sgm_path = diffusers_to_sgm(path, layers, list(up_attn)) if up_attn else None
        names.add(path, "lora_unet_" + diffusers_name, canonical=not sgm or sgm_path is None)
        names.add(path, "lycoris_" + diffusers_name)
        names.add(path, "oft_unet_" + diffusers_name)
        if sgm_path is not None:
            names.add(path, "lora_unet_" + underscore(sgm_path), canonical=sgm)
            names.add(path, "oft_unet_" + underscore(sgm_path))
    return names


def text_encoder_names(model: nn.Module, component: str, write_prefix: str) -> ComponentNames:
    """Names for a CLIP text encoder, with and without transformers 4's ``text_model.`` level.

    We write the ``text_model_`` form (what kohya, AUTOMATIC1111 and ComfyUI expect) whatever the
    installed transformers; both forms are read.
    """
    return _copy(_text_encoder_names(tuple(adapter_capable_paths(model)), component, write_prefix))


@functools.lru_cache(maxsize=16)
def _text_encoder_names(paths: tuple[str, ...], component: str, write_prefix: str) -> ComponentNames:
    names = ComponentNames(component, write_prefix)
    read_prefixes = TE_PREFIXES[component] if write_prefix in TE_PREFIXES[component] else (write_prefix,)
    for path in paths:
        bare = path[len("text_model."):] if path.startswith("text_model.") else path
        for prefix in read_prefixes:
            names.add(path, prefix + "text_model_" + underscore(bare), canonical=prefix == write_prefix)
            names.add(path, prefix + underscore(bare))
        if write_prefix == "lora_te_":  # LyCORIS's generic wrapper: unambiguous with one text encoder
            names.add(path, "lycoris_text_model_" + underscore(bare))
            names.add(path, "lycoris_" + underscore(bare))
    return names


def build_name_map(components: dict[str, nn.Module], sdxl: bool | None = None) -> dict[str, ComponentNames]:
    """``{component: ComponentNames}`` for ``unet`` / ``text_encoder`` / ``text_encoder_2``."""
    sdxl = "text_encoder_2" in components if sdxl is None else sdxl
    out = {}
    for component, model in components.items():
        if model is None:
            continue
        if component == "unet":
            out[component] = unet_names(model, sgm=sdxl)
        elif component == "text_encoder":
            out[component] = text_encoder_names(model, component, "lora_te1_" if sdxl else "lora_te_")
        elif component == "text_encoder_2":
            out[component] = text_encoder_names(model, component, "lora_te2_")
        else:
            raise ValueError(f"unknown component {component!r}")
    return out
