"""``tiny-world``: the embedded pretrained pipeline, its recipe and its measure.

An ordinary diffusers ``StableDiffusionPipeline`` folder (``tiny_world/`` next to this file, 4 MB of
safetensors) pretrained by :func:`pretrain` on the captioned scenes of :mod:`.world`, so that it draws
what it is told: ``pipe("a red circle on a blue background")`` is a red disc on blue. Everything that
loads a real model loads it (``DiffusionPipeline.from_pretrained(TINY_WORLD_DIR)``,
``load_pipeline("tiny-world")``, the trainer's and the web UI's ``--model``).

The model (SD 1.5's components at toy size; 32×32 images):

* VAE: ``AutoencoderKL`` with three ``DownEncoderBlock2D`` (16, 32, 32 channels, one layer each, 8 norm
  groups), 4 latent channels: 3×32×32 pixels ↔ 4×8×8 latents; ``scaling_factor`` = 1/std of the
  training latents' means.
* UNet: ``UNet2DConditionModel`` with blocks (32, 64): ``CrossAttnDownBlock2D`` + ``DownBlock2D`` /
  ``UpBlock2D`` + ``CrossAttnUpBlock2D``, one layer each, cross-attention width 32, 4 heads (0.79 M
  parameters).
* Text: the offline CLIP tokenizer and the tiny CLIP text encoder (hidden 32), trained with the UNet.
* Schedulers: DDPM ``scaled_linear`` 0.00085–0.012 (SD 1.5's) for training; the folder's scheduler is
  ``DPMSolverMultistepScheduler`` on the same betas (20 steps draw well).

The recipe (:func:`pretrain`, ``make tiny-model``; the defaults made the committed weights): 20 000
scenes of seed 0 at 32 px; the VAE for 3000 steps on them and 10 000 generic pictures
(:func:`.world.clutter`: gradients and random shapes of any colour, so that it also encodes pictures
from outside the world, such as a DreamBooth subject) (batch 32, AdamW 2e-3, cosine; loss MSE + ½·L1 +
1e-6·KL); the UNet and text encoder together for 6000 steps (batch 64, AdamW 1e-3 with weight decay
1e-2, 200 warm-up steps then cosine, ε-prediction MSE, 10 % empty captions for classifier-free
guidance, gradient norm clipped to 1). Torch seed 0 for the initial weights, a generator of seed 1 for
the batches. About 30 minutes on 2 CPU cores.

The measure (:func:`caption_accuracy`): draw the captions of held-out scenes (seed 99) and read each
image back with :func:`.world.detect`; the fraction whose shape, colour and background all match.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from . import world
from .tiny import build_tiny_text_encoder, seeded
from .tokenizer import build_clip_tokenizer, save_pipeline

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import StableDiffusionPipeline
    from PIL import Image

#: the committed pretrained pipeline folder
TINY_WORLD_DIR = Path(__file__).resolve().parent / "tiny_world"
#: the images it draws, pixels per side
RESOLUTION = 32
#: what :func:`caption_accuracy` measured on the committed weights at the defaults (60 held-out
#: captions, seed 99, 20 DPM-Solver steps, guidance 3); the test asserts a margin below it
MEASURED_ACCURACY = 0.82


def vae_config() -> dict[str, Any]:
    """The VAE: 3×32×32 ↔ 4×8×8 (three encoder blocks, two downsamplings)."""
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
                latent_channels=4, norm_num_groups=8, sample_size=RESOLUTION)


def unet_config() -> dict[str, Any]:
    """The UNet: 4×8×8 latents, two levels, cross-attention on the outer one."""
    return dict(sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
                norm_num_groups=8)


def training_scheduler_config() -> dict[str, Any]:
    """SD 1.5's noise schedule (``DDPMScheduler``)."""
    return dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def load_tiny_world_pipeline(path: str | Path | None = None) -> "StableDiffusionPipeline":
    """The committed pretrained pipeline (``from_pretrained`` of :data:`TINY_WORLD_DIR`); with ``path`` it
    is also saved there (a folder any diffusers script loads)."""
    from diffusers import StableDiffusionPipeline

    if not (TINY_WORLD_DIR / "model_index.json").is_file():
        raise FileNotFoundError(f"the tiny-world weights are missing from {TINY_WORLD_DIR}: rebuild them with "
                                "`make tiny-model` (python -m lycoris_lite.models.world_model)")
    pipe = StableDiffusionPipeline.from_pretrained(TINY_WORLD_DIR, safety_checker=None, requires_safety_checker=False)
    if path is not None:
        save_pipeline(pipe, path, ("tokenizer",))
    return pipe


