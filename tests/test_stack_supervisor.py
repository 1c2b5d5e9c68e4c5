"""The orchestrator's supervision and the run's ledger, on real processes and plain data."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from services.stack.accounting import issued_ids, reconcile
from services.stack.faults import FaultError, inject, orchestrator_pid, rss_bytes
from services.stack.processes import Child, StartError
from services.stack.supervisor import PROCESSES_FILE, Supervised, Supervisor, read_pids

pytestmark = pytest.mark.timeout(60)


def sleeper(tmp_path: Path, name: str, code: int | None = None) -> Supervised:
    """A piece that runs until killed, or exits with ``code`` at once."""
    body = "import time; time.sleep(600)" if code is None else f"raise SystemExit({code})"

    def start(again: bool) -> Child:
        return Child.start(name, [sys.executable, "-c", body], log_path=tmp_path / f"{name}.log")

    return Supervised(name, start)


def test_a_killed_piece_is_restarted_and_the_reason_logged(tmp_path: Path) -> None:
    notes: list[str] = []
    sup = Supervisor(tmp_path, notify=notes.append)
    try:
        first = sup.add(sleeper(tmp_path, "svc"))
        assert read_pids(tmp_path) == {"svc": first.pid}
        assert orchestrator_pid(tmp_path) is not None
        first.kill()
        sup.check()
        second = sup.pieces["svc"].child
        assert second is not None and second.pid != first.pid and second.alive()
        assert read_pids(tmp_path) == {"svc": second.pid}
        assert sup.restarts() == {"svc": 1}
        assert sup.reasons() == {"svc": ["exited with code -9"]}
        assert "svc exited with code -9; restarting it (restart 1)" in notes[0]
        log = (tmp_path / "logs" / "supervisor.log").read_text()
        assert "restarting it" in log
    finally:
        for child in sup.children():
            child.stop(1.0)


def test_a_piece_that_keeps_crashing_stops_the_run_with_its_log(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, max_restarts=2, window_s=600.0, notify=lambda _: None)
    sup.add(sleeper(tmp_path, "crasher", code=3))
    with pytest.raises(StartError, match="crasher exited with code 3 after 2 restart"):
        for _ in range(10):
            time.sleep(0.3)
            sup.check()
    assert sup.restarts() == {"crasher": 2}


def test_a_finished_piece_is_done_not_restarted(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, notify=lambda _: None)
    piece = sleeper(tmp_path, "trainer", code=0)
    piece.done_on_success = True
    sup.add(piece).wait(10)
    sup.check()
    assert piece.finished and sup.restarts() == {"trainer": 0}


def test_an_unhealthy_piece_is_restarted_after_the_grace(tmp_path: Path) -> None:
    healthy = {"ok": False}
    piece = sleeper(tmp_path, "svc")
    piece.healthy = lambda: healthy["ok"]
    sup = Supervisor(tmp_path, unhealthy_s=10.0, probe_every_s=0.0, notify=lambda _: None)
    try:
        first = sup.add(piece)
        sup.check(now=100.0)
        sup.check(now=105.0)
        assert piece.child is first  # within the grace
        sup.check(now=111.0)
        assert piece.child is not first and sup.reasons() == {"svc": ["unhealthy for 11 s"]}
        assert not first.alive()
    finally:
        for child in sup.children():
            child.stop(1.0)


def test_faults_reach_only_the_run_of_the_given_orchestrator(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, notify=lambda _: None)
    try:
        child = sup.add(sleeper(tmp_path, "trainer"))
        assert rss_bytes(child.pid) > 0
        mine = orchestrator_pid(tmp_path)
        assert mine is not None
        with pytest.raises(FaultError, match="not from the run"):
            inject(tmp_path, "trainer", mine + 1)
        assert child.alive()
        with pytest.raises(FaultError, match="no reward"):
            inject(tmp_path, "reward", mine)
        hit = inject(tmp_path, "trainer", mine)
        assert hit.pid == child.pid and child.wait(10) == -9
    finally:
        for c in sup.children():
            c.stop(1.0)
    body = json.loads((tmp_path / PROCESSES_FILE).read_text())
    assert set(body) == {"orchestrator", "children"}


def test_the_ledger_accounts_for_every_issued_group() -> None:
    issued = issued_ids("run", 1, 2, dataset_size=3)
    assert issued == ["run:0:0", "run:0:1", "run:0:2", "run:1:0", "run:1:1"]
    lineage = {
        1: {"group_ids": ["run:0:0", "run:0:1"], "stale_dropped_ids": ["run:0:2"]},
        2: {"group_ids": ["run:1:0"], "unscored_ids": []},
    }
    ledger = reconcile(issued, lineage, [("run:1:1", "inference: too long")], [])
    assert ledger.ok and ledger.issued == 5 and ledger.applied == 3
    assert ledger.skipped == {"stale_dropped": 1} and ledger.dead_lettered == 1
    assert ledger.dead_letter_reasons == {"inference": 1}
    # A group in the model twice, and one nowhere: both named.
    lineage[2] = {"group_ids": ["run:1:0", "run:0:0"]}
    ledger = reconcile(issued, lineage, [], [])
    assert not ledger.ok
    assert ledger.applied_twice == ["run:0:0"] and ledger.missing == ["run:1:1"]
    assert ledger.to_json()["missing"] == 1
    # Still unacknowledged on the bus when training ended: outstanding, not missing.
    ledger = reconcile(issued, lineage, [], ["run:1:1"])
    assert ledger.outstanding == 1 and not ledger.missing
