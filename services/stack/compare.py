"""``mapo compare``: the paper's comparison table as one command, over seeds, with the spread.

For every seed the demo model is warm-started once (into ``RUN_DIR/warm/seed-S``, or
``model.path`` when the config sets one); then every estimator trains it through the whole
stack with ``mapo up`` (the same services, prompts and evaluation for all), each run in
``RUN_DIR/runs/ESTIMATOR-seed-S``. A run's settings are the config file's, then its
estimator's preset from the paper (below), then ``--set`` (which wins). At the end
``summary.json``, ``results.md`` (the table) and ``compare.png`` (the curves) are written into
``RUN_DIR``.

The grid is resumable: a run that wrote its ``summary.json`` is kept, any other is started
again from scratch, so an interrupted grid continues with the runs it lacks when the same
command is given again.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.core.config import ConfigError, EstimatorName, RunConfig
from services.stack import compare_report as report
from services.stack.progress import write_summary
from services.stack.runs import RunFailed, UpRun, finished, run_up, warm_model

if TYPE_CHECKING:
    from services.stack.warmstart import WarmStartSettings

DEFAULT_RUN_DIR = "runs/compare"

#: The paper's PPO clips (0.2 below 1, 0.3 above; its dual clip 3.0 is the config's default).
PAPER_CLIPS = ("algorithm.clip_low=0.2", "algorithm.clip_high=0.3")
#: Each estimator's settings in the paper, as overrides applied before the config's ``--set``.
#: DAPO is its own recipe: clip-higher at 0.28, no KL term, and the group filter.
PRESETS: dict[str, tuple[str, ...]] = {
    name: PAPER_CLIPS for name in typing.get_args(EstimatorName) if name != "dapo"
}
PRESETS["dapo"] = (
    "algorithm.clip_low=0.2",
    "algorithm.clip_high=0.28",
    "algorithm.kl_coef=0.0",
    "algorithm.dapo_filter=true",
)


@dataclass(frozen=True)
class Grid:
    """What to run: every estimator on every seed, with the same settings otherwise."""

    estimators: tuple[str, ...]
    seeds: tuple[int, ...]
    root: Path
    steps: int | None
    config: str | None
    overrides: tuple[str, ...]

    def cells(self) -> list[tuple[str, int]]:
        """(estimator, seed), seed by seed: one warm start, then all its runs."""
        return [(e, s) for s in self.seeds for e in self.estimators]

    def run_dir(self, estimator: str, seed: int) -> Path:
        return self.root / "runs" / f"{estimator}-seed-{seed}"

    def warm_dir(self, seed: int) -> Path:
        return self.root / "warm" / f"seed-{seed}"

    def overrides_of(self, estimator: str) -> tuple[str, ...]:
        return (*PRESETS.get(estimator, ()), *self.overrides)

    def resolved(self, estimator: str, seed: int) -> RunConfig:
        """The config ``mapo up`` will run for this cell (validates it before anything runs)."""
        from services.stack.up import resolve_config

        as_up = argparse.Namespace(
            config=self.config,
            overrides=list(self.overrides_of(estimator)),
            steps=self.steps,
            estimator=estimator,
            seed=seed,
        )
        return resolve_config(as_up)[0]


def parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ConfigError(f"--{what} is empty")
    return list(dict.fromkeys(items))  # in order, without repeats


def grid_from_args(args: argparse.Namespace) -> Grid:
    """The grid the command line asks for; a ConfigError names what is wrong."""
    known = typing.get_args(EstimatorName)
    estimators = parse_list(args.estimators, "estimators")
    unknown = [e for e in estimators if e not in known]
    if unknown:
        raise ConfigError(f"unknown estimator(s) {unknown}; known: {', '.join(known)}")
    try:
        seeds = [int(s) for s in parse_list(args.seeds, "seeds")]
    except ValueError:
        raise ConfigError(
            f"--seeds must be integers separated by commas, got {args.seeds!r}"
        ) from None
    if any(s < 0 for s in seeds):
        raise ConfigError("seeds must be 0 or more")
    if args.steps is not None and args.steps < 1:
        raise ConfigError("--steps must be at least 1")
    return Grid(
        tuple(estimators),
        tuple(seeds),
        Path(args.run_dir or DEFAULT_RUN_DIR).resolve(),
        args.steps,
        args.config,
        tuple(args.overrides or ()),
    )


def done(grid: Grid, estimator: str, seed: int, steps: int) -> dict[str, Any] | None:
    """The summary of this cell's run when it finished with what the grid asks for."""
    summary = finished(grid.run_dir(estimator, seed))
    if summary is None:
        return None
    same = (summary.get("estimator"), summary.get("seed"), summary.get("steps"))
    return summary if same == (estimator, seed, steps) else None


def one_line(summary: dict[str, Any]) -> str:
    """A finished run in a line: final accuracies and the change from its start."""
    text = (
        f"in-domain {summary['final_accuracy']:.1%} "
        f"({100 * (summary['final_accuracy'] - summary['initial_accuracy']):+.1f})"
    )
    if summary.get("final_ood_accuracy") is not None:
        text += f", out-of-domain {summary['final_ood_accuracy']:.1%}"
    return text + f", {summary.get('seconds', 0):.0f} s"


