"""services/core/secrets.py: what counts as a secret, and how it is hidden."""

from __future__ import annotations

import pytest

from services.core.config import RunConfig
from services.core.secrets import (
    REDACTED,
    is_secret_name,
    redact_text,
    redact_tree,
    redact_url,
    redacted_fields,
)


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("admin_token", True),
        ("inference.admin_token", True),
        ("REDIS_PASSWORD", True),
        ("GF_SECURITY_ADMIN_PASSWORD", True),
        ("api_key", True),
        ("credentials", True),
        ("max_tokens", False),
        ("keep_versions", False),
        ("url", False),
        ("loss_agg", False),
    ],
)
def test_secret_names(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://mapo:secret@h:1/0", "rediss://mapo:***@h:1/0"),
        ("redis://h:1/0", "redis://h:1/0"),
        ("redis://mapo@h:1/0", "redis://mapo@h:1/0"),  # a user name is no secret
        ("redis://:p@ss/word@[::1]:6379/0", "redis://:***@[::1]:6379/0"),  # unencoded @ and /
        ("redis://h:1/0?password=pw&db=2", "redis://h:1/0?password=***&db=2"),
        ("http://trainer:8200", "http://trainer:8200"),
        ("memory://bus", "memory://bus"),
    ],
)
def test_urls_keep_where_they_point_without_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_free_text_and_overrides() -> None:
    line = "cannot use redis://:abc@h:1/0 nor http://u:v@w/x; --set inference.admin_token=t0k"
    assert redact_text(line) == (
        "cannot use redis://:***@h:1/0 nor http://u:***@w/x; --set inference.admin_token=***"
    )
    assert redact_text("trainer.steps=5 task.dataset=a.jsonl") == (
        "trainer.steps=5 task.dataset=a.jsonl"
    )


def test_a_config_tree_and_the_fields_it_changes() -> None:
    config = RunConfig.model_validate(
        {"bus": {"url": "redis://:pw@r:6379/0"}, "inference": {"admin_token": "t"}}
    )
    tree = config.model_dump(mode="json")
    shown = redact_tree(tree)
    assert shown["bus"]["url"] == "redis://:***@r:6379/0"
    assert shown["inference"]["admin_token"] == REDACTED
    assert shown["rollout"] == tree["rollout"]  # max_tokens stays
    assert redacted_fields(tree) == ["bus.url", "inference.admin_token"]
    assert redacted_fields(RunConfig().model_dump(mode="json")) == []  # nothing set: nothing
    assert tree["bus"]["url"] == "redis://:pw@r:6379/0"  # the input is not changed
