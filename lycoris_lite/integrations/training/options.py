"""The trainer's options: diffusers' DreamBooth names, each algorithm's own options from the registry,
and ``--config file.toml`` with the same names (options given on the command line win).

Everything here is checked before a model is loaded: an unknown algorithm, preset or TOML key, an
algorithm option given to an algorithm that does not have it, a config the algorithm rejects, a missing
required option, a number out of its range (:data:`RANGES`, NaN and infinity included), an output name
that is a path, ``--use_8bit_adam`` without bitsandbytes. Errors go through ``argparse`` (exit status 2,
message on stderr); nothing is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import math
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from ...base.config import AdapterConfig
from ...base.presets import PRESETS
from ...base.registry import ALGORITHMS, Algorithm, get_algorithm
from ...base.presets import resolve_targets
from ...tools import quantize

SAVE_FORMATS = ("kohya", "diffusers", "peft")
SAVE_PRECISIONS = {"fp32": "float32", "float32": "float32", "float": "float32", "fp16": "float16",
                   "float16": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16"}
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
#: options without which nothing can be trained (checked once the TOML file's values are in)
REQUIRED = ("pretrained_model_name_or_path", "instance_data_dir", "instance_prompt")
#: folders that a TOML file gives relative to itself
PATH_OPTIONS = ("instance_data_dir", "class_data_dir", "output_dir")
#: fields every config has; the trainer sets them from --rank/--alpha/--*_targets
_COMMON_FIELDS = {f.name for f in dataclasses.fields(AdapterConfig)}
#: (test, what the value must be) of the ranges below; a float must also be finite
_POSITIVE = (lambda x: x > 0, "> 0")
_NON_NEGATIVE = (lambda x: x >= 0, ">= 0")
_FRACTION = (lambda x: 0 <= x < 1, "in [0, 1)")
#: the number options' valid values, checked after parsing (so values from --config too); an option
#: left unset (None) is not checked. --max_grad_norm 0 disables clipping; --alpha 0 would train nothing
#: (scale 0) and reads back from a file as alpha = rank; the seed is one numpy and torch both take.
RANGES = [
    (("learning_rate", "text_encoder_lr", "alpha", "num_train_epochs", "snr_gamma", "adam_epsilon"), _POSITIVE),
    (("prior_loss_weight", "noise_offset", "max_grad_norm", "adam_weight_decay", "regularization_weight", "lr_power",
      "lr_warmup_steps", "dataloader_num_workers"), _NON_NEGATIVE),
    (("adam_beta1", "adam_beta2"), _FRACTION),
    (("train_batch_size", "gradient_accumulation_steps", "resolution", "num_class_images", "sample_batch_size",
      "num_inference_steps", "checkpointing_steps", "validation_steps", "num_validation_images", "max_train_steps",
      "checkpoints_total_limit", "lr_num_cycles"), (lambda n: n >= 1, ">= 1")),
    (("seed",), (lambda n: 0 <= n <= 2**32 - 1, f"in [0, {2**32 - 1}]")),
]


def algorithm_options() -> dict[str, dict]:
    """``{field: {"default": example default, "algos": [...], "aliases": [...]}}`` for the fields that
    only some algorithms' configs have (LoKr ``factor``, OFT/BOFT ``block_size``, HRA ``apply_GS`` …)."""
    options: dict[str, dict] = {}
    for name, algo in ALGORITHMS.items():
        cls = algo.config_class
        for f in dataclasses.fields(cls):
            if f.name in _COMMON_FIELDS:
                continue
            entry = options.setdefault(f.name, {"default": f.default, "algos": [], "aliases": []})
            entry["algos"].append(name)
        for alias, target in cls.aliases.items():
            if target in options and target not in _COMMON_FIELDS and alias not in options[target]["aliases"]:
                options[target]["aliases"].append(alias)
    return options


def has_penalty(algo: str) -> bool:
    """Whether the algorithm defines a training penalty (HRA's orthogonality term)."""
    return get_algorithm(algo).regularization.__func__ is not Algorithm.regularization.__func__


def _block_lr(text) -> dict[str, float]:
    """``group=factor,…`` (or a TOML table): learning-rate factors by block group or block path."""
    if isinstance(text, dict):
        items = list(text.items())
    else:
        items = []
        for part in str(text).split(","):
            name, sep, value = part.strip().partition("=")
            if not sep or not name.strip():
                raise argparse.ArgumentTypeError(f"expected group=factor, got {part.strip()!r}")
            items.append((name.strip(), value))
    out = {}
    for name, value in items:
        try:
            factor = float(value)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{name}: the factor must be a number, got {value!r}") from None
        if not factor >= 0 or factor == float("inf"):
            raise argparse.ArgumentTypeError(f"{name}: the factor must be a finite number >= 0, got {value!r}")
        out[str(name)] = factor
    return out


def _targets(text):
    """A preset name, or a comma-separated list of module names; TOML may give a list."""
    if isinstance(text, list):
        return [str(t).strip() for t in text if str(t).strip()]
    parts = [t.strip() for t in str(text).split(",") if t.strip()]
    return parts[0] if len(parts) == 1 and parts[0] in PRESETS else parts


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_dreambooth.py",
        description="DreamBooth fine-tuning of a Stable Diffusion model with a LyCORIS-style adapter "
                    f"({', '.join(ALGORITHMS)}), on one device or many through accelerate.",
        formatter_class=_Help,
    )
    p.add_argument("--config", help="TOML file with any of these options (same names); the command line wins")

    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", help="diffusers folder, hub id, or 'tiny-sd' (offline tiny model)")
    g.add_argument("--revision", help="hub revision")
    g.add_argument("--variant", help="weights variant, e.g. fp16")

    g = p.add_argument_group("data")
    g.add_argument("--instance_data_dir", help="folder of images of the subject")
    g.add_argument("--instance_prompt", help="prompt with the identifier, e.g. 'a photo of sks dog'; also the "
                                            "adapter's trigger words")
    g.add_argument("--caption_extension", default=".txt",
                   help="an image's caption file (same stem) replaces the instance prompt for that image")
    g.add_argument("--with_prior_preservation", action="store_true", help="add a class-image loss")
    g.add_argument("--class_data_dir", help="folder of class images (missing ones are generated)")
    g.add_argument("--class_prompt", help="prompt of the class, e.g. 'a photo of a dog'")
    g.add_argument("--num_class_images", type=int, default=100, help="class images wanted in --class_data_dir")
    g.add_argument("--prior_loss_weight", type=float, default=1.0)
    g.add_argument("--sample_batch_size", type=int, default=4, help="batch size when generating class images")
    g.add_argument("--num_inference_steps", type=int, default=25,
                   help="denoising steps for generated class images and validation images")
    g.add_argument("--resolution", type=int, default=512, help="training images are resized and cropped to this")
    g.add_argument("--center_crop", action="store_true", help="center crop (default: random crop)")
    g.add_argument("--random_flip", action="store_true", help="flip images horizontally at random")
    g.add_argument("--dataloader_num_workers", type=int, default=0)

    g = p.add_argument_group("adapter")
    g.add_argument("--algo", default="lora", choices=list(ALGORITHMS), help="adapter algorithm")
    g.add_argument("--rank", type=int, help="r: rank (LoRA/LoHa/LoKr), reflections (HRA), number of blocks "
                                            "(OFT/BOFT, else derived from --block_size); default: the algorithm's")
    g.add_argument("--alpha", type=float, help="scale numerator (scale = alpha / rank); default: alpha = rank")
    for name, entry in algorithm_options().items():
        flags = [f"--{name}"] + [f"--{a}" for a in entry["aliases"]]
        default = entry["default"]
        help_text = f"{', '.join(entry['algos'])} only"
        if isinstance(default, bool):
            g.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = type(default) if isinstance(default, (int, float, str)) else str
            g.add_argument(*flags, dest=name, type=kind, default=None, help=help_text)
    g.add_argument("--unet_targets", type=_targets, default="unet-attn",
                   help=f"UNet modules: a preset ({', '.join(PRESETS)}) or comma-separated module names")
    g.add_argument("--train_text_encoder", action="store_true", help="also adapt the text encoder (UNet pipelines; Flux.1: CLIP-L; SD3: CLIP-L and "
                        "CLIP-G, as diffusers' scripts)")
    g.add_argument("--transformer_targets", type=_targets, default=None,
                   help="transformer modules (flow-matching families): a preset or comma-separated module names "
                        "(default: the family's <family>-attn-mlp preset)")
    g.add_argument("--text_encoder_targets", type=_targets, default="text-encoder",
                   help="text encoder modules: a preset or comma-separated module names")
    g.add_argument("--text_encoder_lr", type=float, help="learning rate of the text encoder's adapter "
                                                        "(default: --learning_rate)")
    g.add_argument("--regularization_weight", type=float, default=0.0,
                   help="weight of the algorithm's training penalty (HRA: ‖I − ÛᵀÛ‖ of the reflection vectors)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=4, help="per device")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, help="optimizer steps (overrides --num_train_epochs)")
    g.add_argument("--num_train_epochs", type=float, default=1,
                   help="passes over the instance images (used when --max_train_steps is not given)")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--scale_lr", action="store_true",
                   help="multiply the learning rates by batch size × accumulation × processes")
    g.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS)
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--lr_num_cycles", type=int, default=1, help="cosine_with_restarts only")
    g.add_argument("--lr_power", type=float, default=1.0, help="polynomial only")
    g.add_argument("--snr_gamma", type=float, help="Min-SNR loss weighting (5.0 is the paper's value)")
    g.add_argument("--noise_offset", type=float, default=0.0)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' AdamW8bit")
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"),
                   help="default: accelerate's configuration (usually no)")
    g.add_argument("--weighting_scheme", choices=("sigma_sqrt", "logit_normal", "mode", "cosmap", "none"),
                   help="flow matching: how noise levels are drawn and weighted (default: logit_normal for SD3, "
                        "none for the others)")
    g.add_argument("--logit_mean", type=float, default=0.0, help="logit_normal's mean")
    g.add_argument("--logit_std", type=float, default=1.0, help="logit_normal's standard deviation")
    g.add_argument("--mode_scale", type=float, default=1.29, help="the mode scheme's scale")
    g.add_argument("--precondition_outputs", type=int, choices=(0, 1),
                   help="flow matching: compare the x0 estimate with x0 (default: 1 for SD3, 0 for the others)")
    g.add_argument("--guidance_scale", type=float, default=3.5,
                   help="the guidance input of a guidance-distilled transformer (Flux dev) while training")
    g.add_argument("--max_sequence_length", type=int,
                   help="text encoder prompt length in tokens (default: the family's: 77 for SD3, 512 for the others)")
    g.add_argument("--cache_latents", action="store_true",
                   help="encode each image once, as first seen (its crop and flip then stay); text embeddings are "
                        "computed once (with --train_text_encoder, the trained CLIP parts each step)")
    g.add_argument("--loraplus_lr_ratio", type=float,
                   help="LoRA+: lora_up's learning rate is this many times the rest (LoRA only: the paper's "
                        "up/B factor; the other algorithms have no such factor)")
    g.add_argument("--block_lr", type=_block_lr,
                   help="block-wise learning rates as data: group=factor pairs, e.g. "
                        "transformer_blocks=1,single_transformer_blocks=0.5 (a block: transformer_blocks.3=0)")
    g.add_argument("--base_quantization", choices=tuple(quantize.KINDS),
                   help="hold the base model quantized while the adapter trains (QLoRA): nf4 (bitsandbytes), "
                        "int8 or fp8 weight-only (torchao); the adapter runs unfused on the quantized layers")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="xformers attention (PyTorch's scaled_dot_product_attention, with a warning, when absent)")
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere and newer GPUs")
    g.add_argument("--seed", type=int, help="default: a random seed, recorded in checkpoints and the adapter file")

    g = p.add_argument_group("checkpoints and output")
    g.add_argument("--output_dir", default="dreambooth-output")
    g.add_argument("--output_name", help="adapter file name without extension (default: dreambooth_<algo>)")
    g.add_argument("--save_format", default="kohya", choices=SAVE_FORMATS,
                   help="kohya: <output_name>.safetensors (AUTOMATIC1111, ComfyUI, lycoris); diffusers: "
                        "pytorch_lora_weights.safetensors (LoRA only); peft: <output_name>/unet, /text_encoder")
    g.add_argument("--save_precision", default="fp32", choices=sorted(SAVE_PRECISIONS))
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, help="keep at most this many checkpoints")
    g.add_argument("--resume_from_checkpoint", help="a checkpoint folder, or 'latest' in --output_dir")
    g.add_argument("--validation_prompt", help="render this prompt every --validation_steps and at the end")
    g.add_argument("--num_validation_images", type=int, default=4)
    g.add_argument("--validation_steps", type=int, default=100)
    g.add_argument("--report_to", default="none", choices=("none", "tensorboard"))
    g.add_argument("--logging_dir", default="logs", help="tracker folder, under --output_dir")
    return p


