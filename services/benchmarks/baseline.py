"""A single-process RL loop of the same objective: what the service stack must beat.

One process, no bus, no services: each step samples G completions for ``prompts_per_step``
prompts with transformers' ``generate`` (KV cache, one batched call), scores them with the
task's verifier in-process, and applies them with the trainer's own :class:`Learner` (the same
advantages, loss, optimiser and schedule as ``mapo trainer``). Generation and training
alternate, each using every core: the shape of TRL's ``GRPOTrainer`` without vLLM, minus its
framework overhead. Evaluation runs on the trainer's held-out set and its time is kept apart,
so that wall time counts sampling and training only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from services.core.config import RunConfig
from services.core.schemas import Rollout, ScoredGroup
from services.core.tasks import Example
from services.trainer.dataset import Position, PromptOrder, eval_examples, load_examples
from services.trainer.evaluation import left_pad
from services.trainer.model import Learner


@dataclass(frozen=True)
class BaselineStep:
    """One step of the loop: what it trained on and where its time went."""

    step: int
    completions: int
    generate_s: float
    train_s: float
    reward_mean: float
    eval_accuracy: float | None


@torch.no_grad()
def sample_groups_batched(
    policy: Learner,
    examples: Sequence[tuple[str, Example]],
    *,
    group_size: int,
    temperature: float,
    top_p: float,
    max_tokens: int,
    score: Callable[[str, Example], tuple[float, bool, str]],
    version: int,
) -> list[ScoredGroup]:
    """G samples of every prompt in one ``generate`` call, with the untempered log-probs of
    the sampled tokens (what vLLM reports), scored by ``score(completion, example)``."""
    tok, model = policy.tokenizer, policy.model
    eos, pad = int(tok.eos_token_id), policy.pad_id
    encoded = [tok(ex.prompt, add_special_tokens=False)["input_ids"] for _, ex in examples]
    ids, mask = left_pad(encoded, pad)
    width = ids.shape[1]
    model.eval()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=0,
        max_new_tokens=max_tokens,
        num_return_sequences=group_size,
        eos_token_id=eos,
        pad_token_id=pad,
        output_logits=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[:, width:]
    raw = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # [B*G, T, V], untempered
    picked = raw.gather(-1, new[:, : raw.shape[1], None]).squeeze(-1)
    groups = []
    for i, (group_id, ex) in enumerate(examples):
        rollouts = []
        for j in range(group_size):
            row = i * group_size + j
            tokens = new[row].tolist()
            n = tokens.index(eos) + 1 if eos in tokens else len(tokens)
            text = tok.decode(tokens[:n], skip_special_tokens=True)
            reward, success, status = score(text, ex)
            rollouts.append(
                Rollout(
                    text=text,
                    token_ids=np.asarray(tokens[:n], dtype=np.int32),
                    logprobs=picked[row, :n].numpy().astype(np.float32),
                    reward=reward,
                    success=success,
                    status=status,
                    finish_reason="stop" if eos in tokens[:n] else "length",
                )
            )
        groups.append(
            ScoredGroup(
                group_id=group_id,
                prompt=ex.prompt,
                prompt_token_ids=np.asarray(encoded[i], dtype=np.int32),
                answer=ex.answer,
                task=ex.task,
                policy_version=version,
                replica="baseline",
                rollouts=tuple(rollouts),
            )
        )
    return groups


def sample_step(
    policy: Learner,
    config: RunConfig,
    batch: Sequence[tuple[str, Example]],
    score: Callable[[str, Example], tuple[float, bool, str]],
    version: int,
) -> list[ScoredGroup]:
    """One step's groups with the config's rollout settings."""
    r = config.rollout
    return sample_groups_batched(
        policy,
        batch,
        group_size=r.group_size,
        temperature=r.temperature,
        top_p=r.top_p,
        max_tokens=r.max_tokens,
        score=score,
        version=version,
    )


def verifier_scorer(config: RunConfig) -> Callable[[str, Example], tuple[float, bool, str]]:
    """The reward service's verifier for the config's task, called in-process."""
    from services.reward.registry import get_task

    task = get_task(config.task.name)

    def score(completion: str, ex: Example) -> tuple[float, bool, str]:
        result = task(completion, [ex.answer])
        return float(result.reward), task.success(result.status, result.reward), "scored"

    return score


def run_baseline(
    config: RunConfig,
    steps: int,
    *,
    eval_every: int,
    threads: int,
    on_step: Callable[[BaselineStep], None] = lambda s: None,
    policy: Learner | None = None,
) -> list[BaselineStep]:
    """``steps`` synchronous steps of ``policy`` (default: built from ``config.model.path``);
    evaluation every ``eval_every`` steps (and at step 0) on the held-out set."""
    torch.set_num_threads(threads)
    policy = policy or Learner.build(config)
    t = config.trainer
    order = PromptOrder(
        load_examples(config.task.dataset, config.task.name, config.task.seed),
        config.task.seed,
        Position(),
    )
    held_out = eval_examples(
        config.task.dataset, config.task.eval_dataset, config.task.name, config.task.seed
    )
    score = verifier_scorer(config)
    history = [BaselineStep(0, 0, 0.0, 0.0, 0.0, policy.evaluate(held_out).accuracy)]
    on_step(history[0])
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        batch = [
            (f"baseline:{p.epoch}:{p.index}", ex)
            for p, ex in (next(order) for _ in range(t.prompts_per_step))
        ]
        groups = sample_step(policy, config, batch, score, version=step - 1)
        t1 = time.perf_counter()
        policy.set_step(step - 1)
        policy.train(groups, {g.group_id: 0 for g in groups}, frozenset())
        t2 = time.perf_counter()
        accuracy = None
        if eval_every and step % eval_every == 0:
            accuracy = policy.evaluate(held_out).accuracy
        rewards = [ro.reward for g in groups for ro in g.rollouts]
        record = BaselineStep(
            step,
            len(rewards),
            t1 - t0,
            t2 - t1,
            float(np.mean(rewards)),
            accuracy,
        )
        history.append(record)
        on_step(record)
    return history


def as_dict(step: BaselineStep) -> dict[str, Any]:
    return {
        "step": step.step,
        "completions": step.completions,
        "generate_s": step.generate_s,
        "train_s": step.train_s,
        "reward_mean": step.reward_mean,
        "eval_accuracy": step.eval_accuracy,
    }
