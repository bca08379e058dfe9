"""DreamBooth training on the library's adapters (used by ``pipelines/train_dreambooth.py``).

* :mod:`.options`: the trainer's options (diffusers' names, each algorithm's own from the registry,
  ``--config file.toml``), checked before any model is loaded;
* :mod:`.data`: image folders decoded and checked up front, captions, a resumable seeded sample order;
* :mod:`.loss`: per-sample seeded noise, Min-SNR weighting, noise offset, prior preservation, and a
  held-out denoising loss;
* :mod:`.checkpoint`: atomic checkpoint folders (adapter, optimizer, scheduler; no RNG state needed);
* :mod:`.adapters`: attach, read, restore and save the trained adapter with its metadata;
* :mod:`.images`: generated class images and validation images;
* :mod:`.sharding`: what a run sharded by accelerate's FSDP2 does differently (gathers, placement, refusals).
"""

from . import adapters, checkpoint, data, images, loss, options, sharding
from .data import TrainingInputError

__all__ = ["TrainingInputError", "adapters", "checkpoint", "data", "images", "loss", "options", "sharding"]
