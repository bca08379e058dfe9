"""kohya / LyCORIS files (what AUTOMATIC1111 and ComfyUI read): ``<module>.<key>`` with underscore module
names under ``lora_unet_`` / ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` / ``lycoris_`` / ``oft_unet_``
(and a transformer's ``lycoris_`` / ``lora_transformer_``, ``lora_te3_``: :mod:`.names`), and a 0-d
``alpha`` per module (the COFT constraint for OFT/BOFT). LoRA/LoHa/LoKr modules may carry a DoRA
magnitude ``dora_scale``, ``(out, 1[, 1, 1])`` or LyCORIS's older ``(1, in[, 1, 1])``, which says the axis
(:mod:`lycoris_lite.algos.dora`); it is read and written as it is.

Two pure mappings: :func:`read` (file tensors -> per-layer entries of our algorithms) and :func:`write`
(entries -> file tensors). A transformer's original module names (sd-scripts / musubi-tuner, ComfyUI's
``diffusion_model.`` through :mod:`.community`) are read and written through :mod:`.original`: an
adapter on a fused projection is split exactly onto the diffusers modules, and joined back when written
(:mod:`.projections`). Each algorithm owns its keys (``Algorithm.from_kohya`` / ``to_kohya``);
this module only splits names, maps them through the live model's name map and checks.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ...core.targets import base_module_at, model_class
from ...base.layer_kind import LayerSpec
from ...base.registry import ALPHA_KEY, LayerEntry, NotSplittable, algorithm_of, detect_algorithm
from .names import DENOISERS, ComponentNames, file_name_lookup, underscore
from .original import OriginalModule, has_original_names
from .projections import fused_spec, join_entries, split_entry

__all__ = ["FAMILY_WIDTHS", "TRANSFORMER_FAMILIES", "FamilyMismatch", "LayerEntry", "check_family",
           "check_model_classes", "check_unknown", "class_family", "file_family", "join_modules", "model_family",
           "read", "split_modules", "write"]


class FamilyMismatch(ValueError):
    pass


def split_modules(state: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Group ``<module>.<key>`` keys by module (split at the first dot); keys without a dot are returned apart."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    loose = []
    for key, value in state.items():
        if "." not in key:
            loose.append(key)
            continue
        module, suffix = key.split(".", 1)
        modules.setdefault(module, {})[suffix] = value
    return modules, loose


def join_modules(modules: dict[str, dict[str, torch.Tensor]], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The inverse of :func:`split_modules`: ``{"<module>.<key>": tensor}`` (detached; floating-point
    tensors cast to ``dtype`` when given), what every format writes."""
    return {f"{module}.{key}": value.detach().to(dtype) if dtype is not None and value.is_floating_point() else value.detach()
            for module, tensors in modules.items() for key, value in tensors.items()}


FAMILY_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}  # cross-attention (text embedding) width
#: the family of a transformer (DiT) denoiser, by its diffusers class; other classes are named by their class
TRANSFORMER_FAMILIES = {"FluxTransformer2DModel": "Flux.1", "Flux2Transformer2DModel": "Flux.2",
                        "SD3Transformer2DModel": "SD3", "QwenImageTransformer2DModel": "Qwen-Image",
                        "ZImageTransformer2DModel": "Z-Image", "WanTransformer3DModel": "Wan"}


def class_family(class_name: str) -> str:
    """A denoiser class's family (``"Flux.1"`` for ``FluxTransformer2DModel``), else the class name."""
    return TRANSFORMER_FAMILIES.get(class_name, class_name)


def file_family(state: dict[str, torch.Tensor]) -> tuple[str | None, str]:
    """``(family, evidence)`` from the keys and cross-attention widths of a file with kohya module names
    (tensor keys of any format): the input width of a cross-attention ``to_k`` module, as its algorithm
    reads it (``Algorithm.input_width``)."""
    if any(k.startswith("lora_te2_") for k in state):
        return "SDXL", "lora_te2_ keys"
    modules, _ = split_modules({k: v for k, v in state.items() if "attn2_to_k" in k.split(".", 1)[0]})
    for tensors in modules.values():
        algo = algorithm_of(tensors)
        width = algo.input_width(tensors) if algo is not None else None
        if width in FAMILY_WIDTHS:
            return FAMILY_WIDTHS[width], f"{width}-wide cross-attention"
    return None, ""


def model_family(components: dict[str, nn.Module]) -> tuple[str | None, str]:
    """``(family, evidence)`` of a pipeline's components: a transformer's by its class
    (:data:`TRANSFORMER_FAMILIES`); SDXL by its second text encoder or its UNet's added ``text_time``
    conditions, else by the UNet's cross-attention width."""
    for component in DENOISERS[1:]:
        if components.get(component) is not None:
            name = model_class(components[component]).__name__
            return class_family(name), f"its {component} is a {name}"
    if components.get("text_encoder_2") is not None:
        return "SDXL", "two text encoders"
    config = getattr(components.get("unet"), "config", None)
    if getattr(config, "addition_embed_type", None) == "text_time":
        return "SDXL", "text_time added conditions"
    width = getattr(config, "cross_attention_dim", None)
    family = FAMILY_WIDTHS.get(width) if isinstance(width, int) else None
    return family, f"{width}-wide cross-attention" if width else ""


