"""Adapter file metadata: what a file says about itself, and what we write.

A safetensors header carries string metadata. Three families of keys matter:

* ours, under ``lycoris_lite.`` (``algorithms``: ``{algorithm: layer count}``; ``config``: the config
  dicts; ``rotation_sides``; and the descriptive keys :func:`build_metadata` writes: ``algorithm``,
  ``base_model``, ``target_modules``, ``training``, ``trigger_words``);
* kohya's ``ss_*`` keys (sd-scripts ``train_network.py``; AUTOMATIC1111 shows them in its metadata
  view): ``ss_network_module``, ``ss_network_dim``, ``ss_network_alpha``, ``ss_network_args`` (JSON with
  string values), ``ss_base_model_version`` / ``ss_v2``, ``ss_output_name``, ``ss_tag_frequency`` (JSON
  ``{dataset: {tag: count}}``, where AUTOMATIC1111 finds a LoRA's trigger words) and the training
  settings;
* the SAI model spec, ``modelspec.*``.

:func:`summarize_metadata` reads them into a :class:`MetadataSummary` (never raises on malformed
values: a broken JSON value is kept as its raw string); :func:`build_metadata` builds the dict that
``files.save_adapter(..., metadata=...)`` adds to what it writes.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from ..base.registry import get_algorithm

PREFIX = "lycoris_lite."

#: kohya's ``ss_base_model_version`` for each family, and back
BASE_MODEL_VERSIONS = {"SD 1.x": "sd_v1", "SD 2.x": "sd_v2", "SDXL": "sdxl_base_v1-0"}
#: kohya's training-setting keys (``ss_<name>``) shown by AUTOMATIC1111; other settings stay in ours only
TRAINING_KEYS = ("learning_rate", "unet_lr", "text_encoder_lr", "max_train_steps", "num_epochs", "epoch", "steps",
                 "batch_size_per_device", "total_batch_size", "gradient_accumulation_steps", "resolution", "seed",
                 "optimizer", "lr_scheduler", "lr_warmup_steps", "mixed_precision", "clip_skip", "noise_offset",
                 "network_dropout", "num_train_images", "num_reg_images", "training_started_at",
                 "training_finished_at", "training_comment", "sd_model_name", "caption_dropout_rate",
                 "min_snr_gamma", "max_grad_norm", "prior_loss_weight")
_SS_NOT_TRAINING = {"network_module", "network_dim", "network_alpha", "network_args", "base_model_version", "v2",
                    "output_name", "tag_frequency", "dataset_dirs", "datasets", "bucket_info", "session_id",
                    "new_sd_model_hash", "sd_model_hash", "sd_scripts_commit_hash"}


def _json(raw: str | None, default=None):
    if raw is None:
        return default
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        return default


def _number(raw: str | None):
    if raw is None:
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return raw
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


def header_alphas(metadata: dict[str, str] | None) -> tuple[float | None, float | None]:
    """``(alpha, conv_alpha)`` a kohya-style file states in its header only: ``ss_network_alpha`` and
    ``ss_network_args``' ``conv_alpha`` (LoCon's alpha for k×k convolutions), each ``None`` when absent,
    not a number, or not > 0. A module's own ``.alpha`` tensor wins over both; some trainers write none
    and leave the alpha here (ComfyUI #15830: users made up for the lost scale with strength 3-4)."""
    def positive(raw):
        value = _number(raw if raw is None else str(raw))
        return float(value) if isinstance(value, (int, float)) and 0 < value < float("inf") else None

    metadata = metadata or {}
    args = _json(metadata.get("ss_network_args"), {})
    conv = args.get("conv_alpha") if isinstance(args, dict) else None
    return positive(metadata.get("ss_network_alpha")), positive(conv)


def tag_counts(tag_frequency: str | dict | None) -> Counter:
    """Tags and counts summed over the datasets of a kohya ``ss_tag_frequency`` value (JSON
    ``{dataset: {tag: count}}``); malformed parts are skipped."""
    data = _json(tag_frequency, {}) if isinstance(tag_frequency, str) else (tag_frequency or {})
    counts: Counter = Counter()
    if not isinstance(data, dict):
        return counts
    for tags in data.values():
        if not isinstance(tags, dict):
            continue
        for tag, count in tags.items():
            tag = str(tag).strip()
            try:
                n = int(count)
            except (TypeError, ValueError):
                continue
            if tag and n > 0:
                counts[tag] += n
    return counts


def most_frequent_tags(tag_frequency: str | dict | None, top: int = 10) -> list[str]:
    """The ``top`` most frequent tags (ties in alphabetical order)."""
    counts = tag_counts(tag_frequency)
    return [tag for tag, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]


def family_from_metadata(metadata: dict[str, str]) -> str | None:
    """``"SD 1.x"`` / ``"SD 2.x"`` / ``"SDXL"`` from ``lycoris_lite.base_model``, ``ss_base_model_version``,
    ``ss_v2`` or ``modelspec.architecture``; ``None`` when they say nothing recognisable."""
    ours = metadata.get(PREFIX + "base_model")
    if ours in BASE_MODEL_VERSIONS:
        return ours
    version = (metadata.get("ss_base_model_version") or "").lower()
    if version.startswith("sdxl"):
        return "SDXL"
    if version.startswith(("sd_v2", "sd2", "v2")):
        return "SD 2.x"
    if version.startswith(("sd_v1", "sd1", "v1")):
        return "SD 1.x"
    arch = (metadata.get("modelspec.architecture") or "").lower()
    if arch.startswith("stable-diffusion-xl"):
        return "SDXL"
    if arch.startswith("stable-diffusion-v2"):
        return "SD 2.x"
    if arch.startswith("stable-diffusion-v1"):
        return "SD 1.x"
    v2 = (metadata.get("ss_v2") or "").lower()
    if v2 == "true":
        return "SD 2.x"
    return None


@dataclass
class MetadataSummary:
    """What a file's metadata says, decoded. Fields are ``None`` / empty when the file is silent."""

    algorithms: dict[str, int] = field(default_factory=dict)
    config: dict | None = None
    rotation_sides: dict[str, str] = field(default_factory=dict)
    network_module: str | None = None
    network_args: dict[str, Any] = field(default_factory=dict)
    network_dim: Any = None
    network_alpha: Any = None
    base_model: str | None = None          # the raw version string
    family: str | None = None              # SD 1.x / SD 2.x / SDXL
    output_name: str | None = None
    trigger_words: list[str] = field(default_factory=list)
    tag_count: int = 0                     # distinct tags in ss_tag_frequency
    target_modules: Any = None
    training: dict[str, Any] = field(default_factory=dict)
    modelspec: dict[str, str] = field(default_factory=dict)
    other_keys: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def is_empty(self) -> bool:
        return not any(v for k, v in self.to_dict().items() if k != "other_keys") and not self.other_keys


def summarize_metadata(metadata: dict[str, str] | None, top_tags: int = 10) -> MetadataSummary:
    """Decode a safetensors header's metadata (see the module docstring)."""
    metadata = dict(metadata or {})
    s = MetadataSummary()
    s.algorithms = _json(metadata.get(PREFIX + "algorithms"), {}) or {}
    if not isinstance(s.algorithms, dict):
        s.algorithms = {}
    if not s.algorithms and metadata.get(PREFIX + "algorithm"):
        s.algorithms = {metadata[PREFIX + "algorithm"]: 0}
    s.config = _json(metadata.get(PREFIX + "config"), metadata.get(PREFIX + "config"))
    sides = _json(metadata.get(PREFIX + "rotation_sides"), {})
    s.rotation_sides = sides if isinstance(sides, dict) else {}
    s.target_modules = _json(metadata.get(PREFIX + "target_modules"), metadata.get(PREFIX + "target_modules"))

    s.network_module = metadata.get("ss_network_module")
    raw_args = metadata.get("ss_network_args")
    args = _json(raw_args, None)
    s.network_args = args if isinstance(args, dict) else {"raw": raw_args} if raw_args else {}
    s.network_dim = _number(metadata.get("ss_network_dim"))
    s.network_alpha = _number(metadata.get("ss_network_alpha"))
    s.base_model = metadata.get(PREFIX + "base_model") or metadata.get("ss_base_model_version") \
        or metadata.get("modelspec.architecture")
    s.family = family_from_metadata(metadata)
    s.output_name = metadata.get("ss_output_name") or metadata.get("modelspec.title")

    ours = _json(metadata.get(PREFIX + "trigger_words"), None)
    if isinstance(ours, list) and ours:
        s.trigger_words = [str(w) for w in ours]
    else:
        s.trigger_words = most_frequent_tags(metadata.get("ss_tag_frequency"), top_tags)
        phrase = (metadata.get("modelspec.trigger_phrase") or "").strip()
        if phrase and phrase not in s.trigger_words:
            s.trigger_words.insert(0, phrase)
    s.tag_count = len(tag_counts(metadata.get("ss_tag_frequency")))

    training = _json(metadata.get(PREFIX + "training"), {})
    s.training = dict(training) if isinstance(training, dict) else {}
    for key, value in metadata.items():
        if key.startswith("ss_") and key[3:] not in _SS_NOT_TRAINING:
            s.training.setdefault(key[3:], _number(value) if key[3:] in TRAINING_KEYS else value)
    s.modelspec = {k[len("modelspec."):]: v for k, v in metadata.items() if k.startswith("modelspec.")}
    known = {PREFIX + k for k in ("algorithms", "algorithm", "config", "rotation_sides", "target_modules",
                                  "base_model", "trigger_words", "training")}
    s.other_keys = sorted(k for k in metadata if k not in known and not k.startswith(("ss_", "modelspec.")))
    return s


def network_args(algorithm: str, config: dict | None = None) -> dict[str, str]:
    """LyCORIS-style ``ss_network_args`` (string values, as sd-scripts writes them) for ``algorithm`` and
    a config dict: its ``algo`` (``Algorithm.lycoris_name``), the config fields LyCORIS has an argument
    for that are set (``Algorithm.lycoris_args``) and DoRA's ``dora_wd`` / ``wd_on_output``."""
    algo = get_algorithm(algorithm)
    args = {"algo": algo.lycoris_name or algo.name}
    config = config or {}
    for key, name in algo.lycoris_args.items():
        # -1 is an automatic choice (LoKr's factor); the output side is LyCORIS's only one
        if config.get(key) not in (None, False, 0, 0.0, "", -1) and not (key == "rotation_side" and config[key] == "output"):
            args[name] = str(config[key])
    if algo.decomposable and config.get("use_dora"):
        args.update(dora_wd="True", wd_on_output=str(config.get("dora_axis", "output") != "input"))
    return args


def network_metadata(algorithm: str, config: dict | None = None, network_dim=None, network_alpha=None) -> dict[str, str]:
    """kohya's ``ss_network_*`` keys for ``algorithm`` and its config dict: module, args, and dim / alpha as
    LyCORIS records them (``Algorithm.network_dim_alpha``) unless given. The one policy of every writer
    (:func:`build_metadata`, ``files.save_adapter``)."""
    dim, alpha = get_algorithm(algorithm).network_dim_alpha(config) if config is not None else (None, None)
    network_dim = dim if network_dim is None else network_dim
    network_alpha = alpha if network_alpha is None else network_alpha
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(network_args(algorithm, config))}
    if network_dim is not None:
        meta["ss_network_dim"] = str(network_dim)
    if network_alpha is not None:
        meta["ss_network_alpha"] = str(float(network_alpha))
    return meta


