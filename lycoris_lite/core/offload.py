"""Module-by-module offload seen from the adapters: :func:`offload_hook` tells whether (and how)
a model's weights are offloaded by hooks, :func:`check_not_offloaded` refuses to attach adapters to
such a model (the pipeline takes the hooks off around a load instead).
"""

from __future__ import annotations

from torch import nn

from .targets import submodule, walk_modules


def offload_hook(model: nn.Module) -> str | None:
    """What offloads ``model``'s weights module by module, or None: ``"sequential CPU offload"``
    (accelerate's ``cpu_offload`` / ``enable_sequential_cpu_offload``: hooks that keep each module's
    tensors on the meta device between calls) or ``"group offloading"`` (diffusers'
    ``enable_group_offload``). Whole-model offload (``enable_model_cpu_offload``) moves the model with
    ``.to()`` and is not reported: adapters follow it. Read from the hooks' own attributes."""
    for _, module in walk_modules(model):
        hook = module.__dict__.get("_hf_hook")
        if hook is not None and any(getattr(h, "offload", False) for h in getattr(hook, "hooks", [hook])):
            return "sequential CPU offload"
        registry = module.__dict__.get("_diffusers_hook")
        if registry is not None and "group_offloading" in getattr(registry, "hooks", {}):
            return "group offloading"
    return None


def check_not_offloaded(model: nn.Module, plan: dict) -> None:
    """Refuse to attach to an offloaded model, before anything changes: the offload hooks hold the
    weights elsewhere and know nothing of the adapter tensors (attach first, then offload; the
    pipeline's ``load_adapter`` does that dance itself)."""
    kind = offload_hook(model)
    meta = [n for n in plan if getattr(submodule(model, n), "weight", None) is not None
            and submodule(model, n).weight.is_meta]
    if kind is not None or meta:
        raise RuntimeError(
            f"this model is offloaded ({kind or 'weights on the meta device, e.g. ' + repr(meta[0])}): its weights are "
            "brought in by hooks that know nothing of new adapter tensors. Attach adapters before enabling offload, or "
            "remove the offload hooks first (pipe.load_adapter does this for sequential CPU offload and group "
            "offloading)")
