"""`mapo compare`: the grid, its presets, its report, and a tiny grid through the real stack
(shared warm start, resume of a half-finished grid, table and plot)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.stack import compare, compare_report
from services.stack.compare_report import RunResult, Spread

REPO = Path(__file__).resolve().parents[1]


def compare_args(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = {
        "estimators": "mapo,grpo",
        "seeds": "0",
        "steps": None,
        "run_dir": None,
        "config": None,
        "overrides": [],
    }
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MAPO__ overrides and no REDIS_URL: each run gets the defaults and a private Redis."""
    for key in [k for k in os.environ if k.startswith("MAPO__")]:
        monkeypatch.delenv(key)
    monkeypatch.delenv("REDIS_URL", raising=False)


# ----------------------------------------------------------------------------- grid and presets


def test_grid_from_the_command_line(tmp_path: Path) -> None:
    grid = compare.grid_from_args(
        compare_args(estimators="mapo, grpo,mapo", seeds="2,0", run_dir=str(tmp_path), steps=3)
    )
    assert grid.estimators == ("mapo", "grpo") and grid.seeds == (2, 0)
    # Seed by seed: one warm start, then every estimator on it.
    assert grid.cells() == [("mapo", 2), ("grpo", 2), ("mapo", 0), ("grpo", 0)]
    assert grid.run_dir("grpo", 0) == tmp_path / "runs" / "grpo-seed-0"
    assert grid.warm_dir(2) == tmp_path / "warm" / "seed-2"


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"estimators": "mapo,ppo"}, "unknown estimator"),
        ({"estimators": " , "}, "--estimators is empty"),
        ({"seeds": "0,x"}, "--seeds must be integers"),
        ({"seeds": "-1"}, "0 or more"),
        ({"steps": 0}, "--steps"),
        ({"overrides": ["trainer.stepz=3"]}, "stepz"),
    ],
)
def test_a_bad_grid_exits_2_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kw: dict[str, object], message: str
) -> None:
    assert compare.run(compare_args(run_dir=str(tmp_path / "grid"), **kw)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "grid").exists()


def test_presets_are_the_papers_and_set_wins(clean_env: None) -> None:
    grid = compare.grid_from_args(compare_args(estimators="mapo,grpo,dapo,apd"))
    for name in ("mapo", "grpo", "apd"):
        alg = grid.resolved(name, 0).algorithm
        # The paper's clips, whatever the demo config says (it sets clip_high 0.28).
        assert (alg.estimator, alg.clip_low, alg.clip_high, alg.dual_clip) == (name, 0.2, 0.3, 3.0)
        assert not alg.dapo_filter
    dapo = grid.resolved("dapo", 0).algorithm
    assert (dapo.clip_low, dapo.clip_high, dapo.kl_coef, dapo.dapo_filter) == (0.2, 0.28, 0.0, True)
    assert set(compare.PRESETS) >= {"mapo", "grpo", "dapo", "dr_grpo", "apd", "mapo_random_lambda"}
    mine = compare.grid_from_args(compare_args(overrides=["algorithm.clip_high=0.25"]))
    assert mine.resolved("mapo", 0).algorithm.clip_high == 0.25
    seeded = grid.resolved("mapo", 3)
    assert seeded.task.seed == 3 and seeded.trainer.seed == 3


