"""``mapo bench trainer``: trainer tokens per second for one full step, per model size.

A step is everything the trainer does with a batch: old log-probs (a separate pass only with
more than one PPO epoch), reference log-probs (the paper's KL is on), advantages, the
micro-batched forward/backward of the clipped loss, gradient clipping and the AdamW update.
Batches have the shapes of an RL step: ``groups x G`` sequences of an 8-token prompt and a
response of 32-64 tokens (tiny: 32 x 8, 50m: 4 x 8). Figures are the median of ``--steps`` timed
steps after one warm-up step, on ``trainer.device``; tokens/s counts prompt and response tokens
(what the forward passes process), response tokens/s only what is trained on.

With ``--nproc 1,2`` it compares rank counts instead: each count runs in processes of its own
(one process as the trainer runs today, several under ``torchrun`` with FSDP2, every rank on
``--threads-per-rank`` cores, 1 by default), on the same global batch, and prints tokens/s, the
scaling efficiency (tokens/s over N times the single process's), and per rank the training
state it holds (weights and AdamW moments, its shards) and its peak resident memory during the
timed steps, with what sharding saved against one process.

This module imports neither the config models nor the wire schemas at import time, so
``services/benchmarks/trainer_gpu_check.py`` can reuse it on a machine with only torch and
transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


# ----------------------------------------------------------------------------- rank counts


@contextmanager
def peak_rss() -> Iterator[list[int]]:
    """The peak resident memory of this process while the block runs (sampled every 5 ms
    from /proc; Linux), in bytes, as the one item of the yielded list once the block ends."""
    page = os.sysconf("SC_PAGE_SIZE")
    peak = [0]
    done = threading.Event()

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            done.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()
        peak[0] = max(peak[0], rss())


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of weights and optimiser state this process holds (its shards, when sharded)."""

    def local(t: torch.Tensor) -> torch.Tensor:
        to_local = getattr(t, "to_local", None)
        return to_local() if to_local is not None else t

    total = sum(local(p).numel() * p.element_size() for p in model.parameters())
    for slots in optimizer.state.values():
        for v in slots.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                total += local(v).numel() * v.element_size()
    return total


def rank_worker(spec_path: str) -> int:
    """One rank (or the single process) of a rank-count run: time the steps on its share of
    the rows, sample its memory, write its figures beside the spec."""
    from transformers import AutoModelForCausalLM

    from services.core.config import RunConfig
    from services.models.tiny import vocab
    from services.trainer import distributed

    spec = json.loads(Path(spec_path).read_text())
    config = RunConfig.model_validate(spec["config"])
    torch.set_num_threads(int(spec["threads"]))
    topology = distributed.init("cpu")
    try:
        model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(
            spec["model_dir"], dtype=torch.float32
        )
        model.eval()
        ref: torch.nn.Module | None = None
        if config.algorithm.kl_coef > 0.0:
            frozen: torch.nn.Module = AutoModelForCausalLM.from_pretrained(
                spec["model_dir"], dtype=torch.float32
            )
            ref = frozen.eval().requires_grad_(False)
        if topology.distributed:
            model = distributed.shard_model(model, topology)
            if ref is not None:
                ref = distributed.shard_model(ref, topology)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=1e-2)
        groups, g = SHAPES[spec["size"]]
        batch = synthetic_batch(groups, g, vocab_size=len(vocab()))
        rows = topology.shard()
        times = []
        with peak_rss() as peak:
            for i in range(int(spec["steps"]) + 1):
                start = time.perf_counter()
                train_step(model, optimizer, batch, config, ref_model=ref, shard=rows)
                if i:
                    times.append(time.perf_counter() - start)
        figures = {
            "rank": topology.rank,
            "ranks": topology.world_size,
            "parameters": sum(p.numel() for p in model.parameters()),
            "tokens": batch.tokens,
            "step_s": times,
            "peak_rss": peak[0],
            "state_bytes": state_bytes(model, optimizer),
        }
        out = Path(spec_path).with_name(f"ranks{topology.world_size}-rank{topology.rank}.json")
        out.write_text(json.dumps(figures))
        return 0
    finally:
        distributed.shutdown()