def _load_toml(parser: argparse.ArgumentParser, path: str) -> dict:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        parser.error(f"--config {path}: no such file")
    except (OSError, tomllib.TOMLDecodeError) as exc:
        parser.error(f"--config {path}: {exc}")
    dests = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    aliases = {s.lstrip("-"): a.dest for a in parser._actions for s in a.option_strings}
    values = {}
    for key, value in data.items():
        dest = key if key in dests else aliases.get(key)
        if dest is None or dest == "config":
            hint = difflib.get_close_matches(key, list(dests), n=3)
            parser.error(f"--config {path}: unknown option {key!r}" + (f"; did you mean {', '.join(hint)}?" if hint else ""))
        action = dests[dest]
        if action.type is not None and not isinstance(value, (list, dict)):
            try:
                value = action.type(value)
            except (TypeError, ValueError) as exc:
                parser.error(f"--config {path}: {key} = {value!r}: {exc}")
        if action.choices is not None and value not in action.choices:
            parser.error(f"--config {path}: {key} = {value!r} is not one of {', '.join(map(str, action.choices))}")
        values[dest] = value
    base = Path(path).resolve().parent
    for key in PATH_OPTIONS:  # folders in a TOML file are relative to the file
        if key in values and not Path(values[key]).is_absolute():
            values[key] = str(base / values[key])
    return values


