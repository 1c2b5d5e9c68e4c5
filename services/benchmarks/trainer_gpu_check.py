"""CUDA check of the trainer: bf16 steps of a 0.5B- or 1.5B-shaped model on 1 and N GPUs.

Run on a machine with CUDA GPUs, from the repository root::

    python -m services.benchmarks.trainer_gpu_check                      # 0.5b, 1 and all GPUs
    python -m services.benchmarks.trainer_gpu_check --size 1.5b --nproc 1,8 --steps 5

It needs only torch, transformers, tokenizers, safetensors and pydantic (no Redis or vLLM). It
builds the model offline, checks one step of the single-device trainer (finite loss and gradient
norm, weights moved), then times the trainer's own ``train_step`` on weights sharded the way the
trainer shards them (``services.trainer.distributed``: FSDP2 per decoder layer, float32 master
weights and AdamW moments, bf16 compute with float32 gradient reduction; a bf16 frozen
reference for the KL term) under ``torchrun`` with 1 and N ranks. Every rank runs its share of
the rows of one global batch, as the sharded trainer does (strong scaling).

Per rank count it prints the median step time, tokens/s (prompt and response tokens forwarded),
MFU and the peak GPU memory of the fullest rank. MFU is ``6 x parameters x tokens / step time``
over the ranks' peak dense bf16 FLOP/s (``PEAK_BF16_TFLOPS`` by device name, or
``--peak-tflops``): the forward and backward pass of the update; the reference and proximal
forward passes are extra work it does not count. Exit status: 0 on success, 1 when a step gives
a non-finite loss or gradient norm or moves no weight, 2 without a CUDA device or with
arguments that cannot run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from services.core.config import RunConfig

#: Peak dense (no sparsity) bf16 tensor throughput in TFLOP/s, from the vendors' data sheets.
#: Matched against ``torch.cuda.get_device_name()``, longest name first.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "B200": 2250.0,
    "B100": 1750.0,
    "H200 NVL": 835.0,
    "H200": 989.0,
    "GH200": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "H800": 989.0,
    "H20": 148.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "MI300X": 1307.0,
    "MI250X": 383.0,
}

SIZES = ("0.5b", "1.5b")


def peak_tflops(device_name: str) -> float | None:
    """Peak dense bf16 TFLOP/s of a device, by the longest table name its name contains."""
    name = device_name.lower()
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.lower() in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def mfu(parameters: int, tokens: int, step_s: float, peak_flops: float, ranks: int = 1) -> float:
    """Model FLOPs utilisation: 6 x parameters x tokens per step over the ranks' peak FLOP/s."""
    return 6.0 * parameters * tokens / step_s / (peak_flops * ranks)


def rank_counts(spec: str, available: int) -> tuple[list[int], list[int]]:
    """``"1,8"`` or ``"1,all"`` -> (counts to run, counts skipped for lack of GPUs), in order."""
    wanted: list[int] = []
    for part in spec.split(","):
        part = part.strip().lower()
        if not part:
            continue
        n = available if part == "all" else int(part)
        if n < 1:
            raise ValueError(f"a rank count must be at least 1, not {n}")
        if n not in wanted:
            wanted.append(n)
    if not wanted:
        raise ValueError(f"no rank count in {spec!r}")
    return [n for n in wanted if n <= available], [n for n in wanted if n > available]


@dataclass(frozen=True)
class RankFigures:
    """What rank 0 reports for one rank count: the global batch and its step times."""

    ranks: int
    parameters: int
    tokens: int
    response_tokens: int
    step_s: list[float]
    peak_memory_bytes: int | None

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.median_s

    def line(self, peak_flops: float | None, one_rank: RankFigures | None) -> str:
        """One row of the table under :data:`HEADER`; ``peak_flops`` per GPU, in FLOP/s."""
        mfu_text = "n/a"
        if peak_flops is not None:
            use = mfu(self.parameters, self.tokens, self.median_s, peak_flops, self.ranks)
            mfu_text = f"{use:.1%}"
        scaling = ""
        if one_rank is not None and self.ranks > 1:
            scaling = f"{self.tokens_per_s / (one_rank.tokens_per_s * self.ranks):.0%}"
        mem = "n/a" if self.peak_memory_bytes is None else f"{self.peak_memory_bytes / 2**30:.2f}"
        return (
            f"{self.ranks:5d}  {self.median_s:8.3f}  {self.tokens_per_s:10.0f}  "
            f"{self.tokens_per_s / self.ranks:12.0f}  {mfu_text:>6}  {mem:>9}  {scaling:>8}"
        )


HEADER = (
    f"{'ranks':>5}  {'step (s)':>8}  {'tokens/s':>10}  {'tokens/s/GPU':>12}  {'MFU':>6}  "
    f"{'peak GiB':>9}  {'scaling':>8}"
)


