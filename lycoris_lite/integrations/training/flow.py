"""The flow-matching objective of transformer pipelines (Flux.1, Flux.2, SD3/3.5, Qwen-Image, Z-Image,
Wan 2.1), as diffusers' ``train_dreambooth_lora_{flux,flux2,sd3,qwen_image}.py`` compute it.

For an image latent ``x₀`` (the VAE posterior sample, normalized as the family's pipeline decodes it),
noise ``ε`` and a noise level ``σ`` (the training scheduler's sigma at a drawn index),
``x_σ = (1 − σ)·x₀ + σ·ε`` and the transformer predicts the velocity ``v = ε − x₀``. With
``--precondition_outputs`` (SD3) the prediction is turned into an estimate of ``x₀`` first
(``x̂₀ = x_σ − σ·v``) and compared with ``x₀``. The index is drawn as ``u·num_train_timesteps`` with ``u``
from ``--weighting_scheme``: ``logit_normal`` (``u = sigmoid(N(m, s))``), ``mode``
(``u ← 1 − u − scale·(cos²(πu/2) − 1 + u)``) or uniform; the loss of a sample is the mean of
``w(σ)·(prediction − target)²``, ``w`` = ``σ⁻²`` (``sigma_sqrt``), ``2/(π(1 − 2σ + 2σ²))`` (``cosmap``) or 1.

What differs between families lives in one :class:`Family` object each (:data:`FAMILIES`, keyed by the
transformer class): how a prompt is encoded (and which text encoders can be trained), how an image becomes
``x₀`` (``(z − shift)·scale``; Qwen-Image and Wan: ``(z − mean)/std`` per channel of a one-frame video
latent; Flux.2: 2×2-patchified then batch-norm-normalized), and how the transformer is called (Flux.1 and
Qwen-Image pack 2×2 patches; Flux.2 packs its patchified latent with 4-axis position ids; these take the
time ``t/1000 = σ``; Z-Image takes lists, the time ``(1000 − t)/1000`` and predicts ``−v``; SD3 and Wan take
``t``). Predictions are
brought back to the latent's own layout, where the loss is computed (a permutation of the packed tensors:
the same mean).

Every random quantity is a function of ``(seed, kind, sample position)`` (noise, ``u``) or of the image
(the posterior sample): a run is reproducible on any device or process count, a resumed run equals an
uninterrupted one, and ``--cache_latents`` (each image encoded once) gives the same losses as encoding each
step. The prompts' text embeddings are computed once per prompt (:func:`encode_prompts`); the CLIP encoders
that ``--train_text_encoder`` adapts (Flux.1: CLIP-L; SD3: CLIP-L and CLIP-G, as diffusers' scripts) are run
each step instead (:meth:`Family.text_parts`), the T5 part staying cached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import mix_seed
from .loss import dreambooth_loss

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")

#: a prompt's conditioning: ``{name: tensor with a batch dimension of 1}`` (Z-Image: ``(L, D)`` rows)
Rows = dict[str, torch.Tensor]


def _config(module):
    """A transformer's config through an accelerate/DDP wrapper."""
    return getattr(module, "config", None) or module.module.config


def _guidance(transformer, batch: int, scale: float, device, dtype) -> torch.Tensor | None:
    """The guidance input of a guidance-distilled transformer (``config.guidance_embeds``), else ``None``."""
    if not getattr(_config(transformer), "guidance_embeds", False):
        return None
    return torch.full((batch,), scale, device=device, dtype=dtype)


def _pack(latents: torch.Tensor) -> torch.Tensor:
    """Flux.1 / Qwen-Image 2×2 patches: ``(B, C, H, W) -> (B, H/2·W/2, 4C)``."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`_pack`: ``(B, H/2·W/2, 4C) -> (B, C, H, W)``."""
    b, _, c4 = packed.shape
    return packed.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def _image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Flux.1's ``(H/2·W/2, 3)`` position ids of the packed latent."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


def _posterior(vae, pixel_values: torch.Tensor, noises: torch.Tensor | None) -> torch.Tensor:
    """The VAE posterior's sample ``mean + std·noise`` (its mean when ``noises`` is ``None``), float32."""
    dist = vae.encode(pixel_values.to(vae.dtype)).latent_dist
    z = dist.mean if noises is None else dist.mean + dist.std * noises.to(dist.mean)
    return z.float()