def test_compare_parses_without_heavy_imports() -> None:
    code = (
        "import sys\n"
        "from services.cli import build_parser\n"
        "a = build_parser().parse_args(['compare', '--estimators', 'mapo,grpo', '--seeds', '0,1',"
        " '--steps', '3', '--run-dir', 'x', '--set', 'trainer.eval_every=1'])\n"
        "assert a.handler == 'services.stack.compare:main', a.handler\n"
        "assert (a.estimators, a.seeds, a.steps, a.run_dir) == ('mapo,grpo', '0,1', 3, 'x')\n"
        "heavy = [m for m in ('torch', 'vllm', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr


def test_a_failed_run_stops_the_grid_and_says_how_to_continue(
    tmp_path: Path,
    clean_env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    started: list[str] = []

    def fail(run: compare.UpRun) -> dict[str, object]:
        started.append(run.estimator or "")
        raise compare.RunFailed(f"mapo up failed with code 1; see {run.run_dir / 'up.log'}")

    monkeypatch.setattr(compare, "warm_model", lambda *a, **k: tmp_path / "model")
    monkeypatch.setattr(compare, "run_up", fail)
    assert compare.run(compare_args(run_dir=str(tmp_path / "grid"))) == 1
    err = capsys.readouterr().err
    assert "mapo up failed" in err and "continues with the runs it lacks" in err
    assert started == ["mapo"]  # the grid stops at the first failure
    assert not (tmp_path / "grid" / "summary.json").exists()


def test_a_half_written_run_is_started_again_but_a_stranger_is_refused(
    tmp_path: Path,
    clean_env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Unfinished runs of the grid are deleted and run again; a directory in the way that no
    run made is left alone, and the grid stops saying so."""
    from services.stack.up import RUN_MARKER

    grid_dir = tmp_path / "grid"
    cell = grid_dir / "runs" / "mapo-seed-0"
    seen: list[list[str]] = []

    def fail(run: compare.UpRun) -> dict[str, object]:
        seen.append(sorted(p.name for p in run.run_dir.iterdir()) if run.run_dir.exists() else [])
        raise compare.RunFailed("stop here")

    monkeypatch.setattr(compare, "warm_model", lambda *a, **k: tmp_path / "model")
    monkeypatch.setattr(compare, "run_up", fail)
    (cell / "logs").mkdir(parents=True)
    (cell / RUN_MARKER).write_text("")
    assert compare.run(compare_args(run_dir=str(grid_dir))) == 1
    assert seen == [[]]  # the half-written run was removed before the new one
    capsys.readouterr()
    cell.mkdir(parents=True, exist_ok=True)
    (cell / "thesis.tex").write_text("mine")
    assert compare.run(compare_args(run_dir=str(grid_dir))) == 1
    err = capsys.readouterr().err
    assert "is in the way" in err and str(cell) in err
    assert (cell / "thesis.tex").read_text() == "mine" and len(seen) == 1


# ----------------------------------------------------------------------------- report


def fake_run(estimator: str, seed: int, final: float, ood: float, speed: float) -> RunResult:
    summary = {
        "initial_accuracy": 0.30 + seed / 100,
        "final_accuracy": final,
        "initial_ood_accuracy": 0.10,
        "final_ood_accuracy": ood,
        "initial_sampled_accuracy": 0.25,
        "final_sampled_accuracy": final - 0.05,
        "initial_ood_sampled_accuracy": 0.08,
        "final_ood_sampled_accuracy": ood - 0.05,
        "steps": 4,
    }
    curve = ((0, 0.0, 0.3), (2, 1.0 + seed, (0.3 + final) / 2), (4, 2.0 + seed, final))
    return RunResult(estimator, seed, summary, curve, speed)


def test_curve_counts_training_seconds_without_evaluations() -> None:
    records = [
        {"step": 1, "time": 101.0, "step_s": 1.0, "eval_s": 0.0},
        {"step": 2, "time": 105.0, "step_s": 4.0, "eval_s": 3.0, "eval_accuracy": 0.4},
        {"step": 3, "time": 106.0, "step_s": 1.0, "eval_s": 0.0},
        {"step": 4, "time": 110.0, "step_s": 4.0, "eval_s": 3.0, "eval_accuracy": 0.45},
    ]
    curve, speed = compare_report.curve_and_speed(records, 0.3, 0.5, 4)
    # Started at 100; 3 s of evaluation at step 2 and again at step 4 are left out.
    assert curve == ((0, 0.0, 0.3), (2, 2.0, 0.4), (4, 4.0, 0.5))
    assert speed == pytest.approx(1.0)
    assert compare_report.curve_and_speed([], 0.3, 0.5, 4) == (((0, 0.0, 0.3), (4, 0.0, 0.5)), None)


def test_aggregate_table_and_plot(tmp_path: Path) -> None:
    runs = [
        fake_run("mapo", 0, 0.50, 0.20, 2.0),
        fake_run("grpo", 0, 0.46, 0.18, 2.2),
        fake_run("mapo", 1, 0.54, 0.22, 1.8),
        fake_run("grpo", 1, 0.48, 0.16, 2.0),
    ]
    results = compare_report.aggregate(runs, ["mapo", "grpo"])
    mapo = results["mapo"]
    assert mapo["accuracy"]["mean"] == pytest.approx(0.52)
    assert mapo["accuracy"]["per_seed"] == [0.50, 0.54]
    assert mapo["accuracy"]["std"] == pytest.approx(0.0282843, rel=1e-4)
    assert mapo["average"]["per_seed"] == pytest.approx([0.35, 0.38])
    assert mapo["sampled_average"]["mean"] == pytest.approx(0.315)
    assert mapo["steps_per_s"]["mean"] == pytest.approx(1.9)
    # The warm start: one per seed, shared by the estimators.
    assert results["warm start"]["accuracy"]["per_seed"] == pytest.approx([0.30, 0.31])
    assert results["warm start"]["seeds"] == [0, 1]

    body = {
        "task": "arithmetic",
        "estimators": ["mapo", "grpo"],
        "seeds": [0, 1],
        "steps": 4,
        "eval_problems": 1000,
        "ood_problems": 500,
        "eval_sampling": {"samples": 4, "temperature": 0.5, "top_p": 0.95, "seed": 0},
        "settings": {
            "mapo": {"clip_low": 0.2, "clip_high": 0.3, "dual_clip": 3.0, "kl_coef": 0.0},
            "grpo": {"clip_low": 0.2, "clip_high": 0.3, "dual_clip": None, "kl_coef": 0.0},
        },
        "results": results,
    }
    text = compare_report.markdown(body)
    assert "| mapo | 52.0 ± 2.8 (50.0, 54.0) | 21.0 ± 1.4 (20.0, 22.0) |" in text
    assert "| warm start | 30.5 ± 0.7 (30.0, 31.0) |" in text
    assert "mean over 4 samples per problem at temperature 0.5, top-p 0.95" in text
    assert "| grpo | z = (r - μ)/σ | 0.2 / 0.3 | off | 0.0 | off |" in text
    png = compare_report.plot(tmp_path / "compare.png", runs, ["mapo", "grpo"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Spread.of([0.5]) == Spread(0.5, None, (0.5,)) and Spread.of([]) is None
    assert Spread(0.5, None, (0.5,)).cell() == "50.0"


# ----------------------------------------------------------------------------- the real stack

#: Bound on one `mapo up` of the tiny grid on 2 CPU cores (services ~1 min, RL seconds).
RUN_TIMEOUT_S = 420


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(3 * RUN_TIMEOUT_S + 300)
def test_tiny_grid_shares_the_warm_start_resumes_and_reports(
    tmp_path: Path, clean_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.stack.warmstart import MARKER, WarmStartSettings

    root = tmp_path / "grid"
    args = compare_args(
        estimators="mapo,grpo",
        seeds="0",
        steps=2,
        run_dir=str(root),
        overrides=["trainer.eval_every=1", "rollout.eval_samples=2"],
    )
    # A warm start of a few steps of the tiny model: the plumbing, not the demo's accuracy.
    warm = WarmStartSettings(size="tiny", max_steps=2, eval_every=2, val_problems=16)
    assert compare.run(args, warm) == 0
    out = capsys.readouterr().out
    assert "run 1/2: mapo seed 0: 2 steps" in out and "run 2/2: grpo seed 0: 2 steps" in out

    # One warm start for the seed, and both estimators started from it.
    model = root / "warm" / "seed-0" / "model"
    built = (model / MARKER).stat().st_mtime_ns
    runs = {
        e: json.loads((root / "runs" / f"{e}-seed-0" / "summary.json").read_text())
        for e in ("mapo", "grpo")
    }
    for name, summary in runs.items():
        assert summary["model"] == str(model) and summary["estimator"] == name
        assert summary["steps"] == 2 and summary["ood_problems"] > 0
        for key in ("accuracy", "sampled_accuracy", "ood_accuracy", "ood_sampled_accuracy"):
            for when in ("initial", "final"):
                assert 0.0 <= summary[f"{when}_{key}"] <= 1.0
    # The same starting model measured the same way gives the same starting scores.
    same = ("initial_accuracy", "initial_ood_accuracy", "initial_sampled_accuracy")
    assert [runs["mapo"][k] for k in same] == [runs["grpo"][k] for k in same]

    report = json.loads((root / "summary.json").read_text())
    assert report["estimators"] == ["mapo", "grpo"] and report["seeds"] == [0]
    assert report["results"]["mapo"]["accuracy"]["per_seed"] == [runs["mapo"]["final_accuracy"]]
    assert report["settings"]["grpo"]["clip_high"] == 0.3
    assert [p[0] for p in report["runs"][0]["curve"]] == [0, 1, 2]
    table = (root / "results.md").read_text()
    assert "| mapo |" in table and "| grpo |" in table and "| warm start |" in table
    assert (root / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Half-finished: grpo's run lost its summary. Only that run is done again.
    kept = root / "runs" / "mapo-seed-0" / "summary.json"
    kept_mtime = kept.stat().st_mtime_ns
    (root / "runs" / "grpo-seed-0" / "summary.json").unlink()
    assert compare.run(args, warm) == 0
    out = capsys.readouterr().out
    assert "run 1/2: mapo seed 0: finished earlier, kept" in out
    assert "run 2/2: grpo seed 0: 2 steps" in out
    assert kept.stat().st_mtime_ns == kept_mtime
    assert (model / MARKER).stat().st_mtime_ns == built
    assert (root / "runs" / "grpo-seed-0" / "summary.json").is_file()
    again = json.loads((root / "summary.json").read_text())
    assert again["results"]["mapo"] == report["results"]["mapo"]
