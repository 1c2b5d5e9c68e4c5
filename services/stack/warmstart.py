"""Supervised warm start of the demo model, so RL starts where groups are mixed.

A freshly initialised model answers nothing correctly: every group of G rollouts would score
all zeros and give no gradient. A short supervised phase on ``prompt + answer + eos`` (loss on the
answer tokens only) lifts accuracy into a band (by default 35-60%) where most groups hold both
successes and failures, which is where RL and MAPO's certainty weighting have work to do.

Every rule here counts steps, never seconds, so the same seed gives the same model on a fast
machine and on a slow one (up to the rounding differences between processors' kernels):

* accuracy is measured every ``eval_every`` steps on a *validation* split held back from the
  training problems, never on the held-out test set that scores the run;
* training stops at the first evaluation at or above ``target_low``, or after ``max_steps``;
* the model kept is the evaluated one closest to the band (the stopping one, unless a jump
  overshot the band and an earlier evaluation was nearer), so a seed that never reaches the band
  carries on from its best model, and says so.

The result is an ordinary HF model directory with a ``warmstart.json`` marker; a later run with
the same settings reuses it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.core.tasks import Example, load_builtin

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MARKER = "warmstart.json"


@dataclass(frozen=True)
class WarmStartSettings:
    """What the warm start does; a cached model is reused only when these match."""

    task: str = "arithmetic"
    size: str = "mini"
    #: ``qwen2`` (text) or ``qwen2_5_vl`` (vision-language, for tasks with pictures).
    arch: str = "qwen2"
    seed: int = 0
    lr: float = 1e-3
    batch_size: int = 128
    eval_every: int = 25
    #: Training problems held back to decide when to stop (disjoint from the held-out test set).
    val_problems: int = 256
    target_low: float = 0.35
    target_high: float = 0.60
    max_steps: int = 2000


@dataclass(frozen=True)
class WarmStartResult:
    """What a run of the warm start reached (also the content of ``warmstart.json``)."""

    settings: WarmStartSettings
    #: Step of the model kept (the one closest to the band).
    steps: int
    #: Steps trained in all (past ``steps`` when a jump overshot the band).
    trained_steps: int
    seconds: float
    #: Validation accuracy of the model kept.
    accuracy: float
    in_band: bool
    reused: bool = False

    def to_json(self) -> str:
        return json.dumps(
            {**asdict(self), "settings": asdict(self.settings)}, indent=1, sort_keys=True
        )


def arch_for(task: str) -> str:
    """The demo architecture of a built-in task: vision-language when its problems have
    pictures."""
    built = load_builtin(task, 0)
    return "qwen2_5_vl" if built.train and built.train[0].images else "qwen2"


def split_validation(train: Sequence[Example], count: int) -> tuple[list[Example], list[Example]]:
    """(problems to train on, validation problems): the last ``count`` training problems are
    held back. The test set is a different split of the task, so the two never meet."""
    if not 0 < count < len(train):
        raise ValueError(f"val_problems={count} must be between 1 and {len(train) - 1}")
    return list(train[:-count]), list(train[-count:])


def batch_indices(count: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless mini-batches of ``range(count)``: a fresh shuffle each pass, drawn from a
    generator of its own seeded with ``seed``, so the batches depend on the seed alone."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(count, generator=generator), 0
    while True:
        if cursor + batch_size > count:
            order, cursor = torch.randperm(count, generator=generator), 0
        yield order[cursor : cursor + batch_size]
        cursor += batch_size


def band_distance(accuracy: float, low: float, high: float) -> float:
    """How far an accuracy is from the band [low, high): 0 inside it."""
    return max(low - accuracy, accuracy - high, 0.0)


@dataclass(frozen=True)
class Pictures:
    """Each example's pixel values and patch grid (vision-language warm starts)."""

    pixel_values: list[torch.Tensor]
    image_grid_thw: list[torch.Tensor]
    #: Values per patch (channels x temporal x patch x patch), for text rows' empty entries.
    width: int = 0

    def of(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        rows = idx.tolist()
        return {
            "pixel_values": torch.cat([self.pixel_values[i] for i in rows]),
            "image_grid_thw": torch.cat([self.image_grid_thw[i] for i in rows]),
        }


def encode_examples(
    tokenizer: Any, examples: Sequence[Example]
) -> tuple[torch.Tensor, torch.Tensor, Pictures | None]:
    """Right-padded ``prompt + answer + eos`` ids and labels that mask everything but the answer;
    prompts rendered as the trainer issues them. ``tokenizer`` may be a vision-language model's
    processor: the pictures then go through it, and their pixel values come back too."""
    import torch

    from services.core.images import ImageLimits, decode_image
    from services.core.prompts import PromptFormat
    from services.trainer.evaluation import text_and_images

    tokenizer, processor = text_and_images(tokenizer, None)
    fmt = PromptFormat.for_tokenizer(tokenizer)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    rows: list[tuple[list[int], int]] = []
    pictures = None
    if processor is not None:
        ip = processor.image_processor
        pictures = Pictures([], [], 3 * ip.temporal_patch_size * ip.patch_size**2)
    for ex in examples:
        text = fmt.render_example(ex)
        if pictures is not None and processor is not None and ex.images:
            images = [decode_image(data, ImageLimits()) for data in ex.images]
            out = processor(text=[text], images=images, return_tensors="pt")
            prompt = out["input_ids"][0].tolist()
            pictures.pixel_values.append(out["pixel_values"])
            pictures.image_grid_thw.append(out["image_grid_thw"])
        else:
            prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
            if pictures is not None:  # a text problem for a vision-language model
                pictures.pixel_values.append(torch.zeros((0, pictures.width)))
                pictures.image_grid_thw.append(torch.zeros((0, 3), dtype=torch.long))
        answer = tokenizer(ex.answer, add_special_tokens=False)["input_ids"]
        rows.append((prompt + answer + [eos], len(prompt)))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return input_ids, labels, pictures


def _accuracy_fn() -> Callable[..., float]:
    from services.stack.evaluate import accuracy

    return accuracy


@dataclass(frozen=True)
class TrainOutcome:
    """Where :func:`train` left the model."""

    steps: int  # step of the model kept
    trained_steps: int
    accuracy: float  # validation accuracy of the model kept


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_set: Sequence[Example],
    validation: Sequence[Example],
    settings: WarmStartSettings,
    log: Callable[[str], None] = print,
) -> TrainOutcome:
    """Train until validation accuracy reaches the band or ``max_steps`` pass; leave ``model``
    holding the evaluated weights closest to the band."""
    import torch

    from services.trainer.vision import token_types

    accuracy_of = _accuracy_fn()
    torch.manual_seed(settings.seed)
    input_ids, labels, pictures = encode_examples(tokenizer, train_set)
    pad = getattr(tokenizer, "tokenizer", tokenizer).pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    batches = batch_indices(len(input_ids), settings.batch_size, settings.seed)
    start = time.monotonic()
    step = 0
    best: tuple[float, int, float, dict[str, torch.Tensor]] | None = None
    while True:
        idx = next(batches)
        model.train()
        batch, target = input_ids[idx], labels[idx]
        extra = pictures.of(idx) if pictures is not None else {}
        if extra:
            extra["mm_token_type_ids"] = token_types(model.config, batch)
        mask = (batch != pad).long()
        loss = model(input_ids=batch, attention_mask=mask, labels=target, **extra).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        capped = step >= settings.max_steps
        if step % settings.eval_every and not capped:
            continue
        model.eval()
        accuracy = accuracy_of(model, tokenizer, validation)
        log(
            f"warm start: step {step:4d}  loss {loss.item():.3f}  "
            f"validation accuracy {accuracy:6.1%}  ({time.monotonic() - start:5.1f} s)"
        )
        distance = band_distance(accuracy, settings.target_low, settings.target_high)
        if best is None or distance <= best[0]:
            snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best = (distance, step, accuracy, snapshot)
        if accuracy >= settings.target_low or capped:
            break
    assert best is not None
    _, kept_step, kept_accuracy, weights = best
    if kept_step != step:
        model.load_state_dict(weights)
        log(f"warm start: keeping step {kept_step} ({kept_accuracy:.1%}), nearest to the band")
    return TrainOutcome(kept_step, step, kept_accuracy)


