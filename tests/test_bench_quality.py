"""``benchmarks/bench_quality.py``: its measures on pictures whose answers are known, the CLIP/DINO route on
tiny random transformers models (offline), and the ``--quick`` run end to end (trainer subprocesses,
tiny-world)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lycoris_lite.models import build_clip_tokenizer, world

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_quality.py"
spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
bench = sys.modules["bench_quality"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
spec.loader.exec_module(bench)

pytestmark = pytest.mark.usefixtures("one_thread")


def scene(colour="yellow", background="blue", position="center", shape="triangle"):
    return world.draw(world.Scene(shape, colour, background, position, 0.2, (0.0, 0.0), False))


@pytest.fixture(scope="module")
def feature_models(tmp_path_factory):
    """A tiny random ``CLIPModel`` + ``CLIPProcessor`` and a tiny random ``ViTModel`` + ``ViTImageProcessor``,
    saved as the folders ``--clip`` and ``--dino`` take."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, ViTConfig, ViTImageProcessor,
                              ViTModel)

    folder = tmp_path_factory.mktemp("features")
    tokenizer = build_clip_tokenizer()
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    clip = CLIPConfig(text_config=dict(vocab_size=1000, max_position_embeddings=77, **ids, **small),
                      vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)
    CLIPModel(clip).save_pretrained(folder / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(folder / "clip")
    ViTModel(ViTConfig(image_size=32, patch_size=8, **small)).save_pretrained(folder / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder / "dino")
    return folder / "clip", folder / "dino"


def test_world_scores_read_drawn_scenes_as_requested():
    references = bench.load_references(bench.SAMPLES / "instance", 32)
    prompts = ([bench.Prompt(f"on {bg}", "background", 1, bg) for bg in ("red", "white")]
               + [bench.Prompt(f"a {c}", "colour", 1, c) for c in ("red", "purple")]
               + [bench.Prompt(f"at the {p}", "position", 1, p) for p in bench.POSITIONS])
    ducks = world.on_background(references[:1], "red") + world.on_background(references[:1], "white")
    images = ducks + [scene(colour="red"), scene(colour="purple")] + [scene(position=p) for p in bench.POSITIONS]
    assert bench.subject_colour(references) == "yellow"
    scores = bench.world_scores(bench.by_kind(prompts, images), references)
    assert scores["background"] == scores["colour"] == scores["position"] == 1.0
    assert scores["kept"] == 1.0  # the right background, the duck on it
    yellow_shapes = [scene(background="red", colour="yellow"), scene(background="white", colour="yellow")]
    shapes = bench.world_scores(bench.by_kind(prompts[:2], yellow_shapes), references)
    assert shapes["background"] == 1.0 and shapes["kept"] == 0.0  # the duck's colour is not the duck
    swapped = bench.world_scores(bench.by_kind(prompts[:2], ducks[::-1]), references)
    assert swapped["background"] == 0.0 and swapped["kept"] == 0.0


def test_diversity_is_zero_for_copies_and_grows_with_difference():
    same = bench.diversity([scene()] * 3, appearance=True)
    assert same == {"div_px": 0.0, "div_a": pytest.approx(0.0, abs=1e-6)}
    moved = bench.diversity([scene(), scene(position="left")], appearance=True)
    recoloured = bench.diversity([scene(), scene(colour="red", shape="circle")], appearance=True)
    assert moved["div_px"] > 0 and moved["div_a"] < 0.05  # appearance ignores where the object is
    assert recoloured["div_a"] > 0.5
    assert bench.cosine_distance(np.zeros(3), np.ones(3)) == 1.0


def test_leave_one_out_scores_each_photo_against_the_others():
    references = bench.load_references(bench.SAMPLES / "instance", 32)
    scores = bench.leave_one_out(references)
    assert len(scores) == len(references) == 12
    expected = world.subject_similarity(references[2:3], references[:2] + references[3:])[0]
    assert scores[2] == pytest.approx(expected)
    shapes = world.subject_similarity([scene(shape=s) for s in world.SHAPES], references)
    assert scores.min() > shapes.max()  # the drawn photos stand apart from the world's yellow shapes


def test_clip_and_dino_scores_on_tiny_random_models(feature_models):
    clip_path, dino_path = feature_models
    scorers = {"clip": bench.ClipScorer(str(clip_path)), "dino": bench.DinoScorer(str(dino_path))}
    references = [scene(), scene(colour="red"), scene(background="white")]
    features = {name: s.image_features(references) for name, s in scorers.items()}
    for f in features.values():
        assert torch.allclose(f.norm(dim=-1), torch.ones(len(references)), atol=1e-5)
    prompts = [bench.Prompt("a photo of sks duck", "subject", 3),
               bench.Prompt("a photo of sks duck on a red background", "background", 1, "red")]
    groups = bench.by_kind(prompts, references + [scene(background="red")])
    scores = bench.feature_scores(groups, features, scorers, "sks")
    subject = references + [scene(background="red")]
    expected_dino = (scorers["dino"].image_features(subject) @ features["dino"].T).mean()
    assert scores["dino"] == pytest.approx(float(expected_dino), abs=1e-5)
    text = scorers["clip"].text_features(["a photo of duck on a red background"])
    image = scorers["clip"].image_features([scene(background="red")])
    assert scores["clip_t"] == pytest.approx(float(image @ text.T), abs=1e-5)
    assert -1 <= scores["clip_i"] <= 1 and 0 <= scores["div_dino"] <= 2
    row = bench.instance_row(references, features, world_model=False)
    assert set(row) == {"div_px", "clip_i", "dino", "div_dino"} and row["div_dino"] == pytest.approx(1 - row["dino"])


def test_quick_run_writes_a_sane_table(tmp_path, feature_models):
    clip_path, dino_path = feature_models
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path / "out"),
                           "--json", str(tmp_path / "q.json"), "--markdown", str(tmp_path / "q.md"),
                           "--clip", str(clip_path), "--dino", str(dino_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "q.json").read_text())
    rows = {row["method"]: row for row in result["rows"]}
    assert list(rows) == ["instance photos (leave-one-out)", "base on world captions", "base (no adapter)", "lora",
                          "oft"]
    assert rows["lora"]["params"] == 76_416 and rows["oft"]["params"] == 81_408  # BUDGETS, UNet + text encoder
    for row in result["rows"]:
        for key, metric in row["metrics"].items():
            low = -1.0 if key in ("dino", "clip_i", "clip_t") else 0.0
            high = 2.0 if key == "div_dino" else 1.0
            assert all(low <= v <= high for v in metric["values"]), (row["method"], key, metric)
    for method in ("base (no adapter)", "lora", "oft"):
        assert {"subject", "detected", "background", "kept", "colour", "position", "world", "div_a", "div_px",
                "dino", "clip_i", "clip_t", "div_dino"} <= set(rows[method]["metrics"])
    assert set(rows["base on world captions"]["metrics"]) == {"background", "colour", "position", "world"}
    assert result["subject_colour"] == "yellow"
    assert rows["instance photos (leave-one-out)"]["metrics"]["detected"]["values"] == [1.0]
    assert len(result["weights"]) == 12 and result["runs"][0]["train_s"] > 0
    table = (tmp_path / "q.md").read_text()
    assert table.startswith("| method | params | subject sim ↑ | duck detected ↑ | DINO ↑ | CLIP-I ↑ |")
    assert all(f"| {method} |" in table for method in rows) and f"Weights: {result['weights']}." in table
    assert (tmp_path / "out" / "base.png").is_file() and (tmp_path / "out" / "lora-seed0.png").is_file()
