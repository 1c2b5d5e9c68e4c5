"""The message bus between the services: Redis Streams in production, memory in unit tests.

See docs/bus.md for streams, groups, payloads and the delivery guarantees.
"""

from services.transport.base import (
    Bus,
    BusError,
    BusUnavailable,
    DeadLetter,
    Delivery,
    GroupStats,
    StreamFollower,
    StreamStats,
    message_id,
)
from services.transport.budget import InFlightBudget, PromptProducer
from services.transport.factory import bus_settings, make_bus
from services.transport.idempotency import AppliedLedger, DeferredAcks, make_prompt_id
from services.transport.memory_bus import MemoryBus, MemoryStore
from services.transport.names import INFERENCE_GROUP, TRAINER_GROUP
from services.transport.redis_bus import RedisBus, connection_kwargs, redact_url

__all__ = [
    "INFERENCE_GROUP",
    "TRAINER_GROUP",
    "AppliedLedger",
    "Bus",
    "BusError",
    "BusUnavailable",
    "DeadLetter",
    "DeferredAcks",
    "Delivery",
    "GroupStats",
    "InFlightBudget",
    "MemoryBus",
    "MemoryStore",
    "PromptProducer",
    "RedisBus",
    "StreamFollower",
    "StreamStats",
    "bus_settings",
    "connection_kwargs",
    "make_bus",
    "make_prompt_id",
    "message_id",
    "redact_url",
]
