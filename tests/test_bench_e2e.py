"""`mapo bench e2e`'s parts: the single-process baseline trains for real, and the figures the
benchmark reports are computed from the records as documented (evaluation time left out)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.benchmarks.baseline import BaselineStep, run_baseline
from services.benchmarks.e2e import accuracy_at, baseline_curve, stack_curve
from tests.fixtures.trainer import trainer_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_baseline_loop_samples_scores_and_trains(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from services.trainer.model import Learner

    config = trainer_config(
        tiny_model_dir,
        tmp_path / "run",
        trainer={"prompts_per_step": 4, "device": "cpu"},
        rollout={"group_size": 4, "max_tokens": 4, "temperature": 1.0},
        task={"dataset": "builtin:arithmetic", "name": "arithmetic"},
        optim={"lr": 1e-2},
    )
    seen: list[BaselineStep] = []
    policy = Learner.build(config)
    history = run_baseline(config, 2, eval_every=1, threads=1, on_step=seen.append, policy=policy)
    assert [h.step for h in history] == [0, 1, 2] and seen == history
    assert [h.completions for h in history] == [0, 16, 16]
    assert all(h.eval_accuracy is not None for h in history)
    assert all(h.generate_s > 0 and h.train_s > 0 for h in history[1:])
    before = load_file(tiny_model_dir / "model.safetensors")
    after = policy.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter changed"


def test_stack_curve_leaves_evaluation_time_out() -> None:
    records = [
        {"step": 1, "time": 101.0, "groups_applied": 2, "compute_s": 0.5},
        {
            "step": 2,
            "time": 111.0,
            "groups_applied": 4,
            "compute_s": 0.5,
            "eval_s": 9.0,
            "eval_accuracy": 0.5,
        },
        {"step": 3, "time": 112.0, "groups_applied": 6, "compute_s": 0.5},
    ]
    curve = stack_curve(
        {"records": records, "start": 100.0, "summary": {"initial_accuracy": 0.25}}, 8
    )
    assert curve["seconds"] == pytest.approx(3.0)
    assert curve["completions"] == 48 and curve["completions_per_s"] == pytest.approx(16.0)
    assert curve["points"] == [(0.0, 0.25), (pytest.approx(2.0), 0.5)]
    assert curve["step_s_median"] == pytest.approx(1.0)


def test_baseline_curve_and_accuracy_at_a_time() -> None:
    history = [
        BaselineStep(0, 0, 0.0, 0.0, 0.0, 0.2),
        BaselineStep(1, 10, 1.0, 1.0, 0.5, None),
        BaselineStep(2, 10, 1.0, 1.0, 0.5, 0.4),
    ]
    curve = baseline_curve(history)
    assert curve["completions_per_s"] == pytest.approx(5.0)
    assert curve["points"] == [(0.0, 0.2), (4.0, 0.4)]
    assert accuracy_at(curve["points"], 3.9) == 0.2 and accuracy_at(curve["points"], 4.0) == 0.4


def test_bench_config_is_what_mapo_up_runs_with_the_benchmarks_steps() -> None:
    import argparse

    from services.benchmarks.e2e import bench_config
    from services.core.config import load_config
    from services.stack.up import demo_config_path

    args = argparse.Namespace(config=None, overrides=["optim.lr=1e-4"], steps=7, eval_every=3)
    config = bench_config(args)
    demo = load_config(demo_config_path())
    assert (config.trainer.steps, config.trainer.eval_every, config.optim.lr) == (7, 3, 1e-4)
    assert config.rollout == demo.rollout and config.algorithm == demo.algorithm
