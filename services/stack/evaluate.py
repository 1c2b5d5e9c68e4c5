"""Held-out accuracy of a model, a checkpoint, a run, or a running inference service.

``mapo eval TARGET`` answers one question the same way for every target: which share of the
held-out problems does the policy solve? The headline is greedy decoding; beside it come the
paper's sampled accuracy (the mean over ``rollout.eval_samples`` completions per problem at
``rollout.eval_temperature`` and ``rollout.eval_top_p``) and the same two numbers on the task's
out-of-domain problems, when it has them. Local targets are decoded with transformers by the
trainer's own evaluation (so the greedy number matches the trainer's ``eval_accuracy``); an
``http://`` target is asked through its OpenAI-compatible completions API. Both use the task's
exact-match rule.

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.core.config import ConfigError, RunConfig, load_config
from services.core.tasks import Example

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from services.trainer.evaluation import Sampling

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
class EvalSets:
    """What a policy is scored on: the held-out test problems, the out-of-domain ones (maybe
    none), and how the sampled evaluation decodes (None: greedy only)."""

    test: list[Example]
    ood: list[Example]
    sampling: Sampling | None


@dataclass(frozen=True)
class Scores:
    """A policy's held-out accuracies; greedy in-domain accuracy is the headline number."""

    accuracy: float
    sampled_accuracy: float | None = None
    ood_accuracy: float | None = None
    ood_sampled_accuracy: float | None = None

    def fields(self, prefix: str) -> dict[str, float | None]:
        """The scores as summary fields: ``initial_accuracy``, ``initial_ood_accuracy``..."""
        return {f"{prefix}_{name}": value for name, value in asdict(self).items()}

    def describe(self) -> str:
        """One line: greedy first, then what else was measured."""
        parts = [f"{self.accuracy:.1%} greedy"]
        if self.sampled_accuracy is not None:
            parts[0] += f", {self.sampled_accuracy:.1%} sampled"
        if self.ood_accuracy is not None:
            ood = f"out-of-domain {self.ood_accuracy:.1%} greedy"
            if self.ood_sampled_accuracy is not None:
                ood += f", {self.ood_sampled_accuracy:.1%} sampled"
            parts.append(ood)
        return "; ".join(parts)


def sampling_of(config: RunConfig) -> Sampling | None:
    """The config's sampled evaluation, or None when it is off (no samples, or temperature 0)."""
    from services.trainer.evaluation import Sampling

    rollout = config.rollout
    if rollout.eval_samples < 1 or rollout.eval_temperature <= 0.0:
        return None
    return Sampling(
        rollout.eval_samples, rollout.eval_temperature, rollout.eval_top_p, config.task.seed
    )


def eval_sets(config: RunConfig, limit: int | None = None) -> EvalSets:
    """The config's held-out and out-of-domain problems (the first ``limit`` of each)."""
    from services.trainer.dataset import ood_examples

    ood = ood_examples(
        config.task.dataset, config.task.ood_dataset, config.task.name, config.task.seed
    )
    return EvalSets(held_out(config)[:limit], ood[:limit], sampling_of(config))


def score(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sets: EvalSets) -> Scores:
    """Greedy and sampled accuracy, in-domain and out-of-domain, of a loaded policy."""
    from services.trainer.evaluation import sampled_accuracy

    def sampled(examples: Sequence[Example]) -> float | None:
        if sets.sampling is None or not examples:
            return None
        return sampled_accuracy(
            model, tokenizer, examples, sets.sampling, max_new_tokens=MAX_NEW_TOKENS
        )

    return Scores(
        accuracy=accuracy(model, tokenizer, sets.test),
        sampled_accuracy=sampled(sets.test),
        ood_accuracy=accuracy(model, tokenizer, sets.ood) if sets.ood else None,
        ood_sampled_accuracy=sampled(sets.ood),
    )


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
    has_base = base_model is not None and (base_model / "config.json").is_file()
    if (target / "weights").is_dir() and has_base and (target / "config.toml").is_file():
        # A run that started from model.path (as every run of `mapo compare` does): its own
        # config.toml names the model, its weights/ holds the trained versions.
        assert base_model is not None
        return LocalModel(base_model, _newest_version(target / "weights"))
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
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    from services.models.arch import is_vision_language

    quiet_transformers()

    if is_vision_language(model_dir):
        # The processor stands in for the tokenizer: evaluation takes the pictures through it.
        tokenizer = AutoProcessor.from_pretrained(model_dir)
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if version_dir is not None:
        from services.weights.publish import model_names
        from services.weights.store import load_tensors

        names = model_names(model)
        tensors = {names.get(k, k): v for k, v in load_tensors(version_dir).items()}
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


