"""The trainer's prompts: loaded from a file or a built-in task, issued in a resumable order.

Sources (``task.dataset``): ``builtin:NAME`` (a built-in task's train split, or its held-out or
out-of-domain split for evaluation); a ``.jsonl`` / ``.json`` file; a ``.parquet`` file (needs ``pyarrow``); a
directory written by ``datasets.save_to_disk`` (needs ``datasets``). Every record needs
``prompt`` (or ``problem``, as in the public Geo3K conversions, or chat-style ``messages``:
roles and contents, pictures as ``{"type": "image"}`` parts) and ``answer``; ``task`` defaults
to ``task.name`` and ``id`` to the record's index. A record may carry pictures under ``images``
(a list) or ``image``: file paths (relative to the dataset file), encoded bytes, a Hugging Face
``datasets`` image value (``{"bytes", "path"}``, or a decoded picture). ``<image>`` markers in
the prompt are dropped: the chat template places the pictures before the text.

The order is a pure function of the seed and the position: epoch ``e`` visits the examples in
``shuffle(range(n), seed + e)``, so a checkpoint stores just ``(epoch, index)`` and a resumed run
issues the same prompts under the same ids as the run it replaces.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.core.images import encode_png
from services.core.tasks import Example, load_builtin


class DatasetError(ValueError):
    """A dataset that cannot be read or has unusable records; the message says which."""


def _image_bytes(item: Any, base: Path | None, where: str) -> bytes:
    """One picture of a record as encoded bytes (see the module docstring for the forms)."""
    if isinstance(item, Mapping):
        if item.get("bytes"):
            return bytes(item["bytes"])
        item = item.get("path")
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, str) and item:
        path = Path(item)
        if not path.is_absolute() and base is not None:
            path = base / path
        try:
            return path.read_bytes()
        except OSError as exc:
            raise DatasetError(f"{where}: cannot read image {item}: {exc.strerror}") from None
    if hasattr(item, "save"):  # a decoded picture (datasets' Image feature)
        return encode_png(item)
    raise DatasetError(f"{where}: an image must be a path, bytes or an image value")


def _images_of(rec: Mapping[str, Any], base: Path | None, where: str) -> tuple[bytes, ...]:
    raw = rec.get("images", rec.get("image"))
    if raw is None:
        return ()
    items = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    return tuple(_image_bytes(item, base, where) for item in items)


ROLES = ("system", "user", "assistant")


def _conversation(
    rec: Mapping[str, Any], base: Path | None, where: str
) -> tuple[str, str, tuple[bytes, ...]]:
    """A chat-style record's (conversation as JSON, last user text, pictures in order).

    Pictures are ``{"type": "image"}`` parts, each with its picture inline (``"image"``: a path,
    bytes or an image value) or, in order, from the record's ``images``.
    """
    raw = rec["messages"]
    if not isinstance(raw, list) or not raw:
        raise DatasetError(f"{where}: messages must be a non-empty list")
    inline: list[bytes] = []
    bare = 0
    messages: list[dict[str, Any]] = []
    question = ""
    for k, m in enumerate(raw):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES:
            raise DatasetError(f"{where}: messages[{k}] needs a role in {ROLES}")
        content = m.get("content")
        if isinstance(content, str):
            messages.append({"role": m["role"], "content": content})
            text = content
        elif isinstance(content, list):
            parts: list[dict[str, str]] = []
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, Mapping) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                    texts.append(part["text"])
                elif kind == "image":
                    parts.append({"type": "image"})
                    if part.get("image") is not None:
                        inline.append(_image_bytes(part["image"], base, where))
                    else:
                        bare += 1
                else:
                    raise DatasetError(
                        f"{where}: messages[{k}] has a part that is not text or image"
                    )
            messages.append({"role": m["role"], "content": parts})
            text = " ".join(texts)
        else:
            raise DatasetError(f"{where}: messages[{k}] content must be text or a list of parts")
        if m["role"] == "user":
            question = text
    listed = _images_of(rec, base, where)
    if inline and bare:
        raise DatasetError(f"{where}: give every picture inline or none")
    pictures = tuple(inline) or listed
    if len(pictures) != len(inline) + bare:
        raise DatasetError(
            f"{where}: {len(inline) + bare} image parts but {len(pictures)} pictures"
        )
    if not question.strip():
        raise DatasetError(f"{where}: messages hold no user text")
    return json.dumps(messages), question.strip(), pictures


def _records_to_examples(
    records: Iterable[Mapping[str, Any]], task: str, where: str, base: Path | None = None
) -> list[Example]:
    out: list[Example] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise DatasetError(f"{where}: record {i} is not an object")
        if "messages" in rec and "answer" in rec:
            chat, question, pictures = _conversation(rec, base, f"{where}: record {i}")
            out.append(
                Example(
                    id=str(rec.get("id", i)),
                    prompt=question,
                    answer=str(rec["answer"]),
                    task=str(rec.get("task") or task),
                    images=pictures,
                    messages=chat,
                )
            )
            continue
        prompt = rec.get("prompt", rec.get("problem"))
        if prompt is None or "answer" not in rec:
            raise DatasetError(f"{where}: record {i} needs a prompt (or problem) and an answer")
        if not isinstance(prompt, str) or not prompt.replace("<image>", "").strip():
            raise DatasetError(f"{where}: record {i} has an empty or non-text prompt")
        out.append(
            Example(
                id=str(rec.get("id", i)),
                prompt=prompt.replace("<image>", "").strip(),
                answer=str(rec["answer"]),
                task=str(rec.get("task") or task),
                images=_images_of(rec, base, f"{where}: record {i}"),
            )
        )
    if not out:
        raise DatasetError(f"{where}: no records")
    return out


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{lineno}: not JSON: {exc}") from None
    return records


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
    return rows


def _read_saved_dataset(path: Path, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DatasetError(
            f"{path}: reading a saved dataset needs the datasets package (pip install datasets)"
        ) from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DatasetError(f"{path}: no split '{split}'; it has {sorted(loaded)}")
        loaded = loaded[split]
    return [dict(r) for r in loaded]


def load_examples(spec: str, task: str, seed: int = 0, split: str = "train") -> list[Example]:
    """Examples of ``spec`` (see the module docstring); ``split`` picks a built-in's train,
    held-out (any other name) or ``ood`` split."""
    if spec.startswith("builtin:"):
        built = load_builtin(spec.removeprefix("builtin:"), seed)
        if split == "ood":
            return list(built.ood)
        return list(built.train if split == "train" else built.eval)
    path = Path(spec)
    if not path.exists():
        raise DatasetError(f"dataset {spec} not found (a path, or builtin:NAME)")
    if path.is_dir():
        return _records_to_examples(_read_saved_dataset(path, split), task, spec, path)
    suffix = path.suffix.lower()
    base = path.parent
    if suffix == ".jsonl":
        return _records_to_examples(_read_jsonl(path), task, spec, base)
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        records = data if isinstance(data, list) else [data]
        return _records_to_examples(records, task, spec, base)
    if suffix == ".parquet":
        return _records_to_examples(_read_parquet(path), task, spec, base)
    raise DatasetError(f"dataset {spec}: unknown format (use .jsonl, .json, .parquet or builtin:)")


def eval_examples(dataset: str, eval_dataset: str, task: str, seed: int) -> list[Example]:
    """The held-out set: ``eval_dataset`` when given, else a built-in task's held-out split."""
    if eval_dataset:
        return load_examples(eval_dataset, task, seed, split="test")
    if dataset.startswith("builtin:"):
        return load_examples(dataset, task, seed, split="eval")
    return []


