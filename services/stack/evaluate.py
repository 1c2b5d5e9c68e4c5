"""Held-out accuracy of a model, a checkpoint, a run, or a running inference service.

``mapo eval TARGET`` answers one question the same way for every target: which share of the
held-out problems does the policy solve with greedy decoding? Local targets are decoded with
transformers by the trainer's own evaluation (so the number matches the trainer's
``eval_accuracy``); an ``http://`` target is asked through its OpenAI-compatible completions API
at temperature 0. Both use the task's exact-match rule.

A local TARGET may be an HF model directory (a checkpoint's ``model/`` included), a weight-store
version (``weights/v00000012``), a weight store (its newest version), or a run directory written
by ``mapo up`` (its model with the newest weights of the run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.core.config import ConfigError, RunConfig, load_config
from services.core.tasks import Example

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: Enough new tokens for any answer of the built-in task plus eos, with room to spare.
MAX_NEW_TOKENS = 8
#: The OpenAI route of the inference service takes at most this many prompts per request.
HTTP_BATCH = 256


def accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example]
) -> float:
    """Share of ``examples`` whose greedy completion is exactly the answer."""
    from services.trainer.evaluation import evaluate

    return evaluate(model, tokenizer, examples, max_new_tokens=MAX_NEW_TOKENS).accuracy


@dataclass(frozen=True)
class LocalModel:
    """Where a local target's weights come from: a model directory, maybe newer tensors."""

    model_dir: Path
    version_dir: Path | None = None

    def describe(self) -> str:
        if self.version_dir is None:
            return str(self.model_dir)
        return f"{self.model_dir} with weights {self.version_dir}"


def _newest_version(store: Path) -> Path | None:
    from services.weights.store import latest_version, version_dir

    version = latest_version(store)
    return None if version is None else version_dir(store, version)


def resolve_target(target: Path, base_model: Path | None) -> LocalModel:
    """Which model directory and which weight version a local TARGET stands for."""
    from services.weights.store import MANIFEST_FILE, list_versions
    from services.weights.versions import LATEST_FILE

    if (target / "config.json").is_file():
        return LocalModel(target)
    if (target / "model" / "config.json").is_file():  # a run directory
        weights = target / "weights"
        return LocalModel(target / "model", _newest_version(weights) if weights.is_dir() else None)
    is_version = (target / MANIFEST_FILE).is_file()
    is_store = (target / LATEST_FILE).is_file() or bool(list_versions(target))
    if is_version or is_store:
        if base_model is None or not (base_model / "config.json").is_file():
            raise ValueError(
                f"{target} holds weights only; its model directory ({base_model}) is missing: "
                "pass --config with model.path set to the model the run started from"
            )
        return LocalModel(base_model, target if is_version else _newest_version(target))
    raise ValueError(
        f"{target} is not a model directory, a weight-store version, a weight store or a run "
        "directory (found no config.json, manifest.json or LATEST)"
    )


def quiet_transformers() -> None:
    """No per-file progress bars from transformers: they would break the run's status line."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_policy(
    model_dir: Path, version_dir: Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The HF model and tokenizer, with a verified weight-store version loaded over it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if version_dir is not None:
        from services.weights.store import load_tensors

        tensors = load_tensors(version_dir)
        result = model.load_state_dict(tensors, strict=False)
        # Tied embeddings: a version carries no lm_head.weight, which the model derives.
        missing = [k for k in result.missing_keys if k != "lm_head.weight"]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{version_dir} does not fit {model_dir}: missing {missing[:5]}, "
                f"unexpected {list(result.unexpected_keys)[:5]}"
            )
        model.tie_weights()
    model.eval()
    return model, tokenizer


def newest_weights(model_dir: Path, store: Path | None) -> LocalModel:
    """The model directory with the newest version of ``store`` (none yet: the model itself)."""
    version = _newest_version(store) if store is not None and store.is_dir() else None
    return LocalModel(model_dir, version)


def held_out(config: RunConfig) -> list[Example]:
    """The config's held-out problems."""
    from services.trainer.dataset import eval_examples

    return eval_examples(
        config.task.dataset, config.task.eval_dataset, config.task.name, config.task.seed
    )


def _post_json(url: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as reply:
        data: dict[str, Any] = json.loads(reply.read())
    return data


def service_accuracy(
    base_url: str, examples: Sequence[Example], timeout_s: float = 120.0
) -> tuple[float, str]:
    """Greedy accuracy through a running service's completions API; (accuracy, model name)."""
    from services.trainer.evaluation import is_correct

    base = base_url.rstrip("/")
    with urllib.request.urlopen(base + "/v1/models", timeout=timeout_s) as reply:
        models = json.loads(reply.read())
    name = str(models["data"][0]["id"])
    hits = 0
    for lo in range(0, len(examples), HTTP_BATCH):
        chunk = examples[lo : lo + HTTP_BATCH]
        body = {
            "model": name,
            "prompt": [e.prompt for e in chunk],
            "max_tokens": MAX_NEW_TOKENS,
            "temperature": 0.0,
        }
        choices = _post_json(base + "/v1/completions", body, timeout_s)["choices"]
        texts = [c["text"] for c in sorted(choices, key=lambda c: int(c["index"]))]
        hits += sum(is_correct(t, e.answer) for t, e in zip(texts, chunk, strict=True))
    return (hits / len(examples) if examples else 0.0), name


def _eval_config(args: argparse.Namespace, config: RunConfig, target: Path) -> RunConfig:
    """A run directory's own config.toml describes its task, unless --config says otherwise."""
    own = target / "config.toml"
    if args.config is None and own.is_file():
        return load_config(own, overrides=args.overrides)
    return config


def cli_eval(args: argparse.Namespace, config: RunConfig) -> int:
    """``mapo eval TARGET [--limit N]``: print held-out accuracy and exit 0."""
    target_text: str = args.target
    started = time.monotonic()
    if target_text.startswith(("http://", "https://")):
        examples = held_out(config)[: args.limit]
        if not examples:
            print(
                "mapo eval: the config names no held-out set (task.eval_dataset)", file=sys.stderr
            )
            return 2
        try:
            acc, what = service_accuracy(target_text, examples)
        except (urllib.error.URLError, OSError, KeyError, ValueError) as exc:
            print(
                f"mapo eval: {target_text} did not answer the completions API ({exc}).\n"
                "how to fix: start it with `mapo inference serve` and pass its address, "
                "e.g. http://127.0.0.1:8000",
                file=sys.stderr,
            )
            return 1
        what = f"{target_text} (model {what})"
    else:
        target = Path(target_text)
        if not target.exists():
            print(f"mapo eval: {target} does not exist", file=sys.stderr)
            return 2
        try:
            config = _eval_config(args, config, target)
        except ConfigError as exc:
            print(f"mapo eval: {exc}", file=sys.stderr)
            return 2
        examples = held_out(config)[: args.limit]
        if not examples:
            print(
                "mapo eval: the config names no held-out set (task.eval_dataset)", file=sys.stderr
            )
            return 2
        try:
            policy = resolve_target(target, Path(config.model.path))
            model, tokenizer = load_policy(policy.model_dir, policy.version_dir)
        except ValueError as exc:
            print(f"mapo eval: {exc}", file=sys.stderr)
            return 2
        acc = accuracy(model, tokenizer, examples)
        what = policy.describe()
    seconds = time.monotonic() - started
    print(
        f"held-out accuracy {acc:.1%} ({round(acc * len(examples))}/{len(examples)} "
        f"{config.task.name} problems, greedy) of {what} in {seconds:.1f} s"
    )
    return 0