def _to_pixels(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1


def _to_image(pixels: torch.Tensor) -> "Image.Image":
    from PIL import Image

    return Image.fromarray(((pixels.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy())


def _stack(images: list["Image.Image"]) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()


def train_vae(images: torch.Tensor, steps: int, batches: torch.Generator, log: Callable[[str], None] = print):
    """The autoencoder of :func:`vae_config` trained on ``images`` (uint8, N×3×H×W): batches of 32, AdamW
    2e-3 with a cosine decay, loss MSE + ½·L1 + 1e-6·KL of the posterior. Returns it frozen, in eval mode."""
    import torch.nn.functional as F
    from diffusers import AutoencoderKL

    start = time.time()
    vae = AutoencoderKL(**vae_config())
    optimizer = torch.optim.AdamW(vae.parameters(), 2e-3, weight_decay=0)
    for step in range(steps):
        x = _to_pixels(images[torch.randint(0, len(images), (32,), generator=batches)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + 0.5 * (recon - x).abs().mean() + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        if step % 500 == 0 or step == steps - 1:
            log(f"vae step {step}: loss {loss.item():.4f} ({time.time() - start:.0f} s)")
    return vae.eval().requires_grad_(False)


def optimizer_step(optimizer: torch.optim.Optimizer, params: list, loss: torch.Tensor, step: int, total: int,
                   lr: float = 1e-3, warmup: int = 200) -> None:
    """One step of the pretraining recipes: backward, gradient norm clipped to 1, the update, then the
    learning rate of the next step: ``lr`` warmed up linearly over ``warmup`` steps, times a cosine decay
    over ``total``."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad()
    for group in optimizer.param_groups:
        group["lr"] = lr * min(1, step / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))


def pretrain(out: str | Path, scenes: int = 20_000, vae_steps: int = 3000, unet_steps: int = 6000, seed: int = 0,
             log: Callable[[str], None] = print) -> "StableDiffusionPipeline":
    """Train the tiny-world pipeline from nothing (the recipe of the module docstring) and save it to
    ``out``. Deterministic for a given thread count (``torch.set_num_threads``); the global RNG is
    restored afterwards."""
    import numpy as np
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel

    start = time.time()
    with seeded(seed):
        data = [world.scene(seed, i) for i in range(scenes)]
        images = _stack([world.draw(s, RESOLUTION) for s in data])
        generic = _stack([world.clutter(seed, i, RESOLUTION) for i in range(scenes // 2)])
        log(f"{scenes} scenes and {scenes // 2} generic pictures drawn ({time.time() - start:.0f} s)")
        batches = torch.Generator().manual_seed(seed + 1)
        vae = train_vae(torch.cat([images, generic]), vae_steps, batches, log)
        with torch.no_grad():
            latents = torch.cat([vae.encode(_to_pixels(images[i:i + 256])).latent_dist.mean
                                 for i in range(0, scenes, 256)])
            scaling = float(1 / latents.std())
            vae.register_to_config(scaling_factor=scaling)
            latents = latents * scaling
            recon = vae.decode(latents[:64] / scaling).sample
        read = np.mean([world.detect(_to_image(r)).matches(s) for r, s in zip(recon, data[:64])])
        log(f"vae: scaling factor {scaling:.4f}; detector on 64 reconstructions: {read:.0%} "
            f"({time.time() - start:.0f} s)")

        tokenizer = build_clip_tokenizer()
        text_encoder = build_tiny_text_encoder(0)
        unet = UNet2DConditionModel(**unet_config())
        noise_scheduler = DDPMScheduler(**training_scheduler_config())
        ids_all = tokenizer([s.caption for s in data], padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids
        empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        text_encoder.train().requires_grad_(True)
        unet.train()
        params = list(unet.parameters()) + list(text_encoder.parameters())
        optimizer = torch.optim.AdamW(params, 1e-3, weight_decay=1e-2)
        batch = 64
        for step in range(unet_steps):
            index = torch.randint(0, scenes, (batch,), generator=batches)
            ids = ids_all[index].clone()
            ids[torch.rand(batch, generator=batches) < 0.1] = empty  # unconditional, for guidance
            z = latents[index]
            noise = torch.randn(z.shape, generator=batches)
            t = torch.randint(0, 1000, (batch,), generator=batches)
            pred = unet(noise_scheduler.add_noise(z, noise, t), t, text_encoder(ids)[0]).sample
            loss = F.mse_loss(pred, noise)
            optimizer_step(optimizer, params, loss, step, unet_steps)
            if step % 500 == 0 or step == unet_steps - 1:
                log(f"unet step {step}: loss {loss.item():.4f} ({time.time() - start:.0f} s)")
    unet.eval()
    text_encoder.eval().requires_grad_(False)
    unet.requires_grad_(False)
    scheduler = DPMSolverMultistepScheduler.from_config({**noise_scheduler.config, "steps_offset": 1})
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    save_pipeline(pipe, out, ("tokenizer",))
    log(f"saved {out} ({time.time() - start:.0f} s)")
    return pipe


def held_out_scenes(n: int = 60, seed: int = 99) -> list[world.Scene]:
    """Scenes the model never trained on (another seed of the world)."""
    return [world.scene(seed, i) for i in range(n)]


def caption_accuracy(pipe, scenes: list[world.Scene] | None = None, guidance_scale: float = 3.0, steps: int = 20,
                     seed: int = 0, **call: Any) -> tuple[float, list["Image.Image"]]:
    """Draw each scene's caption (one batch, generator ``seed``; ``call``: more arguments of the pipeline
    call) and return the fraction the detector reads back with the captioned shape, colour and
    background, and the images."""
    scenes = held_out_scenes() if scenes is None else scenes
    images = pipe([s.caption for s in scenes], num_inference_steps=steps, guidance_scale=guidance_scale,
                  height=RESOLUTION, width=RESOLUTION, generator=torch.Generator().manual_seed(seed), **call).images
    return sum(world.detect(im).matches(s) for im, s in zip(images, scenes)) / len(scenes), images


def report(pipe, out: str | Path, guidances: tuple[float, ...]) -> None:
    """What ``make tiny-model`` prints after a recipe: :func:`caption_accuracy` at each guidance scale,
    and the guidance-3 images as ``out/samples.png`` (the model card's)."""
    pipe.set_progress_bar_config(disable=True)
    for guidance in guidances:
        accuracy, images = caption_accuracy(pipe, guidance_scale=guidance)
        print(f"guidance {guidance}: shape, colour and background drawn as captioned in {accuracy:.0%} of "
              f"{len(images)} held-out captions", flush=True)
        if guidance == 3.0:
            image_grid(images, 10, 48).save(Path(out) / "samples.png")


def image_grid(images: list["Image.Image"], columns: int, cell: int = 96) -> "Image.Image":
    """Images side by side, ``columns`` per row, each enlarged to ``cell`` pixels (nearest)."""
    from PIL import Image

    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * cell, rows * cell), "white")
    for i, image in enumerate(images):
        grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), ((i % columns) * cell, (i // columns) * cell))
    return grid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pretrain the tiny-world pipeline (make tiny-model).")
    parser.add_argument("--out", default=str(TINY_WORLD_DIR), help="pipeline folder to write")
    parser.add_argument("--scenes", type=int, default=20_000)
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--unet-steps", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the committed weights: 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = pretrain(args.out, args.scenes, args.vae_steps, args.unet_steps, args.seed,
                    log=lambda line: print(line, flush=True))
    report(pipe, args.out, (1.0, 3.0, 6.0))


if __name__ == "__main__":
    main()
