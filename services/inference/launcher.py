"""Start ``mapo inference serve`` as a child process and wait until it is ready.

Used by the benchmark and the tests: the service is started on a free loopback port, its
``/ready`` is polled with a deadline, and a start that fails raises
:class:`~services.stack.processes.StartError` with the tail of its log. Only the process
started here (and its engine core, in its process group) is stopped.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from services.stack.processes import Child, StartError, free_port, http_ok, wait_until


class InferenceProcess:
    """A running service: ``url``, ``proc``, ``log()``, ``stop()``."""

    def __init__(
        self,
        model: Path | str,
        *,
        settings: Sequence[str] = (),
        no_bus: bool = False,
        env: dict[str, str] | None = None,
        ready_timeout_s: float = 180.0,
    ) -> None:
        fd, log_name = tempfile.mkstemp(prefix="mapo-inference-", suffix=".log")
        os.close(fd)
        self.log_path = Path(log_name)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        args = [sys.executable, "-m", "services.cli", "inference", "serve", "--model", str(model)]
        args += ["--host", "127.0.0.1", "--port", str(port)]
        for item in settings:
            args += ["--set", item]
        if no_bus:
            args.append("--no-bus")
        self.child = Child.start(
            "inference service", args, log_path=self.log_path, env={**os.environ, **(env or {})}
        )
        self.proc = self.child.proc
        try:
            wait_until(
                self.child,
                lambda: http_ok(self.url + "/ready"),
                what=f"ready at {self.url}/ready",
                timeout_s=ready_timeout_s,
                fix=f"see {self.log_path}",
            )
        except StartError:
            self.child.stop()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, grace_s: float = 20.0) -> int | None:
        return self.child.stop(grace_s)
