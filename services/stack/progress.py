"""What a person watches during and after a local run: a progress line, a table, a PNG, a JSON.

The trainer writes one JSON line per step to ``metrics.jsonl``; :class:`MetricsFollower` reads
the new complete lines, :class:`ProgressLine` renders the latest step (in place on a terminal,
as periodic plain lines in a log or CI), and at the end :func:`summary_table`,
:func:`write_summary` and :func:`plot_learning_curve` report the run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from services.core.secrets import redact_tree

SUMMARY_FILE = "summary.json"
CURVE_FILE = "learning_curve.png"
BAR_CHARS = "-#"  # tqdm's bar: empty, then full


class MetricsFollower:
    """Reads the records appended to a JSON-lines file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self.records: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        """New complete records (a half-written last line waits for the next call)."""
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        new: list[dict[str, Any]] = []
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                new.append(record)
        self.records.extend(new)
        return new


def _num(record: Mapping[str, Any], key: str) -> float | None:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return None if math.isnan(value) else float(value)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


class ProgressLine:
    """One status line: redrawn in place on a terminal, printed every so often elsewhere.

    tqdm draws the line on a terminal; a log or CI gets the same text as plain lines (on the
    first step, on evals, on the last step and every ``plain_every_s`` seconds).
    """

    def __init__(
        self,
        total_steps: int,
        stream: TextIO | None = None,
        *,
        tty: bool | None = None,
        plain_every_s: float = 15.0,
        width: int = 20,
    ) -> None:
        self.total = max(1, total_steps)
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.plain_every_s = plain_every_s
        self.start = time.monotonic()
        self.last_eval: float | None = None
        self._last_plain = -math.inf
        # One layout for both: tqdm fills in the bar, the elapsed time and the time left.
        steps = f"{{n:>{len(str(self.total))}}}/{{total}}"
        self.layout = f"step {steps} [{{bar:{width}}}]{{postfix}}  {{elapsed}}<{{remaining}}"
        self._bar = (
            tqdm(total=self.total, file=self.stream, bar_format=self.layout, ascii=BAR_CHARS)
            if self.tty
            else None
        )

    def _stats(self, record: Mapping[str, Any]) -> str:
        """The quantities after the bar; the last eval stays on the line until the next one."""
        eval_acc = _num(record, "eval_accuracy")
        if eval_acc is not None:
            self.last_eval = eval_acc
        return (
            f"reward {_fmt(_num(record, 'reward_mean'), '.2f')}  "
            f"acc {_fmt(_num(record, 'accuracy'), '.2f')}  "
            f"p {_fmt(_num(record, 'p_mean'), '.2f')}  "
            f"lambda {_fmt(_num(record, 'lambda_mean'), '.2f')}  "
            f"stale {_fmt(_num(record, 'staleness_mean'), '.1f')}  "
            f"eval {_fmt(None if self.last_eval is None else 100 * self.last_eval, '.1f')}%"
        )

    def _step(self, record: Mapping[str, Any]) -> int:
        return min(self.total, int(_num(record, "step") or 0))

    def render(self, record: Mapping[str, Any], now: float | None = None) -> str:
        """The status text for the latest step record."""
        now = time.monotonic() if now is None else now
        return tqdm.format_meter(
            self._step(record),
            self.total,
            now - self.start,
            ascii=BAR_CHARS,
            bar_format=self.layout,
            postfix=self._stats(record),
        )

    def update(self, record: Mapping[str, Any]) -> None:
        """Show the latest step: always on a terminal, on evals or every few seconds elsewhere."""
        if self._bar is not None:
            self._bar.n = self._step(record)
            self._bar.set_postfix_str(self._stats(record))  # redraws the line
            return
        now = time.monotonic()
        text = self.render(record, now)
        is_eval = _num(record, "eval_accuracy") is not None
        due = now - self._last_plain >= self.plain_every_s
        if is_eval or due or self._step(record) >= self.total:
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last_plain = now

    def message(self, text: str) -> None:
        """Print a line without garbling the status line."""
        tqdm.write(text, file=self.stream)
        self.stream.flush()

    def close(self) -> None:
        """Leave the last state on its own line."""
        if self._bar is not None:
            self._bar.close()


def _warm_start_cell(summary: Mapping[str, Any]) -> str:
    if summary.get("warmstart_reused"):
        return "reused"
    cell = f"{float(summary.get('warmstart_seconds', 0.0)):.0f} s"
    if "warmstart_steps" in summary:
        cell = f"{int(summary['warmstart_steps'])} steps, " + cell
    if summary.get("warmstart_in_band") is False:
        cell += " (outside the band)"
    return cell


