"""Faults injected into a running ``mapo up``: SIGKILL to one of its pieces, as a crash or an
out-of-memory kill would do it.

The victims are read from the run's ``processes.json`` (:mod:`services.stack.supervisor`), and
only when it names the orchestrator the caller started: a fault never reaches a process of
another run. Every piece leads its own process group, so an inference replica dies together
with its engine process, and the reward service with its verifier workers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.stack.supervisor import PROCESSES_FILE, read_pids

#: The faults one can inject, in the order a round of them takes.
FAULTS = ("trainer", "replica", "reward", "redis")


class FaultError(RuntimeError):
    """The fault could not be injected (no such piece, or not this orchestrator's run)."""


@dataclass(frozen=True)
class Injected:
    fault: str
    name: str
    pid: int
    at: float


def _victim(fault: str, pids: dict[str, int]) -> tuple[str, int] | None:
    if fault == "replica":
        names = sorted(n for n in pids if n.startswith("inference "))
        return (names[0], pids[names[0]]) if names else None
    name = {"trainer": "trainer", "reward": "reward service", "redis": "redis"}.get(fault)
    if name is None:
        raise FaultError(f"unknown fault {fault!r}; one of {', '.join(FAULTS)}")
    return (name, pids[name]) if name in pids else None


def orchestrator_pid(run_dir: Path) -> int | None:
    """The PID of the ``mapo up`` that wrote ``processes.json``."""
    import json

    try:
        body = json.loads((run_dir / PROCESSES_FILE).read_text())
        return int(body["orchestrator"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def inject(run_dir: Path, fault: str, orchestrator: int) -> Injected:
    """SIGKILL the piece ``fault`` names, and its process group, in the run of ``orchestrator``."""
    if orchestrator_pid(run_dir) != orchestrator:
        raise FaultError(f"{run_dir / PROCESSES_FILE} is not from the run of PID {orchestrator}")
    found = _victim(fault, read_pids(run_dir))
    if found is None:
        raise FaultError(f"the run in {run_dir} has no {fault} to kill")
    name, pid = found
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        raise FaultError(f"{name} (PID {pid}) is already gone") from None
    return Injected(fault, name, pid, time.time())


def wait_for_new_pid(
    run_dir: Path, name: str, old: int, timeout_s: float, alive: Callable[[], bool]
) -> int:
    """The PID of ``name`` once the orchestrator has started it again."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        pid = read_pids(run_dir).get(name)
        if pid is not None and pid != old:
            return pid
        time.sleep(0.5)
    raise FaultError(f"{name} was not started again within {timeout_s:.0f} s")


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and every process in its group (0 when it is gone)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pid:  # fields: state ppid pgrp ...
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


__all__ = [
    "FAULTS",
    "FaultError",
    "Injected",
    "inject",
    "orchestrator_pid",
    "rss_bytes",
    "wait_for_new_pid",
]
