"""Full-size SD 1.5 UNet and text encoder with random weights: the benchmarks' real shapes, offline.

``build_sd15_unet`` fills its 859,520,964 parameters from one seeded pool of random numbers (a few
seconds on 2 CPU cores instead of ~14 s with the regular init).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .tiny import seeded

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

SD15_UNET_NUM_PARAMS = 859_520_964
SD15_TEXT_ENCODER_NUM_PARAMS = 123_060_480


def sd15_unet_config() -> dict[str, Any]:
    """The exact ``unet/config.json`` of Stable Diffusion 1.5 (859,520,964 parameters)."""
    return {
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": [
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": [
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ],
    }


_POOL_SIZE = 1 << 24


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating parameters/buffers to ``dtype`` via ``nn.Module._apply`` (bypasses
    diffusers' ``ModelMixin.to`` dtype warning about ``_keep_in_fp32_modules``)."""
    if dtype == torch.float32:
        return module
    return module._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)


@torch.no_grad()
def _fast_seeded_init(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter of a freshly materialised module deterministically and fast.

    Norm layers get weight 1 / bias 0.  Every other parameter gets N(0, 1) values scaled
    to the variance of PyTorch's default init (``std = 1 / sqrt(3 * fan_in)``).  To avoid
    drawing ~10^9 random numbers (~12 s on 2 cores) the values are sliced, at a random
    seeded offset per tensor, from one seeded pool of 2**24 N(0, 1) samples: tensors are
    not independent of each other, but each looks random and the result is a pure
    function of ``seed`` on any device / dtype.
    """
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(_POOL_SIZE, generator=gen)
    pool2 = torch.cat([pool, pool])
    pools: dict[torch.device, torch.Tensor] = {}
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d)

    def fill(t: torch.Tensor, fan_in: int) -> None:
        n = t.numel()
        src = pools.get(t.device)
        if src is None:
            src = pools[t.device] = pool2.to(t.device)
        off = int(torch.randint(_POOL_SIZE, (1,), generator=gen))
        if n <= _POOL_SIZE:
            vals = src[off : off + n]
        else:  # tile (never hit by SD-sized tensors)
            reps = -(-n // _POOL_SIZE)
            vals = src[:_POOL_SIZE].repeat(reps)[:n]
        torch.mul(vals.view(t.shape), (3.0 * max(fan_in, 1)) ** -0.5, out=t)

    for mod in module.modules():
        own = dict(mod.named_parameters(recurse=False))
        if not own:
            continue
        if isinstance(mod, norm_types):
            if "weight" in own:
                own.pop("weight").fill_(1.0)
            if "bias" in own:
                own.pop("bias").zero_()
        weight = own.get("weight")
        fan_in = weight[0].numel() if weight is not None and weight.dim() > 1 else None
        for name, p in own.items():
            fi = fan_in if fan_in is not None else (p[0].numel() if p.dim() > 1 else p.numel())
            fill(p, fi)


def build_sd15_unet(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    fast_init: bool = True,
) -> "UNet2DConditionModel":
    """Full-size SD-1.5-shaped ``UNet2DConditionModel`` with random weights, eval mode.

    Exactly :func:`sd15_unet_config` (859,520,964 parameters; latents (B, 4, 64, 64),
    ``encoder_hidden_states`` (B, 77, 768)).  With ``fast_init`` (default) the model is
    built on the meta device, materialised directly on ``device`` in ``dtype`` and filled
    by a seeded pool-based init (a few seconds on 2 CPU cores instead of ~14 s; see
    ``_fast_seeded_init``).  ``fast_init=False`` uses diffusers' regular init under
    ``torch.manual_seed(seed)``.  Deterministic for a given seed either way.
    """
    from diffusers import UNet2DConditionModel

    if not fast_init:
        with seeded(seed):
            unet = UNet2DConditionModel(**sd15_unet_config())
        return _cast(unet, dtype).to(device).eval()

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd15_unet_config())
    unet = _cast(unet, dtype).to_empty(device=device)
    if any(True for _ in unet.buffers()):  # pragma: no cover - SD 1.5 UNet has no buffers
        raise RuntimeError("unexpected buffers in UNet2DConditionModel; use fast_init=False")
    _fast_seeded_init(unet, seed)
    return unet.eval()


def sd15_text_encoder_config():
    """``transformers.CLIPTextConfig`` of SD 1.5's text encoder (CLIP ViT-L/14 text tower).

    hidden 768, 12 layers, intermediate 3072, 12 heads, vocab 49408, 77 positions,
    quick_gelu, projection_dim 768; 123,060,480 parameters.  bos/eos/pad ids are those of
    SD 1.5's ``text_encoder/config.json`` (0 / 2 / 1; ``eos_token_id == 2`` makes CLIP
    pool at the argmax id, i.e. the real CLIP tokenizer's ``<|endoftext|>`` = 49407).
    """
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        projection_dim=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        initializer_range=0.02,
        initializer_factor=1.0,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def build_sd15_text_encoder(
    seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> "CLIPTextModel":
    """Full-size SD 1.5 ``CLIPTextModel`` (see :func:`sd15_text_encoder_config`) with random
    weights fixed by ``seed``, eval mode.  Input ids (B, 77) -> (B, 77, 768)."""
    from transformers import CLIPTextModel

    with seeded(seed):
        model = CLIPTextModel(sd15_text_encoder_config())
    return model.to(device=device, dtype=dtype).eval()
