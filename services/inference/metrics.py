"""Prometheus metrics of the inference service (``mapo_inference_*``, listed in docs/metrics.md).

The service owns one registry, so several services in one test process never collide, and
``/metrics`` exports exactly these series.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

if TYPE_CHECKING:
    from prometheus_fastapi_instrumentator.metrics import Info

PREFIX = "mapo_inference_"
RATE_WINDOW_S = 10.0
# Why a version was not loaded (see services/inference/reload.py).
RELOAD_FAILURE_REASONS = (
    "missing", "unavailable", "corrupt", "mismatch", "incompatible", "engine",
    "unsigned", "forged", "source", "too_large",
)  # fmt: skip
RELOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Where a scored group's time goes in the rollout worker (services/inference/rollout_worker.py).
ROLLOUT_PHASES = ("weights_wait", "generate", "decode", "score", "publish")
ROLLOUT_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip


class TokenRate:
    """Generated tokens per second over a sliding window of the last ``window_s`` seconds."""

    def __init__(
        self, window_s: float = RATE_WINDOW_S, clock: Callable[[], float] = time.monotonic
    ):
        self.window_s = window_s
        self._clock = clock
        self._events: deque[tuple[float, int]] = deque()

    def add(self, tokens: int) -> None:
        self._events.append((self._clock(), tokens))
        self._trim()

    def rate(self) -> float:
        self._trim()
        if not self._events:
            return 0.0
        return sum(n for _, n in self._events) / self.window_s

    def _trim(self) -> None:
        horizon = self._clock() - self.window_s
        while self._events and self._events[0][0] < horizon:
            self._events.popleft()


class InferenceMetrics:
    """The service's registry and every series it exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.generated_tokens = Counter(
            PREFIX + "generated_tokens", "Tokens generated (rollouts and API).", registry=r
        )
        self.tokens_per_second = Gauge(
            PREFIX + "tokens_per_second",
            f"Generation throughput over the last {RATE_WINDOW_S:.0f} s.",
            registry=r,
        )
        self.queue_depth = Gauge(
            PREFIX + "queue_depth", "Requests waiting in or running on the engine.", registry=r
        )
        self.weight_version = Gauge(
            PREFIX + "weight_version", "Policy version this replica serves.", registry=r
        )
        self.reload_seconds = Histogram(
            PREFIX + "reload_seconds",
            "Weight fetch + verify + in-place reload time.",
            buckets=RELOAD_BUCKETS,
            registry=r,
        )
        self.reload_failures = Counter(
            PREFIX + "reload_failures",
            "Refused or failed weight versions.",
            ["reason"],
            registry=r,
        )
        for reason in RELOAD_FAILURE_REASONS:  # export zeros, so dashboards see every series
            self.reload_failures.labels(reason)
        self.groups = Counter(
            PREFIX + "groups", "Scored groups appended to the rollouts stream.", registry=r
        )
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens",
            "Prompt tokens of scored groups: text, and picture patches (image).",
            ["kind"],
            registry=r,
        )
        for kind in ("text", "image"):
            self.prompt_tokens.labels(kind)
        self.rollout_seconds = Histogram(
            PREFIX + "rollout_seconds",
            "Time of each phase of one scored group in the rollout worker.",
            ["phase"],
            buckets=ROLLOUT_BUCKETS,
            registry=r,
        )
        for phase in ROLLOUT_PHASES:
            self.rollout_seconds.labels(phase)
        self.requests = Counter(
            PREFIX + "requests", "HTTP requests.", ["route", "code"], registry=r
        )
        self.rate = TokenRate()
        self.tokens_per_second.set_function(self.rate.rate)

    def record_tokens(self, tokens: int) -> None:
        self.generated_tokens.inc(tokens)
        self.rate.add(tokens)

    def count_request(self, info: Info) -> None:
        """One HTTP request, by route template ("unmatched" when no route took it) and code."""
        route = "unmatched" if info.modified_handler == "none" else info.modified_handler
        self.requests.labels(route, info.modified_status).inc()

    def watch_queue(self, depth: Callable[[], float]) -> None:
        """Read the queue depth at scrape time, so it is never stale."""
        self.queue_depth.set_function(depth)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
