"""LoRA extraction: the best rank-``r`` LoRA of any adapter's effective weight change.

For one layer, ``ΔW = W_eff − W`` (``W_eff`` from :meth:`AdapterLayer.effective_weight`, so
multiplicative adapters such as OFT, BOFT and HRA are covered as well as LoHa and LoKr) is flattened to
``(out, in·kh·kw)`` and truncated by SVD, ``ΔW ≈ U_r S_r V_rᵀ`` (Eckart-Young: the best rank-``r``
approximation in the Frobenius norm). The singular values are split evenly between the factors:

* ``lora_up = U_r · √S_r``: ``(out, r)`` for a Linear, ``(out, r, 1, 1)`` for a Conv2d;
* ``lora_down = √S_r · V_rᵀ``: ``(r, in)`` for a Linear, ``(r, in, kh, kw)`` for a Conv2d (the LoCon
  layout: a k×k conv followed by a 1×1 conv),

with ``alpha = r`` (scale 1). The relative error ``‖ΔW − up·down‖_F / ‖ΔW‖_F`` is measured on the
factors actually returned (0 for a layer whose ΔW is zero).
"""

from __future__ import annotations

import torch
from torch import nn

from .algos.lora import LoRA, LoRAConfig
from .formats.kohya import LayerEntry
from .model import controller_for


def _svd(flat: torch.Tensor):
    try:
        return torch.linalg.svd(flat, full_matrices=False)
    except RuntimeError:  # rare non-convergence in float32: retry wider
        u, s, vh = torch.linalg.svd(flat.double(), full_matrices=False)
        return u.to(flat.dtype), s.to(flat.dtype), vh.to(flat.dtype)


@torch.no_grad()
def extract_lora(delta_weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(lora_down, lora_up, relative error)`` of the rank-``rank`` truncated SVD of ``delta_weight``.

    ``delta_weight`` is ``(out, in)`` or ``(out, in, kh, kw)``; the rank is capped at
    ``min(out, in·kh·kw)`` (the returned factors tell the rank used). Computed in float32 (float64 if
    given float64) on the tensor's device.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if delta_weight.dim() not in (2, 4):
        raise ValueError(f"delta_weight must be 2-D (Linear) or 4-D (Conv2d), got shape {tuple(delta_weight.shape)}")
    dtype = torch.float64 if delta_weight.dtype == torch.float64 else torch.float32
    flat = delta_weight.detach().reshape(delta_weight.shape[0], -1).to(dtype)
    if not torch.isfinite(flat).all():
        raise ValueError("delta_weight has NaN/Inf values")
    out_dim, in_dim = flat.shape
    r = min(rank, out_dim, in_dim)
    u, s, vh = _svd(flat)
    root = s[:r].sqrt()
    up = u[:, :r] * root
    down = root[:, None] * vh[:r]
    norm = torch.linalg.matrix_norm(flat)
    error = 0.0 if norm == 0 else float(torch.linalg.matrix_norm(flat - up @ down) / norm)
    if delta_weight.dim() == 4:
        down = down.reshape(r, *delta_weight.shape[1:])
        up = up.reshape(out_dim, r, 1, 1)
    return down.contiguous(), up.contiguous(), error


def layer_delta(layer, adapter_name: str) -> torch.Tensor:
    """``W_eff − W`` of one adapter on one :class:`~lycoris_lite.layer.AdapterLayer` (float32 or wider),
    at the adapter's current scale, from the original (unmerged) weight."""
    with torch.no_grad():
        return layer.effective_weight([adapter_name]) - layer.effective_weight([])


def adapter_to_lora(components: dict[str, nn.Module], adapter_name: str, rank: int, progress=None
                    ) -> tuple[dict[str, dict[str, LayerEntry]], dict[str, dict[str, float]]]:
    """A rank-``rank`` LoRA of adapter ``adapter_name`` on every layer that carries it.

    Returns ``({component: {module path: LayerEntry}}, {component: {module path: relative error}})``;
    the entries can be attached with :func:`attach_entries` and written by ``files.save_adapter``.
    ``progress(component, path, error)`` is called after each layer.
    """
    entries: dict[str, dict[str, LayerEntry]] = {}
    errors: dict[str, dict[str, float]] = {}
    for component, model in components.items():
        ctrl = controller_for(model, create=False)
        if ctrl is None or adapter_name not in ctrl.configs:
            continue
        for path, layer in ctrl.layers():
            if adapter_name not in layer.adapters:
                continue
            down, up, error = extract_lora(layer_delta(layer, adapter_name), rank)
            tensors = {"lora_down": down.float(), "lora_up": up.float()}
            r = down.shape[0]
            settings = LoRA.settings_from_tensors(layer.spec, tensors, float(r), path)
            entries.setdefault(component, {})[path] = LayerEntry(LoRA, settings, tensors)
            errors.setdefault(component, {})[path] = error
            if progress is not None:
                progress(component, path, error)
    if not entries:
        raise ValueError(f"no adapter named {adapter_name!r} on these components")
    return entries, errors


def attach_entries(components: dict[str, nn.Module], adapter_name: str, entries: dict[str, dict[str, LayerEntry]],
                   config_class=LoRAConfig, activate: bool = False) -> None:
    """Attach per-layer entries as adapter ``adapter_name`` (validated on every component first)."""
    plans = {c: {p: (e.algorithm, e.settings, e.tensors) for p, e in layers.items()} for c, layers in entries.items()}
    controllers = {c: controller_for(components[c]) for c in plans}
    for c, plan in plans.items():
        controllers[c].check_plan(adapter_name, plan)
    for c, plan in plans.items():
        ranks = sorted({e.settings["r"] for e in entries[c].values() if "r" in e.settings})
        fields = {"target_modules": sorted(plan)}
        if ranks:
            fields["r"] = ranks[-1]
        controllers[c].attach(adapter_name, plan, config_class(**fields), activate=activate)


__all__ = ["adapter_to_lora", "attach_entries", "extract_lora", "layer_delta"]