@dataclass(frozen=True)
class RankCount:
    """One rank count's figures: the global batch's tokens/s and every rank's memory."""

    ranks: int
    tokens: int
    step_s: list[float]
    peak_rss: list[int]
    state_bytes: list[int]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / statistics.median(self.step_s)

    def line(self, one: RankCount | None) -> str:
        gib = 2**30
        text = (
            f"{self.ranks:5d}  {statistics.median(self.step_s):8.2f}  {self.tokens_per_s:8.0f}"
            f"  {max(self.state_bytes) / gib:9.2f}  {max(self.peak_rss) / gib:9.2f}"
        )
        if one is not None and self.ranks > 1:
            efficiency = self.tokens_per_s / (self.ranks * one.tokens_per_s)
            saved_state = 1 - max(self.state_bytes) / max(one.state_bytes)
            saved_rss = 1 - max(self.peak_rss) / max(one.peak_rss)
            text += f"  {efficiency:10.0%}  {saved_state:11.0%}  {saved_rss:9.0%}"
        return text


RANK_HEADER = (
    f"{'ranks':>5}  {'step s':>8}  {'tokens/s':>8}  {'state GiB':>9}  {'peak GiB':>9}"
    f"  {'efficiency':>10}  {'state saved':>11}  {'rss saved':>9}"
)


def run_ranks(
    model_dir: Path, size: str, ranks: int, config: RunConfig, steps: int, threads: int, out: Path
) -> RankCount:
    """Run :func:`rank_worker` as one process (``ranks`` 1) or under torchrun."""
    spec = out / f"spec-{ranks}.json"
    spec.write_text(
        json.dumps(
            {
                "model_dir": str(model_dir),
                "size": size,
                "config": config.model_dump(mode="json"),
                "steps": steps,
                "threads": threads,
            }
        )
    )
    worker = ["-m", "services.benchmarks.trainer", "--rank-worker", str(spec)]
    command = [sys.executable, *worker]
    if ranks > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += [f"--nproc-per-node={ranks}", *worker]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    done = subprocess.run(command, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{ranks} ranks: exited with status {done.returncode}")
    figures: list[dict[str, Any]] = [
        json.loads(out.joinpath(f"ranks{ranks}-rank{r}.json").read_text()) for r in range(ranks)
    ]
    return RankCount(
        ranks=ranks,
        tokens=int(figures[0]["tokens"]),
        step_s=[max(times) for times in zip(*(f["step_s"] for f in figures), strict=True)],
        peak_rss=[int(f["peak_rss"]) for f in figures],
        state_bytes=[int(f["state_bytes"]) for f in figures],
    )


def compare_ranks(
    sizes: list[str], counts: list[int], config: RunConfig, steps: int, threads: int
) -> int:
    from services.models.tiny import build_model

    print(
        f"trainer step on the CPU, {threads} torch thread(s) per rank; the same global batch "
        f"for every rank count; estimator {config.algorithm.estimator}, KL "
        f"{config.algorithm.kl_coef}, micro-batch {config.optim.micro_batch} per rank; "
        f"median of {steps} steps after 1 warm-up; memory per rank, the fullest rank's"
    )
    for size in sizes:
        groups, g = SHAPES[size]
        with tempfile.TemporaryDirectory(prefix=f"mapo-bench-ranks-{size}-") as tmp:
            model_dir = build_model(Path(tmp) / size, size)
            print(f"{size}: {groups} groups x {g}")
            print(RANK_HEADER)
            one: RankCount | None = None
            for n in counts:
                figures = run_ranks(model_dir, size, n, config, steps, threads, Path(tmp))
                one = figures if n == 1 else one
                print(figures.line(one), flush=True)
    return 0


def main(args: argparse.Namespace, config: RunConfig) -> int:
    from services.trainer.model import precision, resolve_device

    sizes = [s.strip() for s in str(getattr(args, "sizes", "tiny,50m")).split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SHAPES]
    if unknown:
        print(f"mapo bench trainer: unknown sizes {unknown}; choose from {sorted(SHAPES)}")
        return 2
    steps = max(int(getattr(args, "steps", 3)), 1)
    nproc = getattr(args, "nproc", None)
    if nproc:
        counts = sorted({int(n) for n in str(nproc).split(",") if n.strip()})
        if not counts or counts[0] < 1:
            print(f"mapo bench trainer: --nproc wants rank counts of at least 1, not {nproc!r}")
            return 2
        threads = max(int(getattr(args, "threads_per_rank", 1)), 1)
        return compare_ranks(sizes, counts, config, steps, threads)
    device = resolve_device(config.trainer.device)
    amp_dtype, _ = precision(config, device)
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


if __name__ == "__main__":
    if sys.argv[1:2] != ["--rank-worker"] or len(sys.argv) != 3:
        sys.exit(
            "usage: python -m services.benchmarks.trainer --rank-worker SPEC (mapo bench trainer)"
        )
    sys.exit(rank_worker(sys.argv[2]))
