"""Sharded training: what the trainer does differently when accelerate shards the denoiser with FSDP2.

With an accelerate config of ``distributed_type: FSDP`` and ``fsdp_version: 2``
(``pipelines/accelerate_fsdp.yaml``), ``accelerator.prepare(model, optimizer)`` shards the model in place
with torch's ``fully_shard``: one unit per block class the model lists in ``_no_split_modules`` (Flux:
``FluxTransformerBlock``, ``FluxSingleTransformerBlock``; SD3: ``JointTransformerBlock``) and one at the
root. Every parameter, the frozen base's and the adapter's alike, becomes a ``DTensor`` holding this
process's rows (dim 0); a forward gathers a unit's weights just before it runs and frees them after.
FSDP2 keeps ``requires_grad`` per parameter, so a block's frozen base and its trained adapter share a
unit: only the adapter gets gradients (reduce-scattered across processes, the data-parallel mean) and
optimizer state, both sharded. What follows from that here:

* **Whole where it is read.** The adapter file and a checkpoint hold whole tensors, gathered by every
  process (a collective: a process that skips it hangs the others) and written by the main one:
  :func:`whole_adapter`, :func:`optimizer_state`. Resuming scatters them back (:func:`like`,
  :func:`load_optimizer_state`). The frozen base is never gathered whole.
* **Validation** renders on every process (each forward gathers shards); the main one writes the images.
* **Placement.** The denoiser stays on the CPU until ``prepare`` moves it to the device one unit at a
  time as shards (:func:`place`), so a model larger than one device's memory never lands there whole.
* **What a sharded run refuses** (:func:`check`), before anything is written: FSDP1, a quantized base, a
  trained text encoder, 8-bit Adam, HRA's penalty, class images still to render, and a checkpoint of a run
  sharded otherwise.

accelerate applies FSDP on accelerator devices only: on a CPU machine ``accelerate launch`` with an FSDP
config starts plain data-parallel processes (every process holds the whole model); :func:`check` says so.
"""

from __future__ import annotations

import functools
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

try:  # FSDP2's public API: torch >= 2.6, which accelerate's FSDP2 requires too; an unsharded run never uses it
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # an older torch, or a build without torch.distributed: no tensor is a DTensor
    DTensor = ()

from ...core.controller import AdapterController
from .data import TrainingInputError, image_files

#: option -> why a sharded run cannot take it
REFUSED = {
    "base_quantization": "a quantized base is not sharded (bitsandbytes' packed 4-bit weights and torchao's "
                         "quantized tensors do not split into FSDP2's DTensor shards: accelerate leaves 4-bit ones "
                         "whole on every process); quantizing and sharding are two ways to fit a model, use one",
    "train_text_encoder": "accelerate's FSDP2 prepares one model with its optimizer, and the text encoder would be "
                          "a second model",
    "use_8bit_adam": "bitsandbytes' 8-bit optimizers do not take FSDP2's DTensor parameters "
                     "(bitsandbytes issues #89, #1633)",
    "regularization_weight": "the penalty is computed from the adapter's parameters outside the model's forward, "
                             "where FSDP2 holds only this process's shards of them",
}


def is_sharded(accelerator) -> bool:
    return accelerator.distributed_type == "FSDP"


def _written_sharded(saved) -> bool:
    """Whether checkpoint ``saved``'s optimizer state is a sharded run's (keyed by parameter name)."""
    return any(isinstance(p, str) for group in saved.optimizer["param_groups"] for p in group["params"])


def check(accelerator, args, saved=None) -> bool:
    """Whether accelerate shards this run (FSDP2). ``TrainingInputError`` for what a sharded run cannot do
    (FSDP1, the options in :data:`REFUSED`) and for a checkpoint ``saved`` written with the other sharding
    (its optimizer state's layout differs); a warning when an FSDP config runs unsharded."""
    sharded = is_sharded(accelerator)
    if saved is not None and _written_sharded(saved) != sharded:
        raise TrainingInputError(f"{saved.path} was written by {'an unsharded' if sharded else 'a sharded (FSDP)'} "
                                 f"run and this run is {'sharded (FSDP)' if sharded else 'not sharded'}: resume it "
                                 "with the accelerate config it was trained with")
    if not sharded:
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and accelerator.num_processes > 1:
            warnings.warn("accelerate applies FSDP on accelerator devices only: these CPU processes train "
                          "data-parallel, each holding the whole model", stacklevel=2)
        return False
    if not getattr(accelerator, "is_fsdp2", False):
        raise TrainingInputError("FSDP1 (fsdp_version: 1) wraps the model in flat parameters this trainer does not "
                                 "read; set fsdp_version: 2 in the accelerate config (pipelines/accelerate_fsdp.yaml)")
    for option, reason in REFUSED.items():
        if getattr(args, option, None):
            raise TrainingInputError(f"--{option} with FSDP: {reason}")
    if args.with_prior_preservation:
        folder = Path(args.class_data_dir)
        found = len(image_files(folder)) if folder.is_dir() else 0
        if found < args.num_class_images:
            raise TrainingInputError(f"--with_prior_preservation with FSDP: {folder} holds {found} of the "
                                     f"{args.num_class_images} class images and a sharded run does not render them "
                                     "(its denoiser reaches the devices as shards only); render them first with "
                                     "an unsharded run")
    return True


