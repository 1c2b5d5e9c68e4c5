"""Held-out accuracy of an HF causal LM: batched greedy decoding, exact match.

A completion is the greedy continuation of the prompt up to the first eos (or
``max_new_tokens``); it is correct when, stripped of surrounding whitespace, it equals the
stripped reference answer. That is the built-in tasks' verifier rule, so the number is directly
comparable with the training accuracy of the same task.
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


@torch.no_grad()
def greedy_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 256,
) -> list[str]:
    """Greedy continuations up to eos, decoded without special tokens; left-padded batches."""
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = eos if pad is None else pad
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for lo in range(0, len(prompts), batch_size):
            encoded = [
                tokenizer(p, add_special_tokens=False)["input_ids"]
                for p in prompts[lo : lo + batch_size]
            ]
            ids, mask = left_pad(encoded, pad)
            width = ids.shape[1]
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            for row in generated[:, width:].tolist():
                if eos in row:
                    row = row[: row.index(eos)]
                out.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out


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
