"""Module names in files versus module names in models.

Files use underscore names under a prefix (``lora_unet_down_blocks_0_attentions_0_…``), sometimes in
SGM/LDM spelling (``lora_unet_input_blocks_1_1_…``, kohya's SDXL files), and text-encoder names with or
without transformers 4's ``text_model.`` level. Underscores are ambiguous (``to_q`` vs ``to.q``), so
names are never rebuilt by string surgery on a key: :func:`build_name_map` walks the live model's
module paths and registers every spelling a file may use for each one.

The prefixes, per component (the first is written, all are read):

* ``unet``: ``lora_unet_``, ``lycoris_``, ``oft_unet_`` (diffusers or SGM paths).
* ``transformer``: ``lycoris_`` (what LyCORIS's generic wrapper and SimpleTuner write, and ComfyUI reads
  for Flux), ``lora_transformer_`` (OneTrainer), ``lora_unet_`` (kohya-style trainers that keep the
  diffusers paths), each followed by the underscore form of the diffusers module path
  (``lycoris_transformer_blocks_0_attn_to_q``). The original (BFL/SAI/Wan/Z-Image) module names that
  sd-scripts and musubi-tuner write (``lora_unet_double_blocks_0_img_attn_qkv``) are read too
  (:func:`add_original_names`): a renamed module as its diffusers path, a fused one as the
  :class:`~lycoris_lite.io.formats.original.OriginalModule` whose parts it splits onto.
* ``transformer_2`` (Wan 2.2's second expert): ``lora_transformer_2_``, ``lycoris_transformer_2_``.
* ``text_encoder``: ``lora_te_`` with one text encoder, else ``lora_te1_`` (both read); ``text_encoder_2``:
  ``lora_te2_``, and ``lora_te3_`` when the pipeline has no ``text_encoder_3`` (sd-scripts and ComfyUI
  call Flux's T5 ``lora_te3``); ``text_encoder_3``: ``lora_te3_`` (sd-scripts' SD3 convention). A text
  encoder's name is the underscore form of its module path (T5 ``encoder_block_0_layer_0_SelfAttention_q``,
  Qwen ``model_layers_0_self_attn_q_proj``); CLIP text models are written with transformers 4's
  ``text_model_`` level and read with or without it. ``lycoris_`` alone names the text encoder only in
  a pipeline whose one text encoder sits beside a UNet (LyCORIS's wrapper on a text encoder alone).

No name is read for two modules: the names come from the live components, and one that two components
would both claim (a ``transformer`` path that begins with ``2_`` beside a ``transformer_2``) is
refused by :func:`file_name_lookup` when a file uses it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from torch import nn

from ...base.registry import file_key_roots
from ...core.layer import AdapterLayer
from ...core.targets import adapter_capable_paths
from .original import original_modules

#: the denoisers adapters sit on: a UNet, or a transformer (Wan 2.2 has two experts)
DENOISERS = ("unet", "transformer", "transformer_2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
#: the pipeline components adapters sit on, in the order files and folders list them
COMPONENTS = DENOISERS + TEXT_ENCODERS
# component -> prefixes read (the first is written; see the module docstring)
UNET_PREFIXES = ("lora_unet_", "lycoris_", "oft_unet_")
TRANSFORMER_PREFIXES = {"transformer": ("lycoris_", "lora_transformer_", "lora_unet_"),
                        "transformer_2": ("lora_transformer_2_", "lycoris_transformer_2_")}
TE_PREFIXES = {"text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",),
               "text_encoder_3": ("lora_te3_",)}
#: kohya/LyCORIS module-name prefix -> component, for reading without a model (the longest prefix that
#: fits wins; ``lycoris_`` alone is the UNet's here, the transformer's in a transformer pipeline)
KOHYA_PREFIXES = dict(sorted({**{p: c for c, ps in TRANSFORMER_PREFIXES.items() for p in ps},
                              **{p: c for c, ps in TE_PREFIXES.items() for p in ps},
                              **{p: "unet" for p in UNET_PREFIXES}}.items(), key=lambda item: -len(item[0])))
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
    #: full file name -> an original module with several parts or moved rows (:mod:`.original`)
    originals: dict = field(default_factory=dict)
    #: the file names that are original names (not diffusers paths) of this component's modules
    original_spellings: set = field(default_factory=set)

    def add(self, path: str, file_name: str, canonical: bool = False) -> None:
        self.to_module.setdefault(file_name, path)
        if canonical or path not in self.to_file:
            self.to_file[path] = file_name


def _copy(names: ComponentNames) -> ComponentNames:
    return ComponentNames(names.component, names.write_prefix, dict(names.to_module), dict(names.to_file),
                          dict(names.originals), set(names.original_spellings))


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


def transformer_names(model: nn.Module, component: str = "transformer") -> ComponentNames:
    """Names for a transformer (``transformer`` or ``transformer_2``): the underscore form of each
    diffusers module path under each of the component's prefixes (:data:`TRANSFORMER_PREFIXES`)."""
    return _copy(_transformer_names(tuple(adapter_capable_paths(model)), component))


@functools.lru_cache(maxsize=16)
def _transformer_names(paths: tuple[str, ...], component: str) -> ComponentNames:
    prefixes = TRANSFORMER_PREFIXES[component]
    names = ComponentNames(component, prefixes[0])
    for path in paths:
        for prefix in prefixes:
            names.add(path, prefix + underscore(path), canonical=prefix == prefixes[0])
    return names


