"""Hugging Face PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``).

Keys are ``base_model.model.<module path>.<param>`` with PEFT's parameter names and layouts
(what ``PeftModel.save_pretrained`` writes with PEFT 0.21):

========  ===================================================  ==================================================
PEFT      PEFT tensors (per module)                            ours
========  ===================================================  ==================================================
LORA      ``lora_A.weight`` (r, in[, kh, kw]),                 ``lora_down``, ``lora_up`` (same tensors);
          ``lora_B.weight`` (out, r[, 1, 1])                   scale ``alpha/r`` or ``alpha/√r`` (``use_rslora``)
          ``lora_magnitude_vector`` (out,) / (1, out, 1, 1)    ``dora_scale`` (out, 1[, 1, 1]): DoRA on the
          (``use_dora``)                                       output axis (:mod:`lycoris_lite.algos.dora`)
LOHA      ``hada_w{1,2}_{a,b}``, ``hada_t{1,2}``               the same keys and layouts; scale ``alpha/r``
LOKR      ``lokr_w1[_a|_b]``, ``lokr_w2[_a|_b]``, ``lokr_t2``  the same keys and layouts; PEFT's scale is
                                                               always ``alpha/r`` (kept as the layer's scale)
OFT       ``oft_R.weight`` (n, b(b−1)/2): the strict upper     input-side ``oft_blocks`` ``B = Q/2`` with
          triangle of ``Q_p`` per block (OFTv2, PEFT ≥ 0.16)   ``Q = −Q_p`` (exact Cayley) or ``Q = Q_p``
                                                               (Cayley–Neumann): :func:`oft_blocks_from_peft`
BOFT      ``boft_R`` (m, N, b, b), ``boft_s`` (out, 1) linear  input-side ``oft_blocks`` (m, N, b, b) through
          / (1, out) conv                                      the butterfly permutations
                                                               (:func:`boft_blocks_from_peft`), ``rescale``
HRA       ``hra_u`` (in·kh·kw, r)                              ``hra_u`` unchanged (input side)
========  ===================================================  ==================================================

PEFT rotates the input side only: our output-side OFT/BOFT/HRA (the kohya/LyCORIS convention) cannot be
written as PEFT; nor can DoRA on the input axis or on LoHa/LoKr (PEFT has DoRA for LoRA only). Per-layer ranks and alphas go to ``rank_pattern``/``alpha_pattern`` (escaped full module
paths); everything PEFT holds globally (OFT block size, Cayley–Neumann terms, LoKr factor, HRA
Gram–Schmidt, ...) must agree across a component's layers, or writing raises a clear error.

Reading and writing are pure mappings: :func:`read` (a state dict and a config -> per-layer entries) and
:func:`write` (entries -> a state dict and a config). Nothing here imports PEFT.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ...algos import dora
from ...core.layer import base_module_at
from ...base.layer_kind import LayerSpec
from ...base.registry import get_algorithm
from .kohya import LayerEntry
from .names import adapter_capable_paths
from .safe_io import AdapterFileError, atomic_write, read_state_dict, write_state_dict
from ...algos.boft import butterfly_perm
from ...algos.common import factorization
from ...algos.lora import lora_scale

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
#: the PEFT version whose layouts the writer follows (OFTv2 with the 0.18 Cayley–Neumann series)
PEFT_LAYOUT_VERSION = "0.18.0"

PEFT_TYPES = {"LORA": "lora", "LOHA": "loha", "LOKR": "lokr", "OFT": "oft", "BOFT": "boft", "HRA": "hra"}
OURS_TO_PEFT_TYPE = {v: k for k, v in PEFT_TYPES.items()}
#: PEFT parameter names (after ``<module>.``) per method
PARAM_NAMES = {
    "lora": ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "oft": ("oft_R.weight",),
    "boft": ("boft_R", "boft_s"),
    "hra": ("hra_u",),
}
#: parameter names PEFT writes for features we do not have
UNSUPPORTED_PARAMS = {
    "lora_B.bias": "LoRA bias (lora_bias=True)",
    "lora_embedding_A": "LoRA on embeddings",
    "lora_embedding_B": "LoRA on embeddings",
    "oft_r": "OFT from PEFT < 0.14 (retrain with PEFT >= 0.16, whose OFTv2 layout is oft_R.weight)",
    "oft_s": "OFT from PEFT < 0.14 (retrain with PEFT >= 0.16, whose OFTv2 layout is oft_R.weight)",
}


# ---- module names -------------------------------------------------------------------------------------
def module_paths(model: nn.Module) -> set[str]:
    """Paths of the modules of ``model`` an adapter may sit on (wrapped ones by their original path)."""
    return set(adapter_capable_paths(model))


def resolve_path(paths: set[str], path: str) -> str | None:
    """The live module path for a file's ``path``: as given, or with/without the ``text_model.`` level
    (transformers 5's ``CLIPTextModel`` has none; files written with transformers 4 have it)."""
    for candidate in (path, path.removeprefix("text_model."), "text_model." + path):
        if candidate in paths:
            return candidate
    return None


def pattern_key(path: str) -> str:
    """A ``rank_pattern``/``alpha_pattern`` key matching exactly ``path`` under PEFT's rule
    ``re.match(rf"(.*\\.)?({key})$", name)`` (also when the model adds a prefix such as ``text_model.``)."""
    return re.escape(path)


def pattern_lookup(patterns: dict, names, default):
    """PEFT's lookup (first key with ``(.*\\.)?(key)$`` matching), trying each of ``names`` in turn."""
    for name in names:
        for key, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({key})$", name):
                return value
    return default


def _unique(values, what: str, component: str):
    values = set(values)
    if len(values) > 1:
        raise ValueError(f"{component}: PEFT holds one {what} per adapter, but the layers have {sorted(values, key=str)}")
    return values.pop()


# ---- OFT ---------------------------------------------------------------------------------------------
def skew_from_peft_vector(vec: torch.Tensor, block_size: int) -> torch.Tensor:
    """PEFT's skew matrix: ``U[rows, cols] = vec`` on the strict upper triangle (``triu_indices``
    order), ``Q_p = U − Uᵀ``. ``vec``: ``(n, b(b−1)/2)`` -> ``(n, b, b)``."""
    rows, cols = torch.triu_indices(block_size, block_size, 1)
    upper = torch.zeros(vec.shape[0], block_size, block_size, dtype=vec.dtype, device=vec.device)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(1, 2)


def peft_vector_from_skew(q: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`skew_from_peft_vector`: the strict upper triangle of each block."""
    b = q.shape[-1]
    rows, cols = torch.triu_indices(b, b, 1)
    return q[:, rows, cols]


def oft_blocks_from_peft(vec: torch.Tensor, block_size: int, cayley_neumann: bool) -> torch.Tensor:
    """Our input-side ``oft_blocks`` ``B`` for PEFT's ``oft_R.weight`` vector.

    PEFT rotates the input, ``x ← x·blockdiag(R_p)``, so ``W'_f = W_f · blockdiag(R_p)ᵀ``; ours
    (``rotation_side="input"``) is ``W'_f = W_f · blockdiag(R)``, hence we need ``R = R_pᵀ``.

    * exact Cayley: ``R_p = (I − Q_p)(I + Q_p)⁻¹`` so ``R_pᵀ = (I + Q_p)(I − Q_p)⁻¹``, which is our
      ``(I − Q)(I + Q)⁻¹`` with ``Q = −Q_p``.
    * Cayley–Neumann: PEFT's series is ``I + 2Q_p + 2Q_p² + … + Q_p^{n−1}`` (a truncation of
      ``(I + Q_p)(I − Q_p)⁻¹``, i.e. of the transpose of its own exact transform); its transpose is
      the same series in ``Q_pᵀ = −Q_p``, which is ours (``I − 2Q + 2Q² − …``) with ``Q = +Q_p``.

    ``Q = B − Bᵀ``, so ``B = Q/2`` gives any wanted skew ``Q`` (exactly: ``Q/2 − (−Q/2) = Q`` in
    floating point). The sign flip between PEFT's exact and Neumann variants is PEFT's (its two
    variants approximate transposed rotations); ours are consistent.
    """
    q_p = skew_from_peft_vector(vec, block_size)
    q = q_p if cayley_neumann else -q_p
    return q / 2


def oft_blocks_to_peft(blocks: torch.Tensor, cayley_neumann: bool) -> torch.Tensor:
    """PEFT's ``oft_R.weight`` for our input-side ``oft_blocks``: the inverse of
    :func:`oft_blocks_from_peft` (``Q_p = ∓(B − Bᵀ)``, upper triangle)."""
    q = blocks - blocks.transpose(-1, -2)
    return peft_vector_from_skew(q if cayley_neumann else -q)


def oft_block_size_from_vector(length: int) -> int:
    """``b`` with ``b(b−1)/2 = length`` (``ValueError`` if there is none)."""
    b = (1 + math.isqrt(1 + 8 * length)) // 2
    if b * (b - 1) // 2 != length:
        raise ValueError(f"an OFT vector of length {length} is not the upper triangle of a square block")
    return b


def peft_coft_project(vec: torch.Tensor, block_size: int, eps: float) -> torch.Tensor:
    """PEFT's COFT projection (``OFTRotationModule._project_batch``), which PEFT applies to its parameter
    in place before every use: each block's skew matrix is pulled onto the Frobenius ball of radius
    ``eps/√n``. Idempotent, so applying it once at load gives PEFT's forward."""
    q = skew_from_peft_vector(vec, block_size)
    radius = eps / math.sqrt(q.shape[0])
    norm = torch.linalg.matrix_norm(q, keepdim=True)
    q = torch.where(norm <= radius, q, radius * (q / norm))
    return peft_vector_from_skew(q)


# ---- BOFT --------------------------------------------------------------------------------------------
def peft_butterfly_perm(dim: int, block_num: int, block_size: int, stages: int, stage: int) -> torch.Tensor:
    """PEFT's stage-``stage`` permutation indices ``idx`` (its ``boft_P[stage]`` is ``perm2mat(idx)``,
    ``P[j, idx[j]] = 1``): ``BOFTLayer.block_butterfly_perm(dim, N / 2^stage, b / 2, m − 1)``."""
    if stages <= 1:
        return torch.arange(dim)
    blocks = int(block_num / (2**stage))
    r = int(block_size / 2)
    if blocks * r * 2 > dim:
        raise ValueError("Invalid number of blocks!")
    size = dim // blocks
    step = size / r
    order = torch.arange(size)
    sorted_order = torch.empty(size, dtype=torch.long)
    sequence = torch.cat((torch.arange(0, step, 2), torch.arange(1, step, 2)))
    for i, pos in enumerate(sequence):
        sorted_order[int(i * r): int(i * r + r)] = order[int(pos * r): int(pos * r + r)]
    indices = torch.arange(dim)
    for start in range(0, dim, size):
        indices[start:start + size] = indices[start:start + size][sorted_order]
    return indices


def peft_perm_indices(perm_matrix: torch.Tensor) -> torch.Tensor:
    """PEFT's ``boft_P[i]`` is ``perm2mat(idx)`` with ``P[j, idx[j]] = 1``: returns ``idx``."""
    return perm_matrix.argmax(dim=1)


def _boft_block_maps(stages: int, block_num: int, block_size: int, perms=None):
    """Per stage ``(blk, loc)``: our block ``k`` is PEFT's block ``blk[k]`` with its rows/columns
    ``loc[k]`` (see :func:`boft_blocks_from_peft`)."""
    dim = block_num * block_size
    maps = []
    for i in range(stages):
        if perms is None:
            idx = peft_butterfly_perm(dim, block_num, block_size, stages, i)
        elif isinstance(perms, torch.Tensor) and perms.dim() == 3:
            idx = peft_perm_indices(perms[i])
        else:
            idx = torch.as_tensor(perms[i])
        sigma = idx.cpu()[butterfly_perm(dim, block_size, i)].reshape(block_num, block_size)
        blk = sigma[:, 0] // block_size
        if not bool((sigma // block_size == blk[:, None]).all()) or len(set(blk.tolist())) != block_num:
            raise ValueError(f"stage {i}: PEFT's and our butterfly blocks do not line up")
        maps.append((blk, sigma % block_size))
    return maps


def boft_blocks_from_peft(boft_r: torch.Tensor, perms=None) -> torch.Tensor:
    """Our input-side ``oft_blocks`` ``(m, n, b, b)`` for PEFT's ``boft_R``, stage ``i`` of ours from
    stage ``i`` of PEFT. ``perms``: PEFT's ``boft_P`` matrices ``(m, D, D)`` or index vectors; ``None``
    computes them as PEFT does (:func:`peft_butterfly_perm`).

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
    (``B' − B'ᵀ = ½(A − Aᵀ)[σ][:, σ]``, bitwise PEFT's ``0.5·(A − Aᵀ)`` permuted).

    With one stage (PEFT's CPU fallback) ``idx`` is the identity and ``σ`` is our stage-0
    permutation, which interleaves the two halves of every block (``b = 6``: ``[0, 3, 1, 4, 2, 5]``),
    so the blocks are conjugated by that in-block permutation.
    """
    m, n, b, _ = boft_r.shape
    out = torch.empty_like(boft_r)
    for i, (blk, loc) in enumerate(_boft_block_maps(m, n, b, perms)):
        out[i] = boft_r[i][blk[:, None, None], loc[:, :, None], loc[:, None, :]] / 2
    return out


def boft_blocks_to_peft(blocks: torch.Tensor, perms=None) -> torch.Tensor:
    """PEFT's ``boft_R`` for our input-side ``oft_blocks``: the inverse of :func:`boft_blocks_from_peft`
    (``A_bd[σ(a), σ(c)] = 2·B'_bd[a, c]``; exact both ways)."""
    m, n, b, _ = blocks.shape
    out = torch.empty_like(blocks)
    for i, (blk, loc) in enumerate(_boft_block_maps(m, n, b, perms)):
        out[i][blk[:, None, None], loc[:, :, None], loc[:, None, :]] = blocks[i] * 2
    return out


def boft_rescale_from_peft(boft_s: torch.Tensor) -> torch.Tensor:
    """PEFT ``boft_s``: ``(out, 1)`` (Linear) or ``(1, out)`` (Conv2d), scaling output rows ->
    our ``rescale`` ``(out,)``."""
    return boft_s.detach().flatten()


def boft_rescale_to_peft(rescale: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    return rescale.reshape(1, -1) if spec.is_conv else rescale.reshape(-1, 1)


# ---- DoRA --------------------------------------------------------------------------------------------
def dora_from_peft(magnitude: torch.Tensor, spec: LayerSpec, path: str) -> torch.Tensor:
    """PEFT's ``lora_magnitude_vector`` (``(out,)`` Linear, ``(1, out, 1, 1)`` Conv2d: one norm per output
    channel) -> our ``dora_scale`` ``(out, 1[, 1, 1])``."""
    if magnitude.numel() != spec.out_features:
        raise ValueError(f"layer {path!r}: lora_magnitude_vector has shape {tuple(magnitude.shape)}; the layer has "
                         f"{spec.out_features} outputs")
    return magnitude.reshape(dora.magnitude_shape(spec, "output"))


def dora_to_peft(magnitude: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    return magnitude.reshape(1, -1, 1, 1) if spec.is_conv else magnitude.reshape(-1)


# ---- LoKr --------------------------------------------------------------------------------------------
def peft_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's LoKr ``factorization``: ``(factor, dim // factor)`` unsorted when ``factor`` divides,
    else the most square split (LyCORIS's, which sorts the first case too)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    return factorization(dimension, factor)


def peft_lokr_shapes(spec: LayerSpec, r: int, decompose_both: bool, factor: int, effective: bool) -> dict[str, tuple]:
    """The tensors (key -> shape) PEFT's ``LoKrLayer.update_layer`` creates for a layer."""
    a, b = peft_factorization(spec.out_features, factor)
    c, d = peft_factorization(spec.in_features, factor)
    use_w1 = not (decompose_both and r < max(a, c) / 2)
    use_w2 = not (r < max(b, d) / 2)
    effective = effective and spec.is_conv and spec.kernel_size != (1, 1)
    kh, kw = spec.kernel_size
    shapes = {"lokr_w1": (a, c)} if use_w1 else {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)}
    if use_w2:
        shapes["lokr_w2"] = (b, d, kh, kw) if spec.is_conv else (b, d)
    elif effective:
        shapes.update(lokr_t2=(r, r, kh, kw), lokr_w2_a=(r, b), lokr_w2_b=(r, d))
    else:
        shapes.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d * spec.taps))
    return shapes


# ---- folders -----------------------------------------------------------------------------------------
def is_peft_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def holds_only_adapter_files(path: str | os.PathLike) -> bool:
    """Whether folder ``path`` holds nothing but a PEFT adapter save (flat, or in component subfolders):
    such a folder may be replaced whole by a new save."""
    allowed_files = {CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME, "README.md"}
    for entry in Path(path).iterdir():
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            continue
        if entry.is_file() and not entry.is_symlink() and entry.name in allowed_files:
            continue
        if entry.is_dir() and not entry.is_symlink() and entry.name in ("unet", "text_encoder", "text_encoder_2") and all(
                f.is_file() and not f.is_symlink() and f.name in allowed_files for f in entry.iterdir()):
            continue
        return False
    return True


def read_folder(path: str | os.PathLike, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
    """``(state dict, adapter_config, safetensors header metadata)`` of a PEFT adapter folder."""
    path = Path(path)
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, bad UTF-8, a 5000-digit number
        raise AdapterFileError(f"{path / CONFIG_NAME}: not a readable JSON adapter config "
                               f"({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise AdapterFileError(f"{path / CONFIG_NAME}: no peft_type; not a PEFT adapter config")
    weights = path / WEIGHTS_NAME
    if not weights.is_file() and (path / PICKLE_WEIGHTS_NAME).is_file():
        weights = path / PICKLE_WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    state, metadata = read_state_dict(weights, allow_pickle=allow_pickle)
    return state, config, metadata


def write_folder(path: str | os.PathLike, state: dict[str, torch.Tensor], config: dict,
                 metadata: dict[str, str] | None = None) -> Path:
    """Write ``adapter_model.safetensors`` then ``adapter_config.json`` (each atomically)."""
    path = Path(path)
    write_state_dict(path / WEIGHTS_NAME, state, {"format": "pt", **(metadata or {})})
    text = json.dumps(config, indent=2, sort_keys=True)

    def write_text(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)

    atomic_write(path / CONFIG_NAME, write_text)
    return path


# ---- reading -----------------------------------------------------------------------------------------
def _split(state: dict[str, torch.Tensor], algo: str):
    """``({module: {param: tensor}}, unsupported {key: what}, unknown keys)``."""
    keys = list(state)
    strip = KEY_PREFIX if keys and all(k.startswith(KEY_PREFIX) for k in keys) else ""
    names = PARAM_NAMES[algo]
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unsupported, unknown = {}, []
    for key, value in state.items():
        rest = key[len(strip):]
        for param in names:
            if rest.endswith("." + param):
                modules.setdefault(rest[: -len(param) - 1], {})[param] = value
                break
        else:
            what = next((w for p, w in UNSUPPORTED_PARAMS.items() if f".{p}" in f".{rest}"), None)
            if what:
                unsupported[key] = what
            else:
                unknown.append(key)
    return modules, unsupported, unknown


#: ``adapter_config.json`` fields the reader uses, by the kind of value PEFT writes there
_INTEGER_FIELDS = ("r", "oft_block_size", "num_cayley_neumann_terms", "decompose_factor")
_NUMBER_FIELDS = ("lora_alpha", "alpha", "eps")


def _is_number(value, integral: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return not integral or float(value).is_integer()


def check_config_values(config: dict, component: str, source: str = CONFIG_NAME) -> None:
    """The config's values the reader uses have the types PEFT writes (a ``ValueError`` naming the field
    otherwise, instead of a ``TypeError`` from deep inside). ``source``: where the config was read, for
    the message (diffusers files keep a LoraConfig in their header)."""
    def refuse(key, want):
        raise ValueError(f"{component}: {source} has {key}={config[key]!r}; expected {want}")

    for key in _INTEGER_FIELDS:
        if key in config and not _is_number(config[key], integral=True):
            refuse(key, "an integer")
    for key in _NUMBER_FIELDS:
        if key in config and not _is_number(config[key]):
            refuse(key, "a finite number")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            refuse(key, "a mapping of module-name patterns to numbers")
        for pattern, value in patterns.items():
            if not _is_number(value, integral=key == "rank_pattern"):
                raise ValueError(f"{component}: {source} {key}[{pattern!r}] is {value!r}; expected "
                                 f"{'an integer' if key == 'rank_pattern' else 'a finite number'}")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{component}: {source} {key} key {pattern!r} is not a regular expression "
                                 f"({exc})") from None


def _check_config(config: dict, component: str) -> str:
    check_config_values(config, component)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in PEFT_TYPES:
        raise ValueError(f"{component}: PEFT type {config.get('peft_type')!r} is not supported; "
                         f"supported: {', '.join(PEFT_TYPES)}")
    if config.get("use_dora") and peft_type != "LORA":
        raise ValueError(f"{component}: use_dora=True on a {peft_type} adapter (PEFT has DoRA for LoRA only)")
    if config.get("lora_bias"):
        raise ValueError(f"{component}: LoRA with a trained bias (lora_bias=True) is not supported")
    if config.get("fan_in_fan_out"):
        raise ValueError(f"{component}: fan_in_fan_out=True (transposed Conv1D weights) is not supported")
    if config.get("layer_replication"):
        raise ValueError(f"{component}: layer_replication is not supported")
    if config.get("target_parameters"):
        raise ValueError(f"{component}: target_parameters (adapters on bare parameters) are not supported")
    if peft_type == "OFT" and config.get("use_cayley_neumann", True):
        version = str(config.get("peft_version") or "0.0.0").partition("@")[0]
        parts = tuple(int(p) for p in re.findall(r"\d+", version)[:2]) or (0,)
        if parts < (0, 18):
            warnings.warn(f"{component}: this OFT adapter uses the Cayley–Neumann series and was saved by PEFT "
                          f"{version} (< 0.18), whose series differs slightly; it is read with the current one, "
                          "as PEFT does", stacklevel=3)
    return PEFT_TYPES[peft_type]


def _layer(algo_name: str, spec: LayerSpec, tensors: dict, config: dict, file_path: str, live_path: str):
    """``(settings, our tensors)`` of one PEFT module."""
    algo = get_algorithm(algo_name)
    names = (live_path, file_path)
    if algo_name in ("lora", "loha", "lokr"):
        if algo_name == "lora":
            params = {"lora_down": tensors["lora_A.weight"], "lora_up": tensors["lora_B.weight"]}
            alpha_default = config.get("lora_alpha", 8)
            if config.get("use_dora") or "lora_magnitude_vector" in tensors:
                params[dora.KEY] = dora_from_peft(tensors["lora_magnitude_vector"], spec, live_path)
        else:
            params = dict(tensors)
            alpha_default = config.get("alpha", 8)
        r = int(pattern_lookup(config.get("rank_pattern"), names, config.get("r", 8)))
        alpha = float(pattern_lookup(config.get("alpha_pattern"), names, alpha_default))
        settings = algo.settings_from_tensors(spec, params, alpha, live_path)
        if algo_name == "lokr":
            full = not settings["w1_low_rank"] and not settings["w2_low_rank"]
            if not full and settings["r"] != r:
                raise ValueError(f"layer {live_path!r}: the config gives rank {r}, the tensors rank {settings['r']}")
            settings["r"] = r
        elif settings["r"] != r:
            raise ValueError(f"layer {live_path!r}: the config gives rank {r}, the tensors rank {settings['r']}")
        rslora = algo_name == "lora" and bool(config.get("use_rslora"))
        settings["alpha"] = alpha
        settings["scale"] = alpha / (math.sqrt(r) if rslora else r)
        return settings, params
    if algo_name == "oft":
        if "oft_R.weight" not in tensors:
            raise KeyError("oft_R.weight")
        vec = tensors["oft_R.weight"]
        if vec.dim() != 2:
            raise ValueError(f"layer {live_path!r}: oft_R.weight has shape {tuple(vec.shape)}, expected (blocks, b(b-1)/2)")
        dim = spec.flat_in
        b = oft_block_size_from_vector(vec.shape[1]) if vec.shape[1] else 1
        shared = bool(config.get("block_share"))
        if dim % b or (shared and vec.shape[0] != 1) or (not shared and vec.shape[0] * b != dim):
            raise ValueError(f"layer {live_path!r}: oft_R.weight {tuple(vec.shape)} (block size {b}) does not fit "
                             f"the input dimension {dim}")
        if config.get("coft"):
            vec = peft_coft_project(vec, b, float(config.get("eps", 6e-5)))
        neumann = bool(config.get("use_cayley_neumann", True))
        blocks = oft_blocks_from_peft(vec, b, neumann)
        if shared:
            blocks = blocks.expand(dim // b, b, b).clone()
        params = {"oft_blocks": blocks}
        settings = algo.settings_from_tensors(spec, params, 0.0, live_path, "input")
        settings["neumann_terms"] = int(config.get("num_cayley_neumann_terms", 5)) if neumann else 0
        return settings, params
    if algo_name == "boft":
        boft_r, boft_s = tensors["boft_R"], tensors["boft_s"]
        if boft_r.dim() != 4 or boft_r.shape[2] != boft_r.shape[3]:
            raise ValueError(f"layer {live_path!r}: boft_R has shape {tuple(boft_r.shape)}, expected (m, N, b, b)")
        m, n, b, _ = boft_r.shape
        if n * b != spec.flat_in:
            raise ValueError(f"layer {live_path!r}: BOFT blocks {tuple(boft_r.shape)} do not fit the input dimension {spec.flat_in}")
        if b % 2:
            raise ValueError(f"layer {live_path!r}: BOFT with an odd block size ({b}) is not supported (ours needs even blocks)")
        if spec.flat_in % (2 ** (m - 1) * b):
            raise ValueError(f"layer {live_path!r}: {m} butterfly stages of {b}-blocks do not fit the input dimension {spec.flat_in}")
        params = {"oft_blocks": boft_blocks_from_peft(boft_r)}
        rescale = boft_rescale_from_peft(boft_s)
        if rescale.numel() != spec.out_features:
            raise ValueError(f"layer {live_path!r}: boft_s has {rescale.numel()} entries, the layer {spec.out_features} outputs")
        if not bool((rescale == 1).all()):
            params["rescale"] = rescale
        settings = algo.settings_from_tensors(spec, params, 0.0, live_path, "input")
        return settings, params
    # hra
    params = {"hra_u": tensors["hra_u"]}
    settings = algo.settings_from_tensors(spec, params, None, live_path, "input", bool(config.get("apply_GS")))
    return settings, params


def read(state: dict[str, torch.Tensor], config: dict, model: nn.Module, component: str = "unet",
         strict: bool = True) -> tuple[dict[str, LayerEntry], list[str]]:
    """Map one PEFT adapter (state dict + ``adapter_config.json`` dict) onto ``model``.

    Returns ``({module path: LayerEntry}, skipped keys)``; every problem raises ``ValueError`` before
    anything is attached (``strict=False`` skips unknown modules and keys instead).
    """
    algo_name = _check_config(config, component)
    modules, unsupported, unknown = _split(state, algo_name)
    if unsupported:
        key, what = next(iter(unsupported.items()))
        raise ValueError(f"{component}: {what} is not supported (key {key!r})")
    if config.get("bias") not in (None, "none") and any(k.endswith(".bias") for k in unknown):
        raise ValueError(f"{component}: trained biases (bias={config['bias']!r}) are not supported; keys "
                         f"{[k for k in unknown if k.endswith('.bias')][:3]}")
    if config.get("modules_to_save") and unknown:
        raise ValueError(f"{component}: modules_to_save {config['modules_to_save']} (fully trained modules) are not "
                         f"supported; keys {unknown[:3]}")
    paths = module_paths(model)
    layers, skipped, missing = {}, list(unknown), []
    for file_path, tensors in modules.items():
        live = resolve_path(paths, file_path)
        if live is None:
            missing.append(file_path)
            skipped += [f"{file_path}.{k}" for k in tensors]
            continue
        spec = LayerSpec.from_module(base_module_at(model, live), live)
        try:
            settings, params = _layer(algo_name, spec, tensors, config, file_path, live)
        except KeyError as exc:
            raise ValueError(f"{component}: layer {live!r} ({algo_name}) is missing the tensor {exc}") from None
        except (IndexError, TypeError, RuntimeError, ZeroDivisionError) as exc:  # tensors of the wrong rank, …
            raise ValueError(f"{component}: layer {live!r} ({algo_name}): its tensors "
                             f"{({k: tuple(v.shape) for k, v in tensors.items()})} do not form a {algo_name} adapter "
                             f"({type(exc).__name__}: {exc})") from None
        layers[live] = LayerEntry(get_algorithm(algo_name), settings, params)
    if strict and (missing or unknown):
        parts = []
        if missing:
            targets = config.get("target_modules")
            parts.append(f"{len(missing)} module(s) of this PEFT adapter (target_modules={targets!r}) are not in the "
                         f"{component} ({type(model).__name__}): {sorted(missing)[:8]}")
        if unknown:
            parts.append(f"keys that are not {algo_name} tensors: {sorted(unknown)[:8]}")
        raise ValueError(f"{component}: " + "; ".join(parts) + " (strict=False loads the rest and returns the skipped keys)")
    if not layers:
        raise ValueError(f"{component}: the PEFT adapter has no tensors for this model")
    return layers, skipped


def our_config(config: dict, layers: dict[str, LayerEntry]):
    """Our config describing a PEFT adapter read with :func:`read` (best effort; the per-layer
    settings are what the layers use)."""
    algo_name = PEFT_TYPES[str(config["peft_type"]).upper()]
    cls = get_algorithm(algo_name).config_class
    fields: dict = {"target_modules": sorted(layers)}
    g = config.get
    if algo_name == "lora":
        fields.update(r=g("r", 8), alpha=g("lora_alpha", 8), use_rslora=bool(g("use_rslora")), use_dora=bool(g("use_dora")),
                      rank_pattern=g("rank_pattern") or {}, alpha_pattern=g("alpha_pattern") or {})
    elif algo_name in ("loha", "lokr"):
        fields.update(r=g("r", 8), alpha=g("alpha", 8), use_tucker=bool(g("use_effective_conv2d")),
                      rank_pattern=g("rank_pattern") or {}, alpha_pattern=g("alpha_pattern") or {})
        if algo_name == "lokr":
            fields.update(factor=g("decompose_factor", -1), decompose_both=bool(g("decompose_both")))
    elif algo_name == "oft":
        fields.update(r=g("r", 0) or 0, block_size=g("oft_block_size", 32) or 0, rotation_side="input",
                      use_cayley_neumann=bool(g("use_cayley_neumann", True)),
                      num_cayley_neumann_terms=max(int(g("num_cayley_neumann_terms", 5)), 2))
    elif algo_name == "boft":
        first = next(iter(layers.values())).settings
        fields.update(block_size=first["block_size"], butterfly_factor=first["stages"], rotation_side="input",
                      rescale=any("rescale" in e.tensors for e in layers.values()))
    else:
        fields.update(r=g("r", 8), apply_GS=bool(g("apply_GS")), rotation_side="input")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(**fields)
    except (TypeError, ValueError):
        return cls(target_modules=sorted(layers), **({"rotation_side": "input"} if algo_name in ("oft", "boft", "hra") else {}))


# ---- writing -----------------------------------------------------------------------------------------
def _lora_alphas(layers: dict[str, LayerEntry]) -> tuple[bool, dict[str, float]]:
    """``(use_rslora, {path: alpha})`` reproducing every layer's scale under PEFT's rule."""
    def fits(entry, rslora):
        s = entry.settings
        return lora_scale(s["alpha"], s["r"], rslora) == s["scale"]

    entries = list(layers.values())
    rslora = not all(fits(e, False) for e in entries) and all(fits(e, True) for e in entries)
    alphas = {}
    for path, e in layers.items():
        s = e.settings
        alphas[path] = float(s["alpha"]) if fits(e, rslora) else float(s["scale"]) * (math.sqrt(s["r"]) if rslora else s["r"])
    return rslora, alphas


def _patterns(values: dict[str, float | int], cast=float):
    common = Counter(values.values()).most_common(1)[0][0]
    return cast(common), {pattern_key(p): cast(v) for p, v in values.items() if v != common}


def _require_input_side(component, path, settings, algo_name):
    if settings.get("side") != "input":
        raise ValueError(f"{component}: layer {path!r} has an output-side {algo_name.upper()} (the kohya/LyCORIS "
                         f"convention); PEFT rotates the input side only, so it cannot be written as PEFT. Save it "
                         f"with format='kohya', or train with rotation_side='input'")


def _require_no_dora(component, layers, algo_name):
    path = next((p for p, e in layers.items() if e.settings.get("dora")), None)
    if path is not None:
        raise ValueError(f"{component}: layer {path!r} is a {algo_name.upper()} with DoRA (LyCORIS's weight_decompose); "
                         f"PEFT's {algo_name.upper()} has no DoRA. Save it with format='kohya'")


def _lokr_config(component: str, layers: dict[str, LayerEntry], model: nn.Module) -> dict:
    specs = {p: LayerSpec.from_module(base_module_at(model, p), p) for p in layers}
    decompose_both = any(e.settings["w1_low_rank"] for e in layers.values())
    effective = any(e.settings["tucker"] for e in layers.values())
    candidates = [-1] + sorted({e.settings["shape"][k] for e in layers.values() for k in (0, 2)})
    factor = None
    for f in candidates:
        if all((peft_factorization(specs[p].out_features, f), peft_factorization(specs[p].in_features, f))
               == (tuple(e.settings["shape"][:2]), tuple(e.settings["shape"][2:])) for p, e in layers.items()):
            factor = f
            break
    if factor is None:
        raise ValueError(f"{component}: no PEFT decompose_factor reproduces these LoKr factor shapes (PEFT does not "
                         "sort (factor, dim // factor) when factor > √dim); use factor=-1 or factor ≤ √dim")
    ranks, alphas = {}, {}
    for path, e in layers.items():
        s, spec = e.settings, specs[path]
        a, b, c, d = s["shape"]
        if s["w2_low_rank"]:
            options = [s["r"]]
        elif s["w1_low_rank"]:
            options = [e.tensors["lokr_w1_a"].shape[1]]
        else:
            options = [s["r"], max(b, d), max(a, b, c, d)]
        want = {k: tuple(v.shape) for k, v in e.tensors.items()}
        r_p = next((r for r in options if peft_lokr_shapes(spec, r, decompose_both, factor, effective) == want), None)
        if r_p is None:
            raise ValueError(f"{component}: layer {path!r}: PEFT's LoKr rules (decompose_both={decompose_both}, "
                             f"use_effective_conv2d={effective}) give other tensors than {want}")
        ranks[path] = r_p
        alphas[path] = float(s["alpha"]) if r_p == s["r"] and s["alpha"] / r_p == s["scale"] else float(s["scale"]) * r_p
    r, rank_pattern = _patterns(ranks, int)
    alpha, alpha_pattern = _patterns(alphas)
    return {"r": r, "alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
            "decompose_both": decompose_both, "decompose_factor": factor, "use_effective_conv2d": effective,
            "rank_dropout": 0.0, "module_dropout": 0.0, "rank_dropout_scale": False, "init_weights": True}


def _rotation_blocks_config(component, layers, size_key, num_key):
    sizes = {e.settings["block_size"] for e in layers.values()}
    nums = {e.settings["block_num"] for e in layers.values()}
    if len(sizes) == 1:
        return {size_key: sizes.pop(), num_key: 0}
    if len(nums) == 1:
        return {size_key: 0, num_key: nums.pop()}
    raise ValueError(f"{component}: PEFT holds one block size or one number of blocks per adapter; these layers have "
                     f"block sizes {sorted(sizes)} and block numbers {sorted(nums)}")


def write(layers: dict[str, LayerEntry], model: nn.Module, component: str = "unet",
          dtype: torch.dtype | None = None, peft_version: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Per-layer entries of one component -> ``(state dict, adapter_config dict)`` in PEFT's layout.

    Raises ``ValueError`` (nothing written) when the adapter cannot be expressed exactly as PEFT.
    """
    algos = {e.algorithm.name for e in layers.values()}
    if len(algos) != 1:
        raise ValueError(f"{component}: a PEFT adapter holds one method; this one mixes {sorted(algos)}")
    algo_name = algos.pop()
    state: dict[str, torch.Tensor] = {}
    specs = {p: LayerSpec.from_module(base_module_at(model, p), p) for p in layers}

    def put(path, key, value):
        value = value.detach()
        state[f"{KEY_PREFIX}{path}.{key}"] = value.to(dtype) if dtype is not None and value.is_floating_point() else value

    config: dict = {}
    if algo_name == "lora":
        for path, e in layers.items():
            if e.settings.get("tucker") or "lora_mid" in e.tensors:
                raise ValueError(f"{component}: layer {path!r} is a Tucker LoRA (lora_mid), which PEFT's LoRA cannot hold")
            put(path, "lora_A.weight", e.tensors["lora_down"])
            put(path, "lora_B.weight", e.tensors["lora_up"])
        axes = _unique({e.settings.get("dora") for e in layers.values()}, "use_dora setting (DoRA on every layer or none)",
                       component)
        if axes == "input":
            raise ValueError(f"{component}: DoRA on the input axis (LyCORIS's older dora_scale (1, in)) has no PEFT form; "
                             "PEFT normalises per output channel. Save it with format='kohya'")
        for path, e in layers.items():
            if axes:
                put(path, "lora_magnitude_vector", dora_to_peft(e.tensors[dora.KEY], specs[path]))
        rslora, alphas = _lora_alphas(layers)
        r, rank_pattern = _patterns({p: e.settings["r"] for p, e in layers.items()}, int)
        alpha, alpha_pattern = _patterns(alphas)
        dropout = Counter(float(e.settings.get("dropout", 0.0)) for e in layers.values()).most_common(1)[0][0]
        config = {"r": r, "lora_alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
                  "use_rslora": rslora, "lora_dropout": dropout, "fan_in_fan_out": False, "use_dora": bool(axes),
                  "lora_bias": False, "init_lora_weights": True}
    elif algo_name == "loha":
        _require_no_dora(component, layers, algo_name)
        for path, e in layers.items():
            for k, v in e.tensors.items():
                put(path, k, v)
        effective = {bool(e.settings["tucker"]) for p, e in layers.items() if specs[p].is_conv and specs[p].taps > 1}
        effective = _unique(effective, "use_effective_conv2d", component) if effective else False
        r, rank_pattern = _patterns({p: e.settings["r"] for p, e in layers.items()}, int)
        alphas = {p: float(e.settings["alpha"]) if e.settings["alpha"] / e.settings["r"] == e.settings["scale"]
                  else float(e.settings["scale"]) * e.settings["r"] for p, e in layers.items()}
        alpha, alpha_pattern = _patterns(alphas)
        config = {"r": r, "alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
                  "use_effective_conv2d": effective, "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True}
    elif algo_name == "lokr":
        _require_no_dora(component, layers, algo_name)
        config = _lokr_config(component, layers, model)
        for path, e in layers.items():
            for k, v in e.tensors.items():
                put(path, k, v)
    elif algo_name == "oft":
        for path, e in layers.items():
            s = e.settings
            _require_input_side(component, path, s, algo_name)
            if s.get("rotation_given"):
                raise ValueError(f"{component}: layer {path!r} holds a legacy LyCORIS rotation (oft_diag); not PEFT")
            if "rescale" in e.tensors:
                raise ValueError(f"{component}: layer {path!r} has an OFT rescale, which PEFT's OFT does not have")
            if s["radius"] > 0:
                raise ValueError(f"{component}: layer {path!r} uses a COFT constraint over all blocks together; PEFT's "
                                 "coft clamps each block, so it cannot be written exactly")
        terms = _unique({e.settings["neumann_terms"] for e in layers.values()}, "Cayley–Neumann setting", component)
        for path, e in layers.items():
            put(path, "oft_R.weight", oft_blocks_to_peft(e.tensors["oft_blocks"], terms > 0))
        blocks = _rotation_blocks_config(component, layers, "oft_block_size", "r")
        config = {**blocks, "use_cayley_neumann": terms > 0, "num_cayley_neumann_terms": terms if terms > 0 else 5,
                  "coft": False, "eps": 6e-5, "block_share": False, "module_dropout": 0.0, "fan_in_fan_out": False,
                  "init_weights": True}
    elif algo_name == "boft":
        for path, e in layers.items():
            s = e.settings
            _require_input_side(component, path, s, algo_name)
            if s["radius"] > 0:
                raise ValueError(f"{component}: layer {path!r} uses a COFT constraint, which PEFT's BOFT does not have")
            put(path, "boft_R", boft_blocks_to_peft(e.tensors["oft_blocks"]))
            rescale = e.tensors.get("rescale")
            if rescale is None:
                rescale = torch.ones(specs[path].out_features, dtype=e.tensors["oft_blocks"].dtype)
            put(path, "boft_s", boft_rescale_to_peft(rescale, specs[path]))
        stages = _unique({e.settings["stages"] for e in layers.values()}, "butterfly factor", component)
        blocks = _rotation_blocks_config(component, layers, "boft_block_size", "boft_block_num")
        config = {**blocks, "boft_n_butterfly_factor": stages, "boft_dropout": 0.0, "fan_in_fan_out": False,
                  "init_weights": True}
    elif algo_name == "hra":
        for path, e in layers.items():
            _require_input_side(component, path, e.settings, algo_name)
            put(path, "hra_u", e.tensors["hra_u"])
        r = _unique({e.settings["r"] for e in layers.values()}, "number of reflections r", component)
        gs = _unique({bool(e.settings["apply_gs"]) for e in layers.values()}, "apply_GS", component)
        config = {"r": r, "apply_GS": gs, "init_weights": True}
    else:
        raise ValueError(f"{component}: no PEFT layout for {algo_name!r}")
    config.update({
        "peft_type": OURS_TO_PEFT_TYPE[algo_name], "peft_version": peft_version or PEFT_LAYOUT_VERSION,
        "target_modules": sorted(layers), "exclude_modules": None, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "bias": "none", "task_type": None,
        "base_model_name_or_path": None, "revision": None, "inference_mode": True,
        "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
    })
    return state, config
