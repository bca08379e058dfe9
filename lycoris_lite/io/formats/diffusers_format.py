"""diffusers LoRA files (``pytorch_lora_weights.safetensors``, what ``save_lora_weights`` writes).

Keys are ``<component>.<module path>.<param>`` with ``component`` one of ``unet``, ``transformer``,
``transformer_2``, ``text_encoder``, ``text_encoder_2``, ``text_encoder_3`` (a file for one model may have
no component prefix; PEFT's ``base_model.model.`` after the component is read too) and the module paths
the diffusers / transformers module paths themselves, so names are looked up directly (no underscore
guessing). The spellings read (all LoRA, ``down`` = our ``lora_down`` = PEFT's ``lora_A``):

* PEFT: ``….to_q.lora_A.weight`` / ``lora_B.weight``;
* diffusers: ``….to_q.lora.down.weight`` / ``lora.up.weight`` and ``….q_proj.lora_linear_layer.down.weight``;
* old diffusers attention processors: ``….attn1.processor.to_q_lora.down.weight`` (``to_out_lora`` is
  ``to_out.0`` in the UNet; ``to_q/k/v/out_lora`` are ``q/k/v/out_proj`` in a text encoder);
* optional ``<module>.alpha`` keys (scale ``alpha / r``).

Text-encoder paths are accepted with and without transformers 4's ``text_model.`` level (written with it
for CLIP text models only).

The scale comes from diffusers' safetensors metadata ``lora_adapter_metadata`` when present (JSON of the
``LoraConfig`` per component, keys ``"<component>.<field>"``: ``r``, ``lora_alpha``, ``rank_pattern``,
``alpha_pattern``, ``use_rslora``), else from ``.alpha`` keys, else 1 (diffusers' rules).

Writing (:func:`write`) holds LoRA only, losslessly: ``lora_A``/``lora_B`` keys and the metadata that
makes ``pipe.load_lora_weights`` build the same scales (per-layer ranks/alphas in ``rank_pattern`` /
``alpha_pattern``, rsLoRA). Other algorithms cannot be expressed as a diffusers LoRA: convert (extract) them
to a LoRA first.
"""

from __future__ import annotations

import json
from collections import Counter

import torch
from torch import nn

from ...core.targets import base_module_at
from ...base.layer_kind import LayerSpec
from ...base.registry import LayerEntry, get_algorithm
from .kohya import check_unknown, join_modules
from .names import COMPONENTS, DENOISERS, has_text_model_level
from .peft_format import check_config_values, module_paths, resolve_path

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"

# suffix -> role, longest first; "old" marks the attention-processor spelling (to_q_lora)
_SUFFIXES = (
    (".lora_linear_layer.down.weight", "down", False),
    (".lora_linear_layer.up.weight", "up", False),
    (".lora.down.weight", "down", False),
    (".lora.up.weight", "up", False),
    ("_lora.down.weight", "down", True),
    ("_lora.up.weight", "up", True),
    (".lora_A.weight", "down", False),
    (".lora_B.weight", "up", False),
    (".alpha", "alpha", False),
)
_UNSUPPORTED = {
    "lora_magnitude_vector": "DoRA", "dora_scale": "DoRA", "lora_B.bias": "LoRA bias (lora_bias=True)",
    "lora.up.bias": "LoRA bias", "lora_embedding_A": "LoRA on embeddings", "lora_embedding_B": "LoRA on embeddings",
}
_OLD_TE = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", ".lora_linear_layer.", "_lora.down.", "_lora.up.")


def looks_like_diffusers(keys) -> bool:
    """Keys of a diffusers/PEFT LoRA state dict, with or without component prefixes."""
    keys = list(keys)
    return bool(keys) and all(any(m in k for m in _LORA_MARKERS) or k.endswith(".alpha") for k in keys) \
        and any(any(m in k for m in _LORA_MARKERS) for k in keys)


