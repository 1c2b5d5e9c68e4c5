"""Built-in verifiable tasks: datasets generated from a seed, no download.

A task is a list of :class:`Example` split into train and held-out sets, and may add an
out-of-domain set: problems of a kind the train split never contains, which measure whether what
training taught carries over. ``dataset = "builtin:NAME"`` in a run config selects one; the reward
service scores it with the verifier of the same name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One problem: the prompt shown to the policy and the reference answer the verifier checks."""

    id: str
    prompt: str
    answer: str
    task: str
    #: Encoded images (PNG, JPEG, ...) shown with the prompt, in order; empty for text tasks.
    images: tuple[bytes, ...] = ()
    #: A whole conversation to render instead of one user turn (a dataset's chat-style
    #: ``messages``, as JSON: roles and contents, pictures as ``{"type": "image"}`` parts in the
    #: order of ``images``); empty for a plain question.
    messages: str = ""


@dataclass(frozen=True)
class BuiltinTask:
    name: str
    train: tuple[Example, ...]
    eval: tuple[Example, ...]
    #: Out-of-domain held-out problems (empty when the task has none).
    ood: tuple[Example, ...] = ()


_BUILDERS: dict[str, Callable[[int], BuiltinTask]] = {}


def register_builtin(name: str, builder: Callable[[int], BuiltinTask]) -> None:
    _BUILDERS[name] = builder


def builtin_names() -> list[str]:
    return sorted(_BUILDERS)


def load_builtin(name: str, seed: int = 0) -> BuiltinTask:
    """The built-in task ``name`` with its deterministic train/held-out split for ``seed``."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown built-in task '{name}'; known: {', '.join(builtin_names())}")
    return _BUILDERS[name](seed)


from services.core.tasks import arithmetic as _arithmetic  # noqa: E402  (registers itself)
from services.core.tasks import shapes as _shapes  # noqa: E402  (registers itself)

__all__ = ["BuiltinTask", "Example", "builtin_names", "load_builtin", "register_builtin"]
del _arithmetic, _shapes
