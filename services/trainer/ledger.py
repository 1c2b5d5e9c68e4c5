"""Exactly-once application on top of at-least-once delivery.

The bus may hand a consumer the same message twice: an entry redelivered after a crash or a
reconnect, or two scored groups for one prompt when a slow replica's prompt was reclaimed and
redone. Every message carries a stable id (a prompt and its scored group share
``prompt_id == group_id``), so the trainer keeps an :class:`AppliedLedger` of the ids it
applied, saves it in the same checkpoint as the model, and acks entries with
:class:`DeferredAcks` only after that checkpoint is written.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from services.transport import Bus, Delivery

LEDGER_STATE_VERSION = 1


class AppliedLedger:
    """The ids of the groups already applied, bounded to the newest ``capacity`` ids.

    A duplicate can only come from an entry still in the rollouts stream, which is capped at
    ``BusConfig.maxlen``; a capacity of at least that (default: twice) recognises every one.
    """

    def __init__(self, capacity: int = 200_000, ids: Iterable[str] = ()) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()
        for i in ids:
            self.mark(i)

    def __contains__(self, group_id: object) -> bool:
        return group_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def mark(self, group_id: str) -> bool:
        """Record ``group_id`` as applied; False if it already was."""
        if group_id in self._ids:
            return False
        self._ids[group_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True

    def admit(self, deliveries: Iterable[Delivery[Any]]) -> list[Delivery[Any]]:
        """The deliveries to apply (marked as applied); repeats, within the batch too, are
        left out. Ack all of them after the next checkpoint, repeats included."""
        return [d for d in deliveries if self.mark(d.message_id)]

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot to save in the checkpoint beside the model."""
        return {"version": LEDGER_STATE_VERSION, "capacity": self.capacity, "ids": list(self._ids)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> AppliedLedger:
        if state.get("version") != LEDGER_STATE_VERSION:
            raise ValueError(f"unsupported ledger state version {state.get('version')!r}")
        return cls(int(state["capacity"]), [str(i) for i in state["ids"]])


class DeferredAcks:
    """Deliveries whose effect becomes durable at the next checkpoint.

    ``add`` them as they are applied (or recognised as repeats); ``commit`` right after the
    checkpoint is saved. If the process dies first, the entries are redelivered and the
    restored ledger decides which still need applying.
    """

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._pending: dict[str, Delivery[Any]] = {}

    def add(self, deliveries: Iterable[Delivery[Any]]) -> None:
        for d in deliveries:
            self._pending[f"{d.stream}\0{d.group}\0{d.entry_id}"] = d

    def __len__(self) -> int:
        return len(self._pending)

    async def commit(self) -> int:
        """Acknowledge everything added so far; returns how many entries were acked."""
        batch = list(self._pending.values())
        n = await self.bus.ack_deliveries(batch)
        for d in batch:
            self._pending.pop(f"{d.stream}\0{d.group}\0{d.entry_id}", None)
        return n
