"""LoRA extraction (``lycoris_lite.tools.svd``, ``lycoris_lite.tools.extract``): one matrix with each
SVD method and rank choice, and a fully fine-tuned model against its base (planted low-rank changes
recovered exactly, full-rank ones reported honestly, changes a LoRA cannot hold listed)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lycoris_lite import LoRAConfig, controller_for, extract_lora
from lycoris_lite.tools.svd import lora_factors, randomized_svd

pytestmark = pytest.mark.usefixtures("one_thread")


def planted(shape, rank, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    flat_in = int(torch.tensor(shape[1:]).prod())
    return (torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, flat_in, generator=g)).reshape(shape)


def measured(delta, down, up) -> float:
    flat = delta.double().flatten(1)
    return float((flat - up.double().flatten(1) @ down.double().flatten(1)).norm() / flat.norm())


def optimal_error(delta, rank) -> float:
    s = torch.linalg.svdvals(delta.double().flatten(1))
    return float(s[rank:].norm() / s.norm())


@pytest.mark.parametrize("method", ["auto", "randomized", "full"])
@pytest.mark.parametrize("shape", [(120, 200), (48, 24, 3, 3)], ids=["linear", "conv3x3"])
def test_a_planted_low_rank_change_is_recovered_exactly(shape, method):
    delta = planted(shape, 6)
    f = lora_factors(delta, 8, method=method)
    assert f.error < 1e-5 and measured(delta, f.down, f.up) < 1e-5
    assert f.down.shape == (8, *shape[1:]) and f.up.shape == ((shape[0], 8) if len(shape) == 2 else (shape[0], 8, 1, 1))
    assert f.method == ("full" if method == "full" else "randomized")  # 2·(8 + 10) ≤ 120 and ≤ 48: cheap enough


def test_a_full_rank_change_reports_its_true_error():
    """Full SVD gives the Eckart-Young error; the randomized one is within 1% of it; both report the
    error of the factors they return."""
    g = torch.Generator().manual_seed(1)
    decay = torch.arange(1, 121, dtype=torch.float32) ** -0.7
    u, _ = torch.linalg.qr(torch.randn(120, 120, generator=g))
    v, _ = torch.linalg.qr(torch.randn(300, 120, generator=g))
    delta = (u * decay) @ v.T  # a decaying, full-rank spectrum: what fine-tunes look like
    best = optimal_error(delta, 10)
    full = lora_factors(delta, 10, method="full")
    fast = lora_factors(delta, 10, method="randomized")
    assert full.error == pytest.approx(best, rel=1e-4) and full.error == pytest.approx(measured(delta, full.down, full.up), rel=1e-5)
    assert fast.error == pytest.approx(measured(delta, fast.down, fast.up), rel=1e-5)
    assert best <= fast.error <= 1.01 * best
    assert 0.3 < best < 0.9  # far from exact: the report must say so


def test_energy_picks_the_smallest_rank_that_keeps_the_fraction():
    g = torch.Generator().manual_seed(2)
    delta = planted((100, 160), 40) * torch.linspace(2, 0.1, 160)[None] + 1e-3 * torch.randn(100, 160, generator=g)
    s = torch.linalg.svdvals(delta.double())
    kept = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
    want = int((kept < 0.9).sum()) + 1
    for method in ("full", "randomized", "auto"):
        f = lora_factors(delta, energy=0.9, method=method)
        assert f.error <= (0.1 ** 0.5) + 1e-6
        assert want <= f.down.shape[0] <= want + 1, method  # Ritz values may need one more
    assert lora_factors(delta, energy=0.9, max_rank=3).down.shape[0] == 3
    exact = lora_factors(planted((30, 50), 7), None)  # neither: the numerical rank
    assert exact.down.shape[0] == 7 and exact.error < 1e-6


def test_randomized_svd_converges_and_says_so():
    delta = planted((200, 150), 5) + 1e-4 * torch.randn(200, 150, generator=torch.Generator().manual_seed(3))
    u, s, vh, converged = randomized_svd(delta, 5)
    assert converged and u.shape == (200, 5) and vh.shape == (5, 150)
    assert torch.allclose(s, torch.linalg.svdvals(delta)[:5], rtol=1e-4)


@pytest.mark.parametrize("kwargs,message", [
    ({"rank": 4, "energy": 0.5}, "not both"), ({"energy": 0.0}, "energy must be"), ({"energy": 1.5}, "energy must be"),
    ({"rank": 0}, "positive integer"), ({"rank": 4, "method": "qr"}, "unknown SVD method"),
    ({"energy": 0.5, "max_rank": 0}, "max_rank must be"),
])
def test_bad_rank_choices(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lora_factors(torch.randn(8, 8), **kwargs)


# ---- a fine-tuned model against its base -------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(40, 60)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.norm = nn.LayerNorm(60)
        self.same = nn.Linear(60, 60)


@pytest.fixture()
def base_and_tuned():
    torch.manual_seed(0)
    base = Net()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.proj.weight.add_(planted((60, 40), 3, seed=1) * 0.01)
        tuned.conv.weight.add_(planted((16, 8, 3, 3), 2, seed=2) * 0.01)
        tuned.grouped.weight.add_(0.01)
        tuned.proj.bias.add_(0.5)
        tuned.norm.weight.mul_(1.1)
    return base, tuned


def test_extract_from_a_fine_tuned_model_recovers_planted_changes(base_and_tuned):
    base, tuned = base_and_tuned
    result = extract_lora(base, tuned, rank=4)  # a model given alone: "transformer" (not a UNet)
    assert set(result.entries["transformer"]) == {"proj", "conv"}  # "same" did not change; grouped convs hold no LoRA
    assert result.max_error < 1e-5 and result.ranks == {"transformer": {"proj": 4, "conv": 4}}
    assert set(result.unrepresented["transformer"]) == {"grouped.weight", "proj.bias", "norm.weight"}
    assert result.unrepresented["transformer"]["norm.weight"] == pytest.approx(0.1, rel=1e-4)
    result.attach(base, "extracted")
    layers = dict(controller_for(base).layers())
    for path in ("proj", "conv"):
        want = getattr(tuned, path).weight.detach().double()
        got = layers[path].effective_weight(["extracted"]).detach().double()
        assert float((got - want).norm() / want.norm()) < 1e-6
    # the tuned model may be a state dict sharing the base's tensors (what the benchmark does)
    controller_for(base).unload()
    state = dict(base.state_dict())
    state["same.weight"] = state["same.weight"] + planted((60, 60), 2, seed=4) * 1e-3
    shared = extract_lora({"unet": base}, {"unet": state}, energy=0.999999)
    assert set(shared.entries["unet"]) == {"same"} and shared.ranks["unet"]["same"] == 2


def test_a_full_rank_fine_tune_is_reported_honestly(base_and_tuned):
    base, tuned = base_and_tuned
    with torch.no_grad():
        tuned.same.weight.add_(torch.randn(60, 60) * 0.01)
    result = extract_lora(base, tuned, rank=4, method="full")
    delta = (tuned.same.weight - base.same.weight).detach()
    assert result.errors["transformer"]["same"] == pytest.approx(optimal_error(delta, 4), rel=1e-4)
    assert result.errors["transformer"]["same"] > 0.5 and result.max_error == result.errors["transformer"]["same"]


def test_extraction_refuses_what_it_cannot_do(base_and_tuned):
    base, tuned = base_and_tuned
    with pytest.raises(ValueError, match="not the base's architecture"):
        extract_lora(base, nn.Sequential(nn.Linear(2, 2)), rank=4)
    other = copy.deepcopy(base)
    other.same = nn.Linear(60, 30)
    with pytest.raises(ValueError, match="other shapes than the base"):
        extract_lora(base, other, rank=4)
    with pytest.raises(ValueError, match="nothing to extract"):
        extract_lora(base, copy.deepcopy(base), rank=4)
    with pytest.raises(ValueError, match="not both"):
        extract_lora(base, tuned, rank=4, energy=0.5)
    controller_for(base).add_adapter("x", LoRAConfig(r=2, target_modules=["proj"]))
    with pytest.raises(ValueError, match="adapters attached"):
        extract_lora(base, tuned, rank=4)
