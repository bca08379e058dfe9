"""The trained adapter: attach it, read and restore its tensors, save it with its training metadata."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ...io import files
from ...base.config import AdapterConfig
from ...base.dtypes import DTYPES
from ...io.formats import diffusers_format, peft_format
from ...io.formats.kohya import model_family
from ...io.metadata import build_metadata
from ...core.controller import AdapterController, controller_for
from . import sharding

ADAPTER_NAME = "dreambooth"


def attach(models: dict[str, nn.Module], configs: dict[str, AdapterConfig], seed: int) -> dict[str, AdapterController]:
    """Add the adapter ``configs[c]`` to ``models[c]`` for each component, active and trainable.

    ``ValueError`` (naming the component; nothing left attached) when a target does not fit."""
    controllers: dict[str, AdapterController] = {}
    for component, config in configs.items():
        generator = torch.Generator().manual_seed(seed + len(controllers))
        controller = controller_for(models[component])
        try:
            controller.add_adapter(ADAPTER_NAME, config, generator=generator)
        except (ValueError, TypeError) as exc:
            for attached in controllers.values():
                attached.delete_adapter(ADAPTER_NAME)
            raise ValueError(f"{component}: {exc}") from None
        controller.set_adapter(ADAPTER_NAME)
        controllers[component] = controller
    return controllers


def trainable_parameters(controllers: dict[str, AdapterController]) -> dict[str, list[nn.Parameter]]:
    return {c: ctrl.trainable_parameters([ADAPTER_NAME]) for c, ctrl in controllers.items()}


def parameter_groups(controllers: dict[str, AdapterController], denoiser: str, lr: float,
                     loraplus_lr_ratio: float | None = None, block_lr: dict[str, float] | None = None) -> list[dict]:
    """The denoiser's optimizer groups, one per learning rate.

    * LoRA+ (``loraplus_lr_ratio``, Hayou et al. 2024): ``lora_up`` learns at ``lr · ratio``. LoRA's alone:
      its up factor is the paper's B; the other algorithms have no such factor (the options refuse the
      ratio for them).
    * Block-wise rates (``block_lr``, data: ``{prefix: factor}``): a layer whose path starts with
      ``prefix`` (a block group such as ``single_transformer_blocks`` or ``up_blocks``, or one block,
      ``transformer_blocks.3``) learns at ``lr · factor``; the longest prefix wins, other layers keep
      ``lr``. ``ValueError`` for a prefix that names no trained layer.
    """
    block_lr = dict(block_lr or {})
    rates: dict[float, list] = {}
    used = set()
    for path, layer in controllers[denoiser].layers():
        if ADAPTER_NAME not in layer.adapters:
            continue
        matches = [prefix for prefix in block_lr if path == prefix or path.startswith(prefix + ".")]
        prefix = max(matches, key=len, default=None)
        used.update(matches)
        factor = block_lr[prefix] if prefix is not None else 1.0
        for key, p in layer.adapters[ADAPTER_NAME].named_parameters():
            if p.requires_grad:
                rate = lr * factor * (loraplus_lr_ratio if loraplus_lr_ratio and key == "lora_up" else 1.0)
                rates.setdefault(rate, []).append(p)
    unused = sorted(set(block_lr) - used)
    if unused:
        raise ValueError(f"--block_lr: {unused} name no trained layer of the {denoiser} (block groups are module "
                         "paths such as transformer_blocks, single_transformer_blocks.3, down_blocks.1)")
    return [{"params": params, "lr": rate} for rate, params in sorted(rates.items())]


def regularization(controllers: dict[str, AdapterController]) -> torch.Tensor:
    """Sum of the algorithm's training penalties over the components (zero when it has none)."""
    return sum(ctrl.regularization_loss([ADAPTER_NAME]) for ctrl in controllers.values())


def adapter_state(controllers: dict[str, AdapterController]) -> dict[str, torch.Tensor]:
    """Every trainable tensor as ``{"<component>.<layer>.<key>": tensor}`` (detached: the parameters'
    own storage)."""
    return {f"{component}.{layer_name}.{key}": value for component, ctrl in controllers.items()
            for layer_name, tensors in ctrl.adapter_tensors(ADAPTER_NAME).items() for key, value in tensors.items()}