def check_ranges(parser, args) -> None:
    """Each option of :data:`RANGES` that is set is in its range (a float is finite, too)."""
    for names, (test, what) in RANGES:
        for name in names:
            value = getattr(args, name)
            if value is None:
                continue
            if isinstance(value, float):
                if not (math.isfinite(value) and test(value)):
                    parser.error(f"--{name} must be a finite number {what}, got {value!r}")
            elif not test(value):
                parser.error(f"--{name} must be {what}, got {value!r}")


def check_targets(parser, option: str, targets) -> None:
    """A name with a dash is no module name: it must be a preset."""
    entries = [targets] if isinstance(targets, str) else targets
    if not entries:
        parser.error(f"--{option} is empty")
    for entry in entries:
        if "-" in entry and entry not in PRESETS:
            hint = difflib.get_close_matches(entry, list(PRESETS), n=1)
            parser.error(f"--{option}: unknown preset {entry!r}; presets: {', '.join(PRESETS)}"
                         + (f" (did you mean {hint[0]!r}?)" if hint else ""))


def adapter_config(args, component: str) -> AdapterConfig:
    """The adapter config of ``component`` ("unet", "transformer" or "text_encoder") from the parsed options
    (``--transformer_targets`` set to the family's preset when not given: :func:`transformer_defaults`).

    Adapters start at the identity (``init_weights=True``): step 0 is the base model."""
    fields = {name: getattr(args, name) for name in algorithm_options() if getattr(args, name) is not None}
    if args.rank is not None:
        fields["r"] = args.rank
    if args.alpha is not None:
        fields["alpha"] = args.alpha
    targets = {"unet": args.unet_targets, "transformer": args.transformer_targets}.get(component,
                                                                                       args.text_encoder_targets)
    fields["target_modules"] = resolve_targets(targets)
    return get_algorithm(args.algo).config_class(**fields)


