"""Per-step adapter weights (``set_adapter_schedule``): a step range or a list per step, applied by the
pipeline call through ``callback_on_step_end``, equal to switching the weight by hand between steps,
never recompiling a compiled transformer, and refused clearly where they cannot apply."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lycoris_lite
from lycoris_lite import PRESETS, LoRAConfig, controller_for, models
from lycoris_lite.integrations.schedule import factor_at, normalize_schedule
from lycoris_lite.io.files import save_adapter

STEPS = 4


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    pipe = models.build_tiny_flux_pipeline()
    ctrl = controller_for(pipe.transformer)
    ctrl.add_adapter("a", LoRAConfig(r=4, target_modules=PRESETS["flux-attn-mlp"], init_weights=False),
                     generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # a visible adapter
        for p in ctrl.trainable_parameters(["a"]):
            p.mul_(8.0)
    path = tmp_path_factory.mktemp("schedule") / "a.safetensors"
    save_adapter({"transformer": pipe.transformer}, "a", path)
    return path


@pytest.fixture
def pipe(adapter_file):
    pipe = lycoris_lite.enable(models.build_tiny_flux_pipeline())
    pipe.set_progress_bar_config(disable=True)
    pipe.load_adapter(adapter_file, "a")
    return pipe


def render(pipe, **kwargs) -> np.ndarray:
    return pipe(prompt="a red circle", num_inference_steps=STEPS, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def by_hand(pipe, weights: list[float]) -> np.ndarray:
    """The oracle: the weight of step i set with set_adapters before it runs."""
    def callback(p, step, timestep, callback_kwargs):
        if step + 1 < len(weights):
            p.set_adapters(["a"], [weights[step + 1]])
        return callback_kwargs

    pipe.set_adapters(["a"], [weights[0]])
    try:
        return render(pipe, callback_on_step_end=callback)
    finally:
        pipe.set_adapters(["a"], [1.0])


def test_schedules_are_checked_and_give_one_factor_per_step():
    assert normalize_schedule({"end": 0.5}) == {"start": 0.0, "end": 0.5}
    assert [factor_at({"start": 0.25, "end": 0.75}, i, 4) for i in range(4)] == [0.0, 1.0, 1.0, 0.0]
    assert [factor_at((1.0, 0.5, 0.0), i, 3) for i in range(3)] == [1.0, 0.5, 0.0]
    for bad, message in (({"start": 0.6, "end": 0.2}, "0 <= start < end <= 1"), ({"begin": 0.1}, "'start' and 'end'"),
                         ([], "empty"), ([1.0, float("nan")], "finite number"), ("early", "a schedule is")):
        with pytest.raises(ValueError, match=message):
            normalize_schedule(bad)


@pytest.mark.parametrize("schedule, weights", [({"start": 0.0, "end": 0.5}, [1.0, 1.0, 0.0, 0.0]),
                                               ([1.0, 0.5, 0.25, 0.0], [1.0, 0.5, 0.25, 0.0]),
                                               ({"start": 0.5, "end": 1.0}, [0.0, 0.0, 1.0, 1.0])])
def test_a_schedule_renders_what_switching_the_weight_by_hand_renders(pipe, schedule, weights):
    full = render(pipe)
    expected = by_hand(pipe, weights)
    pipe.set_adapter_schedule("a", schedule)
    calls = []
    got = render(pipe, callback_on_step_end=lambda p, i, t, kw: calls.append(i) or kw)
    assert calls == list(range(STEPS))  # the user's callback still runs
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    assert np.abs(got - full).max() > 1e-3  # the schedule did something
    slots = [layer.adapters["a"] for _, layer in controller_for(pipe.transformer).layers() if "a" in layer.adapters]
    assert all(s.step_factor == 1.0 for s in slots)  # back to 1 after the call
    assert pipe.list_adapters()["a"]["schedule"] == normalize_schedule(schedule)
    pipe.set_adapter_schedule("a", None)
    np.testing.assert_array_equal(render(pipe), full)


def test_schedules_that_cannot_apply_are_refused_before_anything_runs(pipe):
    with pytest.raises(ValueError, match="unknown adapter"):
        pipe.set_adapter_schedule("nope", {"end": 0.5})
    pipe.set_adapter_schedule("a", [1.0, 0.0])
    with pytest.raises(ValueError, match="its schedule has 2 weights, but the call runs 4 steps"):
        render(pipe)
    pipe.set_adapter_schedule("a", {"end": 0.5})
    pipe.fuse_adapters()
    with pytest.raises(ValueError, match="is fused; unfuse it first"):
        render(pipe)
    pipe.unfuse_adapters()
    pipe.delete_adapters("a")
    assert pipe._lycoris.schedules == {}


def test_a_schedule_never_recompiles_a_compiled_transformer(pipe):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    pipe.transformer = torch.compile(pipe.transformer, backend=counter)
    try:
        render(pipe)
        compiled = counter.frame_count
        pipe.set_adapter_schedule("a", [1.0, 0.5, 0.0, 0.0])  # the factor goes to 0 and back to 1 after
        render(pipe)
        render(pipe)
        assert counter.frame_count == compiled
    finally:
        pipe.transformer = pipe.transformer._orig_mod
        torch._dynamo.reset()