def add_original_names(names: ComponentNames, model: nn.Module) -> None:
    """Read sd-scripts' / musubi-tuner's names of a transformer's original modules too:
    ``lora_unet_`` + the underscore form of each original name (:mod:`.original`); a renamed module
    resolves to its diffusers path, a fused one (or one with moved rows) to its :class:`OriginalModule`."""
    for om in original_modules(model).values():
        spelled = "lora_unet_" + underscore(om.name)
        if om.name != om.parts[0].path:
            names.original_spellings.add(spelled)
        if om.is_rename:
            names.add(om.parts[0].path, spelled)
        else:
            names.originals[spelled] = om


def has_text_model_level(model: nn.Module) -> bool:
    """Whether ``model`` is a CLIP text model, whose files name paths with transformers 4's
    ``text_model.`` level (transformers 5's ``CLIPTextModel`` has none)."""
    return getattr(getattr(model, "config", None), "model_type", None) == "clip_text_model"


def text_encoder_names(model: nn.Module, component: str, write_prefix: str,
                       read_prefixes: tuple[str, ...] | None = None,
                       lycoris_alias: bool | None = None) -> ComponentNames:
    """Names for a text encoder: the underscore form of each module path under ``write_prefix`` and
    ``read_prefixes`` (default: the component's :data:`TE_PREFIXES`).

    A CLIP text model is written in the ``text_model_`` form (what kohya, AUTOMATIC1111 and ComfyUI
    expect) whatever the installed transformers; both forms are read. ``lycoris_alias``: read LyCORIS's
    generic ``lycoris_<path>`` names too (default: with ``lora_te_``, the one text encoder of a UNet
    pipeline).
    """
    if read_prefixes is None:
        read_prefixes = TE_PREFIXES[component] if write_prefix in TE_PREFIXES[component] else (write_prefix,)
    lycoris_alias = write_prefix == "lora_te_" if lycoris_alias is None else lycoris_alias
    return _copy(_text_encoder_names(tuple(adapter_capable_paths(model)), component, write_prefix,
                                     tuple(read_prefixes), has_text_model_level(model), lycoris_alias))


@functools.lru_cache(maxsize=16)
def _text_encoder_names(paths: tuple[str, ...], component: str, write_prefix: str, read_prefixes: tuple[str, ...],
                        clip: bool, lycoris_alias: bool) -> ComponentNames:
    names = ComponentNames(component, write_prefix)
    prefixes = (write_prefix,) + tuple(p for p in read_prefixes if p != write_prefix)
    prefixes += ("lycoris_",) if lycoris_alias else ()
    for path in paths:
        bare = path[len("text_model."):] if clip and path.startswith("text_model.") else path
        for prefix in prefixes:
            if clip:
                names.add(path, prefix + "text_model_" + underscore(bare), canonical=prefix == write_prefix)
            names.add(path, prefix + underscore(bare), canonical=not clip and prefix == write_prefix)
    return names


def build_name_map(components: dict[str, nn.Module], sdxl: bool | None = None) -> dict[str, ComponentNames]:
    """``{component: ComponentNames}`` for the components present (see the module docstring).

    ``sdxl``: two text encoders (``lora_te1_``/``lora_te2_``, and SGM names for a UNet); default: whether
    there is a ``text_encoder_2``."""
    sdxl = "text_encoder_2" in components if sdxl is None else sdxl
    no_transformer = not any(components.get(c) is not None for c in DENOISERS[1:])
    out = {}
    for component, model in components.items():
        if model is None:
            continue
        if component == "unet":
            out[component] = unet_names(model, sgm=sdxl)
        elif component in TRANSFORMER_PREFIXES:
            out[component] = transformer_names(model, component)
            if component == "transformer":  # a second expert's files use diffusers names (one name, one module)
                add_original_names(out[component], model)
        elif component == "text_encoder":
            out[component] = text_encoder_names(model, component, "lora_te1_" if sdxl else "lora_te_",
                                                lycoris_alias=not sdxl and no_transformer)
        elif component == "text_encoder_2":
            # sd-scripts and ComfyUI call Flux's T5 (its text_encoder_2) lora_te3
            extra = ("lora_te3_",) if components.get("text_encoder_3") is None else ()
            out[component] = text_encoder_names(model, component, "lora_te2_", TE_PREFIXES[component] + extra)
        elif component == "text_encoder_3":
            out[component] = text_encoder_names(model, component, "lora_te3_")
        else:
            raise ValueError(f"unknown component {component!r}")
    return out


def file_name_lookup(names: dict[str, ComponentNames]) -> dict[str, tuple[str, str] | list[tuple[str, str]]]:
    """``{file module name: (component, module path)}`` over every component (an original fused module:
    ``(component, OriginalModule)``); a name two components claim maps to the list of both (a file that
    uses it is refused: it would be a guess)."""
    lookup: dict = {}
    for component, cn in names.items():
        for file_name, path in (*cn.to_module.items(), *cn.originals.items()):
            found = lookup.get(file_name)
            if found is None:
                lookup[file_name] = (component, path)
            elif isinstance(found, list):
                found.append((component, path))
            else:
                lookup[file_name] = [found, (component, path)]
    return lookup


def split_key(key: str, roots: set[str] | None = None) -> tuple[str, str] | None:
    """``(module, tensor key)``: kohya names split at the first dot, dotted (diffusers / PEFT) names at
    the first part that begins a registered file key (``roots``: :func:`file_key_roots`); ``None`` for
    anything else."""
    if key.startswith(tuple(KOHYA_PREFIXES)):
        return tuple(key.split(".", 1)) if "." in key else None
    roots = file_key_roots() if roots is None else roots
    parts = key.split(".")
    for i, part in enumerate(parts[1:], 1):
        if part in roots:
            return ".".join(parts[:i]), ".".join(parts[i:])
    return None
