"""Start ``mapo inference serve`` as a child process and wait until it is ready.

Used by the benchmark and the tests: the service is started on a free port (``--port 0``; the
port is read from the line it prints), polled on ``/health`` then ``/ready`` with a deadline,
and a start that fails raises with the tail of its log. Only the process started here is
stopped (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

LISTENING = re.compile(r"mapo-inference listening on (http://\S+)")


class InferenceProcess:
    """A running service: ``url``, ``log()``, ``stop()``."""

    def __init__(
        self,
        model: Path | str,
        *,
        settings: Sequence[str] = (),
        no_bus: bool = False,
        env: dict[str, str] | None = None,
        ready_timeout_s: float = 120.0,
    ) -> None:
        fd, log_name = tempfile.mkstemp(prefix="mapo-inference-", suffix=".log")
        os.close(fd)
        self.log_path = Path(log_name)
        args = [sys.executable, "-m", "services.cli", "inference", "serve", "--model", str(model)]
        args += ["--host", "127.0.0.1", "--port", "0"]
        for item in settings:
            args += ["--set", item]
        if no_bus:
            args.append("--no-bus")
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, **(env or {})},
        )
        self._lines: queue.Queue[bytes] = queue.Queue()
        self._handing_over = True
        self._drain = threading.Thread(target=self._copy_stdout, daemon=True)
        self._drain.start()
        self.url = self._read_url(deadline=time.monotonic() + 60)
        self._wait_ready(time.monotonic() + ready_timeout_s)

    def _copy_stdout(self) -> None:
        """Copy the service's stdout into its log; hand lines over until the address is read."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._log.write(line)
            if self._handing_over:
                self._lines.put(line)
        self._lines.put(b"")

    def _read_url(self, deadline: float) -> str:
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.2).decode(errors="replace")
            except queue.Empty:
                continue
            if not line:
                self._fail("exited before printing its address")
            match = LISTENING.search(line)
            if match:
                self._handing_over = False
                return match.group(1)
        self._fail("did not print its address in time")
        raise AssertionError  # unreachable

    def _wait_ready(self, deadline: float) -> None:
        for path in ("/health", "/ready"):
            while True:
                if self.proc.poll() is not None:
                    self._fail(f"exited with {self.proc.returncode} while waiting for {path}")
                try:
                    if httpx.get(self.url + path, timeout=2.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    self._fail(f"{path} not 200 within the deadline")
                time.sleep(0.2)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def _fail(self, why: str) -> None:
        self.stop()
        raise RuntimeError(f"inference service {why}; log tail:\n{self.log()[-4000:]}")

    def stop(self, grace_s: float = 20.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode
