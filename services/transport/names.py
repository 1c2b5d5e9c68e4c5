"""Consumer-group names and the field layout of stream entries (docs/bus.md describes them all).

Stream keys come from :class:`services.core.config.BusConfig` (one run, one set of keys); the
group names below are fixed because each group stands for a consuming *service*, not a run.
"""

from __future__ import annotations

from typing import Final

#: The inference replicas share this group on the prompts stream (one consumer per replica).
INFERENCE_GROUP: Final = "inference"
#: The trainer's group on the rollouts stream.
TRAINER_GROUP: Final = "trainer"

#: Every entry carries its msgpack payload (services.core.schemas) under this one field.
PAYLOAD_FIELD: Final = b"p"

#: Fields of a dead-letter record (all values are bytes on the wire).
DL_STREAM: Final = b"stream"
DL_GROUP: Final = b"group"
DL_CONSUMER: Final = b"consumer"
DL_ENTRY_ID: Final = b"entry_id"
DL_REASON: Final = b"reason"
DL_DELIVERIES: Final = b"deliveries"
DL_MESSAGE_ID: Final = b"message_id"
DL_PAYLOAD: Final = b"payload"
DL_AT: Final = b"at"
