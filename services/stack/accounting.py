"""The run's ledger: what became of every prompt group the trainer issued.

Prompt ids are ``{run_id}:{epoch}:{index}`` and the trainer's final checkpoint holds the
dataset position of the last prompt it published, so the issued ids can be listed without
trusting any stream. Each must end up in exactly one place:

- in the model (``applied.jsonl``, the steps that survived every resume), exactly once;
- skipped by the trainer's rules (too stale, DAPO's filter, no usable scores), on record;
- dead-lettered, with its reason (the dead-letter stream);
- still outstanding when training ended: a prompt not yet generated or a scored group not
  yet taken, both still unacknowledged on the bus.

Anything else is *missing*, and an id in the model twice is *applied twice*: both must be zero.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Skip lists of a step record in applied.jsonl, by the outcome they stand for.
SKIP_KEYS = {
    "stale_dropped_ids": "stale_dropped",
    "dapo_filtered_ids": "dapo_filtered",
    "unscored_ids": "unscored",
}


def issued_ids(run_id: str, epoch: int, index: int, dataset_size: int) -> list[str]:
    """Every prompt id published before position (``epoch``, ``index``)."""
    if dataset_size < 1:
        raise ValueError("dataset_size must be >= 1")
    ids = [f"{run_id}:{e}:{i}" for e in range(epoch) for i in range(dataset_size)]
    return ids + [f"{run_id}:{epoch}:{i}" for i in range(index)]


@dataclass
class Ledger:
    """Counts of each outcome, and the ids that break the promise (at most a few listed)."""

    issued: int = 0
    applied: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    dead_lettered: int = 0
    outstanding: int = 0
    applied_twice: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.applied_twice and not self.missing

    def to_json(self, listed: int = 20) -> dict[str, Any]:
        return {
            "issued": self.issued,
            "applied": self.applied,
            "skipped": dict(self.skipped),
            "dead_lettered": self.dead_lettered,
            "outstanding": self.outstanding,
            "applied_twice": len(self.applied_twice),
            "missing": len(self.missing),
            "applied_twice_ids": self.applied_twice[:listed],
            "missing_ids": self.missing[:listed],
            "dead_letter_reasons": dict(self.dead_letter_reasons),
        }

    def describe(self) -> str:
        skipped = sum(self.skipped.values())
        return (
            f"{self.issued:,} groups issued: {self.applied:,} applied, {skipped:,} skipped, "
            f"{self.dead_lettered:,} dead-lettered, {self.outstanding:,} outstanding at the end; "
            f"{len(self.applied_twice)} applied twice, {len(self.missing)} missing"
        )


def reconcile(
    issued: Iterable[str],
    lineage: Mapping[int, Mapping[str, Any]],
    dead_letters: Iterable[tuple[str, str]],
    outstanding: Iterable[str],
) -> Ledger:
    """Account for every issued id.

    ``lineage``: step -> record of the surviving steps (``surviving_lineage`` of
    applied.jsonl); ``dead_letters``: (message id, reason) of every dead-letter record;
    ``outstanding``: ids still unacknowledged on the prompts or rollouts stream.
    """
    issued_list = list(issued)
    applied: Counter[str] = Counter()
    skipped: dict[str, str] = {}
    for record in lineage.values():
        applied.update(str(g) for g in record.get("group_ids", ()))
        for key, outcome in SKIP_KEYS.items():
            for gid in record.get(key, ()) or ():
                skipped.setdefault(str(gid), outcome)
    dead: dict[str, str] = {}
    reasons: Counter[str] = Counter()
    for mid, reason in dead_letters:
        if mid:
            dead.setdefault(mid, reason)
        reasons[_reason_kind(reason)] += 1
    waiting = set(outstanding)

    ledger = Ledger(issued=len(issued_list), dead_letter_reasons=dict(reasons))
    skip_counts: Counter[str] = Counter()
    for gid in issued_list:
        if applied[gid]:
            ledger.applied += 1
            if applied[gid] > 1:
                ledger.applied_twice.append(gid)
        elif gid in skipped:
            skip_counts[skipped[gid]] += 1
        elif gid in dead:
            ledger.dead_lettered += 1
        elif gid in waiting:
            ledger.outstanding += 1
        else:
            ledger.missing.append(gid)
    ledger.skipped = dict(skip_counts)
    return ledger


def _reason_kind(reason: str) -> str:
    """A dead-letter reason without its particulars (ids, numbers), for counting."""
    head = reason.split(":", 1)[0].strip()
    return head[:80] or "(no reason)"


async def bus_outcomes(config: Any) -> tuple[list[tuple[str, str]], list[str]]:
    """(message id, reason) of every dead letter, and the ids still unacknowledged on the
    prompts (inference group) and rollouts (trainer group) streams of ``config``'s bus."""
    from services.transport import make_bus
    from services.transport.names import INFERENCE_GROUP, TRAINER_GROUP

    bus = make_bus(config)
    try:
        letters: list[tuple[str, str]] = []
        after = "-"
        while True:
            page = await bus.dead_letters(count=1000, after=after)
            letters += [(d.message_id, d.reason) for d in page]
            if len(page) < 1000:
                break
            after = page[-1].entry_id
        waiting: list[str] = []
        for stream, group in (
            (config.bus.prompts_stream, INFERENCE_GROUP),
            (config.bus.rollouts_stream, TRAINER_GROUP),
        ):
            waiting += [d.message_id for d in await bus.unacked(stream, group, limit=1_000_000)]
        return letters, waiting
    finally:
        await bus.close()


__all__ = ["SKIP_KEYS", "Ledger", "bus_outcomes", "issued_ids", "reconcile"]
