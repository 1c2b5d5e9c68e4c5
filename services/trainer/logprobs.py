"""Per-token log-probs (and entropy) of the sampled tokens under an HF causal LM.

The policy being optimised is the one the rollouts were sampled from: ``softmax(logits / T)``
with T the sampling temperature (T = 0, greedy, is treated as 1). vLLM 0.32 reports log-probs
in its default ``logprobs_mode="raw_logprobs"``: the *untempered* distribution, before
temperature and top-p. At T = 1 (the paper's setting) the two agree; otherwise the trainer also
computes the raw log-probs (``with_raw``), so comparisons with the inference side (the mismatch
metric and truncated importance sampling) compare like with like. Top-p truncation is not
modelled: at the paper's top_p = 0.99 it moves a sampled token's log-prob by at most ~0.01.

Log-softmax runs in float32 whatever the model's compute dtype, and every call is micro-batched:
each slice of rows is trimmed to its own longest sequence before the forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class TokenScores:
    logprobs: Tensor  # float32 [B, L-1]: log-prob of token t+1 at column t, at temperature T
    entropy: Tensor | None  # float32 [B, L-1]: entropy of the tempered distribution
    raw_logprobs: Tensor | None  # float32 [B, L-1]: at temperature 1 (only when T != 1)


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
    with_raw: bool = False,
    amp_dtype: torch.dtype | None = None,
) -> TokenScores:
    """One forward pass over rows already trimmed to their longest sequence.

    ``logprobs`` keeps the graph (when grad is enabled); the entropy and the raw log-probs are
    diagnostics, always computed without one, so asking for them from a forward pass with grad
    adds no backward work.
    """
    with autocast(input_ids.device, amp_dtype):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:, None]
    t = effective_temperature(temperature)
    scaled = logits / t if t != 1.0 else logits
    logp_all = torch.log_softmax(scaled, dim=-1)
    logprobs = logp_all.gather(-1, targets).squeeze(-1)
    entropy = None
    raw = None
    with torch.no_grad():
        if with_entropy:
            # 0 * log 0 is NaN in floating point; its limit, 0, is the right term.
            lp = logp_all.detach()
            entropy = -(lp.exp() * lp).nan_to_num(0.0).sum(-1)
        if with_raw and t != 1.0:
            raw = torch.log_softmax(logits.detach(), dim=-1).gather(-1, targets).squeeze(-1)
    return TokenScores(logprobs, entropy, raw)


@torch.no_grad()
def score_tokens(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    micro_batch: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    with_raw: bool = False,
    amp_dtype: torch.dtype | None = None,
) -> TokenScores:
    """Log-probs of a whole batch without gradients, ``micro_batch`` rows at a time."""
    b, width = input_ids.shape
    shape = (b, width - 1)
    logprobs = torch.zeros(shape, dtype=torch.float32, device=input_ids.device)
    entropy = torch.zeros_like(logprobs) if with_entropy else None
    raw_needed = with_raw and effective_temperature(temperature) != 1.0
    raw = torch.zeros_like(logprobs) if raw_needed else None
    lengths = attention_mask.sum(-1)
    for rows in row_slices(b, micro_batch):
        n = max(int(lengths[rows].max()), 2)
        out = forward_logprobs(
            model,
            input_ids[rows, :n],
            attention_mask[rows, :n],
            temperature=temperature,
            with_entropy=with_entropy,
            with_raw=with_raw,
            amp_dtype=amp_dtype,
        )
        logprobs[rows, : n - 1] = out.logprobs
        if entropy is not None and out.entropy is not None:
            entropy[rows, : n - 1] = out.entropy
        if raw is not None and out.raw_logprobs is not None:
            raw[rows, : n - 1] = out.raw_logprobs
    return TokenScores(logprobs, entropy, raw)
