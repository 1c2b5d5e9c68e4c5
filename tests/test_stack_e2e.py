"""The main job end to end: `mapo up` runs every real part as its own process, trains through
the bus, reports, and leaves nothing running.

One run of the real stack (private Redis, gRPC reward service, a vLLM inference replica, the
trainer) from a model built offline, so the run stays short; the demo's warm start is covered by
the unit tests of services/stack.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: RL steps of the bounded run: enough for several weight versions to reach the replica.
E2E_STEPS = 12
#: The bound on the whole run on 2 CPU cores (services ~1 min, RL ~1 min).
TIMEOUT_S = 420


def _live_processes() -> list[tuple[int, int, int]]:
    """(pid, parent pid, session id) of every live, non-zombie process, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields: state ppid pgrp session ...
        if fields[0] != "Z":
            found.append((int(entry.name), int(fields[1]), int(fields[3])))
    return found


def _pids_in_session_of(pid: int) -> list[int]:
    """Live processes whose session is ``pid``'s (the stack's children each lead their own)."""
    return [p for p, _parent, session in _live_processes() if session == pid]


def _children_of(pid: int) -> list[int]:
    return [p for p, parent, _session in _live_processes() if parent == pid]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 120)
def test_mapo_up_trains_through_the_whole_stack_and_cleans_up(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    subprocess.run(
        [sys.executable, "-m", "services.cli", "make-model", str(model_dir), "--size", "tiny"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAPO__")}
    env.pop("REDIS_URL", None)  # a private Redis, like a new user's
    cmd = [sys.executable, "-m", "services.cli", "up", "--run-dir", str(run_dir)]
    cmd += ["--steps", str(E2E_STEPS), "--set", f"model.path={model_dir}"]
    cmd += ["--set", "trainer.eval_every=6"]
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    # Record the stack's children while it runs, to check afterwards that all of them are gone.
    seen: set[int] = set()
    while proc.poll() is None and time.monotonic() - started < TIMEOUT_S:
        for child in _children_of(proc.pid):
            seen.add(child)
        time.sleep(1.0)
    if proc.poll() is None:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
        pytest.fail(f"mapo up did not finish in {TIMEOUT_S} s:\n{out[-6000:]}")
    out = proc.communicate()[0]
    seconds = time.monotonic() - started
    assert proc.returncode == 0, out[-6000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("initial_accuracy", "final_accuracy", "steps", "seconds"):
        assert key in summary, summary
    assert summary["steps"] == E2E_STEPS
    assert summary["eval_problems"] >= 500
    assert 0.0 < summary["seconds"] <= seconds + 1
    for key in ("initial_accuracy", "final_accuracy"):
        assert 0.0 <= summary[key] <= 1.0 and math.isfinite(summary[key])
    assert "final held-out accuracy" in out  # the summary table

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

    # Nothing the stack started survives it: each child leads its own session, so anything
    # still in one of those sessions (the child or what it spawned) is a leftover.
    assert seen, "mapo up started no child processes"
    deadline = time.monotonic() + 10
    leftovers = [q for p in seen for q in _pids_in_session_of(p)]
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.2)
        leftovers = [q for p in seen for q in _pids_in_session_of(p)]
    assert not leftovers, f"processes left running after mapo up: {leftovers}"
