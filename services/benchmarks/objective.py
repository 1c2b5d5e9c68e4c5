"""``mapo bench objective``: the demo's held-out gain under two objectives, seed by seed.

For every seed the demo model is warm-started once; then ``mapo up`` trains it twice through
the whole stack with the same settings, prompts and evaluation, once with the *classic*
objective (one update per rollout batch, so PPO's ratio is 1, no behaviour-policy
correction, too-stale groups dropped) and once with the *default* one (mini-batch updates against the recomputed
proximal policy, importance weights against the engine's log-probs). Reported per seed:
initial and final held-out accuracy, the gain, and the RL seconds of each run; then mean and
standard deviation of the gains over seeds. A rerun keeps the runs that finished. Everything
lands in ``objective.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from services.core.config import RunConfig
from services.stack.runs import UpRun, finished, run_up, warm_model

DEFAULT_RUN_DIR = "runs/bench-objective"

#: The objective before mini-batches and behaviour correction, as `--set` overrides.
CLASSIC = (
    "algorithm.mini_batch_groups=0",
    "algorithm.behaviour_correction=off",
    "trainer.stale_policy=drop",
)
OBJECTIVES: dict[str, tuple[str, ...]] = {"classic": CLASSIC, "default": ()}


def report(rows: list[dict[str, Any]]) -> str:
    lines = ["seed  objective  initial  final   gain  RL seconds", *map(_row, rows)]
    for name in OBJECTIVES:
        gains = [r["gain"] * 100 for r in rows if r["objective"] == name]
        if not gains:
            continue
        spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
        lines.append(
            f"{name}: gain {statistics.mean(gains):+.1f} ± {spread:.1f} points over {len(gains)} "
            f"seeds ({', '.join(f'{g:+.1f}' for g in gains)})"
        )
    return "\n".join(lines)


def _row(r: dict[str, Any]) -> str:
    return (
        f"{r['seed']:>4}  {r['objective']:<9}  {r['initial']:6.1%}  {r['final']:6.1%}"
        f"  {r['gain'] * 100:+5.1f}  {r['rl_seconds']:10.0f}"
    )


def main(args: argparse.Namespace, config: RunConfig) -> int:
    del config  # each run re-reads the demo (or --config) like `mapo up`
    from services.stack.up import sigterm_as_interrupt

    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    root = Path(args.run_dir or DEFAULT_RUN_DIR).resolve()
    rows: list[dict[str, Any]] = []
    with sigterm_as_interrupt():
        for seed in seeds:
            model = warm_model(args.config, args.overrides, seed, root / f"seed-{seed}")
            for name, extra in OBJECTIVES.items():
                print(f"seed {seed}: {name} objective, {args.steps} steps ...", flush=True)
                run = UpRun(
                    root / f"seed-{seed}" / name,
                    seed,
                    model,
                    steps=args.steps,
                    config=args.config,
                    overrides=(*args.overrides, *extra),
                )
                # A rerun keeps what finished (its own seconds are in the summary's log).
                summary = finished(run.run_dir) or run_up(run)
                rows.append(
                    {
                        "seed": seed,
                        "objective": name,
                        "initial": float(summary["initial_accuracy"]),
                        "final": float(summary["final_accuracy"]),
                        "gain": float(summary["final_accuracy"])
                        - float(summary["initial_accuracy"]),
                        "rl_seconds": float(summary["rl_seconds"]),
                    }
                )
                print(_row(rows[-1]), flush=True)
    (root / "objective.json").write_text(json.dumps({"steps": args.steps, "runs": rows}, indent=1))
    print(report(rows))
    print(f"written: {root / 'objective.json'}")
    return 0
