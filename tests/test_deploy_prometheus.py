"""Prometheus configuration and alert rules, checked with promtool; every PromQL expression of
the dashboards and alerts parsed with promql-parser and checked against docs/metrics.md."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.test_deploy_tools import (
    PROMETHEUS_DIR,
    alert_expressions,
    binary,
    dashboard_expressions,
    exported_series_names,
    metric_names,
    promql,
    run,
    substitute_grafana_variables,
)

CONFIGS = ("prometheus.yml", "prometheus-k8s.yml")
JOBS = {"reward", "inference", "trainer"}


@pytest.mark.parametrize("name", CONFIGS)
def test_promtool_check_config(name: str) -> None:
    out = run([binary("promtool"), "check", "config", str(PROMETHEUS_DIR / name)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_promtool_check_rules() -> None:
    out = run([binary("promtool"), "check", "rules", str(PROMETHEUS_DIR / "alerts.yml")])
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_alert_unit_tests() -> None:
    """alerts_test.yml: each alert fires on its failure and stays quiet on a healthy series."""
    out = run([binary("promtool"), "test", "rules", str(PROMETHEUS_DIR / "alerts_test.yml")])
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    """The rules check is real: a rule with a PromQL error fails it."""
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: rate(mapo_trainer_step[5m]\n"
    )
    out = run([binary("promtool"), "check", "rules", str(bad)])
    assert out.returncode != 0


@pytest.mark.parametrize("name", CONFIGS)
def test_every_service_is_scraped(name: str) -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / name).read_text(encoding="utf-8"))
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs >= JOBS, f"{name} scrapes {sorted(jobs)}"
    assert config["rule_files"] == ["alerts.yml"]


def test_compose_scrape_targets_match_the_compose_services() -> None:
    """Targets name compose services/aliases and the ports deploy/compose.env sets."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    env = dict(
        line.split("=", 1)
        for line in (PROMETHEUS_DIR.parent / "compose.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    want = {
        "reward": ("reward", int(env["MAPO__REWARD__METRICS_PORT"])),
        "inference": ("inference", int(env["MAPO__INFERENCE__PORT"])),
        "trainer": ("trainer", int(env["MAPO__TRAINER__METRICS_PORT"])),
    }
    for job in config["scrape_configs"]:
        if job["job_name"] not in want:
            continue
        host, port = want[job["job_name"]]
        if "dns_sd_configs" in job:
            sd = job["dns_sd_configs"][0]
            assert (sd["names"], sd["port"]) == ([host], port)
        else:
            assert job["static_configs"][0]["targets"] == [f"{host}:{port}"]


def test_alert_rules_cover_the_failure_modes() -> None:
    alerts = dict(alert_expressions())
    for name in (
        "MapoTrainerStalled",
        "MapoReplicaStaleWeights",
        "MapoDeadLettersGrowing",
        "MapoRewardTimeouts",
    ):
        assert name in alerts, f"missing alert {name}"
    assert "mapo_trainer_step" in metric_names(alerts["MapoTrainerStalled"])
    assert "mapo_reward_timeouts_total" in metric_names(alerts["MapoRewardTimeouts"])
    assert "mapo_bus_dead_letters" in metric_names(alerts["MapoDeadLettersGrowing"])
    assert metric_names(alerts["MapoReplicaStaleWeights"]) == {
        "mapo_trainer_weight_version",
        "mapo_inference_weight_version",
    }


_EXPRESSIONS = [
    pytest.param(expr, id=f"{board}:{title}:{i}")
    for i, (board, title, expr) in enumerate(dashboard_expressions())
] + [pytest.param(expr, id=f"alerts.yml:{name}") for name, expr in alert_expressions()]


def test_there_are_expressions() -> None:
    assert len(_EXPRESSIONS) > 50


@pytest.mark.parametrize("expr", _EXPRESSIONS)
def test_expression_parses(expr: str) -> None:
    p = promql()
    p.parse(substitute_grafana_variables(expr))


@pytest.mark.parametrize("expr", _EXPRESSIONS)
def test_expression_uses_only_catalogued_metrics(expr: str) -> None:
    """docs/metrics.md is the contract: every series name must be one a service exports."""
    known = exported_series_names()
    names = metric_names(substitute_grafana_variables(expr)) - {"up"}
    unknown = sorted(n for n in names if n not in known)
    assert not unknown, f"not in docs/metrics.md: {unknown}"


def test_promql_parser_rejects_garbage() -> None:
    p = promql()
    with pytest.raises(Exception):  # noqa: B017 - the parser raises a plain ValueError subclass
        p.parse("sum by (le (rate(x[1m]))")