def image_data_url(data: bytes) -> str:
    """Encoded picture bytes as a data URL (the service decodes by content; the type is a
    courtesy)."""
    import base64

    kind = "jpeg" if data.startswith(b"\xff\xd8") else "png"
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def _get_json(
    url: str, timeout_s: float, token: str = "", body: dict[str, Any] | None = None
) -> dict[str, Any]:
    """GET ``url`` (POST ``body`` as JSON), with the service's bearer token when it has one."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout_s) as reply:
        got: dict[str, Any] = json.loads(reply.read())
    return got


def service_accuracy(
    base_url: str,
    examples: Sequence[Example],
    timeout_s: float = 120.0,
    sampling: Sampling | None = None,
    token: str = "",
) -> tuple[float, str]:
    """Accuracy through a running service's completions API, greedy or (with ``sampling``)
    the mean over its samples; (accuracy, model name). Problems with pictures go through the
    chat API (rendered by the service's chat template, pictures as data URLs), one request
    each. ``token``: the service's ``inference.api_token``, when it has one."""
    from services.trainer.evaluation import is_correct

    base = base_url.rstrip("/")
    models = _get_json(base + "/v1/models", timeout_s, token)
    name = str(models["data"][0]["id"])
    decode: dict[str, Any] = {"temperature": 0.0, "n": 1}
    if sampling is not None:
        decode = {
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "n": sampling.samples,
            "seed": sampling.seed,
        }
    hits = 0
    pictured = [e for e in examples if e.images]
    for e in pictured:
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": image_data_url(data)}} for data in e.images
        ]
        content.append({"type": "text", "text": e.prompt})
        body = {
            "model": name,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": MAX_NEW_TOKENS,
            **decode,
        }
        choices = _get_json(base + "/v1/chat/completions", timeout_s, token, body)["choices"]
        hits += sum(is_correct(c["message"]["content"], e.answer) for c in choices)
    text_only = [e for e in examples if not e.images]
    for lo in range(0, len(text_only), HTTP_BATCH):
        chunk = text_only[lo : lo + HTTP_BATCH]
        body = {
            "model": name,
            "prompt": [e.prompt for e in chunk],
            "max_tokens": MAX_NEW_TOKENS,
            **decode,
        }
        choices = _get_json(base + "/v1/completions", timeout_s, token, body)["choices"]
        texts = [c["text"] for c in sorted(choices, key=lambda c: int(c["index"]))]
        answers = [e.answer for e in chunk for _ in range(int(decode["n"]))]
        hits += sum(is_correct(t, a) for t, a in zip(texts, answers, strict=True))
    total = len(examples) * int(decode["n"])
    return (hits / total if total else 0.0), name


def service_scores(base_url: str, sets: EvalSets, token: str = "") -> tuple[Scores, str]:
    """:class:`Scores` of a running service; (scores, model name)."""
    acc, name = service_accuracy(base_url, sets.test, token=token)

    def sampled(examples: Sequence[Example]) -> float | None:
        if sets.sampling is None or not examples:
            return None
        return service_accuracy(base_url, examples, sampling=sets.sampling, token=token)[0]

    ood = service_accuracy(base_url, sets.ood, token=token)[0] if sets.ood else None
    return Scores(acc, sampled(sets.test), ood, sampled(sets.ood)), name


def _eval_config(args: argparse.Namespace, config: RunConfig, target: Path) -> RunConfig:
    """A run directory's own config.toml describes its task, unless --config says otherwise."""
    own = target / "config.toml"
    if args.config is None and own.is_file():
        return load_config(own, overrides=args.overrides)
    return config


def report_lines(scores: Scores, sets: EvalSets, task: str) -> list[str]:
    """What ``mapo eval`` prints after its headline: the sampled and out-of-domain scores."""
    lines = []
    if scores.sampled_accuracy is not None and sets.sampling is not None:
        k = sets.sampling
        lines.append(
            f"sampled accuracy {scores.sampled_accuracy:.1%} (mean of {k.samples} samples per "
            f"problem at temperature {k.temperature:g}, top-p {k.top_p:g})"
        )
    if scores.ood_accuracy is not None:
        line = (
            f"out-of-domain accuracy {scores.ood_accuracy:.1%} ({len(sets.ood)} {task} "
            "problems, greedy)"
        )
        if scores.ood_sampled_accuracy is not None:
            line += f"; sampled {scores.ood_sampled_accuracy:.1%}"
        lines.append(line)
    return lines


def cli_eval(args: argparse.Namespace, config: RunConfig) -> int:
    """``mapo eval TARGET [--limit N]``: print held-out accuracies and exit 0."""
    target_text: str = args.target
    started = time.monotonic()
    if target_text.startswith(("http://", "https://")):
        sets = eval_sets(config, args.limit)
        if not sets.test:
            print(
                "mapo eval: the config names no held-out set (task.eval_dataset)", file=sys.stderr
            )
            return 2
        try:
            scores, what = service_scores(target_text, sets, config.inference.api_token)
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
        sets = eval_sets(config, args.limit)
        if not sets.test:
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
        scores = score(model, tokenizer, sets)
        what = policy.describe()
    seconds = time.monotonic() - started
    acc, n = scores.accuracy, len(sets.test)
    print(
        f"held-out accuracy {acc:.1%} ({round(acc * n)}/{n} "
        f"{config.task.name} problems, greedy) of {what} in {seconds:.1f} s"
    )
    for line in report_lines(scores, sets, config.task.name):
        print(line)
    return 0
