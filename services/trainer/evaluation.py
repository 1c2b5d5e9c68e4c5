"""Held-out accuracy of an HF causal LM: batched greedy or sampled decoding, exact match.

A completion is the continuation of the prompt up to the first eos (or ``max_new_tokens``); it is
correct when, stripped of surrounding whitespace, it equals the stripped reference answer. That
is the built-in tasks' verifier rule, so the number is directly comparable with the training
accuracy of the same task.

Greedy accuracy is the headline number (one answer per problem, no randomness). Sampled
accuracy is the paper's setting: k completions per problem at a temperature and top-p, scored as
the mean over all k x N completions, from a fixed seed so that two evaluations of the same
model agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from services.core.images import ImageLimits, decode_image
from services.core.prompts import PromptFormat
from services.core.tasks import Example


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    correct: int
    total: int
    completions: tuple[str, ...]


def is_correct(completion: str, answer: str) -> bool:
    return completion.strip() == answer.strip()


def left_pad(encoded: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded on the left (generation continues every row at the same column), and
    the attention mask."""
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, width - len(e) :] = torch.tensor(e, dtype=torch.long)
        mask[i, width - len(e) :] = 1
    return ids, mask


@dataclass(frozen=True)
class Sampling:
    """How the sampled evaluation decodes: k samples per prompt at a temperature and top-p."""

    samples: int = 4
    temperature: float = 0.5
    top_p: float = 0.95
    seed: int = 0


def text_and_images(tokenizer: Any, processor: Any | None) -> tuple[Any, Any | None]:
    """(tokenizer, processor): a vision-language model's processor may be passed as the
    tokenizer (``mapo eval`` and the warm start load one object per model)."""
    if processor is None and hasattr(tokenizer, "image_processor"):
        return tokenizer.tokenizer, tokenizer
    return tokenizer, processor


def _encode(
    tokenizer: Any,
    processor: Any | None,
    prompts: Sequence[str],
    images: Sequence[tuple[bytes, ...]],
    pad: int,
) -> dict[str, torch.Tensor]:
    """Model inputs of rendered prompts, left-padded: token ids and mask, plus the pictures'
    pixel values through the processor when any prompt has images."""
    if processor is None or not any(images):
        encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        ids, mask = left_pad(encoded, pad)
        return {"input_ids": ids, "attention_mask": mask}
    pictures = [decode_image(data, ImageLimits()) for group in images for data in group]
    out = processor(
        text=list(prompts), images=pictures, padding=True, padding_side="left", return_tensors="pt"
    )
    return dict(out)


@torch.no_grad()
def _completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    sampling: Sampling | None,
    images: Sequence[tuple[bytes, ...]] = (),
    processor: Any | None = None,
) -> list[str]:
    """Continuations up to eos, decoded without special tokens, in left-padded batches; with
    ``sampling``, ``sampling.samples`` per prompt, consecutive. ``images``: each prompt's
    pictures (vision-language models, with their ``processor``)."""
    images = list(images) or [()] * len(prompts)
    tokenizer, processor = text_and_images(tokenizer, processor)
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = eos if pad is None else pad
    per_prompt = 1 if sampling is None else sampling.samples
    step = max(1, batch_size // per_prompt)
    decode: dict[str, Any] = {"do_sample": False}
    if sampling is not None:
        decode = {
            "do_sample": True,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": 0,
            "num_return_sequences": per_prompt,
        }
    was_training = model.training
    model.eval()
    out: list[str] = []
    # Sampling draws from the global generator: fork it, so evaluating leaves the caller's
    # random stream as it was and the same seed gives the same samples.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if sampling is not None:
            torch.manual_seed(sampling.seed)
        try:
            for lo in range(0, len(prompts), step):
                inputs = _encode(
                    tokenizer, processor, prompts[lo : lo + step], images[lo : lo + step], pad
                )
                width = inputs["input_ids"].shape[1]
                generated = model.generate(
                    **{k: v.to(device) for k, v in inputs.items()},
                    max_new_tokens=max_new_tokens,
                    eos_token_id=eos,
                    pad_token_id=pad,
                    **decode,
                )
                for row in generated[:, width:].tolist():
                    if eos in row:
                        row = row[: row.index(eos)]
                    out.append(tokenizer.decode(row, skip_special_tokens=True))
        finally:
            model.train(was_training)
    return out


def greedy_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 256,
    images: Sequence[tuple[bytes, ...]] = (),
    processor: Any | None = None,
) -> list[str]:
    """Greedy continuations up to eos, decoded without special tokens; left-padded batches."""
    return _completions(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        sampling=None,
        images=images,
        processor=processor,
    )


def sampled_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    sampling: Sampling,
    *,
    max_new_tokens: int = 8,
    batch_size: int = 256,
    images: Sequence[tuple[bytes, ...]] = (),
    processor: Any | None = None,
) -> list[list[str]]:
    """``sampling.samples`` sampled continuations per prompt (one list per prompt)."""
    if sampling.samples < 1 or sampling.temperature <= 0.0:
        raise ValueError(
            f"sampling needs samples >= 1 and a temperature above 0, got {sampling}; "
            "use greedy_completions for greedy decoding"
        )
    flat = _completions(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        sampling=sampling,
        images=images,
        processor=processor,
    )
    k = sampling.samples
    return [flat[i * k : (i + 1) * k] for i in range(len(prompts))]


def rendered(
    examples: Sequence[Example],
    tokenizer: Any,
    processor: Any | None,
    prompt_format: PromptFormat | None,
) -> list[str]:
    """The examples' prompts as the trainer issues them (``prompt_format``, or the
    tokenizer's chat template when there is one)."""
    fmt = prompt_format or PromptFormat.for_tokenizer(text_and_images(tokenizer, processor)[0])
    return [fmt.render_example(e) for e in examples]


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 256,
    prompt_format: PromptFormat | None = None,
    processor: Any | None = None,
) -> EvalResult:
    """Share of ``examples`` whose greedy completion is exactly the answer; prompts rendered
    with ``prompt_format`` (as the trainer issues them), pictures through ``processor``."""
    if not examples:
        return EvalResult(0.0, 0, 0, ())
    completions = greedy_completions(
        model,
        tokenizer,
        rendered(examples, tokenizer, processor, prompt_format),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        images=[e.images for e in examples],
        processor=processor,
    )
    hits = sum(is_correct(c, e.answer) for c, e in zip(completions, examples, strict=True))
    return EvalResult(hits / len(examples), hits, len(examples), tuple(completions))


def sampled_accuracy(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    sampling: Sampling,
    *,
    max_new_tokens: int = 8,
    batch_size: int = 256,
    prompt_format: PromptFormat | None = None,
    processor: Any | None = None,
) -> float:
    """Mean exact-match accuracy over ``sampling.samples`` sampled completions per example."""
    if not examples:
        return 0.0
    per_prompt = sampled_completions(
        model,
        tokenizer,
        rendered(examples, tokenizer, processor, prompt_format),
        sampling,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        images=[e.images for e in examples],
        processor=processor,
    )
    hits = sum(
        is_correct(c, e.answer)
        for samples, e in zip(per_prompt, examples, strict=True)
        for c in samples
    )
    return hits / (len(examples) * sampling.samples)
