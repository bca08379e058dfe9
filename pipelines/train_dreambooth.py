#!/usr/bin/env python
"""DreamBooth fine-tuning of Stable Diffusion (UNet, ε/v objective) and of Flux.1, Flux.2, SD3/3.5, Qwen-Image,
Z-Image and Wan 2.1 transformers (flow matching, :mod:`lycoris_lite.integrations.training.flow`) with a
LyCORIS-style adapter (LoRA, LoHa, LoKr, OFT, BOFT, HRA), on one device or many through accelerate. The
objective comes from the pipeline.

    accelerate launch pipelines/train_dreambooth.py --pretrained_model_name_or_path PATH_OR_ID \\
        --instance_data_dir DIR --instance_prompt "a photo of sks dog" --algo lokr --output_dir out
    python pipelines/train_dreambooth.py --config samples/dreambooth_lora.toml   # same options from TOML

Options keep the names of diffusers' ``train_dreambooth_lora.py``; ``--help`` lists them. The adapter
lands in ``--output_dir`` (kohya/LyCORIS file by default) with its training metadata, loadable with
``pipe.load_adapter``. Bad input (folders, images, algorithm, preset, model path) stops with exit
status 2 before anything is written.
"""

from __future__ import annotations

import importlib.util
import math
import secrets
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from lycoris_lite.integrations.training import (adapters, checkpoint, data, flow, images, loss,  # noqa: E402
                                               options, sharding)
