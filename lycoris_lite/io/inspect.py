"""What an adapter file or folder holds, read without a model: ``lycoris-lite inspect`` and the web UI's
adapter cards.

:func:`describe` reads a kohya/LyCORIS or diffusers file, a diffusers folder, a PEFT folder or a folder of
per-component PEFT folders and reports the format, algorithms with their layer counts, ranks (each
algorithm's ``describe_size``), alphas, module count, the model family (from key names and
cross-attention widths, else from the metadata), the metadata summary (:mod:`lycoris_lite.io.metadata`)
and the trigger words; :func:`format_report` is its text. Which module a key belongs to and which
algorithm a module is are the registry's facts (``Algorithm.file_keys``), so a new algorithm is reported
as it is registered. :func:`carried_metadata` is what a converted file keeps of its source's metadata.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from ..base.registry import ALPHA_KEY, algorithm_of, file_key_roots, pattern_value
from ..base.settings import ScaledSettings
from .files import detect_format, saved_model_classes
from .formats import community, kohya, peft_format
from .formats.diffusers_format import WEIGHT_NAME as DIFFUSERS_WEIGHTS, component_metadata
from .formats.names import COMPONENTS, DENOISERS, KOHYA_PREFIXES, TE_PREFIXES, UNET_PREFIXES, split_key
from .formats.original import LAYOUT_NAMES, original_name_classes
from .formats.safe_io import AdapterFileError, check_safetensors_header, read_state_dict
from .metadata import PREFIX, header_alphas, summarize_metadata

#: the ``adapter_config.json`` fields a report shows
_CONFIG_FIELDS = ("peft_type", "r", "lora_alpha", "alpha", "use_rslora", "target_modules", "rank_pattern",
                  "alpha_pattern", "base_model_name_or_path", "oft_block_size", "boft_block_size",
                  "boft_n_butterfly_factor", "use_dora")
#: module-name prefix -> component, for every spelling (kohya's, diffusers' ``unet.``, PEFT's one model)
_COMPONENT_PREFIXES = {**KOHYA_PREFIXES, **{c + ".": c for c in COMPONENTS}, peft_format.KEY_PREFIX: "model"}
#: the kohya module-name prefix a dotted module name is given for family detection (SDXL's spellings)
_KOHYA_PREFIX_OF = {"unet": UNET_PREFIXES[0], **{c: prefixes[-1] for c, prefixes in TE_PREFIXES.items()}}
#: metadata a converted file keeps from its source; the rest describes the source's tensors
_CARRIED = {PREFIX + k for k in ("base_model", "trigger_words", "training")}


class InspectError(Exception):
    """An adapter that cannot be read (no such file, not an adapter, a corrupt file)."""


# ---- reading an adapter without a model -----------------------------------------------------------
def _read_file(file: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        state, metadata = read_state_dict(file, allow_pickle=allow_pickle)
    except (AdapterFileError, FileNotFoundError) as exc:
        raise InspectError(str(exc)) from None
    if not state:
        raise InspectError(f"{file}: holds no tensors")
    return state, metadata


def _read_peft(folder: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """``(state, metadata, the config's fields a report shows)`` of one PEFT folder."""
    try:
        state, config, metadata = peft_format.read_folder(folder, allow_pickle=allow_pickle)
    except (AdapterFileError, FileNotFoundError) as exc:
        raise InspectError(str(exc)) from None
    if not state:
        raise InspectError(f"{folder / peft_format.WEIGHTS_NAME}: holds no tensors")
    return state, metadata, {k: config[k] for k in _CONFIG_FIELDS if k in config}


def read_source(path: str, allow_pickle: bool = False):
    """``(path, format or None, state, metadata, {component: adapter config})`` of a file, a diffusers
    folder, a PEFT folder or a folder of per-component PEFT folders (whose keys are then prefixed with
    their component, ``unet.<module path>.…``). ``None`` format: detect it from the keys."""
    p = Path(path)
    if p.is_file():
        return (p, None, *_read_file(p, allow_pickle), {})
    if not p.is_dir():
        raise InspectError(f"{path}: no such file or folder")
    folders = peft_format.adapter_folders(p)
    if None in folders:
        state, metadata, config = _read_peft(p, allow_pickle)
        return p / peft_format.WEIGHTS_NAME, "peft", state, metadata, {"model": config}
    if (p / DIFFUSERS_WEIGHTS).is_file():
        return (p / DIFFUSERS_WEIGHTS, None, *_read_file(p / DIFFUSERS_WEIGHTS, allow_pickle), {})
    if not folders:
        raise InspectError(f"{path}: a folder without an adapter ({peft_format.CONFIG_NAME}, {DIFFUSERS_WEIGHTS} or "
                           f"per-component PEFT folders {', '.join(c + '/' for c in COMPONENTS)})")
    state, metadata, configs = {}, {}, {}
    for c, folder in folders.items():
        part, meta, configs[c] = _read_peft(folder, allow_pickle)
        state.update({f"{c}.{k.removeprefix(peft_format.KEY_PREFIX)}": v for k, v in part.items()})
        metadata = metadata or meta
    return p, "peft", state, metadata, configs


def component_of(module: str) -> str:
    return next((c for prefix, c in _COMPONENT_PREFIXES.items() if module.startswith(prefix)), "unknown")


def _bare(module: str, component: str) -> str:
    """A dotted module name without its component prefix."""
    return module.removeprefix(peft_format.KEY_PREFIX) if component == "model" else module.partition(".")[2]


def _kohya_spelling(modules: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The modules' tensors under kohya module names, which :func:`kohya.file_family` reads."""
    out = {}
    for module, tensors in modules.items():
        component = component_of(module)
        if module.startswith(tuple(KOHYA_PREFIXES)):
            name = module
        else:
            name = _KOHYA_PREFIX_OF.get(component, UNET_PREFIXES[0]) + _bare(module, component).replace(".", "_")
        out.update({f"{name}.{key}": value for key, value in tensors.items()})
    return out


def describe(path: str, allow_pickle: bool = False, top_tags: int = 10) -> dict:
    """What ``inspect`` reports, as a JSON-ready dict (:class:`InspectError` for what cannot be read)."""
    file, fmt, state, metadata, configs = read_source(path, allow_pickle)
    roots = file_key_roots()
    modules: dict[str, dict[str, torch.Tensor]] = {}
    loose, xlabs = [], False
    for key, value in state.items():
        split = split_key(key, roots) or community.xlabs_key(key)
        if split is None:
            loose.append(key)
        else:
            xlabs = xlabs or split[0].startswith("xlabs:")
            modules.setdefault(split[0].removeprefix("xlabs:"), {})[split[1]] = value
    originals = {m: original_name_classes(m) for m in modules}
    originals = {m: classes for m, classes in originals.items() if classes}
    algorithms, components, alphas, sizes, unknown = Counter(), Counter(), Counter(), {}, []
    no_alpha = 0  # modules of an alpha/r algorithm without an alpha tensor
    for module, tensors in modules.items():
        body = {k: v for k, v in tensors.items() if k != ALPHA_KEY}
        algo = algorithm_of(body)
        if algo is None:
            unknown.append(module)
            continue
        algorithms[algo.name] += 1
        components["transformer" if module in originals else component_of(module)] += 1
        sizes.setdefault(algo.name, Counter())[algo.describe_size(body)] += 1
        alpha = tensors.get(ALPHA_KEY)
        if alpha is not None and alpha.numel():
            alphas[_number(float(alpha.reshape(-1)[0]))] += 1
        elif issubclass(algo.settings_class, ScaledSettings):
            no_alpha += 1
    summary = summarize_metadata(metadata, top_tags)
    saved = saved_model_classes(metadata)
    denoiser = next((saved[c] for c in DENOISERS[1:] if isinstance(saved.get(c), str)), None)
    if denoiser is not None:  # a transformer's file we wrote: the SD evidence of file_family means nothing
        family, evidence = kohya.class_family(denoiser), f"metadata: saved from a {denoiser}"
    elif originals:
        classes = set.intersection(*originals.values()) or set.union(*originals.values())
        family = " or ".join(sorted(kohya.class_family(c) for c in classes))
        evidence = f"original module names ({next(iter(originals))})"
    else:
        family, evidence = kohya.file_family(_kohya_spelling(modules))
    if family is None and summary.family:
        family, evidence = summary.family, "metadata"
    if family in kohya.TRANSFORMER_FAMILIES.values() and "unet" in components:  # lycoris_/lora_unet_ on a DiT
        components["transformer"] += components.pop("unet")
    fmt = fmt or detect_format(state)
    layout = _layout(modules, originals, xlabs, fmt)
    if fmt in ("unknown", "diffusers") and (originals or xlabs):  # what save_adapter(format=) calls it
        fmt = "xlabs" if xlabs else "comfyui"
    try:
        configs = configs or component_metadata(metadata)
    except ValueError:
        pass
    alpha_note = None
    if not alphas and configs:  # diffusers / PEFT: alphas live in the adapter config
        for module in modules:
            component = component_of(module)
            config = configs.get(component) or configs.get("model") or {}
            alpha = config.get("lora_alpha", config.get("alpha"))
            alpha = pattern_value(config.get("alpha_pattern"), _bare(module, component), alpha)
            if alpha is not None and module not in unknown:
                alphas[_number(float(alpha))] += 1
    elif no_alpha:
        header, conv = header_alphas(metadata)
        if header is not None or conv is not None:
            alpha_note = (f"{no_alpha} module(s) without an alpha tensor take the header's "
                          + ", ".join(f"{k}={_number(v)}" for k, v in (("ss_network_alpha", header),
                                                                        ("conv_alpha", conv)) if v is not None))
        else:
            alpha_note = (f"{no_alpha} module(s) have no alpha, in their tensors or the header: the scale is not "
                          "stated; alpha = rank (scale 1) is assumed, as kohya and LyCORIS do")
    return {
        "file": str(file),
        "size_bytes": sum(f.stat().st_size for f in ([file] if file.is_file() else file.rglob("*")) if f.is_file()),
        "format": fmt,
        "layout": layout,
        "tensors": len(state),
        "dtypes": dict(Counter(str(v.dtype).removeprefix("torch.") for v in state.values())),
        "modules": sum(algorithms.values()),
        "components": dict(components),
        "algorithms": dict(algorithms.most_common()),
        "ranks": {a: dict(c.most_common()) for a, c in sizes.items()},
        "alphas": dict(alphas.most_common()),
        "alpha_note": alpha_note,
        "family": family,
        "family_evidence": evidence,
        "trigger_words": summary.trigger_words,
        "metadata": summary.to_dict(),
        "adapter_config": configs,
        "unrecognised_modules": sorted(unknown),
        "loose_keys": sorted(loose),
    }


def _layout(modules, originals: dict, xlabs: bool, fmt: str) -> str:
    """How the file names its modules, in the words of :data:`~lycoris_lite.io.formats.original.LAYOUT_NAMES`."""
    found = []
    if xlabs:
        found.append(LAYOUT_NAMES["xlabs"])
    if any(m.startswith("lora_unet_") for m in originals):
        found.append(LAYOUT_NAMES["kohya-original"])
    if any(not m.startswith("lora_unet_") for m in originals) and not xlabs:
        found.append(LAYOUT_NAMES["comfyui-original"])
    if not found:
        if any(m.startswith("diffusion_model.") for m in modules):
            found.append("ComfyUI (diffusion_model. + diffusers names)")
        elif fmt == "kohya":
            found.append("kohya/LyCORIS")
        else:
            found.append(fmt)
    return ", ".join(found)


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _size(n: float) -> str:
    if n < 1024:
        return f"{int(n)} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"


def _counts(counter: dict) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in counter.items()) or "-"


def format_report(info: dict) -> str:
    """The text ``inspect`` prints."""
    lines = [
        f"file:          {info['file']} ({_size(info['size_bytes'])}, {info['tensors']} tensors, "
        f"{', '.join(info['dtypes'])})",
        f"format:        {info['format']}" + (f"; names: {info['layout']}" if info.get("layout") not in (None, info["format"]) else ""),
        f"family:        {info['family'] or 'unknown'}" + (f" ({info['family_evidence']})" if info["family"] else ""),
        f"modules:       {info['modules']}" + (f" ({', '.join(f'{c} {n}' for c, n in info['components'].items())})"
                                               if info["components"] else ""),
        f"algorithms:    {', '.join(f'{a} ({n} layers)' for a, n in info['algorithms'].items()) or '-'}",
        "ranks:         " + ("; ".join(f"{a}: {_counts(r)}" for a, r in info["ranks"].items()) or "-"),
        f"alphas:        {_counts(info['alphas'])}" + (f" ({info['alpha_note']})" if info.get("alpha_note") else ""),
        f"trigger words: {', '.join(info['trigger_words']) or '-'}",
    ]
    if info["unrecognised_modules"]:
        unknown = info["unrecognised_modules"]
        lines.append(f"unrecognised:  {len(unknown)} module(s), e.g. {unknown[:3]}")
    for component, config in (info["adapter_config"] or {}).items():
        long = ("target_modules", "rank_pattern", "alpha_pattern")
        shown = {k: v for k, v in config.items() if k not in long or not v}
        lines.append(f"config ({component}): {json.dumps(shown)}")
    m = info["metadata"]
    meta = []
    if m["network_module"]:
        meta.append(("network module", m["network_module"]))
    if m["network_args"]:
        meta.append(("network args", ", ".join(f"{k}={v}" for k, v in m["network_args"].items())))
    if m["network_dim"] is not None or m["network_alpha"] is not None:
        meta.append(("dim / alpha", f"{m['network_dim']} / {m['network_alpha']}"))
    if m["base_model"] or m["family"]:
        shown = m["base_model"] or m["family"]
        meta.append(("base model", shown + (f" ({m['family']})" if m["family"] and m["family"] != shown else "")))
    if m["output_name"]:
        meta.append(("output name", m["output_name"]))
    if m["algorithms"]:
        meta.append(("algorithms", json.dumps(m["algorithms"])))
    if m["tag_count"]:
        meta.append(("tags", f"{m['tag_count']} distinct in ss_tag_frequency"))
    if m["training"]:
        items = list(m["training"].items())
        meta.append(("training", ", ".join(f"{k}={v}" for k, v in items[:12]) + (" …" if len(items) > 12 else "")))
    if m["modelspec"]:
        meta.append(("modelspec", ", ".join(f"{k}={v}" for k, v in m["modelspec"].items())))
    if m["other_keys"]:
        meta.append(("other keys", ", ".join(m["other_keys"])))
    lines.append("metadata:" + ("" if meta else "      none"))
    lines += [f"  {k + ':':<16}{v}" for k, v in meta]
    return "\n".join(lines)


# ---- what a converted file keeps ----------------------------------------------------------------
def carried_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The source's descriptive metadata: kohya's ``ss_*`` (not the network keys), ``modelspec.*`` and our
    base model, trigger words and training settings. What describes the source's tensors (network
    keys, algorithms, configs, hashes, diffusers' ``lora_adapter_metadata``) is recomputed by the writer."""
    return {k: v for k, v in metadata.items()
            if k in _CARRIED or k.startswith("modelspec.") or (k.startswith("ss_") and not k.startswith("ss_network_"))}


def header_metadata(path: Path) -> dict[str, str]:
    """The safetensors metadata of an adapter file or folder (PEFT folders: the first component's), read
    from the header alone; ``{}`` when there is none."""
    candidates = [path] if path.is_file() else [path / peft_format.WEIGHTS_NAME, path / DIFFUSERS_WEIGHTS] + [
        path / c / peft_format.WEIGHTS_NAME for c in COMPONENTS]
    for file in candidates:
        if file.is_file() and file.suffix == ".safetensors":
            try:
                return check_safetensors_header(file)[1]
            except (AdapterFileError, OSError):
                return {}
    return {}


__all__ = ["InspectError", "carried_metadata", "component_of", "describe", "format_report", "header_metadata",
           "read_source", "split_key"]
