"""Run configuration: defaults, precedence of TOML < environment < --set, and rejections."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.config import (
    AlgorithmConfig,
    ConfigError,
    RunConfig,
    build_config,
    env_overrides,
    load_config,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").rglob("*.toml"))


def test_defaults_are_valid_and_follow_the_paper() -> None:
    config = load_config(environ={})
    assert config == RunConfig()
    alg = config.algorithm
    assert alg.estimator == "mapo" and alg.std == "population" and alg.eps == 1e-6
    assert (alg.clip_low, alg.clip_high, alg.dual_clip) == (0.2, 0.3, 3.0)
    assert alg.kl_type == "low_var_kl" and alg.loss_agg == "token_mean"
    assert alg.advantage_clip is None and not alg.dapo_filter
    assert config.task.success_threshold is None and config.task.max_reward == 1.0


@pytest.mark.parametrize(
    "path", [None, *SHIPPED], ids=lambda p: "defaults" if p is None else p.name
)
def test_every_shipped_config_loads(path: Path | None) -> None:
    # None stands for the defaults, so this test runs something even before configs exist.
    config = load_config(path, environ={})
    assert isinstance(config, RunConfig)
    RunConfig.model_validate(config.model_dump())  # what it dumps is valid input again


def test_toml_file_values_are_read(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[trainer]\nsteps = 7\n[algorithm]\nestimator = "grpo"\n', encoding="utf-8")
    config = load_config(path, environ={})
    assert config.trainer.steps == 7 and config.algorithm.estimator == "grpo"


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[trainer]\nsteps = 7\n", encoding="utf-8")
    config = load_config(path, environ={"MAPO__TRAINER__STEPS": "5"})
    assert config.trainer.steps == 5
    assert env_overrides({"MAPO__TRAINER__STEPS": "5", "OTHER": "1"}) == {"trainer": {"steps": 5}}


def test_environment_is_read_from_the_process_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAPO__TRAINER__STEPS", "5")
    monkeypatch.setenv("MAPO__ALGORITHM__ESTIMATOR", "rloo")
    config = load_config()
    assert config.trainer.steps == 5 and config.algorithm.estimator == "rloo"


def test_set_overrides_beat_the_environment(tmp_path: Path) -> None:
    config = load_config(
        environ={"MAPO__TRAINER__STEPS": "5"},
        overrides=[
            "trainer.steps=9",
            "algorithm.advantage_clip=2.5",
            "task.success_threshold=0.9",
            "algorithm.dual_clip=null",
            "trainer.run_dir=runs/x",
        ],
    )
    assert config.trainer.steps == 9
    assert config.algorithm.advantage_clip == 2.5
    assert config.task.success_threshold == 0.9
    assert config.algorithm.dual_clip is None
    assert config.trainer.run_dir == "runs/x"


@pytest.mark.parametrize(
    "override", ["trainer.stepz=5", "nosection.steps=5", "algorithm.estimator.deep=1"]
)
def test_unknown_keys_are_rejected(override: str) -> None:
    with pytest.raises(ConfigError):
        build_config(environ={}, overrides=[override])


def test_unknown_key_in_a_file_is_rejected_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text("[algorithm]\nestimater = 'mapo'\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"typo\.toml is invalid(.|\n)*estimater"):
        load_config(path, environ={})


def test_unknown_environment_key_is_rejected() -> None:
    with pytest.raises(ConfigError, match="bogus"):
        build_config(environ={"MAPO__TRAINER__BOGUS": "1"})


@pytest.mark.parametrize(
    "override",
    [
        "trainer.steps=-1",
        "rollout.group_size=0",
        "algorithm.eps=0",
        "algorithm.clip_low=1.5",
        "algorithm.dual_clip=1.0",
        "rollout.top_p=0",
        "algorithm.estimator=ppo",
        "algorithm.std=unbiased",
    ],
)
def test_out_of_bound_values_are_rejected_naming_the_field(override: str) -> None:
    section, rest = override.split(".", 1)
    field = rest.split("=", 1)[0]
    with pytest.raises(ConfigError, match=rf"{section}\.{field}"):
        build_config(environ={}, overrides=[override])


def test_malformed_overrides_say_how_to_write_them() -> None:
    with pytest.raises(ConfigError, match=r"section\.field=value"):
        build_config(environ={}, overrides=["trainer.steps"])
    with pytest.raises(ConfigError, match=r"section\.field"):
        build_config(environ={}, overrides=["steps=5"])


def test_missing_and_broken_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml", environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[trainer\nsteps = ", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken, environ={})


def test_dapo_estimator_switches_its_group_filter_on() -> None:
    assert AlgorithmConfig(estimator="dapo").dapo_filter
    assert not AlgorithmConfig(estimator="grpo").dapo_filter


def test_config_estimators_match_the_advantage_module() -> None:
    from typing import get_args

    from services.core.advantages import ESTIMATORS
    from services.core.config import EstimatorName

    assert set(get_args(EstimatorName)) == set(ESTIMATORS)