@torch.no_grad()
def load_adapter_state(controllers: dict[str, AdapterController], tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` (from :func:`adapter_state`, whole) into the live adapter, a sharded parameter taking
    its shard; ``ValueError`` unless the names and shapes are exactly the live adapter's."""
    params = adapter_state(controllers)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"the checkpoint's adapter does not match this run's adapter settings: missing "
                         f"{missing[:3]}{' …' if len(missing) > 3 else ''}, unexpected "
                         f"{unexpected[:3]}{' …' if len(unexpected) > 3 else ''}")
    for name, param in params.items():
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise ValueError(f"the checkpoint's {name} has shape {tuple(tensors[name].shape)}, this run's "
                             f"{tuple(param.shape)}: the adapter settings differ")
    for name, param in params.items():
        param.copy_(sharding.like(param, tensors[name]))


def check_savable(models: dict[str, nn.Module], save_format: str) -> None:
    """Convert the (freshly attached) adapter to ``save_format`` without writing: a format that cannot
    hold it (an output-side rotation as PEFT, a Tucker LoRA as diffusers) fails before training."""
    entries = files.adapter_entries(models, ADAPTER_NAME)
    if save_format == "diffusers":
        diffusers_format.write(entries, models)
    elif save_format == "peft":
        for component, layers in entries.items():
            peft_format.write(layers, models[component], component)


def adapter_path(output_dir: str | Path, output_name: str, save_format: str) -> Path:
    """Where :func:`save` puts the adapter: a kohya file, diffusers' file, or a folder of PEFT folders."""
    output_dir = Path(output_dir)
    if save_format == "diffusers":
        return output_dir / diffusers_format.WEIGHT_NAME
    if save_format == "peft":
        return output_dir / output_name
    return output_dir / f"{output_name}.safetensors"


def training_record(args, *, max_steps: int, seed: int, samples_per_step: int, mixed_precision: str,
                    num_instance: int, num_class: int, started: float) -> dict:
    """The training settings an adapter file records (kohya's names where kohya has one)."""
    return {
        "algorithm": args.algo, "learning_rate": args.learning_rate, "text_encoder_lr": args.text_encoder_lr,
        "max_train_steps": max_steps, "resolution": args.resolution, "seed": seed,
        "batch_size_per_device": args.train_batch_size, "total_batch_size": samples_per_step,
        "gradient_accumulation_steps": args.gradient_accumulation_steps, "lr_scheduler": args.lr_scheduler,
        "lr_warmup_steps": args.lr_warmup_steps, "mixed_precision": mixed_precision,
        "base_quantization": getattr(args, "base_quantization", None),
        "optimizer": "AdamW8bit" if args.use_8bit_adam else "AdamW", "noise_offset": args.noise_offset,
        "min_snr_gamma": args.snr_gamma, "max_grad_norm": args.max_grad_norm,
        "prior_loss_weight": args.prior_loss_weight if args.with_prior_preservation else None,
        "num_train_images": num_instance, "num_reg_images": num_class, "instance_prompt": args.instance_prompt,
        "class_prompt": args.class_prompt if args.with_prior_preservation else None,
        "train_text_encoder": args.train_text_encoder, "training_started_at": round(started),
    }


def metadata(models: dict[str, nn.Module], configs: dict[str, AdapterConfig], *, algo: str, base_model: str,
             instance_prompt: str, training: dict, output_name: str) -> dict[str, str]:
    """The adapter file's metadata: algorithm and configs, base model, the instance prompt as trigger
    words, and the training settings (kohya's ``ss_*`` keys included)."""
    family = model_family(models)[0]
    return build_metadata(
        algo, {c: cfg.to_dict() for c, cfg in configs.items()}, base_model=family or base_model,
        target_modules={c: cfg.target_modules for c, cfg in configs.items()},
        training={"sd_model_name": base_model, **training}, trigger_words=[instance_prompt], output_name=output_name,
    )


def save(models: dict[str, nn.Module], path: Path, save_format: str, precision: str, meta: dict[str, str]) -> Path:
    """Write the adapter atomically (see :func:`adapter_path`)."""
    return files.save_adapter(models, ADAPTER_NAME, path, format=save_format, dtype=DTYPES[precision], metadata=meta)


def describe(controllers: dict[str, AdapterController]) -> str:
    parts = []
    for component, params in trainable_parameters(controllers).items():
        layers = sum(1 for _, layer in controllers[component].layers() if ADAPTER_NAME in layer.adapters)
        parts.append(f"{component}: {sum(p.numel() for p in params):,} parameters in {layers} layers")
    return "; ".join(parts)


def configs_json(configs: dict[str, AdapterConfig]) -> str:
    return json.dumps({c: cfg.to_dict() for c, cfg in configs.items()}, sort_keys=True)