def check_family(state, components) -> None:
    """Refuse an SD 1.x / 2.x / SDXL file on a model of another of those families (the evidence of
    :func:`file_family` means nothing for a transformer's file; :func:`check_model_classes` and the
    names themselves tell those apart)."""
    if any(components.get(c) is not None for c in DENOISERS[1:]):
        return
    file_fam, file_why = file_family(state)
    model_fam, model_why = model_family(components)
    if file_fam and model_fam and file_fam != model_fam:
        raise FamilyMismatch(f"this adapter is for {file_fam}: {file_why}; the model is {model_fam} ({model_why})")
    if file_fam == "SDXL" and components.get("text_encoder_2") is None and any(k.startswith("lora_te2_") for k in state):
        raise FamilyMismatch("this adapter is for SDXL: lora_te2_ keys; the model has one text encoder")


def check_model_classes(saved: dict[str, str], components: dict[str, nn.Module]) -> None:
    """Refuse an adapter saved from another model's denoiser: ``saved`` is ``{component: class name}``
    as the file's metadata records it (``lycoris_lite.model_classes``). A UNet file on a transformer,
    a transformer file on a UNet, or transformers of two families raise :class:`FamilyMismatch` naming
    both; UNets are told apart by :func:`check_family`."""
    file_side = next(((c, saved[c]) for c in DENOISERS if isinstance(saved.get(c), str)), None)
    model_side = next(((c, model_class(components[c]).__name__) for c in DENOISERS if components.get(c) is not None), None)
    if file_side is None or model_side is None or file_side[0] == model_side[0] == "unet":
        return
    if file_side[1] not in TRANSFORMER_FAMILIES and model_side[1] not in TRANSFORMER_FAMILIES:
        return  # two models we know nothing of (a module given alone): their names decide
    (file_c, file_cls), (model_c, model_cls) = file_side, model_side

    def denoiser(component: str, cls: str) -> str:
        family = TRANSFORMER_FAMILIES.get(cls)
        return f"{family} (its {component} is a {cls})" if family else f"a model whose {component} is a {cls}"

    if (file_c == "unet") != (model_c == "unet") or class_family(file_cls) != class_family(model_cls):
        raise FamilyMismatch(f"this adapter is for {denoiser(file_c, file_cls)}; the model is "
                             f"{denoiser(model_c, model_cls)}")


def check_unknown(unknown_modules: list[str], unknown_keys: list[str], strict: bool, keys_label: str = "unknown keys",
                  components: dict[str, nn.Module] | None = None) -> None:
    """The strict-loading error every format raises for names and keys it cannot place; with
    ``components``, the error names the model's family."""
    if not strict or not (unknown_modules or unknown_keys):
        return
    parts = []
    if unknown_modules:
        family, why = model_family(components) if components else (None, "")
        model = f"this model ({family}: {why})" if family and why else "this model"
        parts.append(f"{len(unknown_modules)} module name(s) match no layer of {model}: {sorted(unknown_modules)[:8]}")
    if unknown_keys:
        parts.append(f"{keys_label}: {sorted(unknown_keys)[:8]}")
    raise ValueError("; ".join(parts) + " (strict=False loads the rest and returns the skipped keys)")


