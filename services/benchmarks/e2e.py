"""``mapo bench e2e``: the whole stack against a single-process loop, from one warm start.

Both sides start from the same warm-started model with the same settings (the demo's unless
``--config``), take the same number of steps on the same prompt order, and are evaluated on the
same held-out problems with the same greedy decoding every ``--eval-every`` steps. In one run:

1. the phases alone, on a quiet machine: one step's generation by the bare vLLM engine (the
   replica's thread budget, real stopping at eos) and one training step of the trainer's
   ``Learner`` (the trainer's thread budget);
2. the stack: ``mapo up`` with that model (private Redis, reward service, vLLM replica, trainer);
3. the baseline: :mod:`services.benchmarks.baseline` (transformers ``generate`` then the same
   training step, one process using every core).

Reported: trained completions per second of wall time (evaluation time excluded on both sides),
held-out accuracy against wall time, the stack's steady step time against
max(generation alone, training alone), and the ratios. Everything lands in ``e2e.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from services.core.config import RunConfig
from services.stack.processes import Child

DEFAULT_RUN_DIR = "runs/bench-e2e"


def bench_config(args: argparse.Namespace) -> RunConfig:
    """The config `mapo up` would run (demo or --config, then --set), with the benchmark's
    steps and evaluation interval."""
    from services.stack.up import resolve_config

    as_up = argparse.Namespace(
        config=args.config,
        overrides=[*list(args.overrides or []), f"trainer.eval_every={args.eval_every}"],
        steps=args.steps,
        estimator=None,
        seed=None,
    )
    return resolve_config(as_up)[0]


def _task_prompts(config: RunConfig, count: int) -> list[str]:
    from services.trainer.dataset import load_examples

    examples = load_examples(config.task.dataset, config.task.name, config.task.seed)
    return [ex.prompt for ex in examples[:count]]


def generation_alone(config: RunConfig, model: str, work: Path, rounds: int) -> float:
    """Median seconds of one step's rollouts (prompts_per_step x G) by the bare engine."""
    from services.benchmarks.inference import DirectEngine

    spec = {
        "prompts": _task_prompts(config, config.trainer.prompts_per_step),
        "group_size": config.rollout.group_size,
        "max_tokens": config.rollout.max_tokens,
        "temperature": config.rollout.temperature,
        "top_p": config.rollout.top_p,
        "ignore_eos": False,
        "rounds": rounds,
    }
    spec_path = work / "generation-spec.json"
    spec_path.write_text(json.dumps(spec))
    engine = DirectEngine(model, spec_path, config, work / "generation-alone.log")
    try:
        engine.round()  # vLLM's first generation with log-probs pays a one-off cost
        return statistics.median(engine.round()["seconds"] for _ in range(rounds))
    finally:
        engine.stop()


def training_alone(config: RunConfig, rounds: int) -> float:
    """Median seconds of one trainer step on one step's groups, with the threads `mapo up`
    gives the trainer (one replica)."""
    import torch

    from services.benchmarks.baseline import sample_step, verifier_scorer
    from services.stack.up import trainer_threads
    from services.trainer.dataset import load_examples
    from services.trainer.model import Learner

    threads_before = torch.get_num_threads()
    torch.set_num_threads(trainer_threads(config, replicas=1))
    try:
        policy = Learner.build(config)
        examples = load_examples(config.task.dataset, config.task.name, config.task.seed)
        batch = [
            (f"alone:{i}", ex) for i, ex in enumerate(examples[: config.trainer.prompts_per_step])
        ]
        groups = sample_step(policy, config, batch, verifier_scorer(config), version=0)
        times = []
        for i in range(rounds + 1):
            started = time.perf_counter()
            policy.set_step(i)
            policy.train(groups, {g.group_id: 0 for g in groups}, frozenset())
            times.append(time.perf_counter() - started)
        return statistics.median(times[1:])
    finally:
        torch.set_num_threads(threads_before)


def run_stack(args: argparse.Namespace, model: Path, run_dir: Path) -> dict[str, Any]:
    """``mapo up`` on the warm-started model; its per-step records and summary."""
    cmd = [sys.executable, "-m", "services.cli", "up", "--run-dir", str(run_dir)]
    cmd += ["--steps", str(args.steps)]
    if args.config:
        cmd += ["--config", args.config]
    for item in [*args.overrides, f"model.path={model}", f"trainer.eval_every={args.eval_every}"]:
        cmd += ["--set", item]
    log = run_dir.parent / "stack.log"
    log.unlink(missing_ok=True)
    stack = Child.start("mapo up", cmd, log_path=log)
    try:
        code = stack.wait()
    finally:
        stack.stop(grace_s=120)  # when interrupted: `mapo up` stops what it started on SIGTERM
    if code != 0:
        raise RuntimeError(f"mapo up failed with code {code}; see {log}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    applied = [json.loads(line) for line in (run_dir / "applied.jsonl").read_text().splitlines()]
    starts = [a for a in applied if a.get("event") == "start"]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"records": records, "start": float(starts[-1]["time"]), "summary": summary}