def _posterior_shape(vae, pixel_values: torch.Tensor, video: bool) -> tuple:
    with torch.no_grad():
        probe = vae.encode(pixel_values[:1].to(vae.dtype).unsqueeze(2) if video else pixel_values[:1].to(vae.dtype))
    return tuple(probe.latent_dist.mean.shape[1:])


class Family:
    """One family's conditioning, latents and transformer call (see the module docstring). Subclasses set
    the class attributes and override what differs."""

    name: str
    transformer_class: str
    #: defaults of the options that differ by family (diffusers' scripts'; the prompt length the pipeline renders with)
    max_sequence_length = 512
    weighting_scheme = "none"
    precondition_outputs = False
    #: text encoders ``--train_text_encoder`` adapts (their parts re-run each step by :meth:`text_parts`)
    trainable_text_encoders: tuple[str, ...] = ()
    #: the VAE takes one-frame videos ``(B, 3, 1, H, W)``
    video_vae = False

    @property
    def preset(self) -> str:
        """The default ``--transformer_targets``."""
        return f"{self.name}-attn-mlp"

    def check(self, pipe) -> None:
        """``ValueError`` when the pipeline holds what this objective does not train."""

    def training_scheduler(self, pipe):
        """The scheduler whose ``sigmas``/``timesteps`` the noise levels are drawn from: a copy of the
        pipeline's (the validation renders set its timesteps)."""
        return type(pipe.scheduler).from_config(pipe.scheduler.config)

    # -- conditioning ------------------------------------------------------------------------------------

    def encode(self, pipe, prompt: str, max_sequence_length: int, device) -> Rows:
        """A prompt's conditioning rows, from the pipeline's own ``encode_prompt``."""
        raise NotImplementedError

    def text_parts(self, encoders: dict, pipe, prompts: list[str], device) -> Rows:
        """The rows of ``prompts`` that the trainable text encoders make (``encoders``: component name ->
        module, possibly wrapped by accelerate), with gradients when they have trainable parameters."""
        raise ValueError(f"{self.name} text encoders are not trained (the transformer is)")

    def batch(self, rows: list[Rows], device, dtype) -> Rows:
        """The batch's transformer inputs from each sample's rows (concatenated along the batch)."""
        return {k: torch.cat([r[k] for r in rows]).to(device, dtype) for k in rows[0]}

    # -- latents and the transformer ---------------------------------------------------------------------

    def posterior_shape(self, vae, pixel_values: torch.Tensor) -> tuple:
        return _posterior_shape(vae, pixel_values, self.video_vae)

    def latents(self, vae, pixel_values: torch.Tensor, noises: torch.Tensor | None) -> torch.Tensor:
        """``x₀`` of images ``(B, 3, H, W)`` in ``[-1, 1]`` from the posterior with ``noises``."""
        z = _posterior(vae, pixel_values, noises)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (z - shift) * vae.config.scaling_factor

    def predict(self, transformer, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Rows, guidance_scale: float,
                dtype) -> torch.Tensor:
        """The velocity the transformer predicts at ``noisy`` (``x_σ``), in ``noisy``'s layout."""
        raise NotImplementedError


def _clip_outputs(encoder, tokenizer, prompts: list[str], max_length: int, device, hidden_states: bool):
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt").input_ids
    return encoder(ids.to(device), output_hidden_states=hidden_states)


class Flux(Family):
    name, transformer_class = "flux", "FluxTransformer2DModel"
    trainable_text_encoders = ("text_encoder",)

    def encode(self, pipe, prompt, max_sequence_length, device):
        t5 = pipe._get_t5_prompt_embeds(prompt=prompt, max_sequence_length=max_sequence_length, device=device)
        rows = {"embeds": t5, "text_ids": torch.zeros(1, t5.shape[1], 3)}
        return {**rows, **self.text_parts({"text_encoder": pipe.text_encoder}, pipe, [prompt], device)}

    def text_parts(self, encoders, pipe, prompts, device):
        """CLIP-L's pooled output, as ``FluxPipeline._get_clip_prompt_embeds``."""
        out = _clip_outputs(encoders["text_encoder"], pipe.tokenizer, prompts, pipe.tokenizer_max_length, device,
                            hidden_states=False)
        return {"pooled": out.pooler_output}

    def batch(self, rows, device, dtype):
        out = {k: torch.cat([r[k] for r in rows]).to(device, dtype) for k in ("embeds", "pooled")}
        out["text_ids"] = rows[0]["text_ids"][0].to(device, dtype)
        return out

    def predict(self, transformer, noisy, timesteps, cond, guidance_scale, dtype):
        b, _, h, w = noisy.shape
        guidance = _guidance(transformer, b, guidance_scale, noisy.device, dtype)
        out = transformer(hidden_states=_pack(noisy).to(dtype), timestep=(timesteps / 1000).to(dtype),
                          guidance=guidance, pooled_projections=cond["pooled"], encoder_hidden_states=cond["embeds"],
                          txt_ids=cond["text_ids"], img_ids=_image_ids(h, w, noisy.device, dtype),
                          return_dict=False)[0]
        return _unpack(out, h, w)