def ood_examples(dataset: str, ood_dataset: str, task: str, seed: int) -> list[Example]:
    """The out-of-domain held-out set: ``ood_dataset`` when given, else a built-in task's
    out-of-domain split; empty when there is neither."""
    if ood_dataset:
        return load_examples(ood_dataset, task, seed, split="test")
    if dataset.startswith("builtin:"):
        return load_examples(dataset, task, seed, split="ood")
    return []


@dataclass(frozen=True)
class Position:
    """Where the next prompt comes from: ``index`` within the shuffled order of ``epoch``."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Position:
        return Position(int(d["epoch"]), int(d["index"]))


class PromptOrder:
    """Endless deterministic iteration over examples; ``position`` is all the state there is."""

    def __init__(self, examples: list[Example], seed: int, position: Position = Position()):
        if not examples:
            raise DatasetError("the dataset is empty")
        self.examples = examples
        self.seed = seed
        self.position = position
        self._order_epoch = -1
        self._order: list[int] = []

    def _order_of(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            order = list(range(len(self.examples)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._order, self._order_epoch = order, epoch
        return self._order

    def __iter__(self) -> Iterator[tuple[Position, Example]]:
        return self

    def __next__(self) -> tuple[Position, Example]:
        """The example at the current position, then advance past it."""
        pos = self.position
        if pos.index >= len(self.examples):
            pos = Position(pos.epoch + 1, 0)
        example = self.examples[self._order_of(pos.epoch)[pos.index]]
        self.position = Position(pos.epoch, pos.index + 1)
        return pos, example
