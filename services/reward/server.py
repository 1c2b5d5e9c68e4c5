"""``mapo reward serve``: the gRPC reward/verifier service.

:func:`create_server` builds the server (reward service, ``grpc.health.v1`` health checking,
reflection) and binds it, port 0 picking a free one, without starting anything, so tests and
embedders control the lifecycle; :func:`serve` runs it until SIGTERM or SIGINT and then shuts
down gracefully: health turns NOT_SERVING, calls in flight get a grace period, then the
verifier workers stop. The address is printed as ``mapo-reward listening on HOST:PORT`` once
the service is ready, so a supervisor that asked for port 0 learns the port.

Limits, each refused with a status that says what to do:

- a request larger than ``reward.max_message_bytes``: RESOURCE_EXHAUSTED, from grpc itself,
  before anything is parsed;
- more than ``reward.max_concurrent_rpcs`` calls at once (health checks count too):
  RESOURCE_EXHAUSTED, from grpc itself;
- more completions than ``reward.max_group``, or one longer than ``reward.max_completion_bytes``:
  INVALID_ARGUMENT naming the item and the limit (:mod:`services.reward.validation`);
- more than ``reward.max_queued`` completions waiting for a verifier: RESOURCE_EXHAUSTED
  (:class:`~services.reward.pool.PoolBusy`), nothing queued.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Mapping

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from services.core.config import RewardConfig, RunConfig
from services.reward import metrics
from services.reward.pool import PoolStartError, VerifierPool
from services.reward.registry import Task, import_task_modules, registered_tasks
from services.reward.rpc import reward_pb2
from services.reward.servicer import RewardServicer, add_to_server
from services.reward.verifiers import Status

log = logging.getLogger(__name__)

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
MAX_GRACE_S = 25.0  # inside Kubernetes' default 30 s termination grace period


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` as (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address '{address}' is not host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class RewardServer:
    """A bound reward server: the gRPC server, its health servicer and its verifier pool."""

    def __init__(
        self,
        server: grpc.aio.Server,
        pool: VerifierPool,
        health_servicer: health.aio.HealthServicer,
        port: int,
        grace_s: float,
    ) -> None:
        self.server = server
        self.pool = pool
        self.health = health_servicer
        self.port = port
        self.grace_s = grace_s

    async def start(self) -> None:
        """Start the workers, then the server; report SERVING once both are up."""
        await self.pool.start()
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, let calls in flight finish (``grace_s``), then stop the workers."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.grace_s if grace_s is None else grace_s)
        await self.pool.close()

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


def create_server(
    config: RewardConfig, address: str, *, tasks: Mapping[str, Task] | None = None
) -> tuple[RewardServer, int]:
    """A reward server bound to ``address`` (port 0: a free one) and its port; not started.

    Call from inside the event loop that will run it. ``tasks`` defaults to the registry as
    it is now (built-ins plus whatever was registered before this call).
    """
    tasks = registered_tasks() if tasks is None else dict(tasks)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            # Fail loudly when the port is taken instead of sharing it with another server.
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    pool = VerifierPool(
        tasks,
        config.workers,
        memory_mib=config.worker_memory_mib,
        preload=config.task_modules,
        on_restart=metrics.observe_restart,
        max_queued=config.max_queued,
    )
    add_to_server(RewardServicer(pool, tasks, config), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot bind {address}: {exc}") from None
    if port == 0:
        raise OSError(f"cannot bind {address}")
    for name in tasks:  # zero series, so rate() and alerts see every task from the start
        for status in Status:
            metrics.COMPLETIONS.labels(task=name, status=status.value)
        metrics.TIMEOUTS.labels(task=name)
    grace = min(MAX_GRACE_S, config.timeout_s + 1.0)
    return RewardServer(server, pool, health_servicer, port, grace), port


async def serve(config: RewardConfig, address: str) -> None:
    """Serve on ``address`` until SIGTERM or SIGINT, then shut down gracefully."""
    server, port = create_server(config, address)
    host = split_address(address)[0]
    await server.start()
    try:
        if config.metrics_port:
            metrics_port = metrics.start_http(config.metrics_port, host)
            print(f"mapo-reward metrics on http://{join_address(host, metrics_port)}/metrics")
        print(
            f"mapo-reward listening on {join_address(host, port)} "
            f"({config.workers} workers, {config.timeout_s:g} s per verification)",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down: finishing calls in flight (%.0f s at most)", server.grace_s)
    finally:
        await server.stop()


def effective_config(args: argparse.Namespace, config: RunConfig) -> tuple[RewardConfig, str]:
    """The reward config and bind address with the command-line flags applied."""
    host, port = split_address(config.reward.address)
    if getattr(args, "host", None):
        host = args.host
    if getattr(args, "port", None) is not None:
        port = args.port
    values = config.reward.model_dump()
    if getattr(args, "workers", None) is not None:
        values["workers"] = args.workers
    if getattr(args, "metrics_port", None) is not None:
        values["metrics_port"] = args.metrics_port
    values["address"] = join_address(host, port)
    return RewardConfig.model_validate(values), values["address"]


def cli_serve(args: argparse.Namespace, config: RunConfig) -> int:
    """``mapo reward serve``: 0 after a clean shutdown, 1 when it cannot start, 2 on bad flags."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        reward_config, address = effective_config(args, config)
    except (ValueError, ValidationError) as exc:
        print(f"mapo reward serve: {exc}", file=sys.stderr)
        return 2
    try:
        import_task_modules(reward_config.task_modules)
    except ImportError as exc:
        print(f"mapo reward serve: {exc}", file=sys.stderr)
        return 1
    try:
        asyncio.run(serve(reward_config, address))
    except (OSError, PoolStartError) as exc:
        print(f"mapo reward serve: {exc}", file=sys.stderr)
        return 1
    return 0