def run_config(groups: int, updates: int, micro_batch: int) -> RunConfig:
    """The paper's defaults, with ``updates`` optimiser updates over a batch of ``groups``."""
    from services.core.config import RunConfig

    if groups % updates:
        raise ValueError(f"{groups} groups do not split into {updates} updates")
    return RunConfig.model_validate(
        {
            "optim": {"micro_batch": micro_batch},
            "trainer": {"prompts_per_step": groups},
            "algorithm": {"mini_batch_groups": groups // updates if updates > 1 else 0},
        }
    )


# --- One process: the single-device sanity step -------------------------------------------


def sanity(model_dir: Path, config: RunConfig, device: torch.device) -> str | None:
    """One step of the single-device trainer on a small batch: finite numbers and moved
    weights, or why not."""
    from transformers import AutoModelForCausalLM

    from services.benchmarks.trainer import synthetic_batch
    from services.models.tiny import vocab
    from services.trainer.step import train_step

    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32
    )
    model.to(device)
    ref: torch.nn.Module = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.bfloat16
    )
    ref.to(device).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = synthetic_batch(2, 4, vocab_size=len(vocab()), seed=1).to(device)
    m = train_step(model, optimizer, batch, config, amp_dtype=torch.bfloat16, ref_model=ref).metrics
    values = [m[k] for k in ("loss", "grad_norm", "entropy")]
    if not all(v is not None and math.isfinite(v) for v in values):
        return f"non-finite diagnostics: {m}"
    moved = sum(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    if moved == 0:
        return "no parameter moved"
    return None


# --- One rank under torchrun: the timed steps -------------------------------------------


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def worker(args: argparse.Namespace) -> int:
    """One rank: time ``args.steps`` steps after a warm-up; rank 0 writes the figures.

    Set up as :meth:`services.trainer.model.Learner.build` sets up the trainer. One rank: the
    single-device trainer (float32 weights under bf16 autocast on CUDA, a bf16 frozen
    reference). Several: NCCL on CUDA (gloo on the CPU), FSDP2 per decoder layer with float32
    shards gathered in bf16 and gradients reduced in float32, the reference sharded too; every
    rank holds the whole batch and runs its share of the rows
    (:class:`~services.trainer.distributed.RowShard`).
    """
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from services.benchmarks.trainer import synthetic_batch
    from services.models.tiny import vocab
    from services.trainer import distributed
    from services.trainer.step import train_step

    topology = distributed.init(args.device)
    sharded = topology.distributed
    device = topology.device if sharded else torch.device(args.device)
    cuda = device.type == "cuda"
    bf16 = torch.bfloat16 if cuda else None

    def in_step() -> None:
        if cuda:
            torch.cuda.synchronize(device)
        if sharded:
            dist.barrier()

    try:
        config = run_config(args.groups, args.updates, args.micro_batch)
        model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(
            str(args.model_dir), dtype=torch.float32
        )
        parameters = sum(p.numel() for p in model.parameters())
        if args.activation_checkpointing:
            distributed.checkpoint_activations(model)
        ref: torch.nn.Module = AutoModelForCausalLM.from_pretrained(
            str(args.model_dir), dtype=bf16 or torch.float32
        )
        model, ref = model.to(device), ref.to(device).eval().requires_grad_(False)
        amp_dtype = bf16
        if sharded:  # the shards are gathered in bf16: no autocast on top
            model = distributed.shard_model(model, topology, compute_dtype=bf16)
            ref = distributed.shard_model(ref, topology)
            amp_dtype = None
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=1e-2)
        batch = synthetic_batch(
            args.groups, args.group_size, vocab_size=len(vocab()), response_len=args.response_len
        ).to(device)
        rows = topology.shard()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times, finite = [], True
        for i in range(args.steps + 1):
            in_step()
            start = time.perf_counter()
            m = train_step(
                model, optimizer, batch, config, amp_dtype=amp_dtype, ref_model=ref, shard=rows
            ).metrics
            in_step()
            if i:  # the first step pays for allocation and kernel selection
                times.append(time.perf_counter() - start)
            finite &= all(_finite(m[k]) for k in ("loss", "grad_norm"))
        # Over the ranks: any non-finite step, the fullest GPU.
        worst = torch.tensor(
            [int(not finite), torch.cuda.max_memory_allocated(device) if cuda else 0],
            dtype=torch.long,
            device=device,
        )
        if sharded:
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        if topology.leader:
            figures = {
                "ranks": topology.world_size,
                "parameters": parameters,
                "tokens": batch.tokens,
                "response_tokens": batch.response_tokens,
                "step_s": times,
                "peak_memory_bytes": int(worst[1]) if cuda else None,
            }
            report = {"figures": figures, "nonfinite": bool(worst[0])}
            args.result.write_text(json.dumps(report))
        return 0
    finally:
        distributed.shutdown()


