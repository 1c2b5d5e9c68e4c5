"""The main job end to end: `mapo up` runs every real part as its own process, trains through
the bus, reports, and leaves nothing running.

One run of the real stack (private Redis, gRPC reward service, a vLLM inference replica, the
trainer) from a model built offline, so the run stays short; the demo's warm start is covered by
the unit tests of services/stack.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.mapo_up_runner import assert_nothing_left, run_mapo_up

#: RL steps of the bounded run: enough for several weight versions to reach the replica.
E2E_STEPS = 12
#: The bound on the whole run on 2 CPU cores (services ~1 min, RL ~1 min).
TIMEOUT_S = 420


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 120)
def test_mapo_up_trains_through_the_whole_stack_and_cleans_up(
    tmp_path: Path, tiny_model: Path
) -> None:
    model_dir = tiny_model  # mapo up only reads it: weights go to the run directory
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), "--steps", str(E2E_STEPS)]
    args += ["--set", f"model.path={model_dir}", "--set", "trainer.eval_every=6"]
    run = run_mapo_up(args, TIMEOUT_S)
    out = run.out
    assert run.returncode == 0, out[-6000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("initial_accuracy", "final_accuracy", "steps", "seconds"):
        assert key in summary, summary
    assert summary["steps"] == E2E_STEPS
    assert summary["eval_problems"] >= 500
    assert 0.0 < summary["seconds"] <= run.seconds + 1
    for key in ("initial_accuracy", "final_accuracy"):
        assert 0.0 <= summary[key] <= 1.0 and math.isfinite(summary[key])
    assert "final held-out accuracy" in out  # the summary table
    # Nothing died, and every group issued is accounted for.
    assert set(summary["restarts"].values()) == {0}, summary["restart_reasons"]
    ledger = summary["ledger"]
    assert ledger["missing"] == 0 and ledger["applied_twice"] == 0, ledger
    assert ledger["applied"] >= E2E_STEPS * 32 and ledger["dead_lettered"] == 0, ledger

    # Every step was trained on groups that came through the bus from the replica, scored by
    # the reward service, and the replica followed the published weight versions.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, E2E_STEPS + 1))
    assert all(r["groups"] > 0 and r["response_tokens"] > 0 for r in records)
    assert records[-1]["groups_applied"] >= E2E_STEPS
    assert max(r["staleness_mean"] for r in records) <= 2.0
    assert any(r["version"] > 0 for r in records)

    png = run_dir / "learning_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(r.get("eval_accuracy") is not None for r in records)

    assert_nothing_left(run)
