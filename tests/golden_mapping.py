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
* OFT: see :func:`oft_blocks_from_peft`.
* BOFT: see :func:`boft_blocks_from_peft`.
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

from lycoris_lite.algos.boft import butterfly_perm


# ---- PEFT OFT -------------------------------------------------------------------------------------
def skew_from_peft_vector(vec: torch.Tensor, block_size: int) -> torch.Tensor:
    """PEFT's skew matrix: ``U[rows, cols] = vec`` on the strict upper triangle (``triu_indices``
    order), ``Q_p = U − Uᵀ``. ``vec``: ``(n, b(b−1)/2)`` -> ``(n, b, b)``."""
    rows, cols = torch.triu_indices(block_size, block_size, 1)
    upper = torch.zeros(vec.shape[0], block_size, block_size, dtype=vec.dtype)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(1, 2)


def oft_blocks_from_peft(vec: torch.Tensor, block_size: int, cayley_neumann: bool) -> torch.Tensor:
    """Our input-side ``oft_blocks`` ``B`` for PEFT's ``oft_R.weight`` vector.

    PEFT rotates the input, ``x ← x·blockdiag(R_p)``, so ``W'_f = W_f · blockdiag(R_p)ᵀ``; ours
    (``rotation_side="input"``) is ``W'_f = W_f · blockdiag(R)``, hence we need ``R = R_pᵀ``.

    * exact Cayley: ``R_p = (I − Q_p)(I + Q_p)⁻¹`` so ``R_pᵀ = (I + Q_p)(I − Q_p)⁻¹``, which is our
      ``(I − Q)(I + Q)⁻¹`` with ``Q = −Q_p``.
    * Cayley–Neumann: PEFT's series is ``I + 2Q_p + 2Q_p² + … + Q_p^{n−1}`` (a truncation of
      ``(I + Q_p)(I − Q_p)⁻¹``, i.e. of the transpose of its own exact transform); its transpose is
      the same series in ``Q_pᵀ = −Q_p``, which is ours (``I − 2Q + 2Q² − …``) with ``Q = +Q_p``.

    ``Q = B − Bᵀ``, so ``B = Q/2`` gives any wanted skew ``Q``. The sign flip between PEFT's exact
    and Neumann variants is PEFT's (its two variants approximate transposed rotations); ours are
    consistent (the series approximates our exact transform).
    """
    q_p = skew_from_peft_vector(vec, block_size)
    q = q_p if cayley_neumann else -q_p
    return q / 2


# ---- PEFT BOFT ------------------------------------------------------------------------------------
def peft_perm_indices(perm_matrix: torch.Tensor) -> torch.Tensor:
    """PEFT's ``boft_P[i]`` is ``perm2mat(idx)`` with ``P[j, idx[j]] = 1``: returns ``idx``."""
    return perm_matrix.argmax(dim=1)


def boft_blocks_from_peft(boft_r: torch.Tensor, boft_p: torch.Tensor) -> torch.Tensor:
    """Our input-side ``oft_blocks`` ``(m, n, b, b)`` for PEFT's ``boft_R`` and permutations ``boft_P``,
    stage ``i`` of ours from stage ``i`` of PEFT.

    PEFT: ``B_i = P_i · blockdiag(R_i) · P_iᵀ`` with ``R_i = (I − Q_i)(I + Q_i)⁻¹``,
    ``Q_i = ½(A_i − A_iᵀ)`` (``A = boft_R``), and ``(P v)_j = v[idx[j]]``, i.e.
    ``B_i[j, k] = blockdiag(R_i)[idx[j], idx[k]]``; the input is rotated ``x ← x·B`` so the weight
    sees ``B_iᵀ``.

    Ours: stage ``i`` is ``S_i = P'ᵀ · blockdiag(R'_i) · P'`` with our butterfly permutation
    ``perm_i`` (``(P' v)_a = v[perm_i[a]]``), ``R' = (I + Q')(I − Q')⁻¹``, ``Q' = B' − B'ᵀ``, so
    ``blockdiag(R'_i)[a, c] = S_i[perm_i[a], perm_i[c]]``. Setting ``S_i = B_iᵀ`` gives
    ``blockdiag(R'_i)[a, c] = blockdiag(R_iᵀ)[σ(a), σ(c)]`` with ``σ = idx_i ∘ perm_i``. This is block
    diagonal exactly when ``σ`` maps each of our blocks into one of PEFT's (checked here), and
    ``R_iᵀ = (I + Q_i)(I − Q_i)⁻¹`` is our ``R'`` of ``Q_i``; a Cayley transform commutes with a
    permutation similarity, so ``Q'_i = Q_i[σ][:, σ]`` blockwise and ``B' = ½·A_bd[σ][:, σ]``
    (``B' − B'ᵀ = ½(A − Aᵀ)[σ][:, σ]``).

    With one stage (PEFT's CPU fallback) ``idx`` is the identity and ``σ`` is our stage-0
    permutation, which interleaves the two halves of every block (``b = 6``: ``[0, 3, 1, 4, 2, 5]``),
    so the blocks are conjugated by that in-block permutation.
    """
    m, n, b, _ = boft_r.shape
    dim = n * b
    out = torch.empty_like(boft_r)
    for i in range(m):
        idx = peft_perm_indices(boft_p[i])
        sigma = idx[butterfly_perm(dim, b, i)]
        dense = torch.block_diag(*boft_r[i].unbind(0)) / 2
        conj = dense[sigma][:, sigma]
        for k in range(n):
            sl = slice(k * b, (k + 1) * b)
            outside = conj[sl].clone()
            outside[:, sl] = 0
            if outside.abs().max() > 0:
                raise ValueError(f"stage {i}: PEFT's and our butterfly blocks do not line up")
            out[i, k] = conj[sl, sl]
    return out


def boft_rescale_from_peft(boft_s: torch.Tensor) -> torch.Tensor:
    """PEFT ``boft_s``: ``(out, 1)`` (Linear) or ``(1, out)`` (Conv2d), scaling output rows ->
    our ``rescale`` ``(out,)``."""
    return boft_s.detach().flatten()


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