def launch(args: argparse.Namespace, ranks: int, model_dir: Path, out: Path) -> RankFigures:
    """Run :func:`worker` on ``ranks`` GPUs of this machine under torchrun; its figures."""
    result = out / f"ranks-{ranks}.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={ranks}", "-m", "services.benchmarks.trainer_gpu_check",
        "--worker", "--model-dir", str(model_dir), "--result", str(result),
        "--device", args.device, "--steps", str(args.steps), "--groups", str(args.groups),
        "--group-size", str(args.group_size), "--response-len", str(args.response_len),
        "--micro-batch", str(args.micro_batch), "--updates", str(args.updates),
        *(["--activation-checkpointing"] if args.activation_checkpointing else []),
    ]  # fmt: skip
    # The repository root on the path: the ranks import this module wherever the check runs from.
    root = str(Path(__file__).resolve().parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(cmd, env=env, timeout=args.timeout, check=False)
    if done.returncode != 0 or not result.exists():
        raise RuntimeError(f"{ranks} ranks: torchrun exited with status {done.returncode}")
    data = json.loads(result.read_text())
    if data["nonfinite"]:
        raise RuntimeError(f"{ranks} ranks: non-finite loss or gradient norm")
    return RankFigures(**data["figures"])


# --- The command ------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m services.benchmarks.trainer_gpu_check",
        description=(__doc__ or "").splitlines()[0],
    )
    p.add_argument("--size", default="0.5b", choices=SIZES, help="model preset (default 0.5b)")
    p.add_argument(
        "--nproc", default="1,all", help="rank counts, comma-separated; all: every GPU (default)"
    )
    p.add_argument("--steps", type=int, default=5, help="timed steps after 1 warm-up")
    p.add_argument("--groups", type=int, default=16, help="groups per step, over all ranks")
    p.add_argument("--group-size", type=int, default=8, help="G")
    p.add_argument("--response-len", type=int, default=256, help="max response tokens")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per forward, per rank")
    p.add_argument("--updates", type=int, default=1, help="optimiser updates per step")
    p.add_argument(
        "--activation-checkpointing", action="store_true", help="recompute layer activations"
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s per GPU")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per rank count (hangs)")
    # Internal: one rank under torchrun (--device cpu: gloo, for the CPU tests).
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help=argparse.SUPPRESS)
    return p


def check_arguments(args: argparse.Namespace, counts: list[int]) -> str | None:
    """Why these arguments cannot run, or None."""
    if min(args.steps, args.groups, args.group_size, args.updates, args.micro_batch) < 1:
        return "--steps, --groups, --group-size, --updates and --micro-batch must be at least 1"
    if args.groups % args.updates:
        return f"--groups {args.groups} must split evenly into --updates {args.updates}"
    rows = args.groups * args.group_size
    if max(counts) > rows:
        return f"{max(counts)} ranks for {rows} sequences: some ranks would have none"
    return None


def report(
    args: argparse.Namespace, device_name: str, tflops: float | None, figures: list[RankFigures]
) -> list[str]:
    """The summary and one table row per rank count."""
    first = figures[0]
    lines = [
        f"{args.size}: {first.parameters / 1e6:.1f}M parameters, bf16, FSDP2; "
        f"{args.groups} groups x {args.group_size} per step ({first.tokens} tokens, "
        f"{first.response_tokens} response), {args.updates} update(s); "
        f"median of {args.steps} steps after 1 warm-up"
    ]
    if tflops is None:
        lines.append(f"MFU: n/a (no peak FLOP/s known for {device_name!r}; pass --peak-tflops)")
    else:
        lines.append(f"MFU: 6 x parameters x tokens / step time / (ranks x {tflops:g} TFLOP/s)")
    one_rank = next((f for f in figures if f.ranks == 1), None)
    lines.append(HEADER)
    peak = None if tflops is None else tflops * 1e12
    lines += [f.line(peak, one_rank) for f in figures]
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.worker:
        return worker(args)
    if not torch.cuda.is_available():
        print(
            f"trainer_gpu_check: no CUDA device (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}); run it on a machine with NVIDIA GPUs",
            file=sys.stderr,
        )
        return 2
    from services.models.tiny import build_model

    available = torch.cuda.device_count()
    try:
        counts, skipped = rank_counts(args.nproc, available)
    except ValueError as exc:
        print(f"trainer_gpu_check: --nproc: {exc}", file=sys.stderr)
        return 2
    problem = check_arguments(args, counts)
    if problem or not counts:
        print(f"trainer_gpu_check: {problem or f'only {available} GPUs'}", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    tflops = args.peak_tflops or peak_tflops(name)
    print(f"{available} x {name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    for n in skipped:
        print(f"skipped {n} ranks: {available} GPUs here")
    with tempfile.TemporaryDirectory(prefix="mapo-gpu-check-") as tmp:
        start = time.perf_counter()
        model_dir = build_model(Path(tmp) / args.size, args.size)
        print(f"built {args.size} in {time.perf_counter() - start:.1f} s")
        problem = sanity(model_dir, run_config(2, 1, args.micro_batch), device)
        if problem:
            print(f"FAILED: {problem}")
            return 1
        print("one single-device step: finite loss and gradient norm, weights moved")
        torch.cuda.empty_cache()
        figures: list[RankFigures] = []
        for n in counts:
            try:
                figures.append(launch(args, n, model_dir, Path(tmp)))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                print(f"FAILED: {exc}")
                return 1
    print("\n".join(report(args, name, tflops, figures)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
