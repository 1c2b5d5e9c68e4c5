"""The ``mapo`` command: fast help without heavy imports, and config errors as exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.cli import main

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "vllm", "transformers", "grpc", "redis")


def clean_env() -> dict[str, str]:
    """The current environment without MAPO__ overrides, so the tests see the defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MAPO__")}


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_exits_0_quickly() -> None:
    start = time.perf_counter()
    proc = run("-m", "services.cli", "--help")
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert "usage: mapo" in proc.stdout and "bench" in proc.stdout
    # Interpreter start plus pydantic is well under a second; torch alone takes several.
    assert elapsed < 5.0


def test_console_script_help_exits_0() -> None:
    script = Path(sys.executable).with_name("mapo")
    if not script.exists():
        pytest.skip("the mapo console script is not installed in this environment")
    proc = subprocess.run(
        [str(script), "--help"], env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: mapo" in proc.stdout


def test_parsing_and_printing_the_config_import_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from services.cli import build_parser, main\n"
        "build_parser().parse_args(['bench', 'advantages', '--groups', '10'])\n"
        "assert main(['config', '--json']) == 0\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not heavy, f'imported at parse time: {heavy}'\n"
    )
    proc = run("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert '"estimator": "mapo"' in proc.stdout


def test_out_of_bound_override_exits_2_with_the_field_named() -> None:
    proc = run("-m", "services.cli", "config", "--set", "trainer.steps=-1")
    assert proc.returncode == 2
    assert proc.stderr.startswith("mapo: ")
    assert "trainer.steps" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_config_file_exits_2_in_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in [k for k in os.environ if k.startswith("MAPO__")]:
        monkeypatch.delenv(key)
    assert main(["config", "--config", str(tmp_path / "absent.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[trainer]\nstepz = 1\n", encoding="utf-8")
    assert main(["config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.toml is invalid" in err and "stepz" in err


def test_unknown_command_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_config_output_hides_secrets() -> None:
    """`mapo config` (text and JSON) shows where the bus is, never its password or a token."""
    env = {
        **clean_env(),
        "MAPO__BUS__URL": "redis://mapo:hunter2@redis:6379/0",
        "MAPO__INFERENCE__ADMIN_TOKEN": "tok-0451",
    }
    for args in ([], ["--json"]):
        proc = subprocess.run(
            [sys.executable, "-m", "services.cli", "config", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert "hunter2" not in proc.stdout and "tok-0451" not in proc.stdout
        assert "redis://mapo:***@redis:6379/0" in proc.stdout
        assert "max_tokens" in proc.stdout  # a field named like a token but not a secret
    assert '"admin_token": "***"' in proc.stdout
    data = json.loads(proc.stdout)
    assert data["rollout"]["max_tokens"] == 32 and data["inference"]["admin_token"] == "***"


def test_an_unset_token_shows_as_empty(capsys: pytest.CaptureFixture[str]) -> None:
    """Redaction hides values, not whether one is set."""
    from services.cli import build_parser, show_config
    from services.core.config import build_config

    show_config(build_parser().parse_args(["config", "--json"]), build_config(environ={}))
    data = json.loads(capsys.readouterr().out)
    assert data["inference"]["admin_token"] == ""
    assert data["bus"]["url"] == "redis://127.0.0.1:6379/0"
