"""``mapo bench advantages``: group advantages per second, dense and ragged, MAPO and GRPO.

Rewards take the paper's values {0, 0.1, 0.9, 1}. The ragged batch holds the same groups with
the samples shuffled across the whole batch, as a trainer sees them after load balancing.
Figures are the best of several repeats after one warm-up call, on ``trainer.device``.
On a CPU shared with other busy processes, ``OMP_NUM_THREADS=1`` gives steadier figures:
torch's worker threads otherwise wait on each other at every operation.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from services.core.advantages import compute_advantages, compute_advantages_ragged
from services.core.config import RunConfig

REPEATS = 5


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _best_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def main(args: argparse.Namespace, config: RunConfig) -> int:
    groups, g = int(args.groups), int(args.group_size)
    if groups < 1 or g < 1:
        print("mapo bench advantages: --groups and --group-size must be >= 1", file=sys.stderr)
        return 2
    repeats = int(getattr(args, "repeats", REPEATS))
    device = _device(config.trainer.device)
    alg = config.algorithm
    options: dict[str, Any] = {
        "eps": alg.eps,
        "std": alg.std,
        "max_reward": config.task.max_reward,
        "success_threshold": config.task.success_threshold,
        "advantage_clip": alg.advantage_clip,
    }

    gen = torch.Generator().manual_seed(config.trainer.seed)
    levels = torch.tensor([0.0, 0.1, 0.9, 1.0]) * config.task.max_reward
    dense = levels[torch.randint(0, 4, (groups, g), generator=gen)].to(device)
    perm = torch.randperm(groups * g, generator=gen).to(device)
    flat = dense.flatten()[perm]
    ids = torch.arange(groups, device=device).repeat_interleave(g)[perm]

    print(
        f"advantages: {groups} groups x G={g} ({groups * g} samples), float32 rewards, "
        f"device={device}, torch threads={torch.get_num_threads()}, best of {repeats}"
    )
    print(f"{'estimator':<10} {'layout':<8} {'ms':>9} {'groups/s':>14} {'samples/s':>14}")
    for estimator in ("mapo", "grpo"):
        cases: dict[str, Callable[[], object]] = {
            "dense": partial(compute_advantages, dense, estimator, **options),
            "ragged": partial(compute_advantages_ragged, flat, ids, estimator, **options),
        }
        for layout, fn in cases.items():
            seconds = _best_seconds(fn, device, repeats)
            print(
                f"{estimator:<10} {layout:<8} {seconds * 1e3:>9.2f} {groups / seconds:>14,.0f} "
                f"{groups * g / seconds:>14,.0f}"
            )
    return 0
