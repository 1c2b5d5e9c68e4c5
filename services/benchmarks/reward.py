"""``mapo bench reward``: completions scored per second on the math task, 1 and 2 workers.

Completions look like a reasoning model's: ``<think>`` with a few hundred characters of
working, then ``\\boxed{answer}``. Each group of 8 is one random problem (a fraction, an
integer, a surd, a square, a multiple of pi or a decimal, each with its own numbers, so answers
rarely repeat and caches do not flatter the figures); an answer is right in an equivalent form
(``\\sqrt{12}`` for ``2\\sqrt{3}``, ``(x+3)^2`` for ``x^2+6x+9``), wrong, unboxed, or boxed
without the think block, in fixed proportions from a fixed seed.

Each figure goes through the real service: a ``mapo reward serve`` process per worker count
and the async client, groups of 8 with several calls in flight, after one warm-up pass. A
figure is the best of three passes, each on fresh problems: other load on the host only ever
slows a pass down. The direct figure calls the verifier in this process, with no gRPC and no
worker pool, for reference.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.core.config import RunConfig
from services.stack.processes import Child, StartError, free_port, grpc_serving, wait_until

GROUP_SIZE = 8
CONCURRENCY = 8
WORKER_COUNTS = (1, 2)
START_TIMEOUT_S = 60.0
WARM_UP_COMPLETIONS = 512
REPEATS = 3

STEPS = (
    "Let me set up the problem carefully and name the unknown quantity first.",
    "Substituting the given values, {a} times {b} gives {ab}, which we carry forward.",
    "Subtracting {b} from both sides leaves {amb}, so the expression simplifies.",
    "We can check the sign: the quantity is positive because {a} is larger than zero.",
    "Dividing through by {b} keeps the equation balanced and isolates the term.",
    "Hmm, wait, let me double check the previous step; the factor of {a} is right.",
    "Expanding the square gives the cross term twice, so the coefficients match.",
    "Converting to a common denominator of {ab} makes the fractions easy to add.",
)


@dataclass(frozen=True)
class Problem:
    answer: str
    right: tuple[str, ...]  # equivalent forms of the answer
    wrong: tuple[str, ...]


def make_problem(rng: random.Random) -> Problem:
    """A random problem of one of six answer shapes, each with its own numbers."""
    shape = rng.choice(("fraction", "integer", "sqrt", "square", "pi", "decimal"))
    p, q = rng.randint(1, 60), rng.randint(2, 60)
    while math.gcd(p, q) != 1 or p == q:
        p, q = rng.randint(1, 60), rng.randint(2, 60)
    if shape == "fraction":
        return Problem(
            f"\\frac{{{p}}}{{{q}}}",
            (f"\\frac{{{p}}}{{{q}}}", f"{p}/{q}", f"\\dfrac{{{p}}}{{{q}}}"),
            (f"\\frac{{{q}}}{{{p}}}", f"\\frac{{{p + 1}}}{{{q}}}"),
        )
    if shape == "integer":
        n = rng.randint(-500, 500)
        return Problem(str(n), (str(n), f"{n}.0", f"x = {n}"), (str(n + 1), str(2 * n + 3)))
    if shape == "sqrt":
        k, m = rng.randint(2, 9), rng.choice((2, 3, 5, 6, 7, 10, 11))
        return Problem(
            f"{k}\\sqrt{{{m}}}",
            (f"{k}\\sqrt{{{m}}}", f"\\sqrt{{{k * k * m}}}"),
            (f"{k + 1}\\sqrt{{{m}}}", f"{m}\\sqrt{{{k}}}"),
        )
    if shape == "square":
        a = rng.randint(1, 12)
        return Problem(
            f"x^2+{2 * a}x+{a * a}",
            (f"(x+{a})^2", f"x^2 + {2 * a}x + {a * a}"),
            (f"(x-{a})^2", f"x^2+{a * a}"),
        )
    if shape == "pi":
        return Problem(
            f"\\frac{{{p}\\pi}}{{{q}}}",
            (f"\\frac{{{p}\\pi}}{{{q}}}", f"{p}\\pi/{q}"),
            (f"\\frac{{{q}\\pi}}{{{p}}}", f"\\frac{{\\pi}}{{{q}}}"),
        )
    n = rng.randint(1, 999)  # a terminating decimal and its fraction form
    return Problem(
        f"{n / 8:g}",
        (f"{n / 8:g}", f"\\frac{{{n}}}{{8}}"),
        (f"{n / 8 + 1:g}", f"\\frac{{{n}}}{{9}}"),
    )


def make_completion(rng: random.Random, problem: Problem) -> tuple[str, str]:
    """(completion, kind): 50% right, 25% wrong, 15% no think block, 10% nothing boxed."""
    roll = rng.random()
    kind = "right" if roll < 0.5 else "wrong" if roll < 0.75 else "no_think"
    if roll >= 0.9:
        kind = "no_box"
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    steps = rng.sample(STEPS, k=rng.randint(3, 6))
    reasoning = " ".join(s.format(a=a, b=b, ab=a * b, amb=a - b) for s in steps)
    boxed = rng.choice(problem.right if kind in ("right", "no_think") else problem.wrong)
    if kind == "no_box":
        return f"<think>{reasoning}</think> So the answer is {boxed}.", kind
    if kind == "no_think":
        return f"{reasoning} Therefore the answer is \\boxed{{{boxed}}}.", kind
    return f"<think>{reasoning}</think> The answer is \\boxed{{{boxed}}}.", kind


@dataclass(frozen=True)
class Group:
    answer: str
    completions: list[str]
    kinds: list[str]


def make_groups(n: int, seed: int = 0, size: int = GROUP_SIZE) -> list[Group]:
    """``n`` completions in groups of ``size``: one random problem per group, as in RL."""
    rng = random.Random(seed)
    groups = []
    for start in range(0, n, size):
        problem = make_problem(rng)
        pairs = [make_completion(rng, problem) for _ in range(min(size, n - start))]
        groups.append(Group(problem.answer, [c for c, _ in pairs], [k for _, k in pairs]))
    return groups


def direct_rate(passes: Sequence[Sequence[Group]], warm: Sequence[Group]) -> tuple[float, float]:
    """Completions per second calling the verifier in-process (no gRPC, no pool): best per
    wall-clock second, and per CPU second (what one uncontended core would do)."""
    from services.reward.registry import get_task
    from services.reward.worker import warm_up

    warm_up()
    task = get_task("math")
    for g in warm:
        for c in g.completions:
            task(c, [g.answer])
    best = best_cpu = 0.0
    for groups in passes:
        start, start_cpu = time.perf_counter(), time.process_time()
        for g in groups:
            for c in g.completions:
                task(c, [g.answer])
        best = max(best, _count(groups) / (time.perf_counter() - start))
        best_cpu = max(best_cpu, _count(groups) / (time.process_time() - start_cpu))
    return best, best_cpu


def _count(groups: Sequence[Group]) -> int:
    return sum(len(g.completions) for g in groups)


def start_server(workers: int, log_dir: Path) -> tuple[Child, str]:
    """A ``mapo reward serve`` child on a free port, once it answers SERVING; its address."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAPO__")}
    command = [sys.executable, "-m", "services.cli", "reward", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", str(workers), "--metrics-port", "0"]
    log = log_dir / f"reward-{workers}.log"
    server = Child.start("reward server", command, log_path=log, env=env)
    try:
        wait_until(
            server,
            lambda: grpc_serving(address, 1.0),
            what=f"serving on {address}",
            timeout_s=START_TIMEOUT_S,
            fix=f"see {log}",
        )
    except StartError:
        server.stop()
        raise
    return server, address


async def _one_pass(client: Any, groups: Sequence[Group], concurrency: int) -> dict[str, Any]:
    """Score every group with ``concurrency`` calls in flight; rate, latency, statuses."""
    statuses: collections.Counter[str] = collections.Counter()
    successes = 0
    latencies: list[float] = []
    todo = list(reversed(groups))

    async def caller() -> None:
        nonlocal successes
        while todo:
            g = todo.pop()
            start = time.perf_counter()
            results = await client.score_batch("math", g.completions, [g.answer])
            latencies.append(time.perf_counter() - start)
            statuses.update(r.status for r in results)
            successes += sum(r.success for r in results)

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "rate": _count(groups) / elapsed,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "statuses": dict(statuses),
        "success": successes / _count(groups),
    }


