"""CUDA check of the trainer step: a few bf16 steps of a randomly initialised 0.5B-shaped model.

Run on a machine with one CUDA GPU, from the repository root::

    python -m services.benchmarks.trainer_gpu_check            # 0.5b preset, 5 steps
    python -m services.benchmarks.trainer_gpu_check --steps 3 --groups 8

It needs only torch, transformers, tokenizers and safetensors (no Redis, vLLM or pydantic): it
builds the model offline, runs the trainer's own ``train_step`` the way the service does on
CUDA (float32 weights and AdamW moments, bfloat16 autocast, a bfloat16 frozen reference for the
KL term, the paper's defaults), and prints step time, tokens/s and peak GPU memory. It exits
non-zero if a loss or gradient norm is not finite or the parameters did not move.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from services.benchmarks.trainer import measure, synthetic_batch
from services.core.config import RunConfig
from services.trainer.step import train_step


def sanity(model_dir: Path, config: RunConfig, device: torch.device) -> str | None:
    """One step on a small batch: finite numbers and moved weights, or why not."""
    from transformers import AutoModelForCausalLM

    from services.models.tiny import vocab

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="0.5b", help="model preset (default 0.5b)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after 1 warm-up")
    parser.add_argument("--groups", type=int, default=16, help="groups per step")
    parser.add_argument("--group-size", type=int, default=8, help="G")
    parser.add_argument("--response-len", type=int, default=256, help="max response tokens")
    parser.add_argument("--micro-batch", type=int, default=16, help="sequences per forward")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("trainer_gpu_check: no CUDA device", file=sys.stderr)
        return 2
    from services.models.tiny import build_model, vocab

    device = torch.device("cuda")
    config = RunConfig.model_validate({"optim": {"micro_batch": args.micro_batch}})
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="mapo-gpu-check-") as tmp:
        start = time.perf_counter()
        model_dir = build_model(Path(tmp) / args.size, args.size)
        print(f"built {args.size} in {time.perf_counter() - start:.1f} s")
        problem = sanity(model_dir, config, device)
        if problem:
            print(f"FAILED: {problem}")
            return 1
        torch.cuda.empty_cache()
        batch = synthetic_batch(
            args.groups, args.group_size, vocab_size=len(vocab()), response_len=args.response_len
        )
        figures = measure(
            model_dir,
            args.size,
            batch,
            config,
            device=device,
            amp_dtype=torch.bfloat16,
            steps=args.steps,
        )
    print(figures.line())
    print(
        "step times (s): " + ", ".join(f"{t:.3f}" for t in figures.step_s)
        + f"; peak memory {figures.peak_memory_bytes or 0} bytes"
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
