"""Prometheus metrics of the reward service (prefix ``mapo_reward_``), on their own registry.

Names are the contract with the dashboards and alerts in ``deploy/`` (see docs/metrics.md).
Health checks and reflection are not counted as requests: probes would drown the real traffic.
Score metrics count scored completions only; timeouts and "cannot score" have their own
counters, and a 0 that means "not judged" would bias the mean.
"""

from __future__ import annotations

import collections
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

SCORE_WINDOW = 1000

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "mapo_reward_requests_total",
    "gRPC requests by method and status code.",
    ["method", "code"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "mapo_reward_request_seconds",
    "gRPC request latency in seconds.",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
COMPLETIONS = Counter(
    "mapo_reward_completions_total",
    "Completions verified, by task and status (scored, cannot_score, timed_out).",
    ["task", "status"],
    registry=REGISTRY,
)
TIMEOUTS = Counter(
    "mapo_reward_timeouts_total",
    "Verifications that ran out of time.",
    ["task"],
    registry=REGISTRY,
)
SCORE_MEAN = Gauge(
    "mapo_reward_score_mean",
    f"Mean reward of the last {SCORE_WINDOW} scored completions of each task.",
    ["task"],
    registry=REGISTRY,
)
SCORE = Histogram(
    "mapo_reward_score",
    "Reward of each scored completion.",
    ["task"],
    buckets=(0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0),
    registry=REGISTRY,
)
WORKER_RESTARTS = Counter(
    "mapo_reward_worker_restarts_total",
    "Verifier processes killed after overrunning a deadline, or found dead, and replaced.",
    registry=REGISTRY,
)


class _Window:
    """Running mean of the last ``size`` rewards of one task."""

    def __init__(self, size: int) -> None:
        self.values: collections.deque[float] = collections.deque(maxlen=size)
        self.total = 0.0

    def add(self, value: float) -> float:
        if len(self.values) == self.values.maxlen:
            self.total -= self.values[0]
        self.values.append(value)
        self.total += value
        return self.total / len(self.values)


_windows: dict[str, _Window] = {}
_lock = threading.Lock()


def observe_request(method: str, code: str, seconds: float) -> None:
    REQUESTS.labels(method=method, code=code).inc()
    REQUEST_SECONDS.labels(method=method).observe(seconds)


def observe_completion(task: str, status: str, reward: float) -> None:
    """Count one verified completion; scored ones feed the score histogram and mean."""
    COMPLETIONS.labels(task=task, status=status).inc()
    if status == "timed_out":
        TIMEOUTS.labels(task=task).inc()
    if status != "scored":
        return
    SCORE.labels(task=task).observe(reward)
    with _lock:
        window = _windows.setdefault(task, _Window(SCORE_WINDOW))
        mean = window.add(reward)
    SCORE_MEAN.labels(task=task).set(mean)


def observe_restart() -> None:
    WORKER_RESTARTS.inc()


def start_http(port: int, host: str = "127.0.0.1") -> int:
    """Serve ``/metrics`` on ``host:port`` in a background thread; the bound port."""
    from prometheus_client import start_http_server

    server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    return int(server.server_port)
