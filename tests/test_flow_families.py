"""The flow-matching objective of every transformer family against the family's own pipeline, and the
trainer on the families beyond Flux.1 / SD3 (Flux.2, Qwen-Image, Z-Image, Wan 2.1) and on Flux.1 / SD3 text
encoders.

The oracle for each family's conventions (conditioning, latent packing and position ids, the time input,
the sign of the prediction) is the pipeline itself: its denoising step hands the scheduler the velocity it
got from the transformer for its latent; :meth:`Family.predict` given the same latent and timestep (turned
into our layout with the pipeline's own unpacking functions) must return that velocity.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import Flux2Pipeline, FluxPipeline, QwenImagePipeline
from safetensors import safe_open

import lycoris_lite
from lycoris_lite.integrations.training import data, flow
from lycoris_lite.models import load_pipeline

from test_train_dreambooth import SAMPLES, run
from test_train_transformers import PROMPT, adapter_file, transformer_args

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE, MAX_LEN = 64, 16


def _flux_layout(x, pipe):
    return FluxPipeline._unpack_latents(x, SIZE, SIZE, pipe.vae_scale_factor)


def _qwen_layout(x, pipe):
    return QwenImagePipeline._unpack_latents(x, SIZE, SIZE, pipe.vae_scale_factor)[:, :, 0]


def _flux2_layout(x, pipe):
    side = SIZE // pipe.vae_scale_factor // 2
    return Flux2Pipeline._unpack_latents_with_ids(x, Flux2Pipeline._prepare_latent_ids(torch.zeros(x.shape[0], 1, side, side)))


#: tiny pipeline -> (the pipeline's latent -> our layout, extra call arguments: no classifier-free guidance)
PIPELINES = {
    "tiny-flux": (_flux_layout, {"guidance_scale": 3.5}),
    "tiny-flux2": (_flux2_layout, {"guidance_scale": 4.0}),
    "tiny-sd3": (lambda x, pipe: x, {"guidance_scale": 1.0}),
    "tiny-qwen-image": (_qwen_layout, {}),
    "tiny-z-image": (lambda x, pipe: x, {"guidance_scale": 0.0}),  # Z-Image guides above 0
    "tiny-wan": (lambda x, pipe: x, {"guidance_scale": 1.0, "num_frames": 1}),
}


@pytest.mark.parametrize("name", list(PIPELINES))
def test_predict_is_the_velocity_the_pipeline_steps_with(name):
    pipe = load_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    family = flow.family_of(pipe)
    to_ours, extra = PIPELINES[name]
    seen = {}
    step = pipe.scheduler.step

    def record(model_output, timestep, sample, *args, **kwargs):
        seen.setdefault("call", (model_output.clone(), timestep, sample.clone()))
        return step(model_output, timestep, sample, *args, **kwargs)

    pipe.scheduler.step = record
    with torch.no_grad():
        pipe(prompt="a photo of sks duck", num_inference_steps=2, height=SIZE, width=SIZE, output_type="latent",
             max_sequence_length=MAX_LEN, generator=torch.Generator().manual_seed(0), **extra)
        velocity, timestep, sample = seen["call"]
        cond = family.batch([family.encode(pipe, "a photo of sks duck", MAX_LEN, "cpu")], "cpu", torch.float32)
        ours = family.predict(pipe.transformer, to_ours(sample, pipe), timestep.reshape(1).float(), cond,
                              extra.get("guidance_scale", 3.5), torch.float32)
    expected = to_ours(velocity, pipe).float()
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_clip_parts_are_the_pipelines_prompt_embeddings(name):
    """The CLIP parts the trainer computes itself (so that a trained encoder gets gradients through
    accelerate's wrapper) assemble into exactly what ``pipe.encode_prompt`` returns."""
    pipe = load_pipeline(name)
    family = flow.family_of(pipe)
    prompts = ["a photo of sks duck", "a duck"]
    with torch.no_grad():
        ours = family.batch([family.encode(pipe, p, MAX_LEN, "cpu") for p in prompts], "cpu", torch.float32)
        if name == "tiny-flux":
            embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=prompts, max_sequence_length=MAX_LEN)
        else:
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=prompts, prompt_3=prompts,
                                                      do_classifier_free_guidance=False, max_sequence_length=MAX_LEN)
    # ours encodes one prompt at a time, the pipeline both at once: equal up to the batch's rounding
    torch.testing.assert_close(ours["embeds"], embeds, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours["pooled"], pooled, rtol=1e-6, atol=1e-6)


def test_qwen_prompts_of_different_lengths_are_padded_and_masked():
    """Qwen-Image's embeddings have each prompt's own length: a batch pads and masks them, and each
    sample's prediction equals the one it gets alone."""
    pipe = load_pipeline("tiny-qwen-image")
    family = flow.family_of(pipe)
    rows = [family.encode(pipe, p, MAX_LEN, "cpu") for p in ("a photo of sks duck on a red background", "a duck")]
    assert rows[0]["embeds"].shape[1] != rows[1]["embeds"].shape[1]
    noisy = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([700.0, 300.0])
    with torch.no_grad():
        both = family.predict(pipe.transformer, noisy, t, family.batch(rows, "cpu", torch.float32), 1.0, torch.float32)
        alone = [family.predict(pipe.transformer, noisy[i:i + 1], t[i:i + 1], family.batch([rows[i]], "cpu", torch.float32),
                                1.0, torch.float32) for i in range(2)]
    torch.testing.assert_close(both, torch.cat(alone), rtol=1e-5, atol=1e-5)


