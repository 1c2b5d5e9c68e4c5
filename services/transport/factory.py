"""Build the bus a config or URL names: Redis for services, memory for unit tests."""

from __future__ import annotations

from typing import Any

from services.core.config import BusConfig
from services.core.schemas import KIND_PROMPT, KIND_SCORED_GROUP, KIND_WEIGHTS
from services.transport.bus import Bus
from services.transport.memory_streams import MemoryStore, MemoryStreams
from services.transport.redis_streams import RedisStreams
from services.transport.streams import Streams

_MEMORY_STORES: dict[str, MemoryStore] = {}

#: Settings of the Redis connection (see RedisStreams) that ``make_bus`` overrides may name.
_REDIS_OPTIONS = ("reconnect_timeout_s", "backoff_min_s", "backoff_max_s", "op_timeout_s")


def bus_settings(config: BusConfig) -> dict[str, Any]:
    """The delivery settings of a :class:`BusConfig`, as :class:`Bus` keyword arguments."""
    return {
        "dead_letter_stream": config.dead_letter_stream,
        "block_ms": config.block_ms,
        "claim_idle_ms": config.claim_idle_ms,
        "max_deliveries": config.max_deliveries,
        # Each stream carries one kind of message; anything else is dead-lettered on read.
        "kinds": {
            config.prompts_stream: KIND_PROMPT,
            config.rollouts_stream: KIND_SCORED_GROUP,
            config.weights_stream: KIND_WEIGHTS,
        },
    }


def make_bus(source: BusConfig | str, **overrides: Any) -> Bus:
    """A bus for ``source``: a :class:`BusConfig`, or a URL with the other settings default.

    ``redis://`` / ``rediss://`` (TLS) / ``unix://`` give a bus on :class:`RedisStreams`;
    ``memory://NAME`` one on :class:`MemoryStreams` over the process-wide store of that name
    (so components under test that each call ``make_bus`` meet there), ``memory://`` one on a
    private store. ``overrides`` replace settings (e.g. ``claim_idle_ms=200`` in tests).
    """
    config = BusConfig(url=source) if isinstance(source, str) else source
    settings = bus_settings(config) | overrides
    maxlen = settings.pop("maxlen", config.maxlen)
    options = {k: settings.pop(k) for k in _REDIS_OPTIONS if k in settings}
    streams: Streams
    if config.url.startswith("memory://"):
        name = config.url[len("memory://") :]
        store = _MEMORY_STORES.setdefault(name, MemoryStore()) if name else MemoryStore()
        streams = MemoryStreams(store, maxlen=maxlen)
    else:
        streams = RedisStreams(config.url, maxlen=maxlen, **options)
    return Bus(streams, **settings)