def read(state: dict[str, torch.Tensor], components: dict[str, nn.Module], names: dict[str, ComponentNames],
         sides: dict[str, str] | None = None, strict: bool = True,
         header_alphas: tuple[float | None, float | None] = (None, None)
         ) -> tuple[dict[str, dict[str, LayerEntry]], list[str]]:
    """Map a kohya/LyCORIS state dict onto the model.

    ``header_alphas``: ``(alpha, conv_alpha)`` the file's header states
    (:func:`lycoris_lite.io.metadata.header_alphas`), used for a module without an ``.alpha`` tensor
    (``conv_alpha`` on k×k convolutions, else ``alpha``); with neither, ``alpha = rank`` (scale 1),
    kohya's and LyCORIS's rule.

    Returns ``({component: {module path: LayerEntry}}, skipped keys)``. Every problem raises
    ``ValueError`` before anything is attached; with ``strict=False`` unknown modules and keys are
    skipped and returned instead.
    """
    check_family(state, components)
    modules, loose = split_modules(state)
    lookup = file_name_lookup(names)
    plans: dict[str, dict[str, LayerEntry]] = {}
    skipped = list(loose)
    unknown_modules, unknown_keys = [], []
    for file_name, tensors in modules.items():
        where = lookup.get(file_name)
        if where is None:
            unknown_modules.append(file_name)
            skipped += [f"{file_name}.{k}" for k in tensors]
            continue
        if isinstance(where, list):
            raise ValueError(f"{file_name}: the name fits {' and '.join(f'{c} {p!r}' for c, p in where)}; "
                             "load the file onto one component (a {component: model} dict)")
        component, path = where
        tensors = dict(tensors)
        alpha_tensor = tensors.pop(ALPHA_KEY, None)
        alpha = None if alpha_tensor is None else float(alpha_tensor.reshape(-1)[0]) if alpha_tensor.numel() else None
        alpha = alpha or None  # LyCORIS's rule: a zero alpha is none (alpha = rank, scale 1)
        algo = detect_algorithm(tensors)
        if algo is None:
            unknown_keys += [f"{file_name}.{k}" for k in tensors]
            skipped += [f"{file_name}.{k}" for k in tensors]
            continue
        if "dora_scale" in tensors and not algo.decomposable:
            raise ValueError(f"{file_name}: a DoRA magnitude (dora_scale) on a {algo.name} module; DoRA applies to "
                             "LoRA, LoHa and LoKr only")
        om = path if isinstance(path, OriginalModule) else None  # an original fused module: split below
        if om is not None:
            spec, path = fused_spec(om), om.name
        else:
            spec = LayerSpec.from_module(base_module_at(components[component], path), path)
        if alpha_tensor is None:
            alpha = (header_alphas[1] if spec.taps > 1 else None) \
                or header_alphas[0]
        try:
            settings, params = algo.from_kohya(spec, tensors, alpha, path, (sides or {}).get(algo.name))
        except KeyError as exc:
            raise ValueError(f"{file_name}: {algo.name} module is missing the key {exc}") from None
        except (IndexError, TypeError, RuntimeError, ZeroDivisionError) as exc:  # tensors of the wrong rank, …
            raise ValueError(f"{file_name}: its tensors {({k: tuple(v.shape) for k, v in tensors.items()})} do not "
                             f"form a {algo.name} module ({type(exc).__name__}: {exc})") from None
        expected = set(algo.param_shapes(spec, settings))
        extra = sorted(set(params) - expected)
        if extra:
            unknown_keys += [f"{file_name}.{k}" for k in extra]
            skipped += [f"{file_name}.{k}" for k in extra]
            params = {k: v for k, v in params.items() if k in expected}
        entry = LayerEntry(algo, settings, params, file_name)
        layers = plans.setdefault(component, {})
        for target, e in (split_entry(entry, om, components[component]) if om else {path: entry}).items():
            if target in layers:
                raise ValueError(f"{layers[target].source} and {file_name} both apply to the {component}'s {target}")
            layers[target] = e
    check_unknown(unknown_modules, unknown_keys, strict, components=components)
    if not plans:
        raise ValueError("the file has no adapter tensors for this model")
    return plans, skipped


LAYOUTS = ("original", "diffusers")


def write(entries: dict[str, dict[str, LayerEntry]], names: dict[str, ComponentNames],
          dtype: torch.dtype | None = None, components: dict[str, nn.Module] | None = None,
          layout: str | None = None, comfyui: bool = False) -> dict[str, torch.Tensor]:
    """Per-layer entries -> a kohya/LyCORIS state dict.

    A transformer whose family has original module names (:mod:`.original`) is written in them
    (``layout="original"``): sd-scripts' ``lora_unet_<original>`` or, with ``comfyui``, ComfyUI's
    ``diffusion_model.<original>``, each fused projection's modules joined into one adapter on the fused
    matrix by their algorithm (exact, or ``ValueError`` with the reason). ``layout="diffusers"`` writes
    the canonical names of the diffusers paths (``lycoris_…``). ``layout=None`` takes the original names
    where every module joins exactly, else the diffusers paths' names, with a warning saying why. Other
    components are written in their canonical names.
    """
    if layout not in (None, *LAYOUTS):
        raise ValueError(f"layout must be one of {LAYOUTS} (or None: original names where exact), got {layout!r}")
    modules = {}
    for component, layers in entries.items():
        model = (components or {}).get(component)
        if model is not None and component == "transformer" and layout != "diffusers" and has_original_names(model):
            try:
                joined = join_entries(layers, model)
            except ValueError as exc:
                if layout == "original":
                    raise ValueError(f"{exc}. Save with layout='diffusers' (lycoris_ + diffusers module names), which "
                                     "keeps every module's adapter as it is") from None
                warnings.warn(f"the {component} is written with diffusers module names (lycoris_…), which ComfyUI "
                              f"and LyCORIS read but sd-scripts does not: {exc}", stacklevel=3)
            else:
                for name, (_, entry) in joined.items():
                    file_name = f"diffusion_model.{name}" if comfyui else "lora_unet_" + underscore(name)
                    modules[file_name] = _file_tensors(entry, dtype)
                continue
        to_file = names[component].to_file
        for path, entry in layers.items():
            modules[to_file[path]] = _file_tensors(entry, dtype)
    return join_modules(modules, dtype)


def _file_tensors(entry: LayerEntry, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """One module's kohya tensors (with its ``alpha``)."""
    try:
        tensors, alpha = entry.algorithm.to_kohya(entry.tensors, entry.settings)
    except NotSplittable as exc:
        raise ValueError(str(exc)) from None
    if alpha is not None:
        tensors = {**tensors, ALPHA_KEY: torch.tensor(float(alpha), dtype=dtype or torch.float32)}
    return tensors
