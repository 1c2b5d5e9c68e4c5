"""``mapo inference serve``: the inference service on uvicorn.

The socket is bound before the engine starts, and its address printed as
``mapo-inference listening on http://HOST:PORT`` so a supervisor that asked for port 0 learns
the port. SIGTERM and SIGINT shut down gracefully: the rollout worker gives its unfinished
prompts back to the bus, then the engine stops. vLLM is imported only here, inside
:func:`cli_serve`, so ``mapo --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys

from services.core.config import RunConfig

log = logging.getLogger(__name__)


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


def cli_serve(args: argparse.Namespace, config: RunConfig) -> int:
    """Serve until SIGTERM/SIGINT; exit 1 if the model cannot be loaded."""
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
        failure.append(reason)
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
        print(f"mapo-inference: could not start: {failure[0]}", file=sys.stderr)
        return 1
    return 0
