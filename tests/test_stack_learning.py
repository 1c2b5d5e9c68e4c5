"""The demo learns: `mapo up` with its defaults, from nothing, raises held-out accuracy.

This is what a new user's first `mapo up` does (the demo's 100 RL steps): the supervised warm
start from a freshly built model (nothing is cached between CI runs), then MAPO through the real
stack (private Redis, gRPC reward service, a vLLM replica, the trainer, each its own process),
then the same greedy evaluation on the same 1,000 held-out problems before and after.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.mapo_up_runner import assert_nothing_left, run_mapo_up

#: RL steps of the run (the demo's default): the test budgets work in steps, never in seconds,
#: so a slower machine takes longer but is held to the same bar.
LEARNING_STEPS = 100
#: Minimum rise of held-out accuracy. Both numbers are greedy accuracy on the same 1,000
#: held-out problems; at p ~ 0.45 one measurement has a binomial std of
#: sqrt(0.45 * 0.55 / 1000) = 1.6 points, so a difference of two has a std of at most 2.2 points
#: (less, since the problems are shared). A rise of 8 points is more than 3.5 std of that noise:
#: a run that did not learn passes with a probability below 1e-3.
MIN_GAIN = 0.08
#: Only a hang should ever hit this: several times the slowest run measured (a machine 2.5x
#: slower per step than the one the figures in docs/local-run.md come from, under load).
TIMEOUT_S = 3000


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 120)
def test_mapo_up_with_the_demo_defaults_raises_held_out_accuracy(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run = run_mapo_up(["--run-dir", str(run_dir), "--steps", str(LEARNING_STEPS)], TIMEOUT_S)
    out = run.out
    assert run.returncode == 0, out[-6000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == LEARNING_STEPS and summary["eval_problems"] == 1000
    assert not summary["warmstart_reused"] and summary["warmstart_steps"] > 0
    initial, final = summary["initial_accuracy"], summary["final_accuracy"]
    # The warm start leaves mixed groups for RL to work on.
    assert 0.10 <= initial <= 0.60, summary
    assert final - initial >= MIN_GAIN, (
        f"held-out accuracy went from {initial:.1%} to {final:.1%} "
        f"(need +{MIN_GAIN:.0%} in {LEARNING_STEPS} steps):\n{out[-4000:]}"
    )
    assert (run_dir / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_nothing_left(run)


#: The vision-language demo's RL steps (configs/vl-demo.toml).
VL_STEPS = 60
#: Minimum rise of held-out accuracy on the shapes task's 500 held-out problems (binomial std of
#: one measurement at p ~ 0.5: 2.2 points, of a difference at most 3.2).
VL_MIN_GAIN = 0.10


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 120)
def test_the_vision_language_demo_raises_held_out_accuracy(tmp_path: Path) -> None:
    """`mapo up --config configs/vl-demo.toml`: a tiny Qwen2.5-VL, warm-started on the shapes
    task, learns from its pictures through the whole stack."""
    run_dir = tmp_path / "run"
    args = ["--config", "configs/vl-demo.toml", "--run-dir", str(run_dir)]
    run = run_mapo_up([*args, "--steps", str(VL_STEPS)], TIMEOUT_S)
    out = run.out
    assert run.returncode == 0, out[-6000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == VL_STEPS and summary["eval_problems"] == 500
    initial, final = summary["initial_accuracy"], summary["final_accuracy"]
    assert 0.10 <= initial <= 0.70, summary
    assert final - initial >= VL_MIN_GAIN, (
        f"held-out accuracy went from {initial:.1%} to {final:.1%} "
        f"(need +{VL_MIN_GAIN:.0%} in {VL_STEPS} steps):\n{out[-4000:]}"
    )
    assert_nothing_left(run)
