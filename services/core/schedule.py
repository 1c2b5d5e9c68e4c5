"""Learning-rate schedules as pure functions of the step.

The trainer sets the rate before every step from the step number alone, so a run resumed from a
checkpoint continues on exactly the curve it would have followed without the interruption, and
there is no scheduler state to save.
"""

from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["constant", "linear", "cosine"]
SCHEDULES: tuple[Schedule, ...] = ("constant", "linear", "cosine")


def lr_at(
    step: int,
    total_steps: int,
    base_lr: float,
    schedule: Schedule = "constant",
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> float:
    """The rate for optimiser step ``step`` (0-based) of a run of ``total_steps``.

    Linear warm-up from ``base_lr / (warmup_steps + 1)`` to ``base_lr`` over the first
    ``warmup_steps`` steps, then ``constant``, or a ``linear`` / ``cosine`` decay that reaches
    ``min_lr_ratio * base_lr`` at the last step. Steps past the end keep the final rate.
    """
    if step < 0 or total_steps < 0 or warmup_steps < 0:
        raise ValueError(f"negative step counts: step={step} total={total_steps}")
    if base_lr <= 0.0 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(
            f"need base_lr > 0 and 0 <= min_lr_ratio <= 1, got {base_lr}, {min_lr_ratio}"
        )
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return base_lr * (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return base_lr
    span = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    shape = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * shape)
