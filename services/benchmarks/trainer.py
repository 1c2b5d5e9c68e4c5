"""``mapo bench trainer``: trainer tokens per second for one full step, per model size.

A step is everything the trainer does with a batch: old log-probs (a separate pass only with
more than one PPO epoch), reference log-probs (the paper's KL is on), advantages, the
micro-batched forward/backward of the clipped loss, gradient clipping and the AdamW update.
Batches have the shapes of an RL step: ``groups x G`` sequences of an 8-token prompt and a
response of 32-64 tokens (tiny: 32 x 8, 50m: 4 x 8). Figures are the median of ``--steps`` timed
steps after one warm-up step, on ``trainer.device``; tokens/s counts prompt and response tokens
(what the forward passes process), response tokens/s only what is trained on.

This module imports neither the config models nor the wire schemas at import time, so
``services/benchmarks/trainer_gpu_check.py`` can reuse it on a machine with only torch and
transformers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from services.trainer.batch import TrainBatch
from services.trainer.step import train_step

if TYPE_CHECKING:
    from services.core.config import RunConfig

PROMPT_LEN = 8
RESPONSE_LEN = 64
#: (groups, G) per preset: the tiny model takes a full RL batch, the 69M one a smaller one.
SHAPES = {"tiny": (32, 8), "small": (32, 8), "50m": (4, 8), "0.5b": (16, 8)}
REWARDS = torch.tensor([0.0, 0.1, 0.9, 1.0], dtype=torch.float64)


def synthetic_batch(
    num_groups: int,
    group_size: int,
    *,
    vocab_size: int,
    prompt_len: int = PROMPT_LEN,
    response_len: int = RESPONSE_LEN,
    pad_id: int = 1,
    seed: int = 0,
) -> TrainBatch:
    """Random tokens and rewards in the shape of an RL batch (responses of L/2..L tokens)."""
    g = torch.Generator().manual_seed(seed)
    b = num_groups * group_size
    width = prompt_len + response_len
    lengths = torch.randint(response_len // 2, response_len + 1, (b,), generator=g)
    ids = torch.randint(3, vocab_size, (b, width), generator=g)
    attention = torch.arange(width)[None, :] < (prompt_len + lengths)[:, None]
    ids[~attention] = pad_id
    cols = torch.arange(width - 1)[None, :]
    response_mask = (cols >= prompt_len - 1) & (cols < (prompt_len + lengths - 1)[:, None])
    behaviour = torch.where(response_mask, -3.0 * torch.rand(b, width - 1, generator=g), 0.0)
    rewards = REWARDS[torch.randint(0, len(REWARDS), (b,), generator=g)]
    group_index = torch.arange(num_groups).repeat_interleave(group_size)
    return TrainBatch(
        input_ids=ids,
        attention_mask=attention.long(),
        response_mask=response_mask,
        behaviour_logprobs=behaviour.float(),
        rewards=rewards,
        success=rewards >= 1.0,
        group_index=group_index,
        staleness=torch.zeros(b, dtype=torch.long),
        correct=torch.zeros(b, dtype=torch.bool),
        group_ids=tuple(f"g{i}" for i in range(num_groups)),
        sample_keys=tuple((f"g{i // group_size}", i % group_size) for i in range(b)),
    )


@dataclass(frozen=True)
class StepFigures:
    size: str
    parameters: int
    sequences: int
    tokens: int
    response_tokens: int
    step_s: list[float]
    peak_memory_bytes: int | None

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s)

    def line(self) -> str:
        mem = ""
        if self.peak_memory_bytes is not None:
            mem = f"  peak memory {self.peak_memory_bytes / 2**30:.2f} GiB"
        return (
            f"{self.size:>5}  {self.parameters / 1e6:7.2f}M params  {self.sequences:4d} seqs  "
            f"{self.tokens:6d} tokens ({self.response_tokens} response)  "
            f"step {self.median_s:7.3f} s (min {min(self.step_s):.3f}, max {max(self.step_s):.3f})"
            f"  {self.tokens / self.median_s:9.0f} tokens/s"
            f"  {self.response_tokens / self.median_s:9.0f} response tokens/s{mem}"
        )


def measure(
    model_dir: str | Path,
    size: str,
    batch: TrainBatch,
    config: RunConfig,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    lr: float = 1e-6,
    steps: int = 3,
) -> StepFigures:
    """Time ``steps`` full trainer steps (after one warm-up) of the model in ``model_dir``.

    The set-up is the trainer's: float32 weights and AdamW moments, bf16 autocast on CUDA, and a
    frozen reference copy (bf16 on CUDA) when the KL term is on.
    """
    from transformers import AutoModelForCausalLM

    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32
    )
    model.to(device).eval()
    ref: torch.nn.Module | None = None
    if config.algorithm.kl_coef > 0.0:
        ref_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        frozen: torch.nn.Module = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=ref_dtype
        )
        ref = frozen.to(device).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    on_device = batch.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        train_step(model, optimizer, on_device, config, amp_dtype=amp_dtype, ref_model=ref)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first step pays for allocation and kernel selection
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return StepFigures(
        size=size,
        parameters=sum(p.numel() for p in model.parameters()),
        sequences=batch.size,
        tokens=batch.tokens,
        response_tokens=batch.response_tokens,
        step_s=times,
        peak_memory_bytes=peak,
    )


def run_size(
    size: str,
    config: RunConfig,
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None,
    steps: int,
) -> StepFigures:
    from services.models.tiny import build_model, vocab

    groups, g = SHAPES[size]
    with tempfile.TemporaryDirectory(prefix=f"mapo-bench-trainer-{size}-") as tmp:
        model_dir = build_model(Path(tmp) / size, size)
        batch = synthetic_batch(groups, g, vocab_size=len(vocab()))
        return measure(
            model_dir,
            size,
            batch,
            config,
            device=device,
            amp_dtype=amp_dtype,
            lr=config.optim.lr,
            steps=steps,
        )


def main(args: argparse.Namespace, config: RunConfig) -> int:
    from services.trainer.model import precision, resolve_device

    device = resolve_device(config.trainer.device)
    amp_dtype, _ = precision(config, device)
    sizes = [s.strip() for s in str(getattr(args, "sizes", "tiny,50m")).split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SHAPES]
    if unknown:
        print(f"mapo bench trainer: unknown sizes {unknown}; choose from {sorted(SHAPES)}")
        return 2
    steps = max(int(getattr(args, "steps", 3)), 1)
    print(
        f"trainer step on {device} ({torch.get_num_threads()} torch threads), estimator "
        f"{config.algorithm.estimator}, KL {config.algorithm.kl_coef}, "
        f"micro-batch {config.optim.micro_batch}, "
        f"{PROMPT_LEN}-token prompts, {RESPONSE_LEN // 2}-{RESPONSE_LEN}-token responses; "
        f"median of {steps} steps after 1 warm-up"
    )
    for size in sizes:
        figures = run_size(size, config, device, amp_dtype=amp_dtype, steps=steps)
        print(figures.line(), flush=True)
    return 0