def parse_key(key: str, default_component: str = "unet") -> tuple[str, str, str]:
    """``(component, module path as in the file, role)`` of a diffusers LoRA key; ``ValueError`` if the
    key is not one of the LoRA spellings."""
    head, _, rest = key.partition(".")
    component, rest = (head, rest) if head in COMPONENTS else (default_component, key)
    rest = rest.removeprefix("base_model.model.")  # a PEFT model's state dict saved under a component prefix
    for suffix, role, old in _SUFFIXES:
        if rest.endswith(suffix):
            module = rest[: -len(suffix)]
            if role == "alpha" and module.endswith("_lora"):
                module, old = module[: -len("_lora")], True
            module = module.replace(".processor.", ".")
            if old:
                parent, _, leaf = module.rpartition(".")
                if component in DENOISERS:
                    leaf = "to_out.0" if leaf == "to_out" else leaf
                else:
                    leaf = _OLD_TE.get(leaf, leaf)
                module = f"{parent}.{leaf}" if parent else leaf
            return component, module, role
    what = next((w for p, w in _UNSUPPORTED.items() if p in key), None)
    raise ValueError(f"{what} is not supported (key {key!r})" if what else f"not a LoRA key: {key!r}")


def component_metadata(metadata: dict[str, str] | None, default_component: str = "unet") -> dict[str, dict]:
    """``{component: LoraConfig fields}`` from the file's ``lora_adapter_metadata``: keys
    ``"<component>.<field>"`` (``save_lora_weights``), or bare fields for one model
    (``save_lora_adapter``), which belong to ``default_component``."""
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError as exc:  # not JSON, or a number past Python's digit limit
        raise ValueError(f"the file's {METADATA_KEY} is not valid JSON ({exc})") from None
    if not isinstance(flat, dict):
        raise ValueError(f"the file's {METADATA_KEY} is not a JSON object")
    out: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        if component in COMPONENTS and field:
            out.setdefault(component, {})[field] = value
        elif "." not in key:
            out.setdefault(default_component, {})[key] = value
    for component, config in out.items():
        check_config_values(config, component, get_algorithm("lora"), f"the file's {METADATA_KEY}")
    return out


def read(state: dict[str, torch.Tensor], components: dict[str, nn.Module], metadata: dict[str, str] | None = None,
         *, default_component: str = "unet", strict: bool = True
         ) -> tuple[dict[str, dict[str, LayerEntry]], list[str]]:
    """Map a diffusers LoRA state dict onto the components.

    Returns ``({component: {module path: LayerEntry}}, skipped keys)``; every problem raises
    ``ValueError`` before anything is attached (``strict=False`` skips unknown modules and keys).
    """
    configs = component_metadata(metadata, default_component)
    lora = get_algorithm("lora")
    grouped: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown_keys, skipped = [], []
    for key, value in state.items():
        try:
            component, module, role = parse_key(key, default_component)
        except ValueError as exc:
            if "not supported" in str(exc):
                raise
            unknown_keys.append(key)
            continue
        slot = grouped.setdefault((component, module), {})
        if role in slot:
            raise ValueError(f"{component}.{module}: two tensors for its LoRA {role} weight (spellings mixed?)")
        slot[role] = value
    missing_components = sorted({c for c, _ in grouped if c not in components})
    if missing_components and strict:
        raise ValueError(f"the file has LoRA weights for {missing_components}, which the target does not have "
                         f"(it has {sorted(components)}); strict=False skips them")
    paths = {c: module_paths(m) for c, m in components.items()}
    plans: dict[str, dict[str, LayerEntry]] = {}
    unknown_modules = []
    for (component, module), tensors in grouped.items():
        if component not in components:
            skipped += [f"{component}.{module}.{r}" for r in tensors]
            continue
        live = resolve_path(paths[component], module)
        if live is None:
            unknown_modules.append(f"{component}.{module}")
            skipped += [f"{component}.{module}.{r}" for r in tensors]
            continue
        if "down" not in tensors or "up" not in tensors:
            if set(tensors) == {"alpha"}:
                skipped.append(f"{component}.{module}.alpha")
                continue
            raise ValueError(f"{component}.{module}: has a LoRA {'up' if 'up' in tensors else 'down'} weight but no "
                             f"{'down' if 'up' in tensors else 'up'} weight")
        down, up = tensors["down"], tensors["up"]
        if down.dim() not in (2, 4) or up.dim() not in (2, 4):
            raise ValueError(f"{component}.{module}: LoRA weights of shapes {tuple(down.shape)} / "
                             f"{tuple(up.shape)} are neither linear nor conv weights")
        spec = LayerSpec.from_module(base_module_at(components[component], live), live)
        if spec.is_conv and up.dim() == 2:
            up = up[:, :, None, None]
        r = down.shape[0]
        config = configs.get(component)
        if config is not None:
            if config.get("use_dora"):
                raise ValueError(f"{component}: DoRA adapters (use_dora=True) are not supported")
            config = {"r": r, "lora_alpha": r, **config}  # diffusers' defaults: the tensors' rank, scale 1
        else:
            alpha = tensors.get("alpha")
            config = {"r": r, "lora_alpha": float(alpha.reshape(-1)[0]) if alpha is not None and alpha.numel() else r}
        settings, params = lora.from_peft(spec, {"lora_A.weight": down, "lora_B.weight": up}, config,
                                          (live, module, live.removeprefix("text_model.")))
        plans.setdefault(component, {})[live] = LayerEntry(lora, settings, params, f"{component}.{module}")
    skipped += unknown_keys
    check_unknown(unknown_modules, unknown_keys, strict, "keys that are not LoRA weights", components)
    if not plans:
        raise ValueError("the file has no LoRA tensors for this model")
    return plans, skipped