def component_config(algorithm: str, config: dict | None) -> dict | None:
    """The config dict of ``algorithm`` in ``config``: a config dict itself, or the first of a
    ``{component: config dict}`` whose algorithm it is."""
    if config is not None and "algo" in config:
        return config
    return next((c for c in (config or {}).values() if isinstance(c, dict) and c.get("algo") == algorithm), None)


def _config_dict(config) -> dict | None:
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if isinstance(config, dict):
        return json.loads(json.dumps(config))
    raise TypeError(f"config must be an AdapterConfig or a dict, not {type(config).__name__}")


def build_metadata(algorithm: str, config=None, *, base_model: str | None = None, target_modules=None,
                   training: dict[str, Any] | None = None, trigger_words: list[str] | None = None,
                   output_name: str | None = None, network_dim: int | None = None,
                   network_alpha: float | None = None) -> dict[str, str]:
    """The metadata we write, as ``{key: str}`` for ``save_adapter(..., metadata=...)``.

    * ``config``: an :class:`~lycoris_lite.base.config.AdapterConfig`, its ``to_dict()``, or
      ``{component: config dict}`` (what ``save_adapter`` itself writes); stored as JSON in
      ``lycoris_lite.base.config``.
    * ``base_model``: ``"SD 1.x"`` / ``"SD 2.x"`` / ``"SDXL"`` (written as kohya's
      ``ss_base_model_version`` and ``ss_v2``) or any other string (kept as is).
    * ``training``: settings such as ``learning_rate``, ``max_train_steps``, ``resolution``; all go
      to ``lycoris_lite.integrations.training`` (JSON) and the kohya ones (:data:`TRAINING_KEYS`) to ``ss_<name>`` too.
    * ``trigger_words``: kept in order in ``lycoris_lite.trigger_words`` and written as
      ``ss_tag_frequency`` (``{"trigger_words": {word: count}}``, counts falling in the given order), so
      AUTOMATIC1111 lists them first.
    * ``network_dim`` / ``network_alpha`` default to the config's ``r`` / ``alpha`` (block size and
      constraint for OFT/BOFT, as LyCORIS records them).
    """
    algorithm = get_algorithm(algorithm).name
    cfg = _config_dict(config)
    meta = {PREFIX + "algorithm": algorithm,
            **network_metadata(algorithm, component_config(algorithm, cfg), network_dim, network_alpha)}
    if cfg is not None:
        meta[PREFIX + "config"] = json.dumps(cfg)
    if base_model:
        meta[PREFIX + "base_model"] = base_model
        if base_model in BASE_MODEL_VERSIONS:
            meta["ss_base_model_version"] = BASE_MODEL_VERSIONS[base_model]
            meta["ss_v2"] = str(base_model == "SD 2.x")
        else:
            meta["ss_base_model_version"] = base_model
    if target_modules is not None:
        meta[PREFIX + "target_modules"] = json.dumps(target_modules)
    if output_name:
        meta["ss_output_name"] = output_name
    if training:
        plain = json.loads(json.dumps(training, default=str))
        meta[PREFIX + "training"] = json.dumps(plain)
        for key in TRAINING_KEYS:
            if key in plain and plain[key] is not None:
                meta["ss_" + key] = str(plain[key])
    if trigger_words:
        words = list(dict.fromkeys(w.strip() for w in trigger_words if w and w.strip()))
        meta[PREFIX + "trigger_words"] = json.dumps(words)
        meta["ss_tag_frequency"] = json.dumps({"trigger_words": {w: len(words) - i for i, w in enumerate(words)}})
    return meta


__all__ = ["MetadataSummary", "build_metadata", "component_config", "family_from_metadata", "most_frequent_tags",
           "network_args", "network_metadata", "summarize_metadata", "tag_counts"]
