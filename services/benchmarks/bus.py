"""``mapo bench bus``: scored groups per second through the bus, beside raw ``redis-benchmark``.

Messages are realistic scored groups (G = 8 rollouts of 256 tokens with log-probs). The bus
figure is end to end: a producer publishes in pipelined batches while a consumer reads,
decodes and validates every payload and acks it. ``redis-benchmark`` runs XADD of a payload
of the same size (same MAXLEN ~ cap) against the same server in the same run, on one
connection with the same pipelining depth as the bus batch, and again with its usual 50
connections for reference.

Uses ``REDIS_URL`` if set, else starts its own ``redis-server`` on a free port (persistence
off, so both figures measure the same server doing the same work).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from services.core.config import RunConfig
from services.core.schemas import Rollout, ScoredGroup, encode
from services.stack.processes import free_port
from services.stack.redis_local import FIX, find_redis_server, start_redis_server
from services.transport import TRAINER_GROUP, Bus, RedisStreams

GROUP_SIZE = 8
TOKENS = 256
BATCH = 64


def scored_group(i: int, rng: np.random.Generator) -> ScoredGroup:
    """One group shaped like real rollouts: token ids, log-probs, text, reward terms."""
    rollouts = tuple(
        Rollout(
            text="".join(chr(97 + int(c)) for c in rng.integers(0, 26, TOKENS)),
            token_ids=rng.integers(0, 150_000, TOKENS, dtype=np.int32),
            logprobs=-rng.exponential(0.5, TOKENS).astype(np.float32),
            reward=float(k % 2),
            success=bool(k % 2),
            terms={"accuracy": float(k % 2), "format": 1.0},
        )
        for k in range(GROUP_SIZE)
    )
    return ScoredGroup(
        group_id=f"bench:{i:09d}",
        prompt="What is 12 + 34?",
        prompt_token_ids=rng.integers(0, 150_000, 64, dtype=np.int32),
        answer="46",
        task="arithmetic",
        policy_version=3,
        replica="bench-0",
        rollouts=rollouts,
        created_at=time.time(),
    )


@dataclass
class BusResult:
    messages: int
    seconds: float  # first publish to last ack
    publish_seconds: float  # first publish to last publish

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


async def _consume(url: str, stream: str, n: int) -> float:
    """Read, validate and ack ``n`` groups; returns the monotonic time of the last ack."""
    bus = Bus(RedisStreams(url), block_ms=200, batch=BATCH)
    seen = 0
    while seen < n:
        got = await bus.read(stream, TRAINER_GROUP, "bench", BATCH, expect=ScoredGroup)
        await bus.ack(stream, TRAINER_GROUP, [d.entry_id for d in got])
        seen += len(got)
    await bus.close()
    return time.monotonic()


async def _produce(
    url: str, stream: str, groups: list[ScoredGroup], payloads: list[bytes]
) -> float:
    bus = Bus(RedisStreams(url, maxlen=max(100_000, 2 * len(groups))))
    for k in range(0, len(groups), BATCH):
        if payloads:
            await bus.publish_encoded(stream, payloads[k : k + BATCH])
        else:
            await bus.publish_many(stream, groups[k : k + BATCH])
    await bus.close()
    return time.monotonic()


async def _prepare(url: str, stream: str, drop: bool = False) -> None:
    bus = Bus(streams := RedisStreams(url))
    if drop:
        await streams.redis.delete(stream)
    else:
        await bus.ensure_group(stream, TRAINER_GROUP)
    await bus.close()


def run_bus(url: str, groups: list[ScoredGroup], *, pre_encoded: bool) -> BusResult:
    """Publish all groups in batches while a consumer in the same process reads, validates
    and acks them (on a small machine a second process only competes for the same cores)."""
    stream = f"bench:{uuid.uuid4().hex[:8]}"
    asyncio.run(_prepare(url, stream))
    payloads = [encode(g) for g in groups] if pre_encoded else []

    async def both() -> tuple[float, float]:
        produced, consumed = await asyncio.gather(
            _produce(url, stream, groups, payloads), _consume(url, stream, len(groups))
        )
        return produced, consumed

    t0 = time.monotonic()
    published, finished = asyncio.run(both())
    asyncio.run(_prepare(url, stream, drop=True))
    return BusResult(len(groups), finished - t0, published - t0)


def redis_benchmark(
    host: str, port: int, n: int, size: int, *, clients: int, pipeline: int, password: str | None
) -> float:
    """Requests per second of ``XADD key MAXLEN ~ cap * p <size bytes>`` by redis-benchmark."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        raise RuntimeError("redis-benchmark not found: install redis-tools (Debian) to compare")
    key = f"rawbench:{uuid.uuid4().hex[:8]}"
    cmd = [exe, "-h", host, "-p", str(port), "-n", str(n), "-c", str(clients),
           "-P", str(pipeline), "-q"]  # fmt: skip
    if password:
        cmd += ["-a", password]
    cmd += ["XADD", key, "MAXLEN", "~", str(max(100_000, 2 * n)), "*", "p", "x" * size]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    subprocess.run(
        [shutil.which("redis-cli") or "redis-cli", "-h", host, "-p", str(port), "DEL", key],
        capture_output=True,
        env={**os.environ, "REDISCLI_AUTH": password or ""},
    )
    # -q prints progress lines separated by \r, then "XADD ...: 12345.67 requests per second".
    rates = re.findall(r"([\d.]+) requests per second", out)
    if not rates:
        raise RuntimeError(f"cannot read redis-benchmark output: {out[-500:]!r}")
    return float(rates[-1])


