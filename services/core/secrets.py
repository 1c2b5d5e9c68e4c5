"""Secrets kept out of what people and files see: printed configs, console lines, summaries.

A value is secret when its field is named like a credential (``admin_token``, ``password``,
``api_key``...) or when it is the password part of a URL (``redis://:PASSWORD@host``). Pure
functions, no I/O: the CLI uses them before anything heavy is imported.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"

# A name that ends in one of these words: admin_token, password, api_key (not max_tokens).
_SECRET_NAME = re.compile(
    r"(^|[_.-])(token|passw(or)?d|secret|api_?key|credentials?|private_key|auth)$", re.I
)
# scheme://[user]:password@ : the user info of a URL that carries a password. The password runs
# to the last "@" before the host, so an unencoded "@" or "/" in it is hidden too.
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^\s:/@]*:)(?P<password>\S*)@", re.I)
# NAME=VALUE (an override such as inference.admin_token=..., or a query parameter).
_ASSIGNMENT = re.compile(r"(?P<name>[\w.-]+)=(?P<value>[^\s&;,]*)")


def is_secret_name(name: str) -> bool:
    """Whether a field or parameter named ``name`` holds a credential."""
    return bool(_SECRET_NAME.search(name))


def redact_url(url: str) -> str:
    """``url`` with its password, and any secret query parameter, replaced by ``***``.

    ``redis://:pw@redis:6379/0`` becomes ``redis://:***@redis:6379/0``; the user name, host,
    port and path stay, so the URL still says where it points.
    """
    return redact_text(url)


def redact_text(text: str) -> str:
    """Free text with the passwords of the URLs in it and secret ``NAME=VALUE`` values hidden."""

    def password(m: re.Match[str]) -> str:
        head, secret = m.group("head"), m.group("password")
        # "@" inside the password: hide up to the last one of this URL.
        return f"{head}{REDACTED if secret else ''}@"

    def assignment(m: re.Match[str]) -> str:
        if m.group("value") and is_secret_name(m.group("name")):
            return f"{m.group('name')}={REDACTED}"
        return m.group(0)

    text = _URL_PASSWORD.sub(password, text)
    return _ASSIGNMENT.sub(assignment, text)


def redact_value(name: str, value: Any) -> Any:
    """The value of field ``name`` as it may be shown: a secret field's non-empty value is
    ``***``; strings lose URL passwords; containers are redacted item by item."""
    if is_secret_name(name) and value not in (None, "", [], {}):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return redact_tree(value)
    if isinstance(value, list | tuple):
        return [redact_value(name, v) for v in value]
    return value


def redact_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a nested mapping (a config dump, a summary) with every secret redacted."""
    return {key: redact_value(str(key), value) for key, value in tree.items()}


def redacted_fields(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields :func:`redact_tree` changes (``bus.url``...)."""
    changed = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and not is_secret_name(str(key)):
            changed += redacted_fields(value, dotted + ".")
        elif redact_value(str(key), value) != value:
            changed.append(dotted)
    return changed
