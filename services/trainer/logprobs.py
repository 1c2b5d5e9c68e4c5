"""Per-token log-probs (and entropy) of the sampled tokens under an HF causal LM.

The policy being optimised is the one the rollouts were sampled from: ``softmax(logits / T)``
with T the sampling temperature (T = 0, greedy, is treated as 1). The inference engine reports
the log-probs of the distribution it sampled from (vLLM's ``logprobs_mode =
"processed_logprobs"``: after temperature and top-p), so every comparison with it (the mismatch
metrics, the behaviour weights) is at the same temperature. The trainer does not renormalise
over the top-p nucleus: the weight pi_prox / mu then carries the nucleus mass S >= top_p, which
is the exact importance weight of the untruncated policy being trained (docs/trainer.md).

Log-softmax runs in float32 whatever the model's compute dtype, and every call is micro-batched:
each slice of rows is trimmed to its own longest sequence before the forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from services.trainer.vision import token_types

if TYPE_CHECKING:
    from services.trainer.vision import RowVision


NEVER_LOGIT = -1e4


@dataclass(frozen=True)
class TokenScores:
    logprobs: Tensor  # float32 [B, L-1]: log-prob of token t+1 at column t, at temperature T
    entropy: Tensor | None  # float32 [B, L-1]: entropy of the tempered distribution


def effective_temperature(temperature: float) -> float:
    return temperature if temperature > 0.0 else 1.0


def autocast(
    device: torch.device, amp_dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast on CUDA (weights stay float32 for AdamW); nothing on the CPU."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def row_slices(n: int, size: int) -> Iterator[slice]:
    for lo in range(0, n, size):
        yield slice(lo, min(lo + size, n))


def forward_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    amp_dtype: torch.dtype | None = None,
    vision: RowVision | None = None,
    never: tuple[int, ...] = (),
) -> TokenScores:
    """One forward pass over rows already trimmed to their longest sequence.

    ``logprobs`` keeps the graph (when grad is enabled); the entropy is a diagnostic, always
    computed without one, so asking for it from a forward pass with grad adds no backward work.
    ``vision``: the pictures of these rows (vision-language models). ``never``: token ids the
    engine never samples (a vision-language model's picture placeholders): they get no mass
    here either, so both sides score the same distribution.
    """
    extra = vision.kwargs() if vision is not None else {}
    if extra:
        extra["mm_token_type_ids"] = token_types(model.config, input_ids)
    with autocast(input_ids.device, amp_dtype):
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra
        ).logits
    logits = logits[:, :-1].float()
    if never:
        # Finite: the prompt's own placeholders are targets too, and -inf there would turn
        # masked-out columns into NaN; exp(-1e4) is 0 in float32 all the same.
        logits[..., list(never)] = NEVER_LOGIT
    targets = input_ids[:, 1:, None]
    t = effective_temperature(temperature)
    scaled = logits / t if t != 1.0 else logits
    logp_all = torch.log_softmax(scaled, dim=-1)
    logprobs = logp_all.gather(-1, targets).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            # 0 * log 0 is NaN in floating point; its limit, 0, is the right term.
            lp = logp_all.detach()
            entropy = -(lp.exp() * lp).nan_to_num(0.0).sum(-1)
    return TokenScores(logprobs, entropy)


@torch.no_grad()
def score_tokens(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    micro_batch: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    amp_dtype: torch.dtype | None = None,
    vision: RowVision | None = None,
    never: tuple[int, ...] = (),
) -> TokenScores:
    """Log-probs of a whole batch without gradients, ``micro_batch`` rows at a time."""
    b, width = input_ids.shape
    shape = (b, width - 1)
    logprobs = torch.zeros(shape, dtype=torch.float32, device=input_ids.device)
    entropy = torch.zeros_like(logprobs) if with_entropy else None
    lengths = attention_mask.sum(-1)
    for rows in row_slices(b, micro_batch):
        n = max(int(lengths[rows].max()), 2)
        out = forward_logprobs(
            model,
            input_ids[rows, :n],
            attention_mask[rows, :n],
            temperature=temperature,
            with_entropy=with_entropy,
            amp_dtype=amp_dtype,
            vision=None if vision is None else vision.subset(torch.arange(b)[rows]),
            never=never,
        )
        logprobs[rows, : n - 1] = out.logprobs
        if entropy is not None and out.entropy is not None:
            entropy[rows, : n - 1] = out.entropy
    return TokenScores(logprobs, entropy)