@contextmanager
def redis_for_bench() -> Iterator[str]:
    """REDIS_URL, or a redis-server of our own on a free port (stopped afterwards)."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    binary = find_redis_server()
    if binary is None:
        raise RuntimeError(f"no redis-server to benchmark. {FIX}")
    port = free_port()
    with (
        tempfile.TemporaryDirectory(prefix="mapo-bench-redis-") as d,
        start_redis_server(binary, port, Path(d), appendfsync=None),
    ):
        yield f"redis://127.0.0.1:{port}/0"


def main(args: argparse.Namespace, config: RunConfig) -> int:
    n = int(args.messages)
    rng = np.random.default_rng(0)
    groups = [scored_group(i, rng) for i in range(n)]
    size = len(encode(groups[0]))
    with redis_for_bench() as url:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 6379
        print(f"server: {url.split('@')[-1]}  messages: {n}  payload: {size} bytes "
              f"(G={GROUP_SIZE}, {TOKENS} tokens each with log-probs)  bus batch: {BATCH}")  # fmt: skip
        run_bus(url, groups[: min(n, 500)], pre_encoded=True)  # warm-up
        bus = run_bus(url, groups, pre_encoded=True)
        encoding = run_bus(url, groups, pre_encoded=False)
        raw_1 = redis_benchmark(
            host, port, n, size, clients=1, pipeline=BATCH, password=parts.password
        )
        raw_50 = redis_benchmark(
            host, port, n, size, clients=50, pipeline=16, password=parts.password
        )
    rows = [
        ("bus end to end, payloads pre-encoded", bus.rate, "msg/s"),
        ("bus end to end, producer encodes each group", encoding.rate, "msg/s"),
        ("bus publish side alone (pre-encoded)", n / bus.publish_seconds, "msg/s"),
        (f"redis-benchmark XADD, 1 connection, -P {BATCH}", raw_1, "req/s"),
        ("redis-benchmark XADD, 50 connections, -P 16", raw_50, "req/s"),
    ]
    print("end to end = publish + read + decode/validate + ack, one producer and one consumer")
    for label, value, unit in rows:
        print(f"  {label:<48s} {value:9.0f} {unit}")
    print(
        f"ratio bus / raw XADD (1 connection, -P {BATCH}): {bus.rate / raw_1:.2f}"
        f"   (/ 50 connections: {bus.rate / raw_50:.2f})"
    )
    return 0
