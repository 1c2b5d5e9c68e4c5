"""The message bus between the services: Redis Streams in production, memory in unit tests.

See docs/bus.md for streams, groups, payloads and the delivery guarantees.
"""

from services.transport.bus import Bus
from services.transport.entries import DeadLetter, Delivery, message_id
from services.transport.factory import bus_settings, make_bus
from services.transport.memory_streams import MemoryStore, MemoryStreams
from services.transport.names import INFERENCE_GROUP, TRAINER_GROUP
from services.transport.reader import StreamFollower
from services.transport.redis_streams import RedisStreams, connection_kwargs, redact_url
from services.transport.streams import BusError, BusUnavailable, ConsumerGroupStats, StreamStats

__all__ = [
    "INFERENCE_GROUP",
    "TRAINER_GROUP",
    "Bus",
    "BusError",
    "BusUnavailable",
    "ConsumerGroupStats",
    "DeadLetter",
    "Delivery",
    "MemoryStore",
    "MemoryStreams",
    "RedisStreams",
    "StreamFollower",
    "StreamStats",
    "bus_settings",
    "connection_kwargs",
    "make_bus",
    "message_id",
    "redact_url",
]