class SD3(Family):
    name, transformer_class = "sd3", "SD3Transformer2DModel"
    max_sequence_length, weighting_scheme, precondition_outputs = 77, "logit_normal", True
    trainable_text_encoders = ("text_encoder", "text_encoder_2")

    def encode(self, pipe, prompt, max_sequence_length, device):
        t5 = pipe._get_t5_prompt_embeds(prompt=prompt, max_sequence_length=max_sequence_length, device=device)
        encoders = {c: getattr(pipe, c) for c in self.trainable_text_encoders}
        return {"t5": t5, **self.text_parts(encoders, pipe, [prompt], device)}

    def text_parts(self, encoders, pipe, prompts, device):
        """CLIP-L's and CLIP-G's penultimate hidden states side by side, and their pooled projections, as
        ``StableDiffusion3Pipeline._get_clip_prompt_embeds`` (clip_skip None)."""
        hidden, pooled = [], []
        for component, tokenizer in zip(self.trainable_text_encoders, (pipe.tokenizer, pipe.tokenizer_2)):
            out = _clip_outputs(encoders[component], tokenizer, prompts, pipe.tokenizer_max_length, device,
                                hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        return {"clip": torch.cat(hidden, dim=-1), "pooled": torch.cat(pooled, dim=-1)}

    def batch(self, rows, device, dtype):
        clip = torch.cat([r["clip"] for r in rows]).to(device, dtype)
        t5 = torch.cat([r["t5"] for r in rows]).to(device, dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        pooled = torch.cat([r["pooled"] for r in rows]).to(device, dtype)
        return {"embeds": torch.cat([clip, t5], dim=-2), "pooled": pooled}

    def predict(self, transformer, noisy, timesteps, cond, guidance_scale, dtype):
        return transformer(hidden_states=noisy.to(dtype), timestep=timesteps.to(dtype),
                           encoder_hidden_states=cond["embeds"], pooled_projections=cond["pooled"],
                           return_dict=False)[0]


class Flux2(Family):
    name, transformer_class = "flux2", "Flux2Transformer2DModel"

    def encode(self, pipe, prompt, max_sequence_length, device):
        embeds, text_ids = pipe.encode_prompt(prompt=prompt, device=device, max_sequence_length=max_sequence_length)
        return {"embeds": embeds, "text_ids": text_ids}

    def latents(self, vae, pixel_values, noises):
        """The posterior sample patchified 2×2 (``Flux2Pipeline._patchify_latents``) and normalized by the
        VAE's batch-norm statistics: ``(B, 4C, H/2, W/2)``."""
        z = _posterior(vae, pixel_values, noises)
        b, c, h, w = z.shape
        z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z)
        return (z - mean) / std

    def predict(self, transformer, noisy, timesteps, cond, guidance_scale, dtype):
        b, c, h, w = noisy.shape
        grid = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
        guidance = _guidance(transformer, b, guidance_scale, noisy.device, dtype)
        out = transformer(hidden_states=noisy.reshape(b, c, h * w).permute(0, 2, 1).to(dtype),
                          timestep=(timesteps / 1000).to(dtype), guidance=guidance,
                          encoder_hidden_states=cond["embeds"], txt_ids=cond["text_ids"], img_ids=grid.unsqueeze(0).expand(b, -1, -1).to(noisy.device),
                          return_dict=False)[0]
        return out.permute(0, 2, 1).reshape(b, c, h, w)


def _normalized_video_latent(vae, pixel_values, noises):
    """``(z − mean)/std`` per channel (``vae.config.latents_mean``/``latents_std``) of the one-frame video
    posterior: ``(B, C, 1, H/8, W/8)``."""
    z = _posterior(vae, pixel_values.unsqueeze(2), noises)
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(z)
    std = torch.tensor(vae.config.latents_std).view(shape).to(z)
    return (z - mean) / std


class QwenImage(Family):
    name, transformer_class = "qwen-image", "QwenImageTransformer2DModel"
    video_vae = True

    def encode(self, pipe, prompt, max_sequence_length, device):
        embeds, _ = pipe.encode_prompt(prompt=prompt, device=device, max_sequence_length=max_sequence_length)
        return {"embeds": embeds}  # one prompt: every token is real (the mask is all ones)

    def batch(self, rows, device, dtype):
        """Prompts of different lengths padded with zeros and masked, as the pipeline batches them."""
        lengths = [r["embeds"].shape[1] for r in rows]
        embeds = torch.cat([F.pad(r["embeds"], (0, 0, 0, max(lengths) - n)) for r, n in zip(rows, lengths)])
        mask = None
        if len(set(lengths)) > 1:
            mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long().to(device)
        return {"embeds": embeds.to(device, dtype), "mask": mask}

    def latents(self, vae, pixel_values, noises):
        return _normalized_video_latent(vae, pixel_values, noises)[:, :, 0]

    def predict(self, transformer, noisy, timesteps, cond, guidance_scale, dtype):
        b, _, h, w = noisy.shape
        guidance = _guidance(transformer, b, guidance_scale, noisy.device, dtype)
        out = transformer(hidden_states=_pack(noisy).to(dtype), timestep=(timesteps / 1000).to(dtype),
                          guidance=guidance, encoder_hidden_states=cond["embeds"], encoder_hidden_states_mask=cond["mask"],
                          img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return _unpack(out, h, w)


class ZImage(Family):
    name, transformer_class = "z-image", "ZImageTransformer2DModel"

    def encode(self, pipe, prompt, max_sequence_length, device):
        embeds, _ = pipe.encode_prompt(prompt=prompt, device=device, do_classifier_free_guidance=False,
                                       max_sequence_length=max_sequence_length)
        return {"caption": embeds[0][None]}  # (1, L, D): the real tokens only, as the pipeline keeps them

    def batch(self, rows, device, dtype):
        return {"caption": [r["caption"][0].to(device, dtype) for r in rows]}

    def predict(self, transformer, noisy, timesteps, cond, guidance_scale, dtype):
        """Z-Image takes a list of ``(C, 1, H, W)`` latents, the time ``1 − σ`` and predicts ``x₀ − ε``."""
        out = transformer(list(noisy.to(dtype).unsqueeze(2).unbind(0)), ((1000 - timesteps) / 1000).to(dtype),
                          cond["caption"], return_dict=False)[0]
        return -torch.stack(out).squeeze(2)


class Wan(Family):
    name, transformer_class = "wan", "WanTransformer3DModel"
    video_vae = True

    def check(self, pipe):
        if getattr(pipe, "transformer_2", None) is not None:
            raise ValueError("Wan 2.2's two experts (transformer and transformer_2, split at the boundary timestep) "
                             "are not trained yet; Wan 2.1 / single-expert Wan pipelines are")

    def training_scheduler(self, pipe):
        """Wan renders with a flow UniPC scheduler; training draws from the flow-matching Euler schedule with
        the same shift (``flow_shift``), as the Wan trainers do."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=pipe.scheduler.config.num_train_timesteps,
                                               shift=pipe.scheduler.config.get("flow_shift", 1.0) or 1.0)

    def encode(self, pipe, prompt, max_sequence_length, device):
        embeds, _ = pipe.encode_prompt(prompt=prompt, do_classifier_free_guidance=False, device=device,
                                       max_sequence_length=max_sequence_length)
        return {"embeds": embeds}

    latents = staticmethod(_normalized_video_latent)

    def predict(self, transformer, noisy, timesteps, cond, guidance_scale, dtype):
        return transformer(hidden_states=noisy.to(dtype), timestep=timesteps.to(dtype),
                           encoder_hidden_states=cond["embeds"], return_dict=False)[0]


#: transformer class name -> its family
FAMILIES: dict[str, Family] = {f.transformer_class: f for f in (Flux(), Flux2(), SD3(), QwenImage(), ZImage(), Wan())}


def family_of(pipe) -> Family | None:
    """The :class:`Family` of a pipeline's transformer, ``None`` for a UNet pipeline; ``ValueError`` for
    another transformer or a pipeline the family's objective does not train."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        return None
    family = FAMILIES.get(type(transformer).__name__)
    if family is None:
        raise ValueError(f"{type(transformer).__name__} pipelines are not trained yet; the trainer takes Stable "
                         f"Diffusion 1.x/2.x (UNet) pipelines and those of {', '.join(FAMILIES)}")
    family.check(pipe)
    return family


@torch.no_grad()
def encode_prompts(pipe, family: Family, prompts, max_sequence_length: int, device) -> dict[str, Rows]:
    """Each distinct prompt's conditioning rows, computed once (all the pipeline's text encoders)."""
    return {prompt: family.encode(pipe, prompt, max_sequence_length, device) for prompt in dict.fromkeys(prompts)}


def batch_conditioning(family: Family, cache: dict[str, Rows], prompts: list[str], device, dtype,
                       trained: Rows | None = None) -> Rows:
    """The transformer inputs of a batch of ``prompts``: cached rows, with ``trained`` (the batch's
    :meth:`Family.text_parts`, one row per prompt) in place of the cached parts it names."""
    rows = [dict(cache[p]) for p in prompts]
    for key, value in (trained or {}).items():
        for i, row in enumerate(rows):
            row[key] = value[i: i + 1]
    return family.batch(rows, device, dtype)


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
    """Per-sample draws: the scheduler index ``(B,)``, noise ``(B, *latent shape)``."""

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
def image_latents(family: Family, vae, pixel_values: torch.Tensor, seed: int, kinds: list[str],
                  images: list[int]) -> torch.Tensor:
    """``x₀`` of each image: the VAE posterior's sample with noise seeded by ``(seed, kind, image index)``
    (the same latent for an image every time it comes back: what ``--cache_latents`` keeps)."""
    shape = family.posterior_shape(vae, pixel_values)
    noises = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
        mix_seed(seed, kind, "posterior", index))) for kind, index in zip(kinds, images)])
    return family.latents(vae, pixel_values, noises)


