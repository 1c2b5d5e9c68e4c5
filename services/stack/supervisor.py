"""Keeps a run's services alive: a piece that dies or stays unhealthy is started again.

``mapo up`` starts Redis, the reward service, the inference replicas and the trainer as
children. Each is registered here with how to start it and how to tell it is healthy; every
:meth:`Supervisor.check` restarts one that exited (or, for a service, that failed its probe
for ``unhealthy_s``), with the reason written to the run's ``logs/supervisor.log`` and shown
on the status line. A piece that needs more than ``max_restarts`` restarts within
``window_s`` is crashing in a loop: the run stops there, with its log tail. The trainer is restarted with
``--resume``, so it continues from its newest checkpoint; a trainer that exits with 0 is done.

The PIDs of the current children are kept in ``processes.json`` of the run directory, so a
person (or a fault-injection test) can see which process is which.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.stack.processes import Child, StartError

PROCESSES_FILE = "processes.json"


@dataclass
class Supervised:
    """One piece of the run: how to start it, how to probe it, what happened to it."""

    name: str
    start: Callable[[bool], Child]
    """Start the piece; the argument says whether this is a restart."""
    healthy: Callable[[], bool] | None = None
    """Probe of a running piece (None: alive is healthy)."""
    done_on_success: bool = False
    """An exit with code 0 means the piece finished (the trainer), not that it died."""
    child: Child | None = None
    restarts: int = 0
    reasons: list[str] = field(default_factory=list)
    restarted_at: list[float] = field(default_factory=list)
    unhealthy_since: float | None = None
    finished: bool = False


class Supervisor:
    """Restarts what died; raises :class:`StartError` when a piece is beyond its retries."""

    def __init__(
        self,
        run_dir: Path,
        *,
        max_restarts: int = 3,
        window_s: float = 600.0,
        unhealthy_s: float = 120.0,
        probe_every_s: float = 5.0,
        notify: Callable[[str], None] = print,
    ) -> None:
        self.run_dir = run_dir
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.unhealthy_s = unhealthy_s
        self.probe_every_s = probe_every_s
        self.notify = notify
        self.pieces: dict[str, Supervised] = {}
        self._last_probe = 0.0
        self.log_path = run_dir / "logs" / "supervisor.log"

    def add(self, piece: Supervised) -> Child:
        """Register ``piece`` and start it."""
        self.pieces[piece.name] = piece
        piece.child = piece.start(False)
        self._write_pids()
        return piece.child

    def restarts(self) -> dict[str, int]:
        return {name: p.restarts for name, p in self.pieces.items()}

    def reasons(self) -> dict[str, list[str]]:
        return {name: list(p.reasons) for name, p in self.pieces.items() if p.reasons}

    def check(self, now: float | None = None) -> None:
        """Restart each piece that exited, or that has failed its probe for too long."""
        now = time.monotonic() if now is None else now
        probe = now - self._last_probe >= self.probe_every_s
        if probe:
            self._last_probe = now
        for piece in self.pieces.values():
            child = piece.child
            if child is None or piece.finished:
                continue
            code = child.returncode()
            if code is not None:
                if code == 0 and piece.done_on_success:
                    piece.finished = True
                    continue
                self.restart(piece, f"exited with code {code}")
                continue
            if not probe or piece.healthy is None:
                continue
            if piece.healthy():
                piece.unhealthy_since = None
            elif piece.unhealthy_since is None:
                piece.unhealthy_since = now
            elif now - piece.unhealthy_since >= self.unhealthy_s:
                self.restart(piece, f"unhealthy for {now - piece.unhealthy_since:.0f} s")

    def restart(self, piece: Supervised, why: str) -> None:
        """Stop what is left of ``piece`` and start it again; StartError past the retries."""
        old = piece.child
        tail = old.tail(40) if old is not None else ""
        now = time.monotonic()
        recent = [t for t in piece.restarted_at if now - t < self.window_s]
        if len(recent) >= self.max_restarts:
            self._log(
                f"{piece.name} {why}; not restarted: {len(recent)} restarts in the last "
                f"{self.window_s:.0f} s"
            )
            raise StartError(
                f"{piece.name} {why} after {len(recent)} restart(s) in {self.window_s:.0f} s",
                fix=f"see {old.log_path if old else self.log_path}",
                log=tail,
            )
        if old is not None:
            old.stop(grace_s=10.0)
        piece.restarts += 1
        piece.restarted_at = [*recent, now]
        piece.reasons.append(why)
        piece.unhealthy_since = None
        self._log(f"{piece.name} {why}; restarting it (restart {piece.restarts})")
        piece.child = piece.start(True)
        self._write_pids()

    def children(self) -> list[Child]:
        return [p.child for p in self.pieces.values() if p.child is not None]

    def _log(self, line: str) -> None:
        self.notify(line)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with self.log_path.open("a", encoding="utf-8") as f:
            f.write(f"{stamp} {line}\n")

    def _write_pids(self) -> None:
        pids = {n: p.child.pid for n, p in self.pieces.items() if p.child is not None}
        tmp = self.run_dir / f".{PROCESSES_FILE}.tmp"
        tmp.write_text(json.dumps({"orchestrator": os.getpid(), "children": pids}, indent=1))
        tmp.replace(self.run_dir / PROCESSES_FILE)


def read_pids(run_dir: Path) -> dict[str, int]:
    """The children's PIDs written by a running ``mapo up`` ({} when there are none yet)."""
    try:
        body = json.loads((run_dir / PROCESSES_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    children = body.get("children", {}) if isinstance(body, dict) else {}
    return {str(k): int(v) for k, v in children.items() if isinstance(v, int)}


__all__ = ["PROCESSES_FILE", "Supervised", "Supervisor", "read_pids"]
