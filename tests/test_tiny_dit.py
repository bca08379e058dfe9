"""The tiny transformer (DiT) pipelines of lycoris_lite.models: they build offline, render
deterministically, carry the real models' module paths, load by name and survive save/load."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lycoris_lite import models  # noqa: E402
from lycoris_lite.models import text_encoders  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red circle"


def _in(prefix: str, names: list[str]) -> list[str]:
    return [f"{prefix}.{n}" for n in names]


# transformers 5 builds CLIPTextModel without the ``text_model.`` level (its loader maps the old
# keys); CLIPTextModelWithProjection keeps it
CLIP = ["embeddings.token_embedding", "encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.out_proj",
        "encoder.layers.1.mlp.fc1"]
CLIP_WITH_PROJECTION = _in("text_model", CLIP) + ["text_projection"]
T5 = ["shared", "encoder.block.0.layer.0.SelfAttention.q", "encoder.block.0.layer.0.SelfAttention.k",
      "encoder.block.0.layer.0.SelfAttention.v", "encoder.block.0.layer.0.SelfAttention.o",
      "encoder.block.0.layer.1.DenseReluDense.wi_0", "encoder.block.0.layer.1.DenseReluDense.wi_1",
      "encoder.block.1.layer.1.DenseReluDense.wo"]
QKVO = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
JOINT = QKVO + ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]


FLUX = (["x_embedder", "context_embedder", "time_text_embed.timestep_embedder.linear_1",
         "time_text_embed.guidance_embedder.linear_1", "time_text_embed.text_embedder.linear_1",
         "transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
         "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
         "transformer_blocks.0.ff_context.net.0.proj", "transformer_blocks.1.ff_context.net.2",
         "single_transformer_blocks.0.norm.linear", "single_transformer_blocks.0.proj_mlp",
         "single_transformer_blocks.1.proj_out", "norm_out.linear", "proj_out"]
        + _in("transformer_blocks.0", JOINT) + _in("transformer_blocks.1", JOINT)
        + _in("single_transformer_blocks.0", QKVO[:3]) + _in("single_transformer_blocks.1", QKVO[:3]))
FLUX2 = (["x_embedder", "context_embedder", "time_guidance_embed.timestep_embedder.linear_1",
          "time_guidance_embed.guidance_embedder.linear_1", "double_stream_modulation_img.linear",
          "double_stream_modulation_txt.linear", "single_stream_modulation.linear", "transformer_blocks.0.ff.linear_in",
          "transformer_blocks.0.ff.linear_out", "transformer_blocks.1.ff_context.linear_in",
          "single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single_transformer_blocks.1.attn.to_out",
          "norm_out.linear", "proj_out"] + _in("transformer_blocks.0", JOINT))
SD3 = (["pos_embed.proj", "context_embedder", "time_text_embed.timestep_embedder.linear_1",
        "time_text_embed.text_embedder.linear_1", "transformer_blocks.0.norm1.linear",
        "transformer_blocks.0.norm1_context.linear", "transformer_blocks.0.ff.net.0.proj",
        "transformer_blocks.0.ff_context.net.2", "transformer_blocks.1.ff.net.2", "norm_out.linear", "proj_out"]
       + _in("transformer_blocks.0", JOINT) + _in("transformer_blocks.1", JOINT[:-1]))
QWEN_IMAGE = (["img_in", "txt_in", "time_text_embed.timestep_embedder.linear_1", "transformer_blocks.0.img_mod.1",
               "transformer_blocks.0.txt_mod.1", "transformer_blocks.0.img_mlp.net.0.proj",
               "transformer_blocks.0.img_mlp.net.2", "transformer_blocks.1.txt_mlp.net.0.proj", "norm_out.linear",
               "proj_out"] + _in("transformer_blocks.0", JOINT))
Z_IMAGE = (["all_x_embedder.2-1", "all_final_layer.2-1.linear", "t_embedder.mlp.0", "cap_embedder.1",
            "noise_refiner.1.adaLN_modulation.0", "context_refiner.1.feed_forward.w2", "layers.0.feed_forward.w1",
            "layers.0.feed_forward.w2", "layers.0.feed_forward.w3", "layers.1.adaLN_modulation.0"]
           + [f"{block}.attention.{p}" for block in ("noise_refiner.0", "context_refiner.0", "layers.0", "layers.1")
              for p in ("to_q", "to_k", "to_v", "to_out.0")])
WAN = (["patch_embedding", "condition_embedder.time_embedder.linear_1", "condition_embedder.time_proj",
        "condition_embedder.text_embedder.linear_1", "blocks.0.ffn.net.0.proj", "blocks.0.ffn.net.2", "proj_out"]
       + _in("blocks.0", [n.replace("attn.", "attn1.") for n in QKVO] + [n.replace("attn.", "attn2.") for n in QKVO])
       + _in("blocks.1", ["attn1.to_q", "attn2.to_out.0", "ffn.net.2"]))
QWEN_LM = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]


@dataclass(frozen=True)
class Family:
    pipeline: str
    classes: dict[str, str]  # component -> class name
    paths: dict[str, list[str]]  # component -> module paths that must exist (all Linear / Conv)
    call: dict = field(default_factory=dict)  # extra pipeline arguments


_FLUX_CLASSES = {"transformer": "FluxTransformer2DModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
                 "tokenizer": "CLIPTokenizer", "text_encoder_2": "T5EncoderModel", "tokenizer_2": "T5Tokenizer",
                 "scheduler": "FlowMatchEulerDiscreteScheduler"}
_WAN_CLASSES = {"transformer": "WanTransformer3DModel", "vae": "AutoencoderKLWan", "text_encoder": "UMT5EncoderModel",
                "tokenizer": "T5Tokenizer", "scheduler": "UniPCMultistepScheduler"}

FAMILIES = {
    "tiny-flux": Family("FluxPipeline", _FLUX_CLASSES,
                        {"transformer": FLUX, "text_encoder": CLIP, "text_encoder_2": T5}),
    "tiny-flux-kontext": Family("FluxKontextPipeline", _FLUX_CLASSES,
                                {"transformer": FLUX, "text_encoder": CLIP, "text_encoder_2": T5},
                                {"max_area": 32 * 32}),
    "tiny-flux2": Family("Flux2Pipeline",
                         {"transformer": "Flux2Transformer2DModel", "vae": "AutoencoderKLFlux2",
                          "text_encoder": "Mistral3ForConditionalGeneration"},
                         {"transformer": FLUX2, "text_encoder": _in("model.language_model.layers.0", QWEN_LM) + [
                             "model.language_model.layers.29.mlp.down_proj", "model.multi_modal_projector.linear_1",
                             "model.vision_tower.transformer.layers.0.attention.q_proj", "lm_head"]}),
    "tiny-sd3": Family("StableDiffusion3Pipeline",
                       {"transformer": "SD3Transformer2DModel", "vae": "AutoencoderKL",
                        "text_encoder": "CLIPTextModelWithProjection", "text_encoder_2": "CLIPTextModelWithProjection",
                        "text_encoder_3": "T5EncoderModel", "tokenizer_3": "T5Tokenizer"},
                       {"transformer": SD3, "text_encoder": CLIP_WITH_PROJECTION,
                        "text_encoder_2": CLIP_WITH_PROJECTION, "text_encoder_3": T5}),
    "tiny-qwen-image": Family("QwenImagePipeline",
                              {"transformer": "QwenImageTransformer2DModel", "vae": "AutoencoderKLQwenImage",
                               "text_encoder": "Qwen2_5_VLForConditionalGeneration", "tokenizer": "Qwen2Tokenizer"},
                              {"transformer": QWEN_IMAGE, "text_encoder": _in("model.language_model.layers.0", QWEN_LM)
                               + ["model.visual.blocks.0.attn.qkv", "model.visual.merger.mlp.0", "lm_head"]}),
    "tiny-z-image": Family("ZImagePipeline",
                           {"transformer": "ZImageTransformer2DModel", "vae": "AutoencoderKL",
                            "text_encoder": "Qwen3Model", "tokenizer": "Qwen2Tokenizer"},
                           {"transformer": Z_IMAGE, "text_encoder": _in("layers.1", QWEN_LM)}),
    "tiny-wan": Family("WanPipeline", _WAN_CLASSES, {"transformer": WAN, "text_encoder": T5}, {"num_frames": 5}),
    "tiny-wan22": Family("WanPipeline", {**_WAN_CLASSES, "transformer_2": "WanTransformer3DModel"},
                         {"transformer": WAN, "transformer_2": WAN, "text_encoder": T5}, {"num_frames": 5}),
}


def _render(pipe, name: str, seed: int = 0, prompt: str = PROMPT) -> np.ndarray:
    out = pipe(prompt=prompt, num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(seed), **FAMILIES[name].call)
    return np.asarray(out.frames if hasattr(out, "frames") else out.images)


def _modules(pipe) -> dict[str, torch.nn.Module]:
    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def _realign(pipe) -> None:
    """safetensors hands out tensors at unaligned addresses, and CPU kernels then take other
    vector paths (differences near 1e-7); fresh copies make outputs comparable bit for bit."""
    for module in _modules(pipe).values():
        for t in itertools.chain(module.parameters(), module.buffers()):
            t.data = t.data.clone()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """(name, pipeline built by its builder at seed 0), one family at a time."""
    return request.param, models.TINY_PIPELINES[request.param](seed=0)


def test_layout(family):
    name, pipe = family
    spec = FAMILIES[name]
    assert type(pipe).__name__ == spec.pipeline
    classes = {k: type(v).__name__ for k, v in pipe.components.items() if v is not None}
    assert {k: classes.get(k) for k in spec.classes} == spec.classes
    for component, paths in spec.paths.items():
        named = dict(getattr(pipe, component).named_modules())
        missing = [p for p in paths if p not in named]
        assert not missing, f"{name}.{component} lacks {missing}"
        kinds = {p: type(named[p]).__name__ for p in paths}
        assert set(kinds.values()) <= {"Linear", "Conv2d", "Conv3d", "Embedding"}, kinds
    if "transformer" in spec.paths:
        width = {k: v for k, v in pipe.transformer.config.items() if k in ("num_attention_heads", "n_heads")}
        assert set(width.values()) == {2}


def test_renders_deterministically(family):
    name, pipe = family
    first = _render(pipe, name)
    expected = (1, 5, 32, 32, 3) if "num_frames" in FAMILIES[name].call else (1, 32, 32, 3)
    assert first.shape == expected and np.isfinite(first).all()
    np.testing.assert_array_equal(_render(pipe, name), first)
    assert not np.array_equal(_render(pipe, name, seed=1), first)
    assert not np.array_equal(_render(pipe, name, prompt="a photo of a dog"), first)  # the text reaches the image


def test_load_pipeline_by_name_rebuilds_the_same_weights(family):
    name, pipe = family
    again = models.load_pipeline(name, seed=0)
    assert type(again) is type(pipe)
    for component, module in _modules(pipe).items():
        assert _state_equal(module, getattr(again, component)), component


def test_save_load_roundtrip(family, tmp_path):
    from diffusers import DiffusionPipeline

    name, pipe = family
    models.save_pipeline(pipe, tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)
    for component, module in _modules(pipe).items():
        assert _state_equal(module, getattr(loaded, component)), component
    for component, tokenizer in pipe.components.items():
        if component.startswith("tokenizer"):
            assert type(getattr(loaded, component)) is type(tokenizer)
            assert getattr(loaded, component)(PROMPT).input_ids == tokenizer(PROMPT).input_ids
            # the CLIP slow-tokenizer files are written for our tiny CLIP tokenizer only
            clip_files = (tmp_path / component / "vocab.json").exists()
            assert clip_files == (type(tokenizer).__name__ == "CLIPTokenizer"), component
    _realign(loaded)
    np.testing.assert_array_equal(_render(loaded, name), _render(pipe, name))


# ------------------------------------------------------------------------------------
# family-specific behaviour
# ------------------------------------------------------------------------------------


def test_wan22_uses_both_experts():
    pipe = models.build_tiny_wan22_pipeline()
    assert pipe.config.boundary_ratio == 0.875
    assert not _state_equal(pipe.transformer, pipe.transformer_2)
    calls = {"transformer": 0, "transformer_2": 0}
    for expert in calls:
        getattr(pipe, expert).register_forward_hook(lambda *_, e=expert: calls.__setitem__(e, calls[e] + 1))
    _render(pipe, "tiny-wan22")
    assert calls["transformer"] > 0 and calls["transformer_2"] > 0, calls


def test_flux_kontext_edits_an_image():
    from PIL import Image

    pipe = models.build_tiny_flux_kontext_pipeline()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    out = pipe(prompt="make it blue", image=image, num_inference_steps=2, height=32, width=32, max_area=32 * 32,
               _auto_resize=False, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 32, 32, 3)
    assert not np.array_equal(out, _render(pipe, "tiny-flux-kontext"))


def test_bfloat16_build():
    pipe = models.build_tiny_flux_pipeline(dtype=torch.bfloat16)
    assert {p.dtype for m in _modules(pipe).values() for p in m.parameters()} == {torch.bfloat16}
    assert np.isfinite(_render(pipe, "tiny-flux")).all()


def test_another_seed_gives_other_weights():
    a, b = models.build_tiny_z_image_pipeline(seed=0), models.build_tiny_z_image_pipeline(seed=1)
    assert all(not _state_equal(m, getattr(b, c)) for c, m in _modules(a).items())


# ------------------------------------------------------------------------------------
# tokenizers
# ------------------------------------------------------------------------------------


def test_t5_tokenizer():
    tokenizer = models.build_t5_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.tokenize("a photo of a dog") == ["▁a", "▁photo", "▁of", "▁a", "▁dog"]
    ids = tokenizer("a red circle").input_ids
    assert ids[-1] == 1 and 2 not in ids and max(ids) < text_encoders.TEXT_VOCAB_SIZE


def test_qwen_tokenizer_splits_qwen_image_template_as_qwen_does():
    pipe = models.build_tiny_qwen_image_pipeline()
    template = pipe.prompt_template_encode
    # Qwen-Image drops this many leading tokens: the template's system turn and "<|im_start|>user\n"
    prefix = template[: template.index("{}")]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    assert len(pipe.tokenizer) <= text_encoders.TEXT_VOCAB_SIZE
    chat = pipe.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=True)
    assert chat == f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"


def test_mistral_tokenizer_chat_template():
    tokenizer = models.build_mistral_tokenizer()
    messages = [[{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                 {"role": "user", "content": [{"type": "text", "text": PROMPT}]}]]
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, padding="max_length",
                                        truncation=True, max_length=32, return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert ids[0] == 1 and tokens[1] == "[SYSTEM_PROMPT]" and "[INST]" in tokens and "[/INST]" in tokens
    assert ids[-1] == 11 and tokenizer.convert_tokens_to_ids("[IMG]") == 10
    assert max(ids) < text_encoders.TEXT_VOCAB_SIZE


# ------------------------------------------------------------------------------------
# Flux at full width
# ------------------------------------------------------------------------------------


def test_flux_width_config_on_meta():
    from diffusers import FluxTransformer2DModel

    config = models.flux_width_transformer_config()
    assert config["num_attention_heads"] * config["attention_head_dim"] == 3072
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    assert sum(p.numel() for p in model.parameters()) == 1_310_154_816
    assert len(model.transformer_blocks) == 2 and len(model.single_transformer_blocks) == 4


def test_build_flux_width_transformer_is_seeded():
    small = {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2}
    a = models.build_flux_width_transformer(seed=3, dtype=torch.bfloat16, **small)
    b = models.build_flux_width_transformer(seed=3, dtype=torch.bfloat16, **small)
    assert a.dtype == torch.bfloat16 and a.config.joint_attention_dim == 4096
    assert _state_equal(a, b)
    assert not _state_equal(a, models.build_flux_width_transformer(seed=4, dtype=torch.bfloat16, **small))
