"""Which delivered group the next step applies, and what becomes of the others.

:func:`admit` is a pure function of the group, what the run knows (its id, policy version,
the ids already applied or batched) and the config, so every rule can be read and tested as a
table. The rules, in order:

1. a group from another run (its id lacks this run's prefix) is dead-lettered;
2. a group the trainer cannot use (empty prompt, too long, token ids outside the vocabulary)
   is dead-lettered;
3. a repeat of an applied or already batched id is skipped (a duplicate);
4. a group more than ``trainer.max_staleness`` versions behind is skipped with
   ``stale_policy="drop"``, or applied with truncated importance sampling (``"correct"``);
5. with ``algorithm.dapo_filter``, a group whose outcomes are all equal is skipped;
6. a group with no scored rollout is skipped;
7. everything else is applied.

A skipped group is acknowledged at the next checkpoint, like an applied one; every outcome but
"apply" is counted under the name in :attr:`Verdict.counter`.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass
from enum import StrEnum

import torch

from services.core.advantages import dapo_keep_mask
from services.core.config import RunConfig
from services.core.schemas import ScoredGroup
from services.trainer.batch import problem, trainable


class Action(StrEnum):
    APPLY = "apply"
    SKIP = "skip"
    """Not applied; acknowledged at the next checkpoint."""
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True)
class RunView:
    """What admission needs to know about the run at the moment a group arrives."""

    run_id: str
    version: int
    vocab_size: int
    seen: Container[str]
    """Ids applied to the model lineage or already in the batch being collected."""


@dataclass(frozen=True)
class Verdict:
    action: Action
    counter: str | None = None
    """The run counter this outcome adds one to (None for an applied group)."""
    reason: str = ""
    """Why a group is dead-lettered."""
    staleness: int = 0
    """Policy versions between generation and now (applied groups)."""
    corrected: bool = False
    """Applied with truncated importance sampling (too stale, ``stale_policy="correct"``)."""


def admit(group: ScoredGroup, run: RunView, config: RunConfig) -> Verdict:
    """The verdict on one delivered group; see the module docstring for the rules."""
    gid = group.group_id
    if not gid.startswith(f"{run.run_id}:"):
        reason = f"group {gid} was not issued by run {run.run_id}"
        return Verdict(Action.DEAD_LETTER, "dead_lettered", reason)
    unusable = problem(group, max_len=config.model.max_model_len, vocab_size=run.vocab_size)
    if unusable is not None:
        reason = f"trainer cannot use group {gid}: {unusable}"
        return Verdict(Action.DEAD_LETTER, "dead_lettered", reason)
    if gid in run.seen:
        return Verdict(Action.SKIP, "duplicates")
    staleness = max(run.version - group.policy_version, 0)
    too_stale = staleness > config.trainer.max_staleness
    if too_stale and config.trainer.stale_policy == "drop":
        return Verdict(Action.SKIP, "stale_dropped", staleness=staleness)
    if config.algorithm.dapo_filter and not dapo_keeps(group, config):
        return Verdict(Action.SKIP, "dapo_filtered", staleness=staleness)
    if not trainable(group):
        return Verdict(Action.SKIP, "unscored", staleness=staleness)
    return Verdict(Action.APPLY, staleness=staleness, corrected=too_stale)


def dapo_keeps(group: ScoredGroup, config: RunConfig) -> bool:
    """DAPO's dynamic sampling: keep a group only if its outcomes are not all equal."""
    rewards = torch.tensor([[r.reward for r in group.rollouts if r.status == "scored"]])
    if rewards.numel() == 0:
        return False
    keep = dapo_keep_mask(
        rewards,
        max_reward=config.task.max_reward,
        success_threshold=config.task.success_threshold,
    )
    return bool(keep[0])
