"""Container health probe for the reward service: one standard gRPC health check.

``python -m services.reward.healthcheck [HOST:PORT] [--service NAME] [--timeout S]`` asks the
server's ``grpc.health.v1.Health/Check`` and exits 0 when it answers SERVING, 1 otherwise (not
serving, unknown service, refused connection, deadline). The address defaults to the run config's
``reward.address`` (so ``MAPO__REWARD__ADDRESS`` applies); the empty service name asks about the
server as a whole. docker-compose uses it as the reward healthcheck; Kubernetes uses its native
``grpc`` probe, which asks the same question.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def check(address: str, service: str = "", timeout_s: float = 3.0) -> tuple[bool, str]:
    """Return (serving, a one-line description of the answer)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            name = code.name if code is not None else "ERROR"
            return False, f"{address}: {name}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{address}: {status}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.reward.healthcheck",
        description="Exit 0 when the reward service answers SERVING to a gRPC health check.",
    )
    parser.add_argument("address", nargs="?", default=None, help="host:port (default: config)")
    parser.add_argument("--service", default="", help="service name; empty means the server")
    parser.add_argument("--timeout", type=float, default=3.0, help="deadline in seconds")
    args = parser.parse_args(argv)
    address = args.address
    if address is None:
        from services.core.config import ConfigError, load_config

        try:
            address = load_config().reward.address
        except ConfigError as exc:
            print(f"healthcheck: {exc}", file=sys.stderr)
            return 2
    serving, line = check(address, args.service, args.timeout)
    print(line, file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