from lycoris_lite.integrations.training.data import TrainingInputError  # noqa: E402

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def has_accelerator() -> bool:
    if hasattr(torch, "accelerator"):  # torch >= 2.6
        return torch.accelerator.is_available()
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def load_model(args):
    """The base pipeline: ``tiny-sd`` (offline), a diffusers folder, or a hub id."""
    from lycoris_lite.models import TINY_SD_NAME, load_pipeline

    name = args.pretrained_model_name_or_path
    kwargs = {} if name == TINY_SD_NAME else {k: v for k in ("revision", "variant") if (v := getattr(args, k))}
    try:
        pipe = load_pipeline(name, **kwargs)
    except FileNotFoundError as exc:
        raise TrainingInputError(f"--pretrained_model_name_or_path: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - hub and loading errors come in many types
        raise TrainingInputError(f"--pretrained_model_name_or_path {name!r} cannot be loaded: {exc}") from None
    try:
        family = flow.family_of(pipe)
    except ValueError as exc:
        raise TrainingInputError(f"{name!r}: {exc}") from None
    denoiser = "transformer" if family else "unet"
    missing = [c for c in (denoiser, "vae", "text_encoder", "tokenizer") if getattr(pipe, c, None) is None]
    if missing or (family is None and getattr(pipe, "text_encoder_2", None) is not None):
        raise TrainingInputError(f"{name!r} is a {type(pipe).__name__}; this trainer takes Stable Diffusion 1.x/2.x "
                                 f"pipelines (one UNet, one text encoder) and those of {', '.join(flow.FAMILIES)}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def set_attention(pipe, use_xformers: bool) -> None:
    if not use_xformers:
        return
    if importlib.util.find_spec("xformers") is None:
        warnings.warn("xformers is not installed: using PyTorch's scaled_dot_product_attention", stacklevel=2)
        return
    (getattr(pipe, "unet", None) or pipe.transformer).enable_xformers_memory_efficient_attention()


def make_optimizer(args, groups):
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(groups, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                           eps=args.adam_epsilon)


def main(argv: list[str] | None = None) -> int:
    args = options.parse_args(argv)
    try:
        return train(args)
    except TrainingInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def train(args) -> int:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, broadcast_object_list
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    started = time.time()
    output_dir = Path(args.output_dir)

    # 1. Everything that can be wrong with the input is found before anything is written.
    instance = data.load_examples(args.instance_data_dir, args.instance_prompt, args.caption_extension)
    accelerator = Accelerator(
        cpu=not has_accelerator(),  # on a CPU machine, `accelerate launch --multi_gpu` processes then use gloo
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
    )
    main_process = accelerator.is_main_process
    saved = None
    if args.resume_from_checkpoint:
        try:
            saved = checkpoint.find(args.resume_from_checkpoint, output_dir)
        except FileNotFoundError as exc:
            raise TrainingInputError(f"--resume_from_checkpoint: {exc}") from None
        if saved is None:
            accelerator.print(f"no checkpoint in {output_dir}: starting a new run")
    sharded = sharding.check(accelerator, args, saved)  # FSDP2: every process joins the gathers below
    pipe = load_model(args)
    family = flow.family_of(pipe)  # None: a UNet (ε/v objective); else the transformer's flow-matching family
    denoiser = "transformer" if family else "unet"
    text_components = ["text_encoder"] if args.train_text_encoder else []
    if family:
        if args.train_text_encoder:
            if not family.trainable_text_encoders:
                able = [f.name for f in flow.FAMILIES.values() if f.trainable_text_encoders]
                raise TrainingInputError(f"--train_text_encoder: {family.name}'s text encoder is not trained (its "
                                         f"prompts' embeddings are computed once); families whose CLIP encoders "
                                         f"train: {', '.join(able)}")
            text_components = list(family.trainable_text_encoders)
        if args.resolution % 16:
            raise TrainingInputError(f"--resolution must be a multiple of 16 for {family.name} (the VAE's factor 8 "
                                     f"times the transformer's 2×2 patches), got {args.resolution}")
        if args.snr_gamma or args.noise_offset:
            raise TrainingInputError("--snr_gamma and --noise_offset belong to the UNet's objective; flow matching "
                                     "weighs noise levels with --weighting_scheme")
        options.transformer_defaults(args, family)
    try:
        configs = {denoiser: options.adapter_config(args, denoiser)}
    except ValueError as exc:
        raise TrainingInputError(f"--transformer_targets: {exc}") from None
    for component in text_components:
        configs[component] = options.adapter_config(args, "text_encoder")
    if saved and saved.state.get("configs") != adapters.configs_json(configs):
        raise TrainingInputError(f"{saved.path} was trained with other adapter settings: {saved.state.get('configs')}")
    seed = args.seed if args.seed is not None else saved.state["seed"] if saved else secrets.randbits(31)
    seed = broadcast_object_list([seed])[0]  # one seed for every process
    if saved and saved.state["seed"] != seed:
        warnings.warn(f"resuming a run trained with seed {saved.state['seed']} with seed {seed}: not the same run",
                      stacklevel=1)

    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = WEIGHT_DTYPES.get(accelerator.mixed_precision, torch.float32)
    unet, vae, text_encoder, tokenizer = getattr(pipe, denoiser), pipe.vae, pipe.text_encoder, pipe.tokenizer
    text_encoders = {c: getattr(pipe, c) for c in text_components}
    for component in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, component, None) is not None:
            getattr(pipe, component).requires_grad_(False)
    sharding.place(pipe, denoiser, accelerator.device, weight_dtype, sharded)
    # (adapters attached to a half-precision model keep float32 parameters)
    if args.base_quantization:  # QLoRA: the frozen base held quantized, the adapter trained unfused on it
        from lycoris_lite.tools.quantize import quantize_base

        for model in (unet, *text_encoders.values()):
            quantize_base(model, args.base_quantization, compute_dtype=weight_dtype)
    set_attention(pipe, args.enable_xformers_memory_efficient_attention)
    if family:  # a copy the validation renders never touch (they set its timesteps)
        noise_scheduler = family.training_scheduler(pipe)
    else:
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    models = {denoiser: unet, **text_encoders}
    try:
        controllers = adapters.attach(models, configs, seed)
        adapters.check_savable(models, args.save_format)
        adapters.parameter_groups(controllers, denoiser, 1.0, args.loraplus_lr_ratio, args.block_lr)  # names
    except ValueError as exc:
        raise TrainingInputError(str(exc)) from None

    # 2. Class images for prior preservation: the missing ones come from the base model.
    class_examples = None
    if args.with_prior_preservation:
        if main_process:
            made = images.generate_class_images(
                pipe, args.class_data_dir, args.class_prompt, args.num_class_images, seed=seed,
                steps=args.num_inference_steps, resolution=args.resolution, batch_size=args.sample_batch_size,
                disabled=list(controllers.values()), autocast=accelerator.autocast())
            if made:
                accelerator.print(f"generated {made} class images in {args.class_data_dir}")
        accelerator.wait_for_everyone()
        class_examples = data.load_examples(args.class_data_dir, args.class_prompt, args.caption_extension,
                                            what="class")[: args.num_class_images]

    if main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_temporaries(output_dir)
    accelerator.wait_for_everyone()

    # 3. Optimisation: AdamW over the adapter's tensors; the scheduler steps once per optimizer step.
    samples_per_step = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    max_steps = args.max_train_steps or math.ceil(args.num_train_epochs * len(instance) / samples_per_step)
    lr_scale = samples_per_step if args.scale_lr else 1
    params = adapters.trainable_parameters(controllers)
    try:
        groups = adapters.parameter_groups(controllers, denoiser, args.learning_rate * lr_scale, args.loraplus_lr_ratio,
                                           args.block_lr)
    except ValueError as exc:
        raise TrainingInputError(str(exc)) from None
    for component in text_components:
        groups.append({"params": params[component], "lr": (args.text_encoder_lr or args.learning_rate) * lr_scale})
    optimizer = make_optimizer(args, groups)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=max_steps, num_cycles=args.lr_num_cycles, power=args.lr_power)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for model in text_encoders.values():
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trained = [unet, *text_encoders.values()]
    prepared = sharding.prepare(accelerator, *trained, optimizer)
    unet_model, optimizer = prepared[0], prepared[-1]
    text_models = dict(zip(text_components, prepared[1:-1]))  # as accelerate wrapped them
    text_model = text_models.get("text_encoder", text_encoder)

    start_step = 0
    if saved:
        adapters.load_adapter_state(controllers, saved.adapter_state)
        sharding.load_optimizer_state(unet_model, optimizer, saved.optimizer, sharded)
        lr_scheduler.load_state_dict(saved.scheduler)
        if accelerator.scaler is not None and saved.scaler is not None:
            accelerator.scaler.load_state_dict(saved.scaler)
        start_step = saved.step
        accelerator.print(f"resumed from {saved.path} at step {start_step}")

    dataset = data.DreamBoothDataset(instance, None if family else tokenizer, args.resolution, seed=seed,
                                     class_examples=class_examples, center_crop=args.center_crop,
                                     random_flip=args.random_flip)
    batches = iter(data.data_loader(dataset, args.train_batch_size, accelerator.num_processes,
                                    accelerator.process_index, start=start_step * args.gradient_accumulation_steps,
                                    num_workers=args.dataloader_num_workers))
    num_timesteps = noise_scheduler.config.num_train_timesteps
    conditioning, latent_cache = None, {}
    if family:  # every prompt's text embeddings, once: the text encoders then idle
        prompts = [e.prompt for e in instance] + [e.prompt for e in (class_examples or [])]
        conditioning = flow.encode_prompts(pipe, family, prompts, args.max_sequence_length, accelerator.device)
    else:
        latent_size = args.resolution // pipe.vae_scale_factor
        latent_shape = (vae.config.latent_channels, latent_size, latent_size)

    training = adapters.training_record(args, max_steps=max_steps, seed=seed, samples_per_step=samples_per_step,
                                        mixed_precision=accelerator.mixed_precision, num_instance=len(instance),
                                        num_class=len(class_examples or []), started=started)
    adapter_file = adapters.adapter_path(output_dir, args.output_name, args.save_format)

    def save_adapter(path: Path, step: int) -> Path:
        meta = adapters.metadata(models, configs, algo=args.algo, base_model=args.pretrained_model_name_or_path,
                                 instance_prompt=args.instance_prompt, output_name=args.output_name,
                                 training={**training, "steps": step, "training_finished_at": round(time.time())})
        return adapters.save(models, path, args.save_format, options.SAVE_PRECISIONS[args.save_precision], meta)

    def save_checkpoint(step: int, optimizer_state: dict) -> Path:
        return checkpoint.save(
            output_dir, step, adapter_state=adapters.adapter_state(controllers), optimizer_state=optimizer_state,
            scheduler=lr_scheduler, scaler=accelerator.scaler, total_limit=args.checkpoints_total_limit,
            state={"seed": seed, "configs": adapters.configs_json(configs), "num_processes": accelerator.num_processes,
                   "samples_per_step": samples_per_step},
            extra=lambda folder: save_adapter(adapters.adapter_path(folder, args.output_name, args.save_format), step))

    def validate(step: int) -> list[Path]:
        for model in trained:
            model.eval()
        rendered = images.render(pipe, args.validation_prompt, count=args.num_validation_images, seed=seed,
                                 steps=args.num_inference_steps, resolution=args.resolution,
                                 batch_size=args.num_validation_images, autocast=accelerator.autocast())
        for model in trained:
            model.train()
        if not main_process:  # a sharded run renders on every process (each forward gathers shards)
            return []
        if args.report_to == "tensorboard":
            import numpy as np

            writer = accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_images("validation", np.stack([np.asarray(i) for i in rendered]), step, dataformats="NHWC")
        return images.save_validation(rendered, output_dir, step)

    def flow_loss(batch) -> torch.Tensor:
        """The flow-matching loss of a micro-batch: latents (cached per image with --cache_latents), the
        prompts' cached embeddings (the trained CLIP encoders' parts computed anew), per-sample seeded draws."""
        keys = list(zip(batch["kinds"], batch["indices"]))
        todo = [i for i, key in enumerate(keys) if key not in latent_cache]
        if todo:
            fresh = flow.image_latents(family, vae, batch["pixel_values"][todo].to(accelerator.device), seed,
                                       [keys[i][0] for i in todo], [keys[i][1] for i in todo])
            if not args.cache_latents:
                latents = fresh
            else:
                latent_cache.update({keys[i]: row for i, row in zip(todo, fresh)})
        if args.cache_latents:
            latents = torch.stack([latent_cache[key] for key in keys])
        draws = flow.draw(seed, batch["kinds"], batch["positions"], latents.shape[1:], num_timesteps,
                          args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale)
        trained_parts = None
        if text_models:  # the trained CLIP encoders run each step, with gradients
            trained_parts = family.text_parts(text_models, pipe, batch["prompts"], accelerator.device)
        cond = flow.batch_conditioning(family, conditioning, batch["prompts"], accelerator.device, weight_dtype,
                                       trained_parts)
        return flow.training_loss(unet_model, family, noise_scheduler, latents, draws, cond, batch["kinds"],
                                  weighting_scheme=args.weighting_scheme,
                                  precondition_outputs=bool(args.precondition_outputs),
                                  guidance_scale=args.guidance_scale, prior_loss_weight=args.prior_loss_weight,
                                  dtype=weight_dtype)

    # 4. The loop: `accumulation` micro-batches, then one optimizer step.
    if args.report_to != "none":
        accelerator.init_trackers("dreambooth", config={k: v for k, v in training.items() if v is not None})
    accelerator.print(f"training {adapters.describe(controllers)}; {max_steps} steps of {samples_per_step} samples "
                      f"on {accelerator.num_processes} process(es){', sharded (FSDP2)' if sharded else ''}, "
                      f"seed {seed}")
    for model in trained:
        model.train()
    progress = tqdm(total=max_steps, initial=start_step, desc="steps", disable=not accelerator.is_local_main_process)
    written: list[Path] = []
    for step in range(start_step, max_steps):
        step_loss = 0.0
        for micro in range(args.gradient_accumulation_steps):
            micro_step = step * args.gradient_accumulation_steps + micro
            batch = next(batches)
            # adapter dropout draws from the global RNG: make it a function of the step too
            torch.manual_seed(data.mix_seed(seed, "dropout", micro_step, accelerator.process_index))
            with accelerator.accumulate(*prepared[:-1]):
                if family:
                    total = flow_loss(batch)
                else:
                    draws = loss.draw(seed, batch["kinds"], batch["positions"], latent_shape, num_timesteps,
                                      args.noise_offset).to(accelerator.device)
                    with torch.set_grad_enabled(args.train_text_encoder):
                        context = text_model(batch["input_ids"].to(accelerator.device))[0]
                    total = loss.training_loss(unet_model, vae, noise_scheduler,
                                               batch["pixel_values"].to(accelerator.device), context, draws,
                                               batch["kinds"], snr_gamma=args.snr_gamma,
                                               prior_loss_weight=args.prior_loss_weight, dtype=weight_dtype)
                if args.regularization_weight:
                    total = total + args.regularization_weight * adapters.regularization(controllers)
                accelerator.backward(total)
                step_loss += float(total.detach()) / args.gradient_accumulation_steps
        if args.max_grad_norm:
            # the prepared optimizer's groups: FSDP2 swaps its parameters for the sharded ones
            accelerator.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                        args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        global_step = step + 1
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
        accelerator.log({"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
        if global_step % args.checkpointing_steps == 0:
            optimizer_state = sharding.optimizer_state(unet_model, optimizer, sharded)
            with sharding.whole_adapter(controllers):
                if main_process:
                    written.append(save_checkpoint(global_step, optimizer_state))
            accelerator.wait_for_everyone()
        if args.validation_prompt and global_step % args.validation_steps == 0 and global_step < max_steps:
            if main_process or sharded:
                written += validate(global_step)
            accelerator.wait_for_everyone()
    progress.close()

    # 5. The adapter file, final validation images, and a summary.
    accelerator.wait_for_everyone()
    with sharding.whole_adapter(controllers):
        if main_process:
            written.insert(0, save_adapter(adapter_file, max_steps))
    if args.validation_prompt and (main_process or sharded):
        written += validate(max_steps)
    if main_process:
        kept = [p for p in written if p.exists()]
        folders = sorted({str(p.parent) for p in kept if p.suffix == ".png"})
        trainable = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
        accelerator.print(
            f"done: {max_steps - start_step} steps in {time.time() - started:.1f}s, {trainable:,} trainable "
            f"parameters ({args.algo}).\nadapter: {kept[0]}\n"
            + "".join(f"checkpoint: {p}\n" for p in kept if checkpoint.CHECKPOINT.match(p.name))
            + "".join(f"validation images: {f}\n" for f in folders)
            + (f"logs: {output_dir / args.logging_dir}\n" if args.report_to != "none" else "")
            + f"load it with: lycoris_lite.enable(pipe); pipe.load_adapter({str(kept[0])!r})")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
