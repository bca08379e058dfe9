"""The flow-matching objective of transformer pipelines (Flux.1, SD3/3.5), as diffusers'
``train_dreambooth_lora_flux.py`` / ``train_dreambooth_lora_sd3.py`` compute it.

For an image latent ``x₀`` (VAE posterior sample, ``(z − shift)·scaling``), noise ``ε`` and a noise level
``σ`` (the scheduler's sigma at a drawn index), ``x_σ = (1 − σ)·x₀ + σ·ε`` and the transformer predicts
the velocity ``ε − x₀``. With ``--precondition_outputs`` (SD3) the prediction is turned into an estimate
of ``x₀`` first (``x̂₀ = x_σ − σ·v``) and compared with ``x₀``. The index is drawn as
``u·num_train_timesteps`` with ``u`` from ``--weighting_scheme``: ``logit_normal`` (``u = sigmoid(N(m, s))``),
``mode`` (``u ← 1 − u − scale·(cos²(πu/2) − 1 + u)``) or uniform; the loss of a sample is the mean of
``w(σ)·(prediction − target)²``, ``w`` = ``σ⁻²`` (``sigma_sqrt``), ``2/(π(1 − 2σ + 2σ²))`` (``cosmap``) or 1.

Flux packs the latent into 2×2 patches (``FluxPipeline._pack_latents``) with image position ids, and takes
the guidance scale as an input when its transformer is guidance-distilled (``--guidance_scale``); the loss
is computed on the packed tensors (a permutation of the unpacked ones: the same mean).

Every random quantity is a function of ``(seed, kind, sample position)`` (noise, ``u``) or of the image
(the posterior sample): a run is reproducible on any device or process count, a resumed run equals an
uninterrupted one, and ``--cache_latents`` (each image encoded once) gives the same losses as encoding
each step. The prompts' text embeddings are computed once per prompt (:func:`encode_prompts`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import mix_seed
from .loss import dreambooth_loss

#: the transformer class -> the family this objective knows
FAMILIES = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


def family_of(pipe) -> str | None:
    """``"flux"`` / ``"sd3"`` for a pipeline whose denoiser is one of :data:`FAMILIES`, ``None`` for a UNet
    pipeline; ``ValueError`` for another transformer."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        return None
    family = FAMILIES.get(type(transformer).__name__)
    if family is None:
        raise ValueError(f"{type(transformer).__name__} pipelines are not trained yet; the trainer takes Stable "
                         f"Diffusion 1.x/2.x (UNet) and {', '.join(FAMILIES)} pipelines")
    return family


@dataclass
class Conditioning:
    """A prompt's text embeddings (one row): ``embeds`` ``(1, L, D)``, ``pooled`` ``(1, P)``, and Flux's
    ``text_ids`` ``(L, 3)``."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor | None = None


@torch.no_grad()
def encode_prompts(pipe, family: str, prompts, max_sequence_length: int, device) -> dict[str, Conditioning]:
    """Each distinct prompt's :class:`Conditioning`, computed once with the pipeline's own ``encode_prompt``
    (all its text encoders)."""
    out = {}
    for prompt in dict.fromkeys(prompts):
        if family == "flux":
            embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=prompt, device=device,
                                                          max_sequence_length=max_sequence_length)
            out[prompt] = Conditioning(embeds, pooled, text_ids)
        else:
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=prompt, prompt_3=prompt, device=device,
                                                      do_classifier_free_guidance=False,
                                                      max_sequence_length=max_sequence_length)
            out[prompt] = Conditioning(embeds, pooled)
    return out


def batch_conditioning(cache: dict[str, Conditioning], prompts: list[str], device, dtype) -> Conditioning:
    rows = [cache[p] for p in prompts]
    return Conditioning(torch.cat([r.embeds for r in rows]).to(device, dtype), torch.cat([r.pooled for r in rows]).to(device, dtype),
                        None if rows[0].text_ids is None else rows[0].text_ids.to(device, dtype))


def sample_u(scheme: str, g: torch.Generator, logit_mean: float, logit_std: float, mode_scale: float) -> torch.Tensor:
    """One ``u`` in ``[0, 1)`` for the weighting scheme (see the module docstring)."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.normal(logit_mean, logit_std, (1,), generator=g))
    u = torch.rand((1,), generator=g)
    if scheme == "mode":
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def loss_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    if scheme == "sigma_sqrt":
        return (sigmas ** -2.0).float()
    if scheme == "cosmap":
        return (2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))).float()
    return torch.ones_like(sigmas, dtype=torch.float32)


@dataclass
class FlowDraws:
    """Per-sample draws: the scheduler index ``(B,)``, noise ``(B, C, h, w)``."""

    indices: torch.Tensor
    noise: torch.Tensor