async def _run(
    address: str, passes: Sequence[Sequence[Group]], warm: Sequence[Group], concurrency: int
) -> dict[str, Any]:
    """The best of the timed passes, after one warm-up pass."""
    from services.reward.client import RewardClient

    async with RewardClient(address, timeout_s=60.0) as client:
        await client.wait_ready(START_TIMEOUT_S)
        # Each worker's first verification of a new answer shape loads more of sympy; time
        # the steady state, as a long-running service sees it.
        for g in warm:
            await client.score_batch("math", g.completions, [g.answer])
        results = [await _one_pass(client, groups, concurrency) for groups in passes]
    return max(results, key=lambda r: float(r["rate"]))


def main(args: argparse.Namespace, config: RunConfig) -> int:
    n = int(args.completions)
    if n < GROUP_SIZE:
        print(f"mapo bench reward: --completions must be >= {GROUP_SIZE}", file=sys.stderr)
        return 2
    # Fresh problems for every pass: repeating one set would time cache hits.
    passes = [make_groups(n, seed=seed) for seed in range(REPEATS)]
    warm = make_groups(WARM_UP_COMPLETIONS, seed=REPEATS)
    groups = passes[0]
    kinds = collections.Counter(k for g in groups for k in g.kinds)
    chars = statistics.mean(len(c) for g in groups for c in g.completions)
    print(
        f"math task: {n} completions per pass "
        f"({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}), "
        f"{len(groups)} problems, mean {chars:.0f} chars; groups of {GROUP_SIZE}, "
        f"{CONCURRENCY} calls in flight; best of {REPEATS} passes; {os.cpu_count()} CPUs"
    )
    direct, per_cpu = direct_rate(passes, warm)
    print(
        f"{'direct verifier call, one process, no gRPC':44} {direct:8.1f} completions/s"
        f"  ({per_cpu:.1f} per CPU second)"
    )
    log_dir = Path(tempfile.mkdtemp(prefix="mapo-bench-reward-"))
    for workers in WORKER_COUNTS:
        server, address = start_server(workers, log_dir)
        with server:
            r = asyncio.run(_run(address, passes, warm, CONCURRENCY))
        label = f"gRPC service, {workers} worker{'s' if workers > 1 else ''}"
        print(
            f"{label:44} {r['rate']:8.1f} completions/s"
            f"  (group latency p50 {r['p50'] * 1e3:.0f} ms, p99 {r['p99'] * 1e3:.0f} ms; "
            f"success {r['success']:.0%}; {r['statuses']})"
        )
    return 0
