"""Tests for lycoris_lite.models: offline tiny builders and full-size SD 1.5 shapes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lycoris_lite import models  # noqa: E402
from lycoris_lite.models import full_size, loading  # noqa: E402

PROMPT_A = "a photo of sks dog"
PROMPT_B = "a painting of a cat"


def _render(pipe, prompt: str, seed: int = 0) -> np.ndarray:
    return pipe(
        prompt,
        num_inference_steps=2,
        guidance_scale=6.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def tokenizer():
    return models.build_clip_tokenizer()


@pytest.fixture(scope="module")
def sd_pipe():
    pipe = models.build_tiny_sd_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl_pipe():
    pipe = models.build_tiny_sdxl_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------
# import weight
# ------------------------------------------------------------------------------------


def test_import_is_light():
    code = (
        "import sys, lycoris_lite.models as m; "
        "assert 'diffusers' not in sys.modules, 'diffusers imported'; "
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------


def test_bytes_to_unicode_is_gpt2_mapping():
    m = models.bytes_to_unicode()
    assert len(m) == 256 and len(set(m.values())) == 256
    assert m[ord("a")] == "a" and m[ord(" ")] == "\u0120" and m[ord("!")] == "!"


def test_tokenizer_vocab_layout(tokenizer):
    from transformers import CLIPTokenizer

    assert isinstance(tokenizer, CLIPTokenizer)
    vocab = tokenizer.get_vocab()
    assert len(tokenizer) == len(vocab) == 914 <= 1000
    assert sorted(vocab.values()) == list(range(len(vocab)))
    byte_syms = list(models.bytes_to_unicode().values())
    for i, sym in enumerate(byte_syms):
        assert vocab[sym] == i
        assert vocab[sym + "</w>"] == 256 + i
    assert vocab["<|startoftext|>"] == 912 and vocab["<|endoftext|>"] == 913
    assert tokenizer.model_max_length == 77
    assert tokenizer.bos_token_id == 912
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == tokenizer.unk_token_id == 913


def test_tokenizer_encodes_prompts(tokenizer):
    a = tokenizer(PROMPT_A).input_ids
    b = tokenizer(PROMPT_B).input_ids
    assert a != b
    assert a[0] == b[0] == tokenizer.bos_token_id
    assert a[-1] == b[-1] == tokenizer.eos_token_id
    # learned merges make common words single tokens
    assert tokenizer.convert_ids_to_tokens(a[1:-1]) == ["a</w>", "photo</w>", "of</w>", "sks</w>", "dog</w>"]
    assert tokenizer.decode(a, skip_special_tokens=True) == PROMPT_A
    # unseen words / bytes still encode (byte fallback), case folded, round trip
    text = "Zyzzyva QUUX 42 café"
    ids = tokenizer(text).input_ids
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "zyzzyva quux 4 2 café"


def test_tokenizer_padding_and_truncation(tokenizer):
    enc = tokenizer(
        [PROMPT_A, "word " * 200],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    ids = enc.input_ids
    assert ids.shape == (2, 77)
    n = len(tokenizer(PROMPT_A).input_ids)
    assert (ids[0, n:] == tokenizer.pad_token_id).all()
    assert ids[1, 0] == tokenizer.bos_token_id and ids[1, -1] == tokenizer.eos_token_id
    assert int(ids.max()) < 1000


def test_tokenizer_saved_to_path(tmp_path, tokenizer):
    tok = models.build_clip_tokenizer(tmp_path / "tok")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / "tok" / name).is_file()
    assert tok(PROMPT_B).input_ids == tokenizer(PROMPT_B).input_ids
    tok2 = models.build_clip_tokenizer(pad_token="!")
    assert tok2.pad_token_id == 0 and tok2.eos_token_id == 913


def test_tokenizer_with_text_encoder(tokenizer):
    te = models.build_tiny_text_encoder(seed=0)
    cfg = te.config
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (912, 913, 913)
    assert cfg.vocab_size == 1000 and cfg.hidden_size == 32 and cfg.max_position_embeddings == 77
    ids = tokenizer(
        [PROMPT_A, PROMPT_B], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        out = te(ids)
    assert out.last_hidden_state.shape == (2, 77, 32)
    # CLIP pools at the first eos token
    eos_pos = (ids == tokenizer.eos_token_id).int().argmax(-1)
    expected = out.last_hidden_state[torch.arange(2), eos_pos]
    torch.testing.assert_close(out.pooler_output, expected)
    assert not torch.allclose(out.last_hidden_state[0], out.last_hidden_state[1])


# ------------------------------------------------------------------------------------
# tiny SD 1.5
# ------------------------------------------------------------------------------------

SD15_NAMES = [
    "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.resnets.0.conv1",
    "down_blocks.1.resnets.0.conv_shortcut",
    "down_blocks.2.downsamplers.0.conv",
    "down_blocks.3.resnets.1.conv2",
    "mid_block.attentions.0.proj_in",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "up_blocks.0.upsamplers.0.conv",
    "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj",
    "up_blocks.3.attentions.2.proj_out",
    "time_embedding.linear_1",
    "time_embedding.linear_2",
    "conv_in",
    "conv_out",
]


def test_tiny_unet_has_sd15_layout():
    from diffusers import UNet2DConditionModel

    unet = models.build_tiny_unet(seed=0)
    mods = dict(unet.named_modules())
    for name in SD15_NAMES:
        assert name in mods, name
    proj_in = mods["mid_block.attentions.0.proj_in"]
    assert isinstance(proj_in, torch.nn.Conv2d) and proj_in.kernel_size == (1, 1)
    assert isinstance(mods["up_blocks.3.attentions.2.proj_out"], torch.nn.Conv2d)
    assert mods["down_blocks.0.resnets.0.conv1"].kernel_size == (3, 3)
    assert "down_blocks.3.resnets.0.conv_shortcut" not in mods  # same channels, as in SD 1.5
    assert isinstance(mods["down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q"], torch.nn.Linear)
    assert unet.config.cross_attention_dim == 32

    # module names, types, conv kernel sizes and parameter names are exactly SD 1.5's
    with torch.device("meta"):
        full = UNet2DConditionModel(**models.sd15_unet_config())
    full_mods = {n: type(m) for n, m in full.named_modules()}
    assert {n: type(m) for n, m in unet.named_modules()} == full_mods
    assert [n for n, _ in unet.named_parameters()] == [n for n, _ in full.named_parameters()]
    kernels = lambda mod: {n: m.kernel_size for n, m in mod.named_modules() if isinstance(m, torch.nn.Conv2d)}  # noqa: E731
    assert kernels(unet) == kernels(full)


def test_tiny_unet_forward_shape_and_determinism():
    state = torch.random.get_rng_state()
    a = models.build_tiny_unet(seed=0)
    b = models.build_tiny_unet(seed=0)
    c = models.build_tiny_unet(seed=1)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    assert _state_equal(a, b) and not _state_equal(a, c)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        out = a(x, torch.tensor([10, 500]), encoder_hidden_states=ctx).sample
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_tiny_components_deterministic():
    assert _state_equal(models.build_tiny_vae(3), models.build_tiny_vae(3))
    assert _state_equal(models.build_tiny_text_encoder(3), models.build_tiny_text_encoder(3))
    vae = models.build_tiny_vae(0)
    assert vae.config.latent_channels == 4 and 2 ** (len(vae.config.block_out_channels) - 1) == 8
    with torch.no_grad():
        lat = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
        img = vae.decode(lat).sample
    assert lat.shape == (1, 4, 8, 8) and img.shape == (1, 3, 64, 64)


def test_tiny_sd_pipeline_renders(sd_pipe):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    assert isinstance(sd_pipe, StableDiffusionPipeline)
    assert isinstance(sd_pipe.scheduler, DDIMScheduler)
    sc = sd_pipe.scheduler.config
    assert (sc.beta_start, sc.beta_end, sc.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert sc.clip_sample is False and sc.set_alpha_to_one is False
    assert sd_pipe.safety_checker is None and sd_pipe.vae_scale_factor == 8

    a1 = _render(sd_pipe, PROMPT_A)
    a2 = _render(sd_pipe, PROMPT_A)
    b = _render(sd_pipe, PROMPT_B)
    assert a1.shape == (1, 64, 64, 3) and a1.dtype == np.float32
    assert np.isfinite(a1).all() and a1.min() >= 0.0 and a1.max() <= 1.0
    assert a1.std() > 0.01  # not a flat image
    np.testing.assert_array_equal(a1, a2)
    assert np.abs(a1 - b).max() > 1e-3  # different prompts -> different images
    assert np.abs(a1 - _render(sd_pipe, PROMPT_A, seed=1)).max() > 1e-3


def test_tiny_sd_pipeline_deterministic_build(sd_pipe):
    other = models.build_tiny_sd_pipeline(seed=0)
    for name in ("unet", "vae", "text_encoder"):
        assert _state_equal(getattr(sd_pipe, name), getattr(other, name)), name
    other.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(_render(sd_pipe, PROMPT_A), _render(other, PROMPT_A))


def test_tiny_sd_pipeline_save_load_roundtrip(sd_pipe, tmp_path):
    from diffusers import StableDiffusionPipeline

    path = tmp_path / "tiny-sd"
    saved = models.build_tiny_sd_pipeline(seed=0, path=path)
    assert (path / "model_index.json").is_file()
    assert (path / "tokenizer" / "vocab.json").is_file() and (path / "tokenizer" / "merges.txt").is_file()
    saved.set_progress_bar_config(disable=True)

    loaded = StableDiffusionPipeline.from_pretrained(path)
    loaded.set_progress_bar_config(disable=True)
    assert _state_equal(loaded.unet, sd_pipe.unet)
    assert loaded.tokenizer(PROMPT_A).input_ids == sd_pipe.tokenizer(PROMPT_A).input_ids
    assert loaded.tokenizer.model_max_length == 77
    expected = _render(sd_pipe, PROMPT_A)
    # equal weights (checked above); the renders agree to float rounding: a busy machine's thread scheduling
    # can change a parallel reduction's order (measured: up to 1.7e-6 on values of 0.2-1 at guidance 6)
    np.testing.assert_allclose(_render(saved, PROMPT_A), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(_render(loaded, PROMPT_A), expected, rtol=0, atol=1e-5)

    via_loader = models.load_pipeline(str(path))
    assert isinstance(via_loader, StableDiffusionPipeline)
    assert _state_equal(via_loader.text_encoder, sd_pipe.text_encoder)


# ------------------------------------------------------------------------------------
# tiny SDXL
# ------------------------------------------------------------------------------------


def test_tiny_sdxl_layout(sdxl_pipe):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pipe = sdxl_pipe
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert type(pipe.text_encoder) is CLIPTextModel
    assert type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    assert pipe.tokenizer is not None and pipe.tokenizer_2 is not None
    assert pipe.tokenizer_2.pad_token == "!"
    h1, h2 = pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size
    assert h1 != h2

    unet = pipe.unet
    cfg = unet.config
    assert cfg.cross_attention_dim == h1 + h2
    assert cfg.addition_embed_type == "text_time"
    assert cfg.projection_class_embeddings_input_dim == (
        6 * cfg.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim
    )
    assert tuple(cfg.down_block_types) == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert tuple(cfg.up_block_types) == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    mods = dict(unet.named_modules())
    for name in (
        "down_blocks.1.attentions.0.proj_in",
        "down_blocks.2.attentions.1.transformer_blocks.1.attn1.to_q",
        "mid_block.attentions.0.proj_out",
        "up_blocks.0.attentions.2.transformer_blocks.1.ff.net.2",
        "add_embedding.linear_1",
    ):
        assert name in mods, name
    assert isinstance(mods["down_blocks.1.attentions.0.proj_in"], torch.nn.Linear)
    assert isinstance(mods["mid_block.attentions.0.proj_out"], torch.nn.Linear)
    assert "down_blocks.0.attentions" not in mods  # SDXL: first down block has no attention


def test_tiny_sdxl_renders(sdxl_pipe):
    a1 = _render(sdxl_pipe, PROMPT_A)
    a2 = _render(sdxl_pipe, PROMPT_A)
    b = _render(sdxl_pipe, PROMPT_B)
    assert a1.shape == (1, 64, 64, 3) and np.isfinite(a1).all()
    np.testing.assert_array_equal(a1, a2)
    assert np.abs(a1 - b).max() > 1e-3


# ------------------------------------------------------------------------------------
# full-size SD 1.5 shapes
# ------------------------------------------------------------------------------------


def test_sd15_unet_config_values():
    cfg = models.sd15_unet_config()
    assert cfg["block_out_channels"] == [320, 640, 1280, 1280]
    assert cfg["cross_attention_dim"] == 768 and cfg["attention_head_dim"] == 8
    assert cfg["layers_per_block"] == 2 and cfg["norm_num_groups"] == 32 and cfg["sample_size"] == 64


def test_sd15_parameter_counts_on_meta():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**models.sd15_unet_config())
        te = CLIPTextModel(models.sd15_text_encoder_config())
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in te.parameters()) == 123_060_480


@pytest.mark.slow
def test_build_sd15_unet_full_size():
    unet = models.build_sd15_unet(seed=0)
    params = list(unet.parameters())
    assert sum(p.numel() for p in params) == 859_520_964
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    assert not unet.training
    sd = unet.state_dict()
    w = sd["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
    assert torch.isfinite(w).all() and 0.005 < float(w.std()) < 0.05  # ~1/sqrt(3*320)
    assert torch.equal(sd["mid_block.resnets.0.norm1.weight"], torch.ones(1280))
    assert not torch.equal(sd["conv_in.weight"], sd["conv_in.weight"].flip(0))


def test_fast_seeded_init_is_deterministic():
    """The pool-based init of build_sd15_unet, checked on the tiny SD-1.5-layout UNet."""
    from diffusers import UNet2DConditionModel

    def make(seed, dtype=torch.float32):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**models.tiny_unet_config())
        unet = full_size._cast(unet, dtype).to_empty(device="cpu")
        full_size._fast_seeded_init(unet, seed)
        return unet

    a, b, c = make(0), make(0), make(1)
    assert _state_equal(a, b) and not _state_equal(a, c)
    half = make(0, torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(
        half.conv_in.weight.float(), a.conv_in.weight, atol=1e-2, rtol=1e-2
    )
    assert torch.equal(a.mid_block.resnets[0].norm1.weight, torch.ones(32))
    with torch.no_grad():
        out = a(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 77, 32)).sample
    assert torch.isfinite(out).all()


@pytest.mark.slow
def test_build_sd15_text_encoder_full_size():
    te = models.build_sd15_text_encoder(seed=0)
    assert sum(p.numel() for p in te.parameters()) == 123_060_480
    cfg = te.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (768, 12, 3072)
    assert (cfg.num_attention_heads, cfg.vocab_size, cfg.hidden_act) == (12, 49408, "quick_gelu")


# ------------------------------------------------------------------------------------
# load_pipeline
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["/definitely/not/here", "./no_such_dir", "no_such_model", "a/b/c"])
def test_load_pipeline_missing_path(missing, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        models.load_pipeline(missing)


def test_load_pipeline_missing_pathlike(tmp_path):
    with pytest.raises(FileNotFoundError):
        models.load_pipeline(tmp_path / "nothing")


def test_load_pipeline_tiny(sd_pipe):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipe = models.load_pipeline("tiny-sd", seed=0)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert _state_equal(pipe.unet, sd_pipe.unet)
    assert isinstance(models.load_pipeline("tiny-sdxl"), StableDiffusionXLPipeline)
    with pytest.raises(TypeError):
        models.load_pipeline("tiny-sd", bogus=1)


def test_hub_id_detection():
    assert loading._looks_like_hub_id("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert loading._looks_like_hub_id("owner/name.v2")
    for not_hub in ("./x/y", "/abs/path", "a/b/c", "plain", "../up", "owner/", "C:\\x\\y"):
        assert not loading._looks_like_hub_id(not_hub), not_hub
