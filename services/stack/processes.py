"""Child processes: start with a log file, wait for readiness, stop by PID.

The one way the project starts a process it then waits on (``mapo up``, the benchmarks, the
test fixtures). The caller picks a server's port with :func:`free_port` and passes it in;
readiness is a probe polled against a deadline (:func:`wait_until`), never a line read back
from the log.

Every child gets its own session, so a Ctrl-C reaches only the orchestrator, which then stops
the children in order (trainer first, Redis last) instead of all of them dying at once. On
Linux a child started from the main thread is also told to receive SIGTERM if the orchestrator
itself dies, so a killed run leaves nothing behind. Only processes started here are ever
signalled: a child, and the helpers it spawned into its own process group.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

_PR_SET_PDEATHSIG = 1


class StartError(RuntimeError):
    """A process could not start; carries the fix and the tail of its log."""

    def __init__(self, message: str, *, fix: str = "", log: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix
        self.log = log

    def explain(self) -> str:
        """The message, the fix and the log tail, ready to print for a person."""
        parts = [f"error: {self.message}"]
        if self.fix:
            parts.append(f"how to fix: {self.fix}")
        if self.log:
            parts.append("last lines of its log:\n" + _indent(self.log))
        return "\n".join(parts)

    __str__ = explain


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines())


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` nobody listens on right now, for a server started a moment later.

    Picked below the kernel's ephemeral range: ports from ``bind(0)`` come from the same range
    as the source ports of outgoing connections, so between picking one and the server binding
    it, any client socket on the machine (a service connecting to Redis, say) can take it.
    """
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM when the parent dies (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    """One started process, its log file, and a stop that escalates from SIGTERM to SIGKILL.

    As a context manager it is stopped when the block ends, however it ends.
    """

    def __init__(self, name: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self._terminated = False

    @classmethod
    def start(
        cls,
        name: str,
        args: Sequence[str],
        *,
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        die_with_parent: bool = False,
    ) -> Child:
        """Start ``args`` with stdout and stderr appended to ``log_path``.

        ``die_with_parent`` (Linux): the child gets SIGTERM when the thread that started it
        ends, so a killed orchestrator leaves nothing behind. It needs a hook run between
        fork and exec, so only a single-threaded orchestrator calling from its main thread may
        ask for it: in a process with other threads (gRPC's, a progress bar's), forking with
        such a hook can deadlock inside fork, and ``ValueError`` says so off the main thread.
        """
        if die_with_parent and threading.current_thread() is not threading.main_thread():
            raise ValueError("die_with_parent needs the main thread (the signal follows it)")
        hook = _die_with_parent if die_with_parent and sys.platform.startswith("linux") else None
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=hook,
            )
        return cls(name, proc, log_path)

    def __enter__(self) -> Child:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def returncode(self) -> int | None:
        return self.proc.poll()

    def tail(self, lines: int = 25) -> str:
        """The last ``lines`` lines of its log (empty when there is none)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def wait(self, timeout_s: float | None = None) -> int:
        """Its exit code once it exits (``subprocess.TimeoutExpired`` after ``timeout_s``)."""
        return self.proc.wait(timeout_s)

    def terminate(self) -> None:
        """SIGTERM once, without waiting: a second one would cut a graceful shutdown short,
        so several children can be told together and then stopped one by one."""
        if not self._terminated and self.proc.poll() is None:
            self._terminated = True
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> int:
        """SIGKILL to it and its process group at once, as a crash or an OOM kill would."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(10)

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL; also end what it left in its session."""
        self.terminate()
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(10)
        # Helpers the child spawned (worker pools) share its session's process group, whose id
        # is the child's PID; the id cannot be reused while any member is alive.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.5)
        return self.proc.returncode


def wait_until(
    child: Child,
    ready: Callable[[], bool],
    *,
    what: str,
    timeout_s: float,
    fix: str = "",
    interval_s: float = 0.25,
) -> None:
    """Poll ``ready`` until it is true; fail fast with the log tail if the child exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not child.alive():
            raise StartError(
                f"{child.name} exited with code {child.returncode()} before {what}",
                fix=fix,
                log=child.tail(),
            )
        if ready():
            return
        if time.monotonic() > deadline:
            raise StartError(
                f"{child.name} was not {what} within {timeout_s:.0f} s",
                fix=fix,
                log=child.tail(),
            )
        time.sleep(interval_s)


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    """Whether GET ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return int(reply.status) == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def grpc_serving(address: str, timeout_s: float = 2.0) -> bool:
    """Whether the gRPC server at ``address`` answers SERVING to a standard health check."""
    from services.reward.healthcheck import check

    serving, _ = check(address, "", timeout_s)
    return serving


def stop_all(children: Sequence[Child], grace_s: float = 15.0) -> None:
    """Stop children in the given order, each by its PID; never raises for one already gone."""
    for child in children:
        child.stop(grace_s)
