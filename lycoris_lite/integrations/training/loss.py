"""The denoising objective: per-sample seeded noise, Min-SNR weighting, noise offset, prior
preservation, and a held-out evaluation loss.

For an image latent ``z₀`` (VAE posterior sample × scaling factor), noise ``ε`` and timestep ``t``,
``z_t = √ᾱ_t·z₀ + √(1−ᾱ_t)·ε`` and the UNet predicts the target ``ε`` (epsilon models) or
``v = √ᾱ_t·ε − √(1−ᾱ_t)·z₀`` (v-prediction). The loss of a sample is the mean squared error over its
latent, times the Min-SNR weight ``min(SNR_t, γ)/SNR_t`` (``/(SNR_t + 1)`` for v) when ``snr_gamma``
is set, ``SNR_t = ᾱ_t/(1−ᾱ_t)``. With prior preservation the batch holds instance samples then class
samples: ``loss = mean(instance) + prior_loss_weight · mean(class)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import mix_seed


@dataclass
class Draws:
    """The random quantities of a batch, one row per sample: timestep ``(B,)``, noise and posterior
    noise ``(B, C, h, w)``."""

    timesteps: torch.Tensor
    noise: torch.Tensor
    posterior_noise: torch.Tensor

    def to(self, device) -> "Draws":
        return Draws(self.timesteps.to(device), self.noise.to(device), self.posterior_noise.to(device))


def draw(seed: int, kinds: list[str], positions: list[int], latent_shape: tuple[int, int, int],
         num_train_timesteps: int, noise_offset: float = 0.0) -> Draws:
    """Per-sample draws from a CPU generator seeded with ``(seed, kind, position)``: identical on every
    device, process count and batch layout. ``noise_offset`` adds ``offset · N(0, 1)`` per channel
    (a constant over the latent's pixels) to the noise."""
    timesteps, noise, posterior = [], [], []
    for kind, position in zip(kinds, positions):
        g = torch.Generator().manual_seed(mix_seed(seed, kind, "noise", position))
        timesteps.append(torch.randint(0, num_train_timesteps, (1,), generator=g))
        eps = torch.randn(latent_shape, generator=g)
        if noise_offset:
            eps = eps + noise_offset * torch.randn((latent_shape[0], 1, 1), generator=g)
        noise.append(eps)
        posterior.append(torch.randn(latent_shape, generator=g))
    return Draws(torch.cat(timesteps), torch.stack(noise), torch.stack(posterior))


def encode_latents(vae, pixel_values: torch.Tensor, posterior_noise: torch.Tensor | None = None) -> torch.Tensor:
    """``(z − shift)·scaling_factor`` with ``z`` the VAE posterior's sample ``mean + std·noise`` (its
    mean when ``posterior_noise`` is ``None``)."""
    dist = vae.encode(pixel_values.to(vae.dtype)).latent_dist
    z = dist.mean if posterior_noise is None else dist.mean + dist.std * posterior_noise.to(dist.mean)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z.float() - shift) * vae.config.scaling_factor


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """``SNR_t = ᾱ_t / (1 − ᾱ_t)`` of a DDPM-style scheduler, float32, on the timesteps' device."""
    alphas = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alphas / (1.0 - alphas)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023), one per sample."""
    ratio = snr(scheduler, timesteps)
    clipped = torch.clamp(ratio, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (ratio + 1.0)
    return clipped / ratio


def target_for(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction type {kind!r} is not supported (epsilon or v_prediction)")


def per_sample_loss(prediction: torch.Tensor, target: torch.Tensor, scheduler, timesteps: torch.Tensor,
                    snr_gamma: float | None = None) -> torch.Tensor:
    """Mean squared error of each sample (float32), Min-SNR weighted when ``snr_gamma`` is set."""
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=tuple(range(1, prediction.dim())))
    if snr_gamma:
        loss = loss * min_snr_weights(scheduler, timesteps, snr_gamma)
    return loss


def dreambooth_loss(per_sample: torch.Tensor, kinds: list[str], prior_loss_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """``(loss, {"instance": …, "prior": …})``: the instance mean plus ``prior_loss_weight`` times the
    class mean (when the batch has class samples)."""
    is_class = torch.tensor([k == "class" for k in kinds], device=per_sample.device)
    instance = per_sample[~is_class].mean()
    parts = {"instance": instance.detach()}
    if bool(is_class.any()):
        prior = per_sample[is_class].mean()
        parts["prior"] = prior.detach()
        return instance + prior_loss_weight * prior, parts
    return instance, parts


def training_loss(unet, vae, scheduler, pixel_values: torch.Tensor, context: torch.Tensor, draws: Draws,
                  kinds: list[str], *, snr_gamma: float | None = None, prior_loss_weight: float = 1.0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The DreamBooth loss of a batch (see the module docstring): encode the images (no gradient), noise
    the latents at the drawn timesteps, predict with ``unet`` under ``context`` (the UNet's input in
    ``dtype``), compare with the scheduler's target."""
    with torch.no_grad():
        latents = encode_latents(vae, pixel_values, draws.posterior_noise)
    noisy = scheduler.add_noise(latents, draws.noise, draws.timesteps)
    prediction = unet(noisy.to(dtype), draws.timesteps, context.to(dtype)).sample
    target = target_for(scheduler, latents, draws.noise, draws.timesteps)
    total, _ = dreambooth_loss(per_sample_loss(prediction, target, scheduler, draws.timesteps, snr_gamma), kinds,
                               prior_loss_weight)
    return total


@torch.no_grad()
def heldout_loss(unet, vae, text_encoder, tokenizer, scheduler, pixel_values: torch.Tensor,
                 prompt: str | list[str], *, seed: int = 1234, pairs_per_image: int = 8) -> float:
    """Mean denoising loss of ``unet`` on fixed (noise, timestep) pairs for the images ``(N, 3, H, W)``
    in ``[-1, 1]`` with ``prompt`` (one for all, or a list of N: each image's caption): the posterior
    means as latents, ``pairs_per_image`` noises per image
    and timesteps evenly spread over the schedule (the same pairs for every call with the same seed).
    Unweighted MSE against the scheduler's target."""
    device = next(unet.parameters()).device
    latents = encode_latents(vae, pixel_values.to(device))
    n = latents.shape[0] * pairs_per_image
    latents = latents.repeat_interleave(pairs_per_image, dim=0)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g).to(device)
    steps = scheduler.config.num_train_timesteps
    timesteps = ((torch.arange(n) + 0.5) * steps / n).long().clamp(max=steps - 1).to(device)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if len(prompts) not in (1, pixel_values.shape[0]):
        raise ValueError(f"{len(prompts)} prompts for {pixel_values.shape[0]} images: give one, or one per image")
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids.to(device)
    context = text_encoder(ids)[0]
    context = context.expand(n, -1, -1) if len(prompts) == 1 else context.repeat_interleave(pairs_per_image, dim=0)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy.to(unet.dtype), timesteps, context.to(unet.dtype)).sample
    return float(per_sample_loss(prediction, target_for(scheduler, latents, noise, timesteps), scheduler, timesteps).mean())
