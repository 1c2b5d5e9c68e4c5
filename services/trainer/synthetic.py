"""Scored groups without an inference service: for tests, benchmarks and trainer-only runs.

- :func:`sample_groups` samples G completions per prompt from an HF model itself (plain torch,
  temperature sampling) and records the untempered log-prob of every sampled token, as vLLM
  does by default; rewards come from a caller's function.
- :func:`random_group` makes a group of random tokens and rewards of a given shape, for
  throughput measurements where only the shapes matter.
- :func:`fake_inference` plays the inference side on a bus: it reads prompts as a consumer of
  the ``inference`` group and answers each with a random group stamped with the newest announced
  weight version, acknowledging the prompt only after the group is appended (as the real
  rollout worker does).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from services.core.config import BusConfig
from services.core.schemas import PromptMessage, Rollout, ScoredGroup, WeightAnnouncement
from services.transport.base import Bus
from services.transport.names import INFERENCE_GROUP

RewardFn = Callable[[str, int, list[int]], float]


@torch.no_grad()
def sample_groups(
    model: Any,
    prompts: Sequence[tuple[str, Sequence[int]]],
    *,
    group_size: int,
    max_tokens: int,
    eos_id: int,
    reward_fn: RewardFn,
    temperature: float = 1.0,
    version: int = 0,
    generator: torch.Generator | None = None,
) -> list[ScoredGroup]:
    """One group per ``(group_id, prompt_token_ids)``: G samples of up to ``max_tokens``."""
    groups = []
    model.eval()
    for group_id, prompt_ids in prompts:
        x = torch.tensor([list(prompt_ids)] * group_size, dtype=torch.long)
        done = torch.zeros(group_size, dtype=torch.bool)
        tokens: list[list[int]] = [[] for _ in range(group_size)]
        logps: list[list[float]] = [[] for _ in range(group_size)]
        for _ in range(max_tokens):
            logits = model(input_ids=x, use_cache=False).logits[:, -1].float()
            raw = torch.log_softmax(logits, dim=-1)
            probs = torch.softmax(logits / max(temperature, 1e-6), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            picked = raw.gather(-1, nxt[:, None]).squeeze(-1)
            for i in range(group_size):
                if not done[i]:
                    tokens[i].append(int(nxt[i]))
                    logps[i].append(float(picked[i]))
            done |= nxt == eos_id
            if bool(done.all()):
                break
            x = torch.cat([x, nxt[:, None]], dim=1)
        rollouts = []
        for i in range(group_size):
            reward = float(reward_fn(group_id, i, tokens[i]))
            rollouts.append(
                Rollout(
                    text="",
                    token_ids=np.asarray(tokens[i], dtype=np.int32),
                    logprobs=np.asarray(logps[i], dtype=np.float32),
                    reward=reward,
                    success=reward >= 1.0,
                    finish_reason="stop" if tokens[i][-1] == eos_id else "length",
                )
            )
        groups.append(
            ScoredGroup(
                group_id=group_id,
                prompt="",
                prompt_token_ids=np.asarray(list(prompt_ids), dtype=np.int32),
                answer="",
                task="synthetic",
                policy_version=version,
                replica="synthetic",
                rollouts=tuple(rollouts),
                created_at=time.time(),
            )
        )
    return groups


def random_group(
    group_id: str,
    *,
    group_size: int,
    prompt_len: int,
    response_len: int,
    vocab_size: int,
    rng: random.Random,
    version: int = 0,
    low_token: int = 3,
) -> ScoredGroup:
    """A group of random tokens with rewards in the paper's {0, 0.1, 0.9, 1}."""
    prompt = np.asarray(
        [rng.randrange(low_token, vocab_size) for _ in range(prompt_len)], dtype=np.int32
    )
    rollouts = []
    for _ in range(group_size):
        n = rng.randint(max(1, response_len // 2), response_len)
        reward = rng.choice((0.0, 0.1, 0.9, 1.0))
        rollouts.append(
            Rollout(
                text="",
                token_ids=np.asarray(
                    [rng.randrange(low_token, vocab_size) for _ in range(n)], dtype=np.int32
                ),
                logprobs=np.asarray([-rng.uniform(0.1, 5.0) for _ in range(n)], dtype=np.float32),
                reward=reward,
                success=reward >= 1.0,
            )
        )
    return ScoredGroup(
        group_id=group_id,
        prompt="",
        prompt_token_ids=prompt,
        answer="",
        task="synthetic",
        policy_version=version,
        replica="synthetic",
        rollouts=tuple(rollouts),
        created_at=time.time(),
    )


async def fake_inference(
    bus: Bus,
    config: BusConfig,
    stop: asyncio.Event,
    *,
    vocab_size: int,
    seed: int = 0,
    response_len: int = 8,
    consumer: str = "synthetic-0",
    delay_s: float = 0.0,
    version_of: Callable[[int, int], int] | None = None,
) -> int:
    """Answer prompts with random groups until ``stop`` is set; return how many it answered.

    Groups are stamped with the newest announced version, or ``version_of(n, newest)`` for the
    n-th group answered (to play a lagging replica).
    """
    rng = random.Random(seed)
    await bus.ensure_group(config.prompts_stream, INFERENCE_GROUP)
    answered = 0
    while not stop.is_set():
        deliveries = await bus.read(
            config.prompts_stream, INFERENCE_GROUP, consumer, 16, 100, expect=PromptMessage
        )
        if not deliveries:
            continue
        latest = await bus.latest(config.weights_stream, expect=WeightAnnouncement)
        version = latest.message.version if latest is not None else 0
        groups = [
            random_group(
                d.message.prompt_id,
                group_size=d.message.group_size,
                prompt_len=rng.randint(3, 8),
                response_len=min(response_len, d.message.max_tokens),
                vocab_size=vocab_size,
                rng=rng,
                version=version if version_of is None else version_of(answered + k, version),
            )
            for k, d in enumerate(deliveries)
        ]
        if delay_s:
            await asyncio.sleep(delay_s)
        await bus.publish_many(config.rollouts_stream, groups)
        await bus.ack(config.prompts_stream, INFERENCE_GROUP, [d.entry_id for d in deliveries])
        answered += len(deliveries)
    return answered
