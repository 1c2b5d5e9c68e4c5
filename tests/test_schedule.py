"""Learning-rate schedules: shapes, end points, and that a resumed run sees the same rates."""

from __future__ import annotations

import itertools
import math

import pytest

from services.core.config import RunConfig
from services.core.schedule import lr_at


def test_constant_is_the_base_rate_after_warmup() -> None:
    rates = [lr_at(s, 10, 1e-3, "constant", warmup_steps=3) for s in range(10)]
    assert rates[:3] == pytest.approx([2.5e-4, 5e-4, 7.5e-4])
    assert rates[3:] == [1e-3] * 7


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decays_reach_the_floor_at_the_last_step(schedule: str) -> None:
    rates = [lr_at(s, 101, 2e-3, schedule, min_lr_ratio=0.1) for s in range(101)]  # type: ignore[arg-type]
    assert rates[0] == pytest.approx(2e-3)
    assert rates[-1] == pytest.approx(2e-4)
    assert all(a >= b for a, b in itertools.pairwise(rates))
    # Past the end: the final rate, not a rise or a negative rate.
    assert lr_at(500, 101, 2e-3, schedule, min_lr_ratio=0.1) == pytest.approx(2e-4)  # type: ignore[arg-type]


def test_linear_and_cosine_midpoints() -> None:
    assert lr_at(50, 101, 1.0, "linear") == pytest.approx(0.5)
    assert lr_at(50, 101, 1.0, "cosine") == pytest.approx(0.5)
    assert lr_at(25, 101, 1.0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(25, 101, 1.0, "linear") == pytest.approx(0.75)


def test_warmup_then_decay_starts_at_the_base_rate() -> None:
    assert lr_at(4, 20, 1.0, "linear", warmup_steps=5) == pytest.approx(5 / 6)
    assert lr_at(5, 20, 1.0, "linear", warmup_steps=5) == pytest.approx(1.0)
    assert lr_at(19, 20, 1.0, "linear", warmup_steps=5) == pytest.approx(0.0)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(0, 10, 1e-3, "step")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative"):
        lr_at(-1, 10, 1e-3)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        lr_at(0, 10, 1e-3, "linear", min_lr_ratio=2.0)


def test_config_bounds() -> None:
    cfg = RunConfig.model_validate({"optim": {"schedule": "cosine", "warmup_steps": 5}})
    assert cfg.optim.schedule == "cosine" and cfg.optim.min_lr_ratio == 0.0
    with pytest.raises(ValueError):
        RunConfig.model_validate({"optim": {"schedule": "exponential"}})
    with pytest.raises(ValueError):
        RunConfig.model_validate({"optim": {"min_lr_ratio": 1.5}})


def test_the_trainer_sets_the_scheduled_rate_on_its_optimiser(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from services.models.tiny import build_model
    from services.trainer.model import Learner

    model = build_model(tmp_path / "m", "tiny", 0)
    cfg = RunConfig.model_validate(
        {
            "model": {"path": str(model)},
            "optim": {"lr": 1e-3, "schedule": "linear", "min_lr_ratio": 0.5},
            "trainer": {"steps": 11, "device": "cpu"},
        }
    )
    policy = Learner.build(cfg)
    assert policy.set_step(0) == pytest.approx(1e-3)
    assert policy.set_step(10) == pytest.approx(5e-4)
    assert all(g["lr"] == pytest.approx(5e-4) for g in policy.optimizer.param_groups)
