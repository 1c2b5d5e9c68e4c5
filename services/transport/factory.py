"""Build the bus a config or URL names: Redis for services, memory for unit tests."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from services.core.config import BusConfig, RolloutConfig, RunConfig
from services.core.schemas import (
    DEFAULT_LIMITS,
    KIND_PROMPT,
    KIND_SCORED_GROUP,
    KIND_WEIGHTS,
    WireLimits,
)
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


def config_bound(section: type[BaseModel], name: str) -> float:
    """The upper bound (``le``) a config field declares."""
    for rule in section.model_fields[name].metadata:
        if (le := getattr(rule, "le", None)) is not None:
            return float(le)
    raise ValueError(f"{section.__name__}.{name} declares no upper bound")


def wire_limits(config: RunConfig) -> WireLimits:
    """The message bounds a run's config implies, the rest left at their defaults.

    A group is scored in one reward request, so it has at most ``reward.max_group`` rollouts
    (and no more than ``rollout.group_size`` may ever be); a completion and a prompt fit in
    ``model.max_model_len`` tokens; texts the reward service refuses past
    ``reward.max_completion_bytes`` (a character takes at least a byte) cannot be scored.
    """
    group = min(int(config_bound(RolloutConfig, "group_size")), config.reward.max_group)
    context = config.model.max_model_len
    text = config.reward.max_completion_bytes
    return WireLimits(
        max_group_size=group,
        # The worker clamps a prompt's max_tokens to the context left, so a configured value
        # above the context is still valid.
        max_tokens=max(context, config.rollout.max_tokens),
        max_sequence_tokens=context,
        max_answer_chars=text,
        max_completion_chars=text,
    )


def make_bus(source: RunConfig | BusConfig | str, **overrides: Any) -> Bus:
    """A bus for ``source``: a run config, its :class:`BusConfig`, or a URL with the other
    settings default.

    Given the whole :class:`RunConfig`, the bus also bounds every message field by what the
    run can produce (:func:`wire_limits`); otherwise by :data:`schemas.DEFAULT_LIMITS`.
    ``redis://`` / ``rediss://`` (TLS) / ``unix://`` give a bus on :class:`RedisStreams`;
    ``memory://NAME`` one on :class:`MemoryStreams` over the process-wide store of that name
    (so components under test that each call ``make_bus`` meet there), ``memory://`` one on a
    private store. ``overrides`` replace settings (e.g. ``claim_idle_ms=200`` in tests, or
    ``limits=``).
    """
    limits = DEFAULT_LIMITS
    if isinstance(source, RunConfig):
        limits, source = wire_limits(source), source.bus
    config = BusConfig(url=source) if isinstance(source, str) else source
    settings = bus_settings(config) | {"limits": limits} | overrides
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
