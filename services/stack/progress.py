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

SUMMARY_FILE = "summary.json"
CURVE_FILE = "learning_curve.png"


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


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


class ProgressLine:
    """One status line: rewritten in place on a terminal, printed every so often elsewhere."""

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
        self.width = width
        self.start = time.monotonic()
        self.last_eval: float | None = None
        self._last_plain = -math.inf
        self._shown = ""

    def render(self, record: Mapping[str, Any], now: float | None = None) -> str:
        """The status text for the latest step record."""
        now = time.monotonic() if now is None else now
        step = int(_num(record, "step") or 0)
        eval_acc = _num(record, "eval_accuracy")
        if eval_acc is not None:
            self.last_eval = eval_acc
        done = min(1.0, step / self.total)
        filled = round(done * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = now - self.start
        eta = elapsed / done - elapsed if done > 0 else None
        return (
            f"step {step:>{len(str(self.total))}}/{self.total} [{bar}] "
            f"reward {_fmt(_num(record, 'reward_mean'), '.2f')}  "
            f"acc {_fmt(_num(record, 'accuracy'), '.2f')}  "
            f"p {_fmt(_num(record, 'p_mean'), '.2f')}  "
            f"lambda {_fmt(_num(record, 'lambda_mean'), '.2f')}  "
            f"stale {_fmt(_num(record, 'staleness_mean'), '.1f')}  "
            f"eval {_fmt(None if self.last_eval is None else 100 * self.last_eval, '.1f')}%  "
            f"{_clock(elapsed)}<{'--:--' if eta is None else _clock(eta)}"
        )

    def update(self, record: Mapping[str, Any]) -> None:
        """Show the latest step: always on a terminal, on evals or every few seconds elsewhere."""
        now = time.monotonic()
        text = self.render(record, now)
        if self.tty:
            pad = max(0, len(self._shown) - len(text))
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
            self._shown = text
            return
        is_eval = _num(record, "eval_accuracy") is not None
        last = int(_num(record, "step") or 0) >= self.total
        if is_eval or last or now - self._last_plain >= self.plain_every_s:
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last_plain = now

    def message(self, text: str) -> None:
        """Print a line without garbling the status line."""
        if self.tty and self._shown:
            self.stream.write("\r" + " " * len(self._shown) + "\r")
            self._shown = ""
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = ""


def _warm_start_cell(summary: Mapping[str, Any]) -> str:
    if summary.get("warmstart_reused"):
        return "reused"
    cell = f"{float(summary.get('warmstart_seconds', 0.0)):.0f} s"
    if "warmstart_steps" in summary:
        cell = f"{int(summary['warmstart_steps'])} steps, " + cell
    if summary.get("warmstart_in_band") is False:
        cell += " (outside the band)"
    return cell


def summary_table(summary: Mapping[str, Any]) -> str:
    """The end-of-run table a person reads first."""
    initial = float(summary["initial_accuracy"])
    final = float(summary["final_accuracy"])
    rows = [
        ("held-out problems", f"{summary.get('eval_problems', '-')}"),
        ("initial held-out accuracy", f"{100 * initial:.1f}%"),
        ("final held-out accuracy", f"{100 * final:.1f}%"),
        ("change", f"{100 * (final - initial):+.1f} points"),
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
    """``summary.json`` in the run directory, replaced atomically."""
    path = run_dir / SUMMARY_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(summary), indent=2, sort_keys=True) + "\n")
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
    """Draw the PNG learning curve with Pillow (no plotting library needed)."""
    from PIL import Image, ImageDraw, ImageFont

    held, reward = curve_points(records, initial, final)
    reward = _smooth(reward, 10)
    w, h = 900, 540
    left, right, top, bottom = 80, 30, 60, 80
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    try:
        font: Any = ImageFont.load_default(size=16)
        small: Any = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        font = small = ImageFont.load_default()
    max_step = max([p[0] for p in held + reward] + [1.0])
    x0, x1, y0, y1 = left, w - right, h - bottom, top

    def to_xy(step: float, value: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * step / max_step, y0 - (y0 - y1) * min(max(value, 0.0), 1.0)

    for i in range(11):
        y = y0 - (y0 - y1) * i / 10
        draw.line([(x0, y), (x1, y)], fill=(230, 230, 230))
        draw.text((x0 - 8, y), f"{i * 10}%", fill="black", font=small, anchor="rm")
    ticks = 10
    for i in range(ticks + 1):
        step = max_step * i / ticks
        x = x0 + (x1 - x0) * i / ticks
        draw.line([(x, y0), (x, y0 + 5)], fill="black")
        draw.text((x, y0 + 8), f"{step:.0f}", fill="black", font=small, anchor="mt")
    draw.rectangle([x0, y1, x1, y0], outline="black")
    draw.text((w / 2, h - 30), "RL step", fill="black", font=font, anchor="mm")
    draw.text((w / 2, 25), title, fill="black", font=font, anchor="mm")

    series = [
        ("train reward (mean of 10 steps)", reward, (230, 140, 40), False),
        ("held-out accuracy (greedy)", held, (30, 90, 200), True),
    ]
    for k, (label, points, colour, markers) in enumerate(series):
        xy = [to_xy(s, v) for s, v in points]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=3)
        if markers:
            for x, y in xy:
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        ly = y1 + 15 + 22 * k
        draw.line([(x0 + 15, ly), (x0 + 45, ly)], fill=colour, width=3)
        draw.text((x0 + 52, ly), label, fill="black", font=small, anchor="lm")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path
