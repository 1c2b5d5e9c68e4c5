"""A whole `mapo up` run while its pieces are killed: the run completes and every prompt group
it issued is accounted for.

One real run (private Redis with its append-only file, the gRPC reward service, a vLLM
replica, the trainer) on a model built offline. During training, SIGKILL in turn: the trainer,
the inference replica together with its engine process, the reward service, and Redis. The
orchestrator restarts each (the trainer with --resume, Redis on its port and directory), the
run reaches its step count, and the ledger in summary.json shows every issued group applied
exactly once, skipped on record, dead-lettered with its reason or still outstanding: none
applied twice, none missing.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

from services.stack.faults import FAULTS, inject, orchestrator_pid, wait_for_new_pid
from services.stack.processes import Child
from services.stack.progress import MetricsFollower
from services.stack.supervisor import read_pids
from tests.mapo_up_runner import REPO, MapoUpRun, _children_of, assert_nothing_left

STEPS = 16
#: A fault every this many steps, from this step on (the trainer's first).
FAULT_EVERY = 3
FIRST_FAULT = 2
#: The bound on the whole run on 2 CPU cores: four restarts, one of them an engine's.
TIMEOUT_S = 1500

#: The name each fault's victim has in processes.json.
VICTIM = {
    "trainer": "trainer",
    "replica": "inference replica-0",
    "reward": "reward service",
    "redis": "redis",
}


def _step(follower: MetricsFollower) -> int:
    follower.poll()
    return max([int(r.get("step", 0)) for r in follower.records] + [0])


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 180)
def test_run_completes_and_accounts_for_every_group_while_its_pieces_are_killed(
    tmp_path: Path, tiny_model: Path
) -> None:
    model_dir = tiny_model  # mapo up only reads it: weights go to the run directory
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), "--steps", str(STEPS)]
    for item in (
        f"model.path={model_dir}",
        "trainer.checkpoint_every=2",  # a resumed trainer redoes at most one step
        "trainer.prompts_per_step=16",
        "trainer.in_flight=32",
        "bus.claim_idle_ms=10000",  # a killed replica's prompts come back soon
        "rollout.eval_samples=0",  # the greedy evaluation is enough here
    ):
        args += ["--set", item]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAPO__")}
    env.pop("REDIS_URL", None)
    log = Path(tempfile.mkdtemp(prefix="mapo-up-faults-")) / "mapo-up.log"
    started = time.monotonic()
    up = Child.start(
        "mapo up", [sys.executable, "-m", "services.cli", "up", *args], log_path=log, env=env,
        cwd=REPO,
    )  # fmt: skip
    seen: set[int] = set()
    injected: list[str] = []
    try:
        follower = MetricsFollower(run_dir / "metrics.jsonl")
        pending = list(FAULTS)
        next_at = FIRST_FAULT
        while up.alive() and time.monotonic() - started < TIMEOUT_S:
            seen.update(_children_of(up.pid))
            if pending and _step(follower) >= next_at:
                fault = pending.pop(0)
                assert orchestrator_pid(run_dir) == up.pid
                name = VICTIM[fault]
                old = read_pids(run_dir)[name]
                inject(run_dir, fault, up.pid)
                injected.append(fault)
                wait_for_new_pid(run_dir, name, old, 120.0, up.alive)
                next_at = max(_step(follower), next_at) + FAULT_EVERY
            time.sleep(0.5)
        if up.alive():
            up.stop(grace_s=60)
            pytest.fail(f"mapo up did not finish in {TIMEOUT_S} s:\n{log.read_text()[-6000:]}")
    finally:
        up.stop(grace_s=60)
    run = MapoUpRun(up.wait(), log.read_text(errors="replace"), 0.0, frozenset(seen))
    assert run.returncode == 0, run.out[-8000:]
    assert injected == list(FAULTS), (injected, run.out[-4000:])

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS
    restarts = summary["restarts"]
    for fault in FAULTS:
        assert restarts[VICTIM[fault]] >= 1, (fault, summary["restart_reasons"])
    ledger = summary["ledger"]
    assert ledger["missing"] == 0, ledger
    assert ledger["applied_twice"] == 0, ledger
    accounted = (
        ledger["applied"]
        + sum(ledger["skipped"].values())
        + ledger["dead_lettered"]
        + ledger["outstanding"]
    )
    assert accounted == ledger["issued"], ledger
    assert ledger["applied"] >= STEPS * 16, ledger  # every step trained on a full batch
    supervisor_log = (run_dir / "logs" / "supervisor.log").read_text()
    for fault in FAULTS:
        assert f"{VICTIM[fault]} exited with code" in supervisor_log, supervisor_log
    assert_nothing_left(run)