#: the families beyond Flux.1 / SD3, one algorithm each (every algorithm runs on Flux.1 and SD3)
NEW_FAMILIES = {"tiny-flux2": {"algo": "lokr", "rank": 4, "factor": 4}, "tiny-qwen-image": {"algo": "loha", "rank": 4},
                "tiny-z-image": {"algo": "hra", "rank": 4}, "tiny-wan": {"algo": "oft", "block_size": 8}}


def _render(pipe, name):
    pipe.set_progress_bar_config(disable=True)
    extra = PIPELINES[name][1]
    out = pipe(prompt=PROMPT, num_inference_steps=2, height=SIZE, width=SIZE, output_type="np",
               max_sequence_length=MAX_LEN, generator=torch.Generator().manual_seed(0), **extra)
    return torch.from_numpy(out.frames if "num_frames" in extra else out.images)


@pytest.mark.parametrize("name", list(NEW_FAMILIES))
def test_the_family_trains_learns_and_its_file_loads(tmp_path, name):
    """20 steps lower the held-out flow-matching loss on the instance images (the same fixed (noise, σ)
    pairs before and after; deterministic runs, so the direction is the claim: measured after/before 0.9993
    Flux.2 LoKr, 0.964 Qwen-Image LoHa, 0.958 Z-Image HRA, 0.852 Wan OFT; the size of learning against
    run-to-run noise is measured on Flux.1 in ``test_train_transformers.py``), the file records the family and
    loads with ``pipe.load_adapter``, the render changes, and a validation image is written with the family's
    pipeline."""
    pipe = load_pipeline(name)
    family = flow.family_of(pipe)
    examples = data.load_examples(SAMPLES / "instance", PROMPT)
    pixels = torch.stack([data.transform(e.image, SIZE, True, False, torch.Generator()) for e in examples])
    latents = flow.image_latents(family, pipe.vae, pixels, 0, ["instance"] * len(examples), list(range(len(examples))))
    cond = flow.encode_prompts(pipe, family, [PROMPT], MAX_LEN, "cpu")[PROMPT]
    scheduler = family.training_scheduler(pipe)
    before = flow.heldout_loss(pipe.transformer, family, scheduler, latents, cond)
    base = _render(pipe, name)

    settings = {**NEW_FAMILIES[name], "max_train_steps": 20, "learning_rate": 1e-2, "validation_prompt": "sks duck",
                "num_validation_images": 1, "num_inference_steps": 2, "validation_steps": 1000}
    assert run(transformer_args(tmp_path, name, **settings)) == 0
    assert len(list((tmp_path / "validation" / "step_20").glob("*.png"))) == 1
    path = adapter_file(tmp_path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["lycoris_lite.model_classes"]) == {"transformer": family.transformer_class}

    lycoris_lite.enable(pipe)
    pipe.load_adapter(str(path), adapter_name="trained")
    after = flow.heldout_loss(pipe.transformer, family, scheduler, latents, cond)
    assert after < before, (before, after)
    assert not torch.equal(_render(pipe, name), base)


@pytest.mark.parametrize("name,components", [("tiny-flux", ["text_encoder"]), ("tiny-sd3", ["text_encoder", "text_encoder_2"])])
def test_text_encoders_train_with_the_transformer(tmp_path, name, components):
    """``--train_text_encoder`` adapts Flux.1's CLIP-L and SD3's CLIP-L and CLIP-G (as diffusers' scripts):
    their adapters move, the file holds them (``lora_te1_``/``lora_te2_``) and loads on a fresh pipeline,
    where they change the prompt's embeddings."""
    assert run(transformer_args(tmp_path, name, algo="lora", rank=4, train_text_encoder=True, learning_rate=1e-2,
                                max_train_steps=3)) == 0
    path = adapter_file(tmp_path)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    prefixes = {"text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}
    for component in components:
        assert any(k.startswith(prefixes[component]) for k in keys), component
    pipe = load_pipeline(name)
    family = flow.family_of(pipe)
    with torch.no_grad():
        plain = family.encode(pipe, PROMPT, MAX_LEN, "cpu")
        lycoris_lite.enable(pipe)
        pipe.load_adapter(str(path), adapter_name="trained")
        adapted = family.encode(pipe, PROMPT, MAX_LEN, "cpu")
    assert set(pipe.list_adapters()["trained"]["components"]) == {"transformer", *components}
    assert not torch.equal(plain["pooled"], adapted["pooled"])
    assert torch.equal(plain.get("embeds", plain.get("t5")), adapted.get("embeds", adapted.get("t5")))  # T5 untouched


@pytest.mark.parametrize("name,message", [("tiny-qwen-image", "text encoder is not trained"),
                                          ("tiny-wan22", "two experts")])
def test_refusals_before_anything_is_written(tmp_path, name, message, capsys):
    extra = {"train_text_encoder": True} if name == "tiny-qwen-image" else {}
    out = tmp_path / "out"
    assert run(transformer_args(out, name, algo="lora", **extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert run(transformer_args(out, "tiny-flux", algo="lora", resolution=72)) == 2
    assert "multiple of 16" in capsys.readouterr().err
    assert not out.exists()
