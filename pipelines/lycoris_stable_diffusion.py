"""A diffusers community pipeline: Stable Diffusion with lycoris-lite adapter methods built in.

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(
        "path/or/hub-id-of-an-sd-1.x-2.x-model",
        custom_pipeline="pipelines/lycoris_stable_diffusion.py",
        trust_remote_code=True,
    )
    pipe.load_adapter("style.safetensors", scale=0.8)   # LoRA, LoHa, LoKr, OFT, BOFT, HRA files
    image = pipe("a photo of sks dog").images[0]

The class is ``StableDiffusionPipeline`` with :class:`lycoris_lite.integrations.pipeline.LycorisPipelineMixin` in front:
``load_adapter``, ``set_adapters``, ``get_active_adapters``, ``list_adapters``, ``fuse_adapters``,
``unfuse_adapters``, ``disable_adapters``, ``enable_adapters``, ``delete_adapters``,
``unload_adapters`` and ``save_adapter``. For SDXL or any other pipeline instance, call
``lycoris_lite.enable(pipe)`` instead.
"""

from diffusers import StableDiffusionPipeline

from lycoris_lite.integrations.pipeline import LycorisPipelineMixin


class LycorisStableDiffusionPipeline(LycorisPipelineMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` whose adapter methods are lycoris-lite's (every algorithm, every file
    format); its components, ``__call__`` and ``save_pretrained`` are diffusers' own."""
