"""Parameter mappings from PEFT's and LyCORIS's adapter tensors to lycoris_lite's (``oft_blocks``,
``lora_down`` … under ``layer.adapters[name]``), used by the golden tests.

Every mapping is written out explicitly, with the maths that justifies it. Notation: rows of ``W``
are output channels; ``W_f`` is the flattened ``(out, in·kh·kw)`` weight; a linear layer computes
``y = x Wᵀ``.

PEFT (installed 0.21.x)
-----------------------
* LoRA: ``lora_A.weight -> lora_down``, ``lora_B.weight -> lora_up`` (same shapes; conv ``lora_A`` is
  ``(r, in, kh, kw)`` with the base stride/padding, ``lora_B`` ``(out, r, 1, 1)``).
  Scale ``alpha/r`` (``alpha/√r`` with rsLoRA) on both sides.
* LoHa / LoKr: same key names (``hada_*``, ``lokr_*``) and layouts, including the effective-conv2d
  (Tucker) ones (``use_effective_conv2d`` == our ``use_tucker``). PEFT's LoKr scale is always
  ``alpha/r``; ours is 1 when both Kronecker factors are full (LyCORIS's rule), so the golden tests
  use configurations where a factor is low-rank (or alpha == r).
* OFT: see :func:`lycoris_lite.algos.oft.oft_blocks_from_peft`.
* BOFT: see :func:`lycoris_lite.algos.boft.boft_blocks_from_peft`.
* HRA: ``hra_u`` unchanged (``(in·kh·kw, r)`` on both sides, ``W' = W · Π(I − 2ûûᵀ)``).

LyCORIS (``lycoris-lora``)
--------------------------
State-dict keys are ours with ``.weight`` dropped (``lora_down.weight -> lora_down``);
``alpha`` is not a tensor of ours (it is a setting); OFT/BOFT ``rescale`` ``(out, 1[, 1, 1])`` is
flattened to ``(out,)``. LyCORIS's OFT ``R_ly = (I + Q)(I − Q)⁻¹`` is applied as ``W' = R_lyᵀ W``
blockwise and ``R_lyᵀ = (I − Q)(I + Q)⁻¹`` is our output-side ``R`` for the same ``Q = B − Bᵀ``, so
``oft_blocks`` copies unchanged; LyCORIS's BOFT uses ``R = (I + Q)(I − Q)⁻¹`` untransposed with the
same butterfly permutation as ours, so it copies unchanged too.
"""

from __future__ import annotations

import torch
from torch import nn

# The PEFT mappings are the library's (each algorithm's PEFT codec uses them); the derivations are in
# their docstrings.
from lycoris_lite.algos.boft import (  # noqa: F401  (re-exported for the tests)
    boft_blocks_from_peft,
    boft_blocks_to_peft,
    boft_rescale_from_peft,
    peft_butterfly_perm,
    peft_perm_indices,
)
from lycoris_lite.algos.oft import oft_blocks_from_peft, oft_blocks_to_peft, skew_from_peft_vector  # noqa: F401


# ---- PEFT: the whole layer ------------------------------------------------------------------------
def peft_tensors(layer, algo: str, adapter: str = "default", *, cayley_neumann: bool = False) -> dict:
    """``{our_key: tensor}`` for adapter ``adapter`` of a PEFT tuner layer."""
    if algo == "lora":
        return {"lora_down": layer.lora_A[adapter].weight, "lora_up": layer.lora_B[adapter].weight}
    if algo in ("loha", "lokr"):
        out = {}
        for key in layer.adapter_layer_names:
            store = getattr(layer, key)
            if adapter in store:
                out[key] = store[adapter]
        return out
    if algo == "oft":
        rot = layer.oft_R[adapter]
        return {"oft_blocks": oft_blocks_from_peft(rot.weight.detach(), rot.block_size, cayley_neumann)}
    if algo == "boft":
        return {
            "oft_blocks": boft_blocks_from_peft(layer.boft_R[adapter].detach(), layer.boft_P),
            "rescale": boft_rescale_from_peft(layer.boft_s[adapter]),
        }
    if algo == "hra":
        return {"hra_u": layer.hra_u[adapter]}
    raise ValueError(algo)


# ---- LyCORIS --------------------------------------------------------------------------------------
def lycoris_tensors(module) -> dict:
    """``{our_key: tensor}`` from a LyCORIS module's state dict (``alpha`` dropped; ``.weight``
    suffixes dropped; ``rescale`` flattened)."""
    out = {}
    for key, value in module.state_dict().items():
        if key == "alpha":
            continue
        key = key.removesuffix(".weight")
        out[key] = value.detach().flatten() if key == "rescale" else value.detach()
    return out


# ---- copying into our layer -----------------------------------------------------------------------
def load_into(layer, tensors: dict, adapter: str = "default") -> None:
    """Copy ``tensors`` into our layer's adapter slot; the key sets must be equal."""
    slot = layer.adapters[adapter]
    ours = dict(slot.named_parameters(recurse=False))
    if set(ours) != set(tensors):
        raise AssertionError(f"key mismatch: ours {sorted(ours)}, given {sorted(tensors)}")
    with torch.no_grad():
        for key, value in tensors.items():
            if tuple(ours[key].shape) != tuple(value.shape):
                raise AssertionError(f"{key}: ours {tuple(ours[key].shape)}, given {tuple(value.shape)}")
            ours[key].copy_(value.detach().to(ours[key].dtype))


def make_base(kind: str, dtype=torch.float64, linear_out: int = 40) -> nn.Module:
    """A test layer with large random weights: Linear(24, linear_out), Conv2d 1x1 or 3x3 (stride 2) 12->16."""
    if kind == "linear":
        layer = nn.Linear(24, linear_out)
    elif kind == "conv1x1":
        layer = nn.Conv2d(12, 16, 1)
    elif kind == "conv3x3":
        layer = nn.Conv2d(12, 16, 3, stride=2, padding=1)
    else:
        raise ValueError(kind)
    with torch.no_grad():
        layer.weight.normal_(0, 0.5)
        layer.bias.normal_(0, 0.5)
    return layer.to(dtype)
