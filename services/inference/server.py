"""``mapo inference serve``: the inference service on uvicorn.

The socket is bound before the engine starts, and its address printed as
``mapo-inference listening on http://HOST:PORT`` so a supervisor that asked for port 0 learns
the port. SIGTERM and SIGINT shut down gracefully: the rollout worker gives its unfinished
prompts back to the bus, then the engine stops, and the process exits with status 0. A fatal
error (the model cannot be loaded; the engine died and ``inference.engine_dead_grace_s`` passed)
shuts it down the same way but exits with status 1, so that a supervisor starts a fresh
replica; should that shutdown hang, the process exits anyway after ``FATAL_EXIT_DEADLINE_S``.
vLLM is imported only here, inside :func:`cli_serve`, so ``mapo --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading

from services.core.config import RunConfig

log = logging.getLogger(__name__)

#: After a fatal error, the graceful shutdown gets this long before the process exits anyway.
FATAL_EXIT_DEADLINE_S = 60.0


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def apply_args(args: argparse.Namespace, config: RunConfig) -> RunConfig:
    """The config with the command-line flags applied (flags win over the file)."""
    config = config.model_copy(deep=True)
    if getattr(args, "model", None):
        config.model.path = args.model
    if getattr(args, "host", None):
        config.inference.host = args.host
    if getattr(args, "port", None) is not None:
        config.inference.port = args.port
    return config


def _exit_later(seconds: float, code: int) -> None:
    """Exit with ``code`` in ``seconds`` unless the process has ended by then."""

    def go() -> None:
        print(f"mapo-inference: shutdown took over {seconds:.0f} s; exiting", file=sys.stderr)
        sys.stderr.flush()
        os._exit(code)

    timer = threading.Timer(seconds, go)
    timer.daemon = True
    timer.start()


def cli_serve(args: argparse.Namespace, config: RunConfig) -> int:
    """Serve until SIGTERM/SIGINT (exit 0); exit 1 if the model cannot be loaded or the engine
    died."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = apply_args(args, config)
    from services.inference.engine import apply_cpu_defaults, cuda_available

    if not cuda_available():
        apply_cpu_defaults(config.inference.cpu_threads)  # before vLLM or torch is imported
    import uvicorn

    from services.inference.app import build_app

    failure: list[str] = []
    server: uvicorn.Server | None = None

    def on_fatal(reason: str) -> None:
        if failure:
            return
        failure.append(reason)
        _exit_later(FATAL_EXIT_DEADLINE_S, 1)
        if server is not None:
            server.should_exit = True

    app = build_app(config, use_bus=not args.no_bus, on_fatal=on_fatal)
    sock = bind(config.inference.host, config.inference.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"mapo-inference listening on http://{shown}:{port}", flush=True)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=10)
    )
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again with the handler
    # it found installed: with this one the process then exits normally (status 0).
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failure:
        print(f"mapo-inference: exiting with status 1: {failure[0]}", file=sys.stderr)
        return 1
    return 0