def _other_accuracies(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Rows for the sampled and out-of-domain accuracies a run measured: 'start -> end'."""
    rows = []
    for key, label in (
        ("sampled_accuracy", "sampled accuracy"),
        ("ood_accuracy", "out-of-domain accuracy"),
        ("ood_sampled_accuracy", "out-of-domain, sampled"),
    ):
        start, end = _num(summary, f"initial_{key}"), _num(summary, f"final_{key}")
        if start is not None and end is not None:
            rows.append((label, f"{100 * start:.1f}% -> {100 * end:.1f}%"))
    return rows


def summary_table(summary: Mapping[str, Any]) -> str:
    """The end-of-run table a person reads first."""
    initial = float(summary["initial_accuracy"])
    final = float(summary["final_accuracy"])
    rows = [
        ("held-out problems", f"{summary.get('eval_problems', '-')}"),
        ("initial held-out accuracy", f"{100 * initial:.1f}%"),
        ("final held-out accuracy", f"{100 * final:.1f}%"),
        ("change", f"{100 * (final - initial):+.1f} points"),
        *_other_accuracies(summary),
        ("RL steps", f"{summary['steps']}"),
        ("estimator", f"{summary.get('estimator', '-')}"),
        ("inference replicas", f"{summary.get('replicas', '-')}"),
        ("warm start", _warm_start_cell(summary)),
        ("RL", f"{float(summary.get('rl_seconds', 0.0)):.0f} s"),
        ("total time", f"{float(summary['seconds']):.0f} s"),
    ]
    key_w = max(len(k) for k, _ in rows)
    val_w = max(len(v) for _, v in rows)
    rule = "+" + "-" * (key_w + 2) + "+" + "-" * (val_w + 2) + "+"
    body = [f"| {k:<{key_w}} | {v:>{val_w}} |" for k, v in rows]
    return "\n".join([rule, *body, rule])


def write_summary(run_dir: Path, summary: Mapping[str, Any]) -> Path:
    """``summary.json`` in the run directory, replaced atomically.

    Secrets are redacted (a ``--set inference.admin_token=...`` among the overrides a grid
    records, a URL with a password): summaries get shared.
    """
    path = run_dir / SUMMARY_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(redact_tree(summary), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def curve_points(
    records: Sequence[Mapping[str, Any]],
    initial: float | None = None,
    final: tuple[int, float] | None = None,
) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(held-out accuracy points, train reward points) by step, for the learning curve."""
    held: list[tuple[float, float]] = [] if initial is None else [(0.0, initial)]
    reward: list[tuple[float, float]] = []
    for r in records:
        step = _num(r, "step")
        if step is None:
            continue
        value = _num(r, "reward_mean")
        if value is not None:
            reward.append((step, value))
        acc = _num(r, "eval_accuracy")
        if acc is not None:
            held.append((step, acc))
    if final is not None:
        held.append((float(final[0]), final[1]))
    held.sort(key=lambda p: p[0])
    return held, reward


def _smooth(points: list[tuple[float, float]], window: int) -> list[tuple[float, float]]:
    """Trailing moving average: per-step reward is noisy, the trend is what matters."""
    out = []
    for i in range(len(points)):
        chunk = points[max(0, i - window + 1) : i + 1]
        out.append((points[i][0], sum(v for _, v in chunk) / len(chunk)))
    return out


def plot_learning_curve(
    path: Path,
    records: Sequence[Mapping[str, Any]],
    initial: float | None = None,
    final: tuple[int, float] | None = None,
    title: str = "held-out accuracy and train reward",
) -> Path:
    """Draw the PNG learning curve with matplotlib (imported here: the CLI starts without it)."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg: no display, no pyplot
    from matplotlib.ticker import PercentFormatter

    held, reward = curve_points(records, initial, final)
    reward = _smooth(reward, 10)
    fig = Figure(figsize=(9, 5.4), dpi=100, layout="constrained")
    ax = fig.subplots()
    for label, points, style, colour in (
        ("train reward (mean of 10 steps)", reward, "-", "tab:orange"),
        ("held-out accuracy (greedy)", held, "o-", "tab:blue"),
    ):
        steps, values = [s for s, _ in points], [v for _, v in points]
        ax.plot(steps, values, style, color=colour, linewidth=2.5, markersize=6, label=label)
    ax.set(title=title, xlabel="RL step", ylim=(0.0, 1.0), yticks=[i / 10 for i in range(11)])
    ax.set_xlim(0.0, max([s for s, _ in held + reward] + [1.0]))
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    ax.grid(axis="y", color="0.9")
    ax.legend(loc="upper left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
