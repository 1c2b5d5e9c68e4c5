"""Admission of delivered groups, rule by rule, as a table (services/trainer/admission.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from services.core.config import RunConfig
from services.core.schemas import ScoredGroup
from services.trainer.admission import Action, RunView, Verdict, admit
from tests.fixtures.redis import make_group

RUN = "run1"
VOCAB = 50


def group(name: str = f"{RUN}:0:0", *, version: int = 5, **changes: Any) -> ScoredGroup:
    return dataclasses.replace(make_group(name, size=4, version=version), **changes)


def unscored(g: ScoredGroup) -> ScoredGroup:
    rollouts = tuple(dataclasses.replace(r, status="error", reward=0.0) for r in g.rollouts)
    return dataclasses.replace(g, rollouts=rollouts)


def all_equal(g: ScoredGroup) -> ScoredGroup:
    rollouts = tuple(dataclasses.replace(r, reward=1.0, success=True) for r in g.rollouts)
    return dataclasses.replace(g, rollouts=rollouts)


def config(**trainer: Any) -> RunConfig:
    algorithm = {"dapo_filter": trainer.pop("dapo_filter", False)}
    return RunConfig.model_validate(
        {"trainer": trainer, "algorithm": algorithm, "model": {"max_model_len": 16}}
    )


CASES: list[tuple[str, ScoredGroup, RunConfig, Verdict]] = [
    ("fresh group", group(), config(), Verdict(Action.APPLY)),
    ("one version behind", group(version=4), config(), Verdict(Action.APPLY, staleness=1)),
    (
        "another run's group",
        group("run0:0:0"),
        config(),
        Verdict(Action.DEAD_LETTER, "dead_lettered", "group run0:0:0 was not issued by run run1"),
    ),
    (
        "empty prompt",
        group(prompt_token_ids=np.zeros(0, dtype=np.int32)),
        config(),
        Verdict(
            Action.DEAD_LETTER,
            "dead_lettered",
            "trainer cannot use group run1:0:0: empty prompt_token_ids",
        ),
    ),
    (
        "prompt fills the context",
        group(prompt_token_ids=np.arange(16, dtype=np.int32)),
        config(),
        Verdict(
            Action.DEAD_LETTER,
            "dead_lettered",
            "trainer cannot use group run1:0:0: prompt of 16 tokens fills model.max_model_len=16",
        ),
    ),
    (
        "token outside the vocabulary",
        group(prompt_token_ids=np.array([1, VOCAB], dtype=np.int32)),
        config(),
        Verdict(
            Action.DEAD_LETTER,
            "dead_lettered",
            f"trainer cannot use group run1:0:0: token id {VOCAB} outside the vocabulary of {VOCAB}",
        ),
    ),
    ("already applied", group(f"{RUN}:0:7"), config(), Verdict(Action.SKIP, "duplicates")),
    (
        "too stale, drop",
        group(version=2),
        config(max_staleness=2, stale_policy="drop"),
        Verdict(Action.SKIP, "stale_dropped", staleness=3),
    ),
    (
        "too stale, correct",
        group(version=2),
        config(max_staleness=2, stale_policy="correct"),
        Verdict(Action.APPLY, staleness=3, corrected=True),
    ),
    (
        "stale within the bound",
        group(version=3),
        config(max_staleness=2, stale_policy="drop"),
        Verdict(Action.APPLY, staleness=2),
    ),
    (
        "all-equal outcomes under the DAPO filter",
        all_equal(group()),
        config(dapo_filter=True),
        Verdict(Action.SKIP, "dapo_filtered"),
    ),
    (
        "mixed outcomes under the DAPO filter",
        group(),
        config(dapo_filter=True),
        Verdict(Action.APPLY),
    ),
    ("all-equal outcomes without the filter", all_equal(group()), config(), Verdict(Action.APPLY)),
    ("no scored rollout", unscored(group()), config(), Verdict(Action.SKIP, "unscored")),
    (
        "another run's duplicate: the run check comes first",
        group("run0:0:7"),
        config(),
        Verdict(Action.DEAD_LETTER, "dead_lettered", "group run0:0:7 was not issued by run run1"),
    ),
    (
        "a stale duplicate is a duplicate",
        group(f"{RUN}:0:7", version=0),
        config(max_staleness=1, stale_policy="drop"),
        Verdict(Action.SKIP, "duplicates"),
    ),
]


@pytest.mark.parametrize(("why", "g", "cfg", "expected"), CASES, ids=[c[0] for c in CASES])
def test_admission_table(why: str, g: ScoredGroup, cfg: RunConfig, expected: Verdict) -> None:
    run = RunView(run_id=RUN, version=5, vocab_size=VOCAB, seen={f"{RUN}:0:7", "run0:0:7"})
    assert admit(g, run, cfg) == expected, why
