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


@torch.no_grad()
def _completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    sampling: Sampling | None,
) -> list[str]:
    """Continuations up to eos, decoded without special tokens, in left-padded batches; with
    ``sampling``, ``sampling.samples`` per prompt, consecutive."""
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
                encoded = [
                    tokenizer(p, add_special_tokens=False)["input_ids"]
                    for p in prompts[lo : lo + step]
                ]
                ids, mask = left_pad(encoded, pad)
                width = ids.shape[1]
                generated = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
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
) -> list[str]:
    """Greedy continuations up to eos, decoded without special tokens; left-padded batches."""
    return _completions(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        sampling=None,
    )


def sampled_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    sampling: Sampling,
    *,
    max_new_tokens: int = 8,
    batch_size: int = 256,
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
    )
    k = sampling.samples
    return [flat[i * k : (i + 1) * k] for i in range(len(prompts))]


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 256,
) -> EvalResult:
    """Share of ``examples`` whose greedy completion is exactly the answer."""
    if not examples:
        return EvalResult(0.0, 0, 0, ())
    completions = greedy_completions(
        model,
        tokenizer,
        [e.prompt for e in examples],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
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
) -> float:
    """Mean exact-match accuracy over ``sampling.samples`` sampled completions per example."""
    if not examples:
        return 0.0
    per_prompt = sampled_completions(
        model,
        tokenizer,
        [e.prompt for e in examples],
        sampling,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    hits = sum(
        is_correct(c, e.answer)
        for samples, e in zip(per_prompt, examples, strict=True)
        for c in samples
    )
    return hits / (len(examples) * sampling.samples)