def training_loss(transformer, family: Family, scheduler, latents: torch.Tensor, draws: FlowDraws, cond: Rows,
                  kinds: list[str], *, weighting_scheme: str = "none", precondition_outputs: bool = False,
                  guidance_scale: float = 3.5, prior_loss_weight: float = 1.0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The DreamBooth flow-matching loss of a batch (see the module docstring)."""
    device = latents.device
    sigmas = scheduler.sigmas.to(device=device, dtype=torch.float32)[draws.indices.to(device)]
    timesteps = scheduler.timesteps.to(device=device)[draws.indices.to(device)]
    noise = draws.noise.to(device)
    s = sigmas.view(-1, *[1] * (latents.dim() - 1))
    noisy = (1.0 - s) * latents + s * noise
    prediction = family.predict(transformer, noisy, timesteps, cond, guidance_scale, dtype).float()
    target = noise - latents
    if precondition_outputs:
        prediction, target = noisy - s * prediction, latents
    per_sample = (loss_weights(weighting_scheme, sigmas).view_as(s) * (prediction - target) ** 2).mean(
        dim=tuple(range(1, target.dim())))
    total, _ = dreambooth_loss(per_sample, kinds, prior_loss_weight)
    return total


@torch.no_grad()
def heldout_loss(transformer, family: Family, scheduler, latents: torch.Tensor, cond: Rows, *,
                 seed: int = 1234, pairs_per_image: int = 8, guidance_scale: float = 3.5) -> float:
    """Mean unweighted flow-matching loss on fixed (noise, σ) pairs: ``pairs_per_image`` noises per latent
    and indices evenly spread over the schedule (the same pairs for every call with the same seed);
    ``cond`` is one prompt's rows (:func:`encode_prompts`)."""
    n = latents.shape[0] * pairs_per_image
    x0 = latents.repeat_interleave(pairs_per_image, dim=0)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    steps = len(scheduler.sigmas) - 1
    indices = ((torch.arange(n) + 0.5) * steps / n).long().clamp(max=steps - 1)
    sigmas = scheduler.sigmas.float()[indices].to(x0.device)
    timesteps = scheduler.timesteps[indices].to(x0.device)
    s = sigmas.view(-1, *[1] * (x0.dim() - 1))
    noisy = (1 - s) * x0 + s * noise
    rows = family.batch([cond] * n, x0.device, torch.float32)
    prediction = family.predict(transformer, noisy, timesteps, rows, guidance_scale, torch.float32)
    return float(F.mse_loss(prediction.float(), noise - x0))