def draw(seed: int, kinds: list[str], positions: list[int], latent_shape, num_train_timesteps: int, scheme: str,
         logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29) -> FlowDraws:
    """Per-sample draws from a CPU generator seeded with ``(seed, kind, position)``."""
    indices, noise = [], []
    for kind, position in zip(kinds, positions):
        g = torch.Generator().manual_seed(mix_seed(seed, kind, "flow", position))
        u = sample_u(scheme, g, logit_mean, logit_std, mode_scale)
        indices.append((u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1))
        noise.append(torch.randn(latent_shape, generator=g))
    return FlowDraws(torch.cat(indices), torch.stack(noise))


@torch.no_grad()
def image_latents(vae, pixel_values: torch.Tensor, seed: int, kinds: list[str], images: list[int]) -> torch.Tensor:
    """``x₀`` of each image: the VAE posterior's sample with noise seeded by ``(seed, kind, image index)``
    (the same latent for an image every time it comes back: what ``--cache_latents`` keeps)."""
    dist = vae.encode(pixel_values.to(vae.dtype)).latent_dist
    noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(
        mix_seed(seed, kind, "posterior", index))) for kind, index in zip(kinds, images)])
    z = dist.mean + dist.std * noise.to(dist.mean)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z.float() - shift) * vae.config.scaling_factor


def _pack(latents: torch.Tensor) -> torch.Tensor:
    """Flux's 2×2 patches: ``(B, C, H, W) -> (B, H/2·W/2, 4C)``."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


def predict(transformer, family: str, noisy: torch.Tensor, timesteps: torch.Tensor,
            cond: Conditioning, guidance_scale: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prediction, the noisy input as the transformer saw it)``, both packed for Flux."""
    if family == "flux":
        b, _, h, w = noisy.shape
        packed = _pack(noisy)
        config = getattr(transformer, "config", None) or transformer.module.config
        guidance = (torch.full((b,), guidance_scale, device=noisy.device, dtype=dtype)
                    if getattr(config, "guidance_embeds", False) else None)
        out = transformer(hidden_states=packed.to(dtype), timestep=(timesteps / 1000).to(dtype), guidance=guidance,
                          pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds, txt_ids=cond.text_ids,
                          img_ids=_image_ids(h, w, noisy.device, dtype), return_dict=False)[0]
        return out, packed
    out = transformer(hidden_states=noisy.to(dtype), timestep=timesteps.to(dtype), encoder_hidden_states=cond.embeds,
                      pooled_projections=cond.pooled, return_dict=False)[0]
    return out, noisy


def training_loss(transformer, family: str, scheduler, latents: torch.Tensor, draws: FlowDraws, cond: Conditioning,
                  kinds: list[str], *, weighting_scheme: str = "none", precondition_outputs: bool = False,
                  guidance_scale: float = 3.5, prior_loss_weight: float = 1.0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The DreamBooth flow-matching loss of a batch (see the module docstring)."""
    device = latents.device
    sigmas = scheduler.sigmas.to(device=device, dtype=torch.float32)[draws.indices.to(device)]
    timesteps = scheduler.timesteps.to(device=device)[draws.indices.to(device)]
    noise = draws.noise.to(device)
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1.0 - s) * latents + s * noise
    prediction, seen = predict(transformer, family, noisy, timesteps, cond, guidance_scale, dtype)
    if family == "flux":
        target = _pack(noise - latents)
        if precondition_outputs:
            prediction, target = seen - sigmas.view(-1, 1, 1) * prediction.float(), _pack(latents)
    else:
        target = noise - latents
        if precondition_outputs:
            prediction, target = prediction.float() * (-s) + noisy, latents
    per_sample = (loss_weights(weighting_scheme, sigmas).view(-1, *[1] * (target.dim() - 1))
                  * (prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, target.dim())))
    total, _ = dreambooth_loss(per_sample, kinds, prior_loss_weight)
    return total


@torch.no_grad()
def heldout_loss(transformer, family: str, scheduler, latents: torch.Tensor, cond: Conditioning, *,
                 seed: int = 1234, pairs_per_image: int = 8, guidance_scale: float = 3.5) -> float:
    """Mean unweighted flow-matching loss on fixed (noise, σ) pairs: ``pairs_per_image`` noises per latent
    and indices evenly spread over the schedule (the same pairs for every call with the same seed)."""
    n = latents.shape[0] * pairs_per_image
    x0 = latents.repeat_interleave(pairs_per_image, dim=0)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    steps = len(scheduler.sigmas) - 1
    indices = ((torch.arange(n) + 0.5) * steps / n).long().clamp(max=steps - 1)
    sigmas = scheduler.sigmas.float()[indices].to(x0.device)
    timesteps = scheduler.timesteps[indices].to(x0.device)
    noisy = (1 - sigmas.view(-1, 1, 1, 1)) * x0 + sigmas.view(-1, 1, 1, 1) * noise
    rows = Conditioning(cond.embeds.expand(n, -1, -1), cond.pooled.expand(n, -1), cond.text_ids)
    prediction, _ = predict(transformer, family, noisy, timesteps, rows, guidance_scale, torch.float32)
    target = _pack(noise - x0) if family == "flux" else noise - x0
    return float(F.mse_loss(prediction.float(), target))
