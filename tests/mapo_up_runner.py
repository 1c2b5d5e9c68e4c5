"""Run `mapo up` as a user would and check that it leaves nothing running (shared by the
end-to-end tests)."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.stack.processes import Child

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class MapoUpRun:
    """The finished command: its exit code, output, wall time and every child it started."""

    returncode: int
    out: str
    seconds: float
    children: frozenset[int]


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


def run_mapo_up(args: list[str], timeout_s: float) -> MapoUpRun:
    """``mapo up ARGS`` with a private Redis and no MAPO__ overrides, like a new user's run;
    fails the test when it does not finish within ``timeout_s``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAPO__")}
    env.pop("REDIS_URL", None)
    cmd = [sys.executable, "-m", "services.cli", "up", *args]
    log = Path(tempfile.mkdtemp(prefix="mapo-up-")) / "mapo-up.log"
    started = time.monotonic()
    up = Child.start("mapo up", cmd, log_path=log, env=env, cwd=REPO)
    # Record the stack's children while it runs, to check afterwards that all of them are gone.
    seen: set[int] = set()
    while up.alive() and time.monotonic() - started < timeout_s:
        seen.update(_children_of(up.pid))
        time.sleep(1.0)
    if up.alive():
        up.stop(grace_s=60)
        out = log.read_text(errors="replace")
        pytest.fail(f"mapo up did not finish in {timeout_s:.0f} s:\n{out[-6000:]}")
    out = log.read_text(errors="replace")
    return MapoUpRun(up.wait(), out, time.monotonic() - started, frozenset(seen))


def assert_nothing_left(run: MapoUpRun, grace_s: float = 10.0) -> None:
    """Nothing the stack started survives it: each child leads its own session, so anything
    still in one of those sessions (the child or what it spawned) is a leftover."""
    assert run.children, "mapo up started no child processes"
    deadline = time.monotonic() + grace_s
    leftovers = [q for p in run.children for q in _pids_in_session_of(p)]
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.2)
        leftovers = [q for p in run.children for q in _pids_in_session_of(p)]
    assert not leftovers, f"processes left running after mapo up: {leftovers}"
