"""Per-step weights: an adapter's weight as a function of the denoising step.

A schedule multiplies an adapter's weight at step ``i`` of ``n`` (``i = 0 … n-1``) by a factor:

* ``{"start": a, "end": b}`` (fractions of the run, ``0 ≤ a < b ≤ 1``): 1 while ``a ≤ i / n < b``, else
  0; what "turbo"/sigma-range LoRAs and "only the first 60 % of the steps" ask for;
* a list of numbers, one per step (its length must be the call's ``num_inference_steps``).

:class:`~lycoris_lite.integrations.pipeline.LycorisPipelineMixin` applies the factors in its call, through
the pipeline's ``callback_on_step_end`` (the factor of step ``i + 1`` is set after step ``i``), by writing
each slot's multiplier tensor in place (:attr:`~lycoris_lite.core.slot.AdapterSlot.step_factor`): a
compiled transformer is not recompiled when a factor changes, even to or from 0.
"""

from __future__ import annotations

from contextlib import contextmanager

from .weights import _number


def normalize_schedule(schedule) -> dict | tuple[float, ...]:
    """``schedule`` checked: ``{"start": float, "end": float}`` or a tuple of finite numbers; ``ValueError``
    naming what is wrong otherwise."""
    if isinstance(schedule, dict):
        unknown = set(schedule) - {"start", "end"}
        if unknown:
            raise ValueError(f"a schedule range takes 'start' and 'end' (fractions of the steps); got {sorted(unknown)}")
        start = _number(schedule.get("start", 0.0), "a schedule's start")
        end = _number(schedule.get("end", 1.0), "a schedule's end")
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"a schedule range needs 0 <= start < end <= 1, got start={start}, end={end}")
        return {"start": start, "end": end}
    if isinstance(schedule, (list, tuple)):
        if not schedule:
            raise ValueError("an empty per-step schedule")
        return tuple(_number(v, "a per-step weight") for v in schedule)
    raise ValueError(f"a schedule is {{'start': a, 'end': b}} or a list of per-step weights, got {schedule!r}")


def check_steps(schedule, steps: int, name: str) -> None:
    """A per-step list must have one weight per step of the call."""
    if isinstance(schedule, tuple) and len(schedule) != steps:
        raise ValueError(f"adapter {name!r}: its schedule has {len(schedule)} weights, but the call runs {steps} steps")


def factor_at(schedule, step: int, steps: int) -> float:
    """The factor of ``schedule`` at ``step`` of ``steps``."""
    if isinstance(schedule, tuple):
        return schedule[min(step, len(schedule) - 1)]
    return 1.0 if schedule["start"] <= step / max(steps, 1) < schedule["end"] else 0.0


@contextmanager
def scheduled(kwargs: dict, schedules: dict, slots: dict, params, pipeline: str):
    """The call's ``kwargs`` with a ``callback_on_step_end`` that sets each scheduled adapter's step
    factor (on its ``slots``) for the next step, the user's callback running first; every factor back to
    1 afterwards. ``params``: the pipeline call's signature parameters (``pipeline`` its class name, for
    the error where it takes no step callback)."""
    if not schedules:
        yield kwargs
        return
    if "callback_on_step_end" not in params:
        raise ValueError(f"{pipeline} takes no callback_on_step_end: per-step schedules need it")
    steps = kwargs.get("num_inference_steps", getattr(params.get("num_inference_steps"), "default", None))
    for name, schedule in schedules.items():
        check_steps(schedule, steps, name)

    def set_step(step: int, total: int) -> None:
        for name, schedule in schedules.items():
            factor = factor_at(schedule, step, total)
            for slot in slots[name]:
                if slot.step_factor != factor:
                    slot.step_factor = factor

    user = kwargs.get("callback_on_step_end")
    kwargs = dict(kwargs)
    if user is not None and hasattr(user, "tensor_inputs"):  # diffusers' PipelineCallback objects
        kwargs.setdefault("callback_on_step_end_tensor_inputs", user.tensor_inputs)

    def callback(pipe, step, timestep, callback_kwargs):
        out = user(pipe, step, timestep, callback_kwargs) if user is not None else callback_kwargs
        set_step(step + 1, getattr(pipe, "num_timesteps", None) or steps)
        return out

    kwargs["callback_on_step_end"] = callback
    set_step(0, steps)
    try:
        yield kwargs
    finally:
        for group in slots.values():
            for slot in group:
                slot.step_factor = 1.0


__all__ = ["check_steps", "factor_at", "normalize_schedule", "scheduled"]
