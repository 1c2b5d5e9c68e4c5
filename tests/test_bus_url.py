"""Connection settings from a bus URL, and which implementation a URL or config gives."""

from __future__ import annotations

import pytest

from services.core.config import BusConfig
from services.transport import (
    BusError,
    MemoryStreams,
    RedisStreams,
    connection_kwargs,
    make_bus,
    redact_url,
)


def test_url_with_acl_user_password_and_database() -> None:
    kw = connection_kwargs("redis://mapo:s%40cret%3A1@redis.internal:6380/4")
    assert (kw["username"], kw["password"]) == ("mapo", "s@cret:1")
    assert (kw["host"], kw["port"], kw["db"]) == ("redis.internal", 6380, 4)
    assert kw["ssl"] is False


def test_password_only_url_uses_the_default_user() -> None:
    kw = connection_kwargs("redis://:pw@127.0.0.1:6379/0")
    assert kw["password"] == "pw" and "username" not in kw


def test_rediss_url_means_tls_and_passes_the_ca_file() -> None:
    kw = connection_kwargs("rediss://u:p@cache.example:6390/2?ssl_ca_certs=/etc/ca.pem")
    assert kw["ssl"] is True
    assert kw["ssl_ca_certs"] == "/etc/ca.pem"
    assert kw["connection_class"].__name__ == "SSLConnection"
    assert kw["db"] == 2


def test_database_from_the_query_string() -> None:
    assert connection_kwargs("redis://127.0.0.1:6379?db=7")["db"] == 7


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:6379", "127.0.0.1:6379", "redis://127.0.0.1:6379/zero"]
)
def test_unusable_urls_are_refused_with_the_schemes_that_work(url: str) -> None:
    with pytest.raises(BusError, match=r"redis://|database number"):
        connection_kwargs(url)


def test_redacted_url_hides_the_password_only() -> None:
    assert redact_url("rediss://mapo:secret@h:1/0") == "rediss://mapo:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


def test_make_bus_picks_the_implementation_from_the_url_and_applies_the_config() -> None:
    config = BusConfig(url="redis://127.0.0.1:1/0", claim_idle_ms=1234, max_deliveries=7)
    bus = make_bus(config)
    assert isinstance(bus.streams, RedisStreams)
    assert (bus.claim_idle_ms, bus.max_deliveries) == (1234, 7)
    assert bus.kinds[config.rollouts_stream] == "scored_group"
    assert isinstance(make_bus("memory://").streams, MemoryStreams)


def test_named_memory_buses_share_their_streams() -> None:
    import asyncio

    from tests.fixtures.redis import make_prompt

    async def main() -> None:
        a, b = make_bus("memory://shared-test"), make_bus("memory://shared-test")
        await a.publish("s", make_prompt(1))
        assert (await b.stats("s")).length == 1
        assert (await make_bus("memory://").stats("s")).length == 0

    asyncio.run(main())
