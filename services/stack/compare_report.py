"""What ``mapo compare`` reports: per-estimator means and spreads over seeds, a Markdown table,
a plot, and one JSON file with every number behind them.

Every number comes from the runs' own outputs: the final and initial accuracies from each run's
``summary.json`` (measured by ``mapo up`` on the same problems with the same decoding), the
curve and the training speed from its ``metrics.jsonl``. The spread is the sample standard
deviation over seeds (n - 1), and each seed's own value is listed beside it, because with three
seeds a standard deviation alone says little.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.md"
PLOT_FILE = "compare.png"

#: What each estimator does to a group of rewards (services/core/advantages.py).
ADVANTAGES = {
    "mapo": "(1 - λ) z + λ (r - μ)/μ, λ = 1 - 4p(1 - p)",
    "grpo": "z = (r - μ)/σ",
    "dapo": "z, groups with equal rewards dropped",
    "dr_grpo": "r - μ",
    "apd": "(r - μ)/μ",
    "mapo_random_lambda": "MAPO with λ ~ U(0, 1) per group",
    "rloo": "r - mean of the other rewards",
}

#: The scores a run reports, as (summary key, column): greedy first, the headline.
GREEDY = (("accuracy", "in-domain"), ("ood_accuracy", "out-of-domain"))
SAMPLED = (("sampled_accuracy", "in-domain"), ("ood_sampled_accuracy", "out-of-domain"))


@dataclass(frozen=True)
class RunResult:
    """One finished run of the grid."""

    estimator: str
    seed: int
    summary: Mapping[str, Any]
    #: (step, seconds of training, greedy held-out accuracy), from step 0.
    curve: tuple[tuple[int, float, float], ...]
    steps_per_s: float | None

    def score(self, when: str, key: str) -> float | None:
        """``when`` is initial or final; ``key`` a score, or an ``average`` of in/out-domain."""
        if key.endswith("average"):
            kind = "sampled_" if key.startswith("sampled") else ""
            parts = [self.score(when, f"{kind}accuracy"), self.score(when, f"ood_{kind}accuracy")]
            return None if None in parts else sum(p for p in parts if p is not None) / 2
        value = self.summary.get(f"{when}_{key}")
        return float(value) if isinstance(value, int | float) else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The step records of a run's ``metrics.jsonl`` (none when it is missing)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def curve_and_speed(
    records: Sequence[Mapping[str, Any]], initial: float, final: float, steps: int
) -> tuple[tuple[tuple[int, float, float], ...], float | None]:
    """Held-out accuracy by step and by seconds of training, and training steps per second.

    Seconds count from the start of the first step and leave out the trainer's evaluations,
    which cost the same whatever the estimator; the last point is the run's final evaluation.
    """
    points = [(0, 0.0, initial)]
    if not records:
        return (*points, (steps, 0.0, final)), None
    start = float(records[0]["time"]) - float(records[0].get("step_s", 0.0))
    evaluating = 0.0
    seconds = 0.0
    for r in records:
        evaluating += float(r.get("eval_s") or 0.0)
        seconds = float(r["time"]) - start - evaluating
        acc = r.get("eval_accuracy")
        if isinstance(acc, int | float) and int(r["step"]) < steps:
            points.append((int(r["step"]), seconds, float(acc)))
    points.append((steps, seconds, final))
    return tuple(points), (len(records) / seconds if seconds > 0 else None)


def load_run(estimator: str, seed: int, run_dir: Path, summary: Mapping[str, Any]) -> RunResult:
    """A finished run, read from its directory."""
    curve, speed = curve_and_speed(
        read_metrics(run_dir / "metrics.jsonl"),
        float(summary["initial_accuracy"]),
        float(summary["final_accuracy"]),
        int(summary["steps"]),
    )
    return RunResult(estimator, seed, summary, curve, speed)


@dataclass(frozen=True)
class Spread:
    """A quantity over seeds: mean, sample std (None for one seed) and each seed's value."""

    mean: float
    std: float | None
    per_seed: tuple[float, ...]

    @staticmethod
    def of(values: Sequence[float]) -> Spread | None:
        if not values:
            return None
        std = statistics.stdev(values) if len(values) > 1 else None
        return Spread(statistics.fmean(values), std, tuple(values))

    def cell(self, scale: float = 100.0, digits: int = 1) -> str:
        """``51.2 ± 0.8 (50.1, 51.2, 52.3)``, or just the value for one seed."""
        text = f"{self.mean * scale:.{digits}f}"
        if self.std is None:
            return text
        seeds = ", ".join(f"{v * scale:.{digits}f}" for v in self.per_seed)
        return f"{text} ± {self.std * scale:.{digits}f} ({seeds})"

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "per_seed": list(self.per_seed)}


def spread(runs: Sequence[RunResult], when: str, key: str) -> Spread | None:
    """``key`` at ``when`` over the runs (in seed order); None when a run lacks it."""
    values = [r.score(when, key) for r in sorted(runs, key=lambda r: r.seed)]
    if any(v is None for v in values):
        return None
    return Spread.of([v for v in values if v is not None])


SCORE_KEYS = (
    "accuracy",
    "ood_accuracy",
    "average",
    "sampled_accuracy",
    "ood_sampled_accuracy",
    "sampled_average",
)


def aggregate(runs: Sequence[RunResult], estimators: Sequence[str]) -> dict[str, Any]:
    """Per estimator (and for the shared warm starts): every score's spread over seeds."""

    def entry(group: Sequence[RunResult], when: str) -> dict[str, Any]:
        scores = {k: spread(group, when, k) for k in SCORE_KEYS}
        out: dict[str, Any] = {k: None if v is None else v.to_json() for k, v in scores.items()}
        out["seeds"] = sorted(r.seed for r in group)
        return out

    # Every estimator of a seed starts from the same model: its first run stands for them all.
    one_per_seed = list({r.seed: r for r in reversed(runs)}.values())
    results = {"warm start": entry(one_per_seed, "initial")}
    for name in estimators:
        mine = [r for r in runs if r.estimator == name]
        results[name] = entry(mine, "final")
        speed = Spread.of([r.steps_per_s for r in mine if r.steps_per_s is not None])
        results[name]["steps_per_s"] = None if speed is None else speed.to_json()
    return results


def _cell(value: Mapping[str, Any] | None, scale: float = 100.0, digits: int = 1) -> str:
    if value is None:
        return "-"
    return Spread(value["mean"], value["std"], tuple(value["per_seed"])).cell(scale, digits)


def _table(
    results: Mapping[str, Any],
    rows: Sequence[str],
    keys: Sequence[str],
    with_speed: bool,
) -> list[str]:
    head = ["estimator", "in-domain", "out-of-domain", "average"]
    if with_speed:
        head.append("steps/s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        entry = results.get(row, {})
        cells = [row, *(_cell(entry.get(k)) for k in keys)]
        if with_speed:
            cells.append(_cell(entry.get("steps_per_s"), scale=1.0, digits=2))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def settings_table(settings: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The algorithm settings each estimator ran with, read from its runs' config."""
    lines = [
        "| estimator | advantage | clip low / high | dual clip | KL coefficient | group filter |",
        "|---|---|---|---|---|---|",
    ]
    for name, alg in settings.items():
        dual = alg.get("dual_clip")
        lines.append(
            f"| {name} | {ADVANTAGES.get(name, '-')} | {alg.get('clip_low')} / "
            f"{alg.get('clip_high')} | {'off' if dual is None else dual} | "
            f"{alg.get('kl_coef')} | {'on' if alg.get('dapo_filter') else 'off'} |"
        )
    return lines


def markdown(report: Mapping[str, Any]) -> str:
    """``results.md``: the greedy table (the headline), the sampled one, and the settings."""
    results = report["results"]
    estimators = list(report["estimators"])
    rows = ["warm start", *estimators]
    seeds = ", ".join(str(s) for s in report["seeds"])
    sampling = report.get("eval_sampling")
    lines = [
        "# Estimator comparison",
        "",
        f"Task `{report['task']}`: {report['steps']} RL steps per run through the whole stack, "
        f"from one warm start per seed shared by every estimator; seeds {seeds}. "
        f"{report['eval_problems']:,} held-out problems in-domain, "
        f"{report['ood_problems']:,} out-of-domain.",
        "",
        "Held-out accuracy (%) at the end of training: mean ± standard deviation over seeds "
        "(sample std), then each seed's value in seed order. *average* is the mean of "
        "in-domain and out-of-domain accuracy (the paper's Avg). *warm start* is the shared "
        "starting model. *steps/s*: RL steps per second of training, without the services' "
        "start-up and the evaluations.",
        "",
        "## Greedy decoding",
        "",
        *_table(results, rows, ("accuracy", "ood_accuracy", "average"), with_speed=True),
    ]
    if sampling:
        lines += [
            "",
            f"## Sampled: mean over {sampling['samples']} samples per problem at temperature "
            f"{sampling['temperature']:g}, top-p {sampling['top_p']:g}",
            "",
            *_table(
                results,
                rows,
                ("sampled_accuracy", "ood_sampled_accuracy", "sampled_average"),
                with_speed=False,
            ),
        ]
    lines += [
        "",
        "## Settings of each estimator",
        "",
        *settings_table(report.get("settings", {})),
        "",
        f"Plot: `{PLOT_FILE}`. Every run's outputs: `runs/ESTIMATOR-seed-S/`.",
    ]
    return "\n".join(lines) + "\n"


def _band(
    curves: Sequence[Sequence[tuple[int, float, float]]],
) -> list[tuple[int, float, float, float, float]]:
    """(step, mean seconds, mean, min, max accuracy) at the steps every seed evaluated."""
    common = set.intersection(*({p[0] for p in c} for c in curves))
    rows = []
    for step in sorted(common):
        at = [next(p for p in c if p[0] == step) for c in curves]
        accs = [p[2] for p in at]
        rows.append(
            (step, statistics.fmean(p[1] for p in at), statistics.fmean(accs), min(accs), max(accs))
        )
    return rows


def plot(path: Path, runs: Sequence[RunResult], estimators: Sequence[str]) -> Path:
    """Held-out accuracy against RL step and against seconds of training: the mean over seeds
    with a band from the lowest to the highest seed, one colour per estimator."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg: no display needed
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    fig = Figure(figsize=(12, 5), dpi=100, layout="constrained")
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    colours = [f"C{i % 10}" for i in range(len(estimators))]
    seeds = sorted({r.seed for r in runs})
    for name, colour in zip(estimators, colours, strict=True):
        curves = [r.curve for r in runs if r.estimator == name]
        if not curves:
            continue
        band = _band(curves)
        steps, secs = [b[0] for b in band], [b[1] for b in band]
        mean, low, high = [b[2] for b in band], [b[3] for b in band], [b[4] for b in band]
        for ax, x in ((by_step, steps), (by_time, secs)):
            ax.plot(x, mean, "o-", color=colour, linewidth=2, markersize=4, label=name)
            ax.fill_between(x, low, high, color=colour, alpha=0.15, linewidth=0)
    title = f"mean and min-max over {len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
    by_step.set(xlabel="RL step", ylabel="held-out accuracy (greedy)", title=title)
    by_time.set(xlabel="seconds of training (mean over seeds)", title=title)
    for ax in (by_step, by_time):
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
        ax.grid(color="0.9")
    by_step.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_step.legend(loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