def _file_path(component: str, model: nn.Module, path: str) -> str:
    """The module path written: CLIP text encoders without transformers 4's ``text_model.`` level get it
    back, so that diffusers with either transformers version reads the file (diffusers strips it when the
    model has no such level)."""
    if has_text_model_level(model) and not hasattr(model, "text_model") and path.startswith(
            ("encoder.", "embeddings.")):
        return "text_model." + path
    return path


def write(entries: dict[str, dict[str, LayerEntry]], components: dict[str, nn.Module],
          dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Per-layer LoRA entries -> ``(state dict, safetensors metadata)`` as ``save_lora_weights`` writes them.

    ``ValueError`` (nothing written) for anything but plain LoRA layers.
    """
    for component, layers in entries.items():
        for path, entry in layers.items():
            name = entry.algorithm.name
            if name != "lora":
                raise ValueError(
                    f"the diffusers format holds LoRA only; layer {path!r} of the {component} is {name.upper()}. "
                    f"Convert the adapter to a LoRA first (extraction to a LoRA with the CLI's conversion command), or "
                    f"save it with format='kohya' (AUTOMATIC1111/ComfyUI) or format='peft'")
            if entry.settings.dora:
                raise ValueError(f"layer {path!r} of the {component} is a DoRA LoRA (dora_scale); save it with "
                                 "format='kohya' or format='peft', which hold the magnitude")
            if entry.settings.tucker or "lora_mid" in entry.tensors:
                raise ValueError(f"layer {path!r} of the {component} is a Tucker LoRA (lora_mid), which diffusers' "
                                 "LoRA cannot hold; save it with format='kohya' or extract a plain LoRA")
    lora = get_algorithm("lora")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    flat: dict = {}
    for component, layers in entries.items():
        model = components[component]
        # PEFT's LoraConfig of the component, its patterns keyed by paths without ``text_model.``
        short = {p: p.removeprefix("text_model.") if has_text_model_level(model) else p for p in layers}
        specs = {short[p]: LayerSpec.from_module(base_module_at(model, p), p) for p in layers}
        tensors, config = lora.to_peft({short[p]: e for p, e in layers.items()}, specs, component)
        for path in layers:
            modules[f"{component}.{_file_path(component, model, path)}"] = tensors[short[path]]
        config.update(target_modules=sorted(short.values()), peft_type=lora.peft_type, bias="none")
        flat.update({f"{component}.{k}": v for k, v in config.items()})
    state = join_modules(modules, dtype)
    algorithms = Counter(e.algorithm.name for layers in entries.values() for e in layers.values())
    meta = {"format": "pt", METADATA_KEY: json.dumps(flat, indent=2, sort_keys=True),
            "lycoris_lite.algorithms": json.dumps(dict(algorithms))}
    return state, meta


__all__ = ["WEIGHT_NAME", "METADATA_KEY", "looks_like_diffusers", "parse_key", "component_metadata", "read", "write"]
