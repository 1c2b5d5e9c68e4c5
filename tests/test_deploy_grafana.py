"""Grafana provisioning and dashboards (deploy/grafana/).

No Grafana server can run in the test environment, so the dashboards are checked as Grafana
reads them: provisioning files, dashboard JSON model (schema version, unique ids and uids, grid
positions, data source references, query targets). Their PromQL is parsed in
test_deploy_prometheus.py and run against a real Prometheus in test_deploy_live.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_deploy_tools import (
    DEPLOY,
    REPO,
    dashboard_files,
    metric_names,
    substitute_grafana_variables,
)

GRAFANA = DEPLOY / "grafana"
PANEL_TYPES = {"timeseries", "heatmap", "stat", "gauge", "bargauge", "table", "text", "row"}
DATASOURCE_UID = "mapo-prometheus"


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _board(name: str) -> dict[str, Any]:
    return _load(GRAFANA / "dashboards" / f"{name}.json")


def _exprs(panel: dict[str, Any]) -> list[str]:
    return [t["expr"] for t in panel.get("targets", []) if "expr" in t]


def _names(panel: dict[str, Any]) -> set[str]:
    out: set[str] = set()
    for expr in _exprs(panel):
        out |= metric_names(substitute_grafana_variables(expr))
    return out


def test_four_dashboards() -> None:
    assert [p.stem for p in dashboard_files()] == [
        "advantages",
        "certainty",
        "learning",
        "pipeline",
    ]


def test_datasource_provisioning() -> None:
    doc = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    assert doc["apiVersion"] == 1
    (ds,) = doc["datasources"]
    assert ds["type"] == "prometheus"
    assert ds["uid"] == DATASOURCE_UID
    assert ds["url"] == "http://prometheus:9090"  # the compose service


def test_dashboard_provider_points_at_the_mounted_folder() -> None:
    doc = yaml.safe_load((GRAFANA / "provisioning/dashboards/dashboards.yml").read_text())
    (provider,) = doc["providers"]
    assert provider["type"] == "file"
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


@pytest.mark.parametrize("path", dashboard_files(), ids=lambda p: p.name)
def test_dashboard_model(path: Path) -> None:
    board = _load(path)
    assert board["uid"] == f"mapo-{path.stem}"
    assert 36 <= board["schemaVersion"] <= 41
    assert board["title"].startswith("mapo-rl / ")
    (var,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert var["query"] == "prometheus"
    assert var["current"]["value"] == DATASOURCE_UID
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        assert panel["type"] in PANEL_TYPES, panel["type"]
        assert panel["title"] and panel.get("description"), panel
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["w"] > 0 and g["h"] > 0, panel["title"]
        cells = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        targets = panel["targets"]
        assert targets, f"panel {panel['title']!r} has no query"
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs))
        for t in targets:
            assert t["datasource"] == panel["datasource"]
            assert t["expr"].strip()
        if panel["type"] == "heatmap":
            assert all(t.get("format") == "heatmap" for t in targets)
            assert panel["options"]["calculate"] is False  # buckets come from Prometheus


def test_certainty_dashboard() -> None:
    panels = _board("certainty")["panels"]
    heatmaps = [p for p in panels if p["type"] == "heatmap"]
    names = set().union(*(_names(p) for p in heatmaps))
    # The p distribution over steps, from the trainer's histogram buckets; lambda the same way.
    assert {"mapo_trainer_certainty_p_bucket", "mapo_trainer_lambda_bucket"} <= names
    for p in heatmaps:
        assert all("increase(" in e and "by (le)" in e for e in _exprs(p))
    everything = set().union(*(_names(p) for p in panels))
    assert {"mapo_trainer_certainty_p_mean", "mapo_trainer_lambda_mean"} <= everything


def test_advantages_dashboard() -> None:
    panels = _board("advantages")["panels"]
    exprs = " ".join(e for p in panels for e in _exprs(p))
    assert "mapo_trainer_advantage_term_abs_mean" in exprs  # z and APD contributions
    assert 'term="apd"' in exprs
    assert 'stat="max"' in exprs and 'stat="min"' in exprs  # extremes
    assert "avg by (term)" in exprs


def test_learning_dashboard() -> None:
    names = set().union(*(_names(p) for p in _board("learning")["panels"]))
    assert {
        "mapo_trainer_reward_mean",
        "mapo_trainer_accuracy",
        "mapo_trainer_kl",
        "mapo_trainer_entropy",
        "mapo_trainer_clip_fraction",
    } <= names


def test_pipeline_dashboard() -> None:
    panels = _board("pipeline")["panels"]
    names = set().union(*(_names(p) for p in panels))
    assert {
        "mapo_bus_lag",
        "mapo_bus_pending",
        "mapo_bus_dead_letters",
        "mapo_inference_tokens_per_second",
        "mapo_trainer_staleness_bucket",
        "mapo_inference_reload_seconds_bucket",
        "mapo_trainer_publish_seconds_bucket",
    } <= names
    (lag,) = [p for p in panels if p["title"] == "Weight-version lag per replica"]
    # The query docs/metrics.md gives, one series per replica.
    assert _exprs(lag) == [
        "max(mapo_trainer_weight_version) - on() group_right mapo_inference_weight_version"
    ]
    assert lag["targets"][0]["legendFormat"] == "{{instance}}"
