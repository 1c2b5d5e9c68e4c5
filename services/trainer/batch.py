"""Scored groups to padded tensors: one row per rollout, prompt then response, right-padded.

Per-token tensors are aligned with the *predictions*: column ``t`` holds what the model says at
position ``t`` about token ``t + 1``, so ``response_mask[b, t]`` is set when token ``t + 1`` of
row ``b`` was generated (not part of the prompt, not padding). Right padding keeps every real
token at its natural position, so no position ids are needed.

Every row carries the index of its group among the batch's sorted unique group ids. That index
depends only on *which* groups are in the batch, never on their order, so advantages computed
from it (``compute_advantages_ragged``) do not change when the batch is shuffled.

Rollouts whose status is not ``scored`` (the verifier could not score them, timed out, or
failed) are left out: their reward is not a judgement of the completion, and counting it as 0
would bias the group's statistics. A group left with no rollout is not trainable.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from services.trainer.vision import GroupVision, RowVision

if TYPE_CHECKING:  # only for hints: the GPU check imports this module without msgpack
    from services.core.schemas import ScoredGroup


@dataclass(frozen=True)
class TrainBatch:
    """The tensors of one optimiser step (all on the CPU until moved with :meth:`to`)."""

    input_ids: Tensor  # long [B, L], padded with pad_id
    attention_mask: Tensor  # long [B, L]
    response_mask: Tensor  # bool [B, L-1]: column t predicts a generated token t+1
    behaviour_logprobs: Tensor  # float32 [B, L-1]: inference log-probs, 0 off the mask
    rewards: Tensor  # float64 [B]
    success: Tensor  # bool [B]
    group_index: Tensor  # long [B]: row of the group in ``group_ids``
    staleness: Tensor  # long [B]: policy versions between generation and this step
    correct: Tensor  # bool [B]: too stale, kept with truncated importance sampling
    group_ids: tuple[str, ...]  # sorted unique group ids
    sample_keys: tuple[tuple[str, int], ...]  # (group id, rollout index) of each row
    #: Pictures of each group (aligned with ``group_ids``); empty for a text-only batch.
    vision: tuple[GroupVision | None, ...] = ()
    #: Token ids the engine never samples (picture placeholders): masked out of the policy.
    never: tuple[int, ...] = ()

    def row_vision(self, rows: Tensor | None = None) -> RowVision | None:
        """The pictures of ``rows`` (all rows by default); None for a text-only batch."""
        if not any(v is not None for v in self.vision):
            return None
        whole = RowVision(self.vision, self.group_index)
        return whole if rows is None else whole.subset(rows)

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def tokens(self) -> int:
        """Prompt plus response tokens (padding excluded): what a forward pass processes."""
        return int(self.attention_mask.sum())

    @property
    def response_tokens(self) -> int:
        return int(self.response_mask.sum())

    def to(self, device: torch.device | str) -> TrainBatch:
        def move(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=True)

        return TrainBatch(
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            response_mask=move(self.response_mask),
            behaviour_logprobs=move(self.behaviour_logprobs),
            rewards=move(self.rewards),
            success=move(self.success),
            group_index=move(self.group_index),
            staleness=move(self.staleness),
            correct=move(self.correct),
            group_ids=self.group_ids,
            sample_keys=self.sample_keys,
            vision=tuple(None if v is None else v.to(device) for v in self.vision),
            never=self.never,
        )


def trainable(group: ScoredGroup) -> bool:
    """Whether a group has at least one scored rollout with at least one token."""
    return any(r.status == "scored" and r.token_ids.size for r in group.rollouts)


def problem(group: ScoredGroup, *, max_len: int, vocab_size: int) -> str | None:
    """Why ``group`` cannot be trained on, or None: the trainer dead-letters such groups."""
    if len(group.prompt_token_ids) == 0:
        return "empty prompt_token_ids"
    if len(group.prompt_token_ids) >= max_len:
        return f"prompt of {len(group.prompt_token_ids)} tokens fills model.max_model_len={max_len}"
    for part in [group.prompt_token_ids, *(r.token_ids for r in group.rollouts)]:
        if part.size and int(part.max()) >= vocab_size:
            return f"token id {int(part.max())} outside the vocabulary of {vocab_size}"
    return None


def collate(
    groups: Sequence[ScoredGroup],
    *,
    pad_id: int,
    max_len: int,
    staleness: Mapping[str, int] | None = None,
    correct: frozenset[str] = frozenset(),
    vision: Mapping[str, GroupVision] | None = None,
    never: Collection[int] = (),
) -> TrainBatch:
    """Stack the scored rollouts of ``groups`` into a :class:`TrainBatch`.

    ``staleness`` maps group id to its staleness (0 when absent); groups in ``correct`` get
    truncated importance sampling; ``vision`` holds the pictures of the groups that have any;
    ``never`` the token ids the engine is told never to sample.
    A response is cut where prompt plus response would pass ``max_len``.
    """
    vision = vision or {}
    staleness = staleness or {}
    ids_sorted = tuple(sorted({g.group_id for g in groups if trainable(g)}))
    row_of = {gid: i for i, gid in enumerate(ids_sorted)}
    rows: list[tuple[list[int], int, list[float]]] = []  # (tokens, prompt length, logprobs)
    rewards, success, index, stale, corr, keys = [], [], [], [], [], []
    for g in groups:
        if g.group_id not in row_of:
            continue
        prompt = [int(t) for t in g.prompt_token_ids]
        if not prompt:
            # The first response token needs a position to be predicted from.
            raise ValueError(f"group {g.group_id}: empty prompt_token_ids")
        if len(prompt) >= max_len:
            raise ValueError(
                f"group {g.group_id}: prompt of {len(prompt)} tokens leaves no room in "
                f"model.max_model_len={max_len}"
            )
        for k, r in enumerate(g.rollouts):
            if r.status != "scored" or not r.token_ids.size:
                continue
            keep = max_len - len(prompt)
            response = [int(t) for t in r.token_ids[:keep]]
            rows.append((prompt + response, len(prompt), [float(x) for x in r.logprobs[:keep]]))
            rewards.append(float(r.reward))
            success.append(bool(r.success))
            index.append(row_of[g.group_id])
            stale.append(int(staleness.get(g.group_id, 0)))
            corr.append(g.group_id in correct)
            keys.append((g.group_id, k))
    if not rows:
        raise ValueError("no trainable rollouts in the batch (every group empty or unscored)")

    width = max(len(tokens) for tokens, _, _ in rows)
    b = len(rows)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention = torch.zeros((b, width), dtype=torch.long)
    response_mask = torch.zeros((b, width - 1), dtype=torch.bool)
    behaviour = torch.zeros((b, width - 1), dtype=torch.float32)
    for i, (tokens, plen, logprobs) in enumerate(rows):
        n = len(tokens)
        input_ids[i, :n] = torch.tensor(tokens, dtype=torch.long)
        attention[i, :n] = 1
        # Token j (j >= plen) is predicted at column j - 1.
        response_mask[i, plen - 1 : n - 1] = True
        behaviour[i, plen - 1 : n - 1] = torch.tensor(logprobs, dtype=torch.float32)
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention,
        response_mask=response_mask,
        behaviour_logprobs=behaviour,
        rewards=torch.tensor(rewards, dtype=torch.float64),
        success=torch.tensor(success, dtype=torch.bool),
        group_index=torch.tensor(index, dtype=torch.long),
        staleness=torch.tensor(stale, dtype=torch.long),
        correct=torch.tensor(corr, dtype=torch.bool),
        group_ids=ids_sorted,
        sample_keys=tuple(keys),
        vision=tuple(vision.get(gid) for gid in ids_sorted) if vision else (),
        never=tuple(sorted(never)),
    )