def stack_curve(stack: dict[str, Any], group_size: int) -> dict[str, Any]:
    """Completions/s, step times and (seconds, accuracy) points of the stack's run."""
    records = sorted(stack["records"], key=lambda r: int(r["step"]))
    start = stack["start"]
    eval_total = 0.0
    points = [(0.0, float(stack["summary"]["initial_accuracy"]))]
    intervals = []
    previous = start
    for r in records:
        eval_s = float(r.get("eval_s") or 0.0)
        eval_total += eval_s
        elapsed = float(r["time"]) - start - eval_total
        if r.get("eval_accuracy") is not None:
            points.append((elapsed, float(r["eval_accuracy"])))
        intervals.append(float(r["time"]) - previous - eval_s)
        previous = float(r["time"])
    wall = float(records[-1]["time"]) - start - eval_total
    completions = int(records[-1]["groups_applied"]) * group_size
    steady = intervals[len(intervals) // 5 :] or intervals
    return {
        "completions": completions,
        "seconds": wall,
        "completions_per_s": completions / wall,
        "step_s_median": statistics.median(steady),
        "first_step_s": intervals[0],
        "points": points,
        "compute_s_median": statistics.median(float(r["compute_s"]) for r in records),
    }


def baseline_curve(history: list[Any]) -> dict[str, Any]:
    elapsed, points = 0.0, []
    for h in history:
        elapsed += h.generate_s + h.train_s
        if h.eval_accuracy is not None:
            points.append((elapsed, h.eval_accuracy))
    completions = sum(h.completions for h in history)
    steps = history[1:]
    return {
        "completions": completions,
        "seconds": elapsed,
        "completions_per_s": completions / elapsed,
        "step_s_median": statistics.median(h.generate_s + h.train_s for h in steps),
        "generate_s_median": statistics.median(h.generate_s for h in steps),
        "train_s_median": statistics.median(h.train_s for h in steps),
        "points": points,
    }


def accuracy_at(points: list[tuple[float, float]], seconds: float) -> float:
    """The last evaluated accuracy at or before ``seconds`` of wall time."""
    best = points[0][1]
    for t, acc in points:
        if t <= seconds:
            best = acc
    return best


def report(result: dict[str, Any]) -> str:
    s, b = result["stack"], result["baseline"]
    lines = [
        f"{'':24}{'stack':>12}{'baseline':>12}{'ratio':>8}",
        f"{'completions/s':24}{s['completions_per_s']:12.1f}{b['completions_per_s']:12.1f}"
        f"{s['completions_per_s'] / b['completions_per_s']:8.2f}",
        f"{'median step (s)':24}{s['step_s_median']:12.3f}{b['step_s_median']:12.3f}"
        f"{b['step_s_median'] / s['step_s_median']:8.2f}",
        f"{'wall time (s)':24}{s['seconds']:12.1f}{b['seconds']:12.1f}",
    ]
    horizon = min(s["seconds"], b["seconds"])
    for frac in (0.25, 0.5, 1.0):
        t = horizon * frac
        lines.append(
            f"{f'accuracy at {t:.0f} s':24}{accuracy_at(s['points'], t):12.1%}"
            f"{accuracy_at(b['points'], t):12.1%}"
        )
    for name, curve in (("stack", s), ("baseline", b)):
        pts = "  ".join(f"{t:.0f}s {a:.1%}" for t, a in curve["points"])
        lines.append(f"{name} held-out accuracy by wall time: {pts}")
    alone = result["alone"]
    bound = max(alone["generation_s"], alone["training_s"])
    lines.append(
        f"alone: generation {alone['generation_s']:.3f} s, training {alone['training_s']:.3f} s "
        f"per step; stack steady step {s['step_s_median']:.3f} s = "
        f"{s['step_s_median'] / bound:.2f} x max(generation, training)"
    )
    lines.append(
        f"baseline step: generate {b['generate_s_median']:.3f} s + train "
        f"{b['train_s_median']:.3f} s; stack trainer compute {s['compute_s_median']:.3f} s"
    )
    return "\n".join(lines)


def main(args: argparse.Namespace, config: RunConfig) -> int:
    del config  # re-read with the demo as the base, like `mapo up`
    from services.stack.up import sigterm_as_interrupt

    with sigterm_as_interrupt():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from services.benchmarks.baseline import as_dict, run_baseline
    from services.stack.up import starting_model

    cfg = bench_config(args)
    run_dir = Path(args.run_dir or DEFAULT_RUN_DIR).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    model, warm = starting_model(cfg, run_dir)
    cfg.model.path = str(model)
    print(f"model: {model} ({warm})", flush=True)

    alone = {
        "generation_s": generation_alone(cfg, str(model), run_dir, args.rounds),
        "training_s": training_alone(cfg, args.rounds),
    }
    print(f"alone: {alone}", flush=True)

    print(f"stack: mapo up for {args.steps} steps ...", flush=True)
    stack = run_stack(args, model, run_dir / "stack")
    s_curve = stack_curve(stack, cfg.rollout.group_size)
    print(f"stack: {s_curve['completions_per_s']:.1f} completions/s", flush=True)

    print(f"baseline: {args.steps} steps in one process ...", flush=True)
    history = run_baseline(
        cfg,
        args.steps,
        eval_every=args.eval_every,
        threads=os.cpu_count() or 1,
        on_step=lambda h: print(
            f"  baseline step {h.step}: {h.generate_s:.2f} s + {h.train_s:.2f} s"
            + (f", held-out {h.eval_accuracy:.1%}" if h.eval_accuracy is not None else ""),
            flush=True,
        ),
    )
    b_curve = baseline_curve(history)
    result = {
        "steps": args.steps,
        "model": str(model),
        "warm_start": warm,
        "alone": alone,
        "stack": s_curve,
        "baseline": b_curve,
        "baseline_steps": [as_dict(h) for h in history],
        "stack_summary": stack["summary"],
        "cpu": _cpu_model(),
    }
    (run_dir / "e2e.json").write_text(json.dumps(result, indent=1))
    print(report(result))
    print(f"written: {run_dir / 'e2e.json'}")
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" x {os.cpu_count()}"
    except OSError:
        pass
    return "unknown"