def place(pipe, denoiser: str, device: torch.device, dtype: torch.dtype, sharded: bool) -> None:
    """Move the pipeline to ``device`` (and to ``dtype`` unless float32); a sharded run's denoiser is only
    cast, staying on the CPU for ``accelerator.prepare`` to move as shards."""
    kwargs = {"dtype": dtype} if dtype != torch.float32 else {}
    if not sharded:
        pipe.to(device, **kwargs)
        return
    pipe.to(**kwargs)
    for name, component in pipe.components.items():
        if isinstance(component, nn.Module) and name != denoiser:
            component.to(device)


def prepare(accelerator, *args):
    """``accelerator.prepare(*args)``; a sharded run's model (one, its optimizer with it: FSDP2 swaps the
    optimizer's parameters for the shards) computes as an unsharded run's: FSDP2 casts no parameter (the base
    already has the weight dtype, the adapter keeps float32 and computes in it, as on one device; accelerate's
    policy for ``--mixed_precision bf16`` would hand the adapter to the forward in bf16 and reduce its
    gradients in bf16) and the forward runs under accelerate's autocast, as ``prepare`` wraps an unsharded
    model's forward."""
    if not is_sharded(accelerator):
        return accelerator.prepare(*args)
    accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(output_dtype=torch.float32)
    prepared = accelerator.prepare(*args)
    model = next(obj for obj in prepared if isinstance(obj, nn.Module))
    forward = model.forward

    @functools.wraps(forward)
    def autocast_forward(*inputs, **kwargs):
        with accelerator.autocast():
            return forward(*inputs, **kwargs)

    model.forward = autocast_forward
    return prepared


def like(param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``whole`` laid out as ``param``: this process's shard of it for a sharded parameter (cut locally, every
    process holds ``whole``), ``whole`` itself otherwise."""
    if isinstance(param, DTensor):
        return distribute_tensor(whole.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return whole


@contextmanager
def whole_adapter(controllers: dict[str, AdapterController]) -> Iterator[None]:
    """For the duration, the adapters' sharded parameters are whole on every process (gathered: every process
    enters), so saving reads them as it would on one process; the shards are put back after. An unsharded
    adapter is left as it is. Run no forward inside: the swapped parameters are outside FSDP's reach."""
    swapped = []
    try:
        for ctrl in controllers.values():
            for _, layer in ctrl.layers():
                for module in (m for slot in layer.adapters.values() for m in slot.modules()):
                    for key, param in list(module.named_parameters(recurse=False)):
                        if isinstance(param, DTensor):
                            whole = nn.Parameter(param.detach().full_tensor(), requires_grad=param.requires_grad)
                            setattr(module, key, whole)
                            swapped.append((module, key, param))
        yield
    finally:
        for module, key, param in swapped:
            setattr(module, key, param)


def _optimizer(optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def optimizer_state(model: nn.Module, optimizer, sharded: bool) -> dict:
    """The optimizer's state dict; for a sharded run gathered whole onto the main process (a collective: every
    process calls it; the others get ``{}``) and keyed by parameter name (torch's ``get_optimizer_state_dict``,
    the layout :func:`load_optimizer_state` reads back)."""
    if not sharded:
        return optimizer.state_dict()
    return get_optimizer_state_dict(model, _optimizer(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer, state: dict, sharded: bool) -> None:
    """Restore :func:`optimizer_state` (of a run sharded as this one: :func:`check`), each process taking its
    shards of a sharded run's."""
    if not sharded:
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(model, _optimizer(optimizer), state, options=StateDictOptions(full_state_dict=True))