def cached(model_dir: Path, settings: WarmStartSettings) -> WarmStartResult | None:
    """The previous result in ``model_dir`` when it was made with the same settings."""
    marker = model_dir / MARKER
    if not marker.is_file():
        return None
    try:
        data: dict[str, Any] = json.loads(marker.read_text())
        previous = WarmStartSettings(**data["settings"])
        result = WarmStartResult(
            settings=previous,
            steps=int(data["steps"]),
            trained_steps=int(data["trained_steps"]),
            seconds=float(data["seconds"]),
            accuracy=float(data["accuracy"]),
            in_band=bool(data["in_band"]),
            reused=True,
        )
    except (ValueError, TypeError, KeyError):
        return None
    return result if previous == settings else None


def warm_start(
    model_dir: str | Path,
    settings: WarmStartSettings | None = None,
    log: Callable[[str], None] = print,
) -> WarmStartResult:
    """Build and warm-start the demo model into ``model_dir``, or reuse a matching one there."""
    settings = settings or WarmStartSettings()
    out = Path(model_dir)
    previous = cached(out, settings)
    if previous is not None:
        log(
            f"warm start: reusing {out} (validation accuracy {previous.accuracy:.1%} "
            f"after {previous.steps} steps)"
        )
        return previous

    import torch

    from services.models.tiny import build_model, parameter_count
    from services.models.tiny_vl import build_vl_model, saved_parameter_count
    from services.stack.evaluate import load_policy, quiet_transformers

    quiet_transformers()
    random.seed(settings.seed)
    task = load_builtin(settings.task, settings.seed)
    train_set, validation = split_validation(task.train, settings.val_problems)
    # Build in a scratch directory and rename at the end: an interrupted warm start never
    # leaves a half-written model that a later run would mistake for a finished one.
    scratch = out.with_name(out.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    if settings.arch == "qwen2_5_vl":
        build_vl_model(scratch, settings.size, settings.seed)
        parameters = saved_parameter_count(scratch)
    else:
        build_model(scratch, settings.size, settings.seed)
        parameters = parameter_count(scratch)
    log(
        f"warm start: {settings.size} {settings.arch} model ({parameters:,} parameters), "
        f"supervised on {len(train_set):,} {settings.task} problems until accuracy on "
        f"{len(validation)} validation problems reaches {settings.target_low:.0%} "
        f"(at most {settings.max_steps:,} steps)"
    )
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, tokenizer = load_policy(scratch)
    start = time.monotonic()
    outcome = train(model, tokenizer, train_set, validation, settings, log)
    seconds = time.monotonic() - start
    in_band = settings.target_low <= outcome.accuracy < settings.target_high
    if not in_band:
        log(
            f"warm start: did NOT reach the target band {settings.target_low:.0%}-"
            f"{settings.target_high:.0%} in {settings.max_steps:,} steps; RL carries on from "
            f"the nearest model (step {outcome.steps}, {outcome.accuracy:.1%}), where groups "
            "are less often mixed and RL gains less"
        )
    model.save_pretrained(scratch, safe_serialization=True)
    result = WarmStartResult(
        settings,
        outcome.steps,
        outcome.trained_steps,
        round(seconds, 2),
        outcome.accuracy,
        in_band,
    )
    (scratch / MARKER).write_text(result.to_json())
    shutil.rmtree(out, ignore_errors=True)
    scratch.rename(out)
    log(
        f"warm start: wrote {out} (step {outcome.steps} of {outcome.trained_steps}, "
        f"{seconds:.0f} s, validation accuracy {outcome.accuracy:.1%})"
    )
    return result
