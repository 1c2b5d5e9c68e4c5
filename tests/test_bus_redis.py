"""The bus against a real redis-server that the tests kill, restart and reconfigure."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from services.core.config import BusConfig
from services.core.schemas import PromptMessage, ScoredGroup
from services.stack.processes import Child, StartError, wait_until
from services.stack.redis_local import find_redis_server
from services.trainer.ledger import AppliedLedger
from services.transport import (
    INFERENCE_GROUP,
    TRAINER_GROUP,
    BusError,
    BusUnavailable,
    RedisStreams,
    make_bus,
)
from tests.fixtures.redis import RedisServer, bus_config, free_port, make_group, make_prompt

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[1]

_VICTIM = """
import asyncio, sys
from services.core.config import BusConfig
from services.transport import INFERENCE_GROUP, make_bus

async def main():
    config = BusConfig.model_validate_json(sys.argv[1])
    bus = make_bus(config)
    got = await bus.read(config.prompts_stream, INFERENCE_GROUP, "victim", 5)
    print(" ".join(d.message_id for d in got), flush=True)
    await asyncio.sleep(3600)  # mid-batch: never acks

asyncio.run(main())
"""


def test_consumer_process_killed_mid_batch_has_its_entries_finished_by_another(
    redis_server: RedisServer,
) -> None:
    config = bus_config(redis_server.url)

    async def setup() -> None:
        bus = make_bus(config)
        await bus.ensure_group(config.prompts_stream, INFERENCE_GROUP)
        await bus.publish_many(config.prompts_stream, [make_prompt(i) for i in range(8)])
        await bus.close()

    asyncio.run(setup())
    victim = subprocess.Popen(
        [sys.executable, "-c", _VICTIM, config.model_dump_json()],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert victim.stdout is not None
        taken = victim.stdout.readline().split()
        assert len(taken) == 5
    finally:
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)

    async def survivor() -> list[str]:
        bus = make_bus(config)
        done: list[str] = []
        deadline = time.monotonic() + 10
        while len(done) < 8 and time.monotonic() < deadline:
            async with bus.processing(config.prompts_stream, INFERENCE_GROUP, "survivor") as b:
                done += [d.message_id for d in b]
        stats = await bus.stats(config.prompts_stream)
        await bus.close()
        assert stats.group(INFERENCE_GROUP).pending == 0  # type: ignore[union-attr]
        return done

    done = asyncio.run(survivor())
    assert sorted(done) == [f"p-{i:05d}" for i in range(8)]
    assert set(taken) <= set(done)


def test_redis_killed_and_restarted_with_aof_mid_traffic_loses_nothing_and_applies_each_once(
    own_redis_server: RedisServer,
) -> None:
    config = bus_config(own_redis_server.url)
    total, restarts = 400, 2

    async def main() -> tuple[list[str], Counter[str], int]:
        producer = make_bus(config, reconnect_timeout_s=30)
        consumer = make_bus(config, reconnect_timeout_s=30)
        stream = config.rollouts_stream
        await producer.ensure_group(stream, TRAINER_GROUP)
        published: list[str] = []
        applied: Counter[str] = Counter()  # the durable effect: counts of applications
        ledger = AppliedLedger()
        deliveries = 0

        async def produce() -> None:
            for start in range(0, total, 10):
                batch = [make_group(f"g{i:04d}") for i in range(start, start + 10)]
                await producer.publish_many(stream, batch)
                published.extend(g.group_id for g in batch)
                await asyncio.sleep(0.005)

        async def consume() -> None:
            nonlocal deliveries
            while len(applied) < total:
                got = await consumer.read(stream, TRAINER_GROUP, "trainer", 25, block_ms=100)
                deliveries += len(got)
                for d in ledger.admit(got):
                    applied[d.message_id] += 1
                await consumer.ack(stream, TRAINER_GROUP, [d.entry_id for d in got])

        async def chaos() -> None:
            for k in range(restarts):
                while len(published) < total * (k + 1) // (restarts + 1):
                    await asyncio.sleep(0.01)
                await asyncio.to_thread(own_redis_server.kill)
                await asyncio.sleep(0.3)
                await asyncio.to_thread(own_redis_server.restart)

        await asyncio.wait_for(asyncio.gather(produce(), consume(), chaos()), 45)
        await producer.close()
        await consumer.close()
        return published, applied, deliveries

    published, applied, deliveries = asyncio.run(main())
    assert sorted(set(published)) == sorted(applied)
    assert len(applied) == total
    assert set(applied.values()) == {1}
    assert deliveries >= total


def test_a_group_lost_with_its_stream_is_recreated_and_reading_goes_on(
    redis_server: RedisServer,
) -> None:
    """What a restart without persistence looks like to a consumer: NOGROUP."""
    config = bus_config(redis_server.url)

    async def main() -> None:
        bus = make_bus(config)
        stream = config.prompts_stream
        await bus.ensure_group(stream, INFERENCE_GROUP)
        await bus.publish(stream, make_prompt(1))
        assert len(await bus.read(stream, INFERENCE_GROUP, "r0", block_ms=0)) == 1
        raw = aioredis.Redis.from_url(redis_server.url)
        await raw.delete(stream)
        await raw.aclose()
        await bus.publish(stream, make_prompt(2))  # recreates the stream, not the group
        got = await bus.read(stream, INFERENCE_GROUP, "r0", block_ms=0, expect=PromptMessage)
        assert [d.message.prompt_id for d in got] == ["p-00002"]
        await bus.close()

    asyncio.run(main())


def test_acl_user_with_password_and_database_number_from_the_url(
    own_redis_server: RedisServer,
) -> None:
    async def main() -> None:
        admin = aioredis.Redis.from_url(own_redis_server.url)
        await admin.execute_command(
            "ACL", "SETUSER", "mapo", "on", ">s3cr:t@/pw", "~*", "+@all", "-flushall"
        )
        url = own_redis_server.url.replace("redis://", "redis://mapo:s3cr%3At%40%2Fpw@")
        url = url.rsplit("/", 1)[0] + "/3"
        config = bus_config(url)
        bus = make_bus(config)
        await bus.publish(config.prompts_stream, make_prompt(1))
        await admin.execute_command("SELECT", "3")
        assert await admin.xlen(config.prompts_stream) == 1
        await admin.aclose()
        await bus.close()

        bad = make_bus(bus_config(url.replace("s3cr%3At", "wrong")), reconnect_timeout_s=30)
        started = time.monotonic()
        with pytest.raises(BusError, match="Check the user, password and TLS"):
            await bad.publish(config.prompts_stream, make_prompt(2))
        assert time.monotonic() - started < 5  # a wrong password is not retried
        await bad.close()

    asyncio.run(main())


def test_unreachable_redis_raises_bus_unavailable_naming_the_fix() -> None:
    async def main() -> None:
        bus = make_bus(
            bus_config(f"redis://:hunter2@127.0.0.1:{free_port()}/0"), reconnect_timeout_s=0.5
        )
        with pytest.raises(BusUnavailable, match="Make sure the server is running") as err:
            await bus.publish("s", make_prompt(1))
        assert "hunter2" not in str(err.value)
        await bus.close()

    asyncio.run(main())


# ------------------------------------------------------------------------------ TLS


def _tls_answers(ctx: ssl.SSLContext, port: int) -> bool:
    try:
        with ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=0.5),
            server_hostname="127.0.0.1",
        ):
            return True
    except OSError:
        return False


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    binary = find_redis_server()
    if binary is None or shutil.which("openssl") is None:
        pytest.skip("needs a redis-server and openssl on PATH")
    d = Path(tempfile.mkdtemp(prefix="mapo-tls-", dir=tmp_path))

    def sh(*args: str) -> None:
        subprocess.run(args, cwd=d, check=True, capture_output=True)

    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
       "-out", "ca.crt", "-days", "1", "-subj", "/CN=mapo-test-ca")  # fmt: skip
    sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
       "-out", "server.csr", "-subj", "/CN=localhost")  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    sh("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
       "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "san.ext")  # fmt: skip
    port = free_port()
    args = [binary.path, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", "server.crt", "--tls-key-file", "server.key",
            "--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no", "--save", "",
            "--dir", str(d)]  # fmt: skip
    ctx = ssl.create_default_context(cafile=str(d / "ca.crt"))
    with Child.start("TLS redis-server", args, log_path=d / "redis.log", cwd=d) as server:
        try:
            wait_until(
                server,
                lambda: _tls_answers(ctx, port),
                what="answering TLS",
                timeout_s=10,
                interval_s=0.05,
            )
        except StartError:
            if not server.alive():
                pytest.skip("redis-server did not start with TLS (built without it?)")
            raise
        yield f"rediss://127.0.0.1:{port}/0", d / "ca.crt"


def test_rediss_url_speaks_tls_and_verifies_the_server_against_the_given_ca(
    tls_redis: tuple[str, Path],
) -> None:
    url, ca = tls_redis

    async def main() -> None:
        config = bus_config(f"{url}?ssl_ca_certs={ca}")
        bus = make_bus(config)
        assert isinstance(bus.streams, RedisStreams)
        await bus.ensure_group(config.rollouts_stream, TRAINER_GROUP)
        await bus.publish(config.rollouts_stream, make_group("g1"))
        got = await bus.read(config.rollouts_stream, TRAINER_GROUP, "t", expect=ScoredGroup)
        assert [d.message.group_id for d in got] == ["g1"]
        await bus.close()

        # Without the CA the server's certificate is not trusted: refused, not retried.
        untrusting = make_bus(bus_config(url), reconnect_timeout_s=30)
        started = time.monotonic()
        with pytest.raises(BusError):
            await untrusting.publish(config.rollouts_stream, make_group("g2"))
        assert time.monotonic() - started < 5
        await untrusting.close()

    asyncio.run(main())


def test_bus_config_round_trips_through_json_for_subprocesses() -> None:
    config = bus_config("redis://127.0.0.1:1/0")
    assert BusConfig.model_validate(json.loads(config.model_dump_json())) == config