def run_grid(
    grid: Grid, warm: WarmStartSettings | None = None, log: Any = print
) -> list[report.RunResult]:
    """Run every cell the grid still lacks; the results of all its cells, in grid order."""
    from services.stack.up import RUN_MARKER, is_run_dir

    cells = grid.cells()
    steps = {e: grid.resolved(e, grid.seeds[0]).trainer.steps for e in grid.estimators}
    models: dict[int, Path] = {}
    results = []
    for k, (estimator, seed) in enumerate(cells, 1):
        head = f"run {k}/{len(cells)}: {estimator} seed {seed}"
        run_dir = grid.run_dir(estimator, seed)
        summary = done(grid, estimator, seed, steps[estimator])
        if summary is not None:
            log(f"{head}: finished earlier, kept ({one_line(summary)})")
        else:
            if seed not in models:
                models[seed] = warm_model(
                    grid.config, grid.overrides, seed, grid.warm_dir(seed), warm
                )
            # A run without a summary may be half-written: start it again from nothing (only
            # a run directory, never a directory of other files that has the same name).
            if run_dir.exists() and not is_run_dir(run_dir):
                raise RunFailed(
                    f"{run_dir} is in the way: it is not a run directory of mapo up (no "
                    f"{RUN_MARKER}). Move it away, or choose another --run-dir"
                )
            shutil.rmtree(run_dir, ignore_errors=True)
            log(f"{head}: {steps[estimator]} steps (log: {run_dir / 'up.log'})")
            run = UpRun(
                run_dir,
                seed,
                models[seed],
                steps=grid.steps,
                estimator=estimator,
                config=grid.config,
                overrides=grid.overrides_of(estimator),
            )
            summary = run_up(run)
            log(f"{head}: done ({one_line(summary)})")
        results.append(report.load_run(estimator, seed, run_dir, summary))
    return results


def settings_of(grid: Grid) -> dict[str, dict[str, Any]]:
    """The algorithm section each estimator runs with, resolved as its runs resolve it."""
    return {
        e: grid.resolved(e, grid.seeds[0]).algorithm.model_dump(mode="json")
        for e in grid.estimators
    }


def write_outputs(grid: Grid, results: Sequence[report.RunResult]) -> dict[str, Any]:
    """``summary.json``, ``results.md`` and ``compare.png`` in the grid's directory."""
    first = results[0].summary
    body: dict[str, Any] = {
        "task": grid.resolved(grid.estimators[0], grid.seeds[0]).task.name,
        "estimators": list(grid.estimators),
        "seeds": list(grid.seeds),
        "steps": first["steps"],
        "eval_problems": first.get("eval_problems", 0),
        "ood_problems": first.get("ood_problems", 0),
        "eval_sampling": first.get("eval_sampling"),
        "presets": {e: list(PRESETS.get(e, ())) for e in grid.estimators},
        "overrides": list(grid.overrides),
        "settings": settings_of(grid),
        "results": report.aggregate(results, grid.estimators),
        "runs": [
            {
                "estimator": r.estimator,
                "seed": r.seed,
                "run_dir": str(grid.run_dir(r.estimator, r.seed)),
                "steps_per_s": r.steps_per_s,
                "curve": [list(p) for p in r.curve],
                **{k: v for k, v in r.summary.items() if k.startswith(("initial_", "final_"))},
            }
            for r in results
        ],
    }
    write_summary(grid.root, body)
    (grid.root / report.RESULTS_FILE).write_text(report.markdown(body))
    report.plot(grid.root / report.PLOT_FILE, results, grid.estimators)
    return body


def run(args: argparse.Namespace, warm: WarmStartSettings | None = None) -> int:
    """Everything ``mapo compare`` does; ``warm`` replaces the demo's warm-start settings."""
    from services.stack.processes import StartError
    from services.stack.up import sigterm_as_interrupt

    try:
        grid = grid_from_args(args)
        for estimator in grid.estimators:  # every cell's config is valid before any run starts
            grid.resolved(estimator, grid.seeds[0])
    except ConfigError as exc:
        print(f"mapo compare: {exc}", file=sys.stderr)
        return 2
    cells = len(grid.cells())
    print(
        f"mapo compare: {len(grid.estimators)} estimator(s) x {len(grid.seeds)} seed(s) = "
        f"{cells} runs into {grid.root}",
        flush=True,
    )
    started = time.monotonic()
    try:
        with sigterm_as_interrupt():
            results = run_grid(grid, warm, log=lambda line: print(line, flush=True))
    except (RunFailed, StartError) as exc:
        text = exc.explain() if isinstance(exc, StartError) else str(exc)
        print(
            f"mapo compare: {text}\nthe same command continues with the runs it lacks",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("\nmapo compare: interrupted; the same command continues with the runs it lacks")
        return 130
    written = write_outputs(grid, results)
    print(report.markdown(written))
    print(
        f"mapo compare: {cells} runs in {time.monotonic() - started:.0f} s; "
        f"{grid.root / 'summary.json'}, {grid.root / report.RESULTS_FILE}, "
        f"{grid.root / report.PLOT_FILE}"
    )
    return 0


def main(args: argparse.Namespace, config: RunConfig) -> int:
    """``mapo compare`` (each run re-reads --config or the demo, like ``mapo up``)."""
    del config
    return run(args)