def transformer_defaults(args, family) -> None:
    """The flow-matching options' family defaults (a :class:`~.flow.Family`), where not given (those of
    diffusers' script for the family)."""
    if args.transformer_targets is None:
        args.transformer_targets = family.preset
    if args.weighting_scheme is None:
        args.weighting_scheme = family.weighting_scheme
    if args.precondition_outputs is None:
        args.precondition_outputs = int(family.precondition_outputs)
    if args.max_sequence_length is None:
        args.max_sequence_length = family.max_sequence_length


def to_argv(settings: dict) -> list[str]:
    """The command line that sets ``settings`` (``{option: value}``): ``True`` is the flag alone,
    ``None`` and ``False`` are left out, anything else is ``--option str(value)``."""
    argv = []
    for key, value in settings.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not None and value is not False:
            argv += [f"--{key}", str(value)]
    return argv


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (and ``--config``), and check everything that needs no model."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**_load_toml(parser, first.config))
    args = parser.parse_args(argv)

    missing = [f"--{k}" for k in REQUIRED if not getattr(args, k)]
    if missing:
        parser.error(f"the following options are required (on the command line or in --config): {', '.join(missing)}")
    if args.with_prior_preservation and not (args.class_data_dir and args.class_prompt):
        parser.error("--with_prior_preservation needs --class_data_dir and --class_prompt")
    check_ranges(parser, args)
    if args.resolution % 8:
        parser.error(f"--resolution must be a multiple of 8 (the VAE's factor), got {args.resolution}")
    if args.output_name and (args.output_name in (".", "..") or any(c in args.output_name for c in "/\\\0")):
        parser.error(f"--output_name must be a plain file name (no folders; it is written in --output_dir), "
                     f"got {args.output_name!r}")

    given = [name for name in algorithm_options() if getattr(args, name) is not None]
    for name in given:
        owners = algorithm_options()[name]["algos"]
        if args.algo not in owners:
            parser.error(f"--{name} is not an option of --algo {args.algo} (it belongs to {', '.join(owners)})")
    if args.regularization_weight and not has_penalty(args.algo):
        parser.error(f"--regularization_weight: --algo {args.algo} has no training penalty "
                     f"(algorithms with one: {', '.join(a for a in ALGORITHMS if has_penalty(a))})")
    check_targets(parser, "unet_targets", args.unet_targets)
    if args.train_text_encoder:
        check_targets(parser, "text_encoder_targets", args.text_encoder_targets)
    try:
        adapter_config(args, "unet")
    except ValueError as exc:
        parser.error(f"--algo {args.algo}: {exc}")
    if args.save_format == "diffusers" and args.algo != "lora":
        parser.error(f"--save_format diffusers holds LoRA only; use kohya or peft for --algo {args.algo}")
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        parser.error("--use_8bit_adam needs bitsandbytes, which is not installed (pip install bitsandbytes)")
    if args.loraplus_lr_ratio is not None and (args.algo != "lora" or args.loraplus_lr_ratio <= 0):
        parser.error("--loraplus_lr_ratio: LoRA+ scales the learning rate of LoRA's up factor; it takes a positive "
                     f"ratio and --algo lora (not {args.algo})")
    if args.base_quantization:
        try:
            quantize.require_backend(args.base_quantization)
        except ImportError as exc:
            parser.error(f"--base_quantization: {exc}")
    if args.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        parser.error("--report_to tensorboard needs tensorboard (pip install tensorboard)")
    args.output_name = args.output_name or f"dreambooth_{args.algo}"
    return args
