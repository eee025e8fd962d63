"""The Grafana provisioning and dashboard: valid layout, the provisioned datasource, and only metrics that exist.

Metric names are taken from the real exporters: the monitor's collector and the peer's registry, scraped as text.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import pytest
import yaml
from docker_files import DOCKER, load_yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from monitor.aggregate import PeerProgress, aggregate
from monitor.checkpoint import CheckpointStore
from monitor.history import History
from monitor.live import LiveState
from monitor.metrics import make_registry
from peer.report import PeerMetrics

DASHBOARD = DOCKER / "grafana" / "dashboards" / "albert-swarm.json"
# What the issue asks the swarm's dashboards to show, at the least.
CORE_METRICS = {
    "albert_swarm_epoch",
    "albert_swarm_loss",
    "albert_swarm_samples_per_second",
    "albert_swarm_alive_peers",
    "albert_swarm_samples_total",
}
PROMQL_WORDS = {"rate", "increase", "deriv", "time", "sum", "by", "avg", "max", "min", "on", "without"}


def exported_names(registry) -> set[str]:
    """Series names as a Prometheus server stores them (a counter only as NAME_total, never as its family name)."""
    names = set()
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        if family.type in ("gauge", "unknown"):
            names.add(family.name)  # labelled gauges may have no sample yet (no peer alive)
        names.update(sample.name for sample in family.samples)
    return names


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, set[str]]:
    root = tmp_path_factory.mktemp("monitor")
    history = History(root / "history.sqlite")
    # one alive peer, so that the monitor's per-peer series have samples as in a live run
    peer = PeerProgress("peer-a", epoch=3, samples_per_second=9.0, samples_accumulated=32, loss_sum=8.0,
                      mini_steps=4, time=time.time(), device="cpu")  # fmt: skip
    live = LiveState(run_id="dashboard-test")
    live.update(aggregate([peer], now=time.time()), invalid=0, refused={})
    try:
        monitor = exported_names(make_registry(live, CheckpointStore(root / "ck", history)))
    finally:
        history.close()
    return {"albert-monitor": monitor, "albert-peer": exported_names(PeerMetrics().registry)}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels_of(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # panels of collapsed rows
    return panels


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every query."""
    return [(panel["title"], target["expr"]) for panel in panels_of(dashboard) for target in panel.get("targets", [])]


def test_dashboard_identity_and_layout(dashboard):
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    ids = [panel["id"] for panel in panels_of(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied = set()
    for panel in panels_of(dashboard):
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
    assert all(panel["type"] in {"row", "stat", "timeseries"} for panel in panels_of(dashboard))


def test_queries_use_the_provisioned_datasource(dashboard):
    datasources = load_yaml("grafana/provisioning/datasources/prometheus.yaml")["datasources"]
    assert [source["url"] for source in datasources] == ["http://prometheus:9090"]  # the compose service
    uid = datasources[0]["uid"]
    for panel in panels_of(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"] and all(target["datasource"]["uid"] == uid for target in panel["targets"])


def test_every_queried_metric_is_exported_by_its_job(dashboard, exported):
    jobs = {job["job_name"] for job in load_yaml("prometheus.yml")["scrape_configs"]}
    assert jobs == set(exported)
    for title, expr in queries(dashboard):
        selectors = re.findall(r"\b(albert_\w+)\{([^}]*)\}", expr)
        bare = set(re.findall(r"\balbert_\w+\b", expr)) - {name for name, _ in selectors}
        assert not bare, f"{title}: every albert_* metric must select its job, unlike {sorted(bare)}"
        for name, labels in selectors:
            job = re.search(r'job="([^"]+)"', labels)
            assert job and job.group(1) in jobs, f"{title}: {name} selects no scraped job"
            assert name in exported[job.group(1)], f"{title}: {name} is not exported by {job.group(1)}"
        words = set(re.findall(r"\b([a-z_]+)\(", expr))
        assert words <= PROMQL_WORDS, f"{title}: unexpected functions {sorted(words - PROMQL_WORDS)}"


def test_no_metric_name_means_two_things(exported):
    """One Prometheus scrapes the monitor and the peers: a name both export would be two meanings under one name."""
    shared = exported["albert-monitor"] & exported["albert-peer"]
    assert not shared, f"exported by both the monitor and the peers: {sorted(shared)}"


def test_core_swarm_metrics_are_on_the_dashboard(dashboard, exported):
    queried = {name for _, expr in queries(dashboard) for name in re.findall(r"\balbert_\w+\b", expr)}
    assert CORE_METRICS <= exported["albert-monitor"], "the monitor no longer exports a core metric"
    assert CORE_METRICS <= queried, f"missing on the dashboard: {sorted(CORE_METRICS - queried)}"


def test_dashboard_provider_points_at_the_mounted_folder(compose):
    provider = load_yaml("grafana/provisioning/dashboards/albert-swarm.yaml")["providers"][0]
    mounts = dict(volume.split(":")[:2] for volume in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


def test_queries_are_valid_promql(dashboard, tmp_path):
    """promtool parses every expression (as a recording rule), the way Prometheus itself will."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    rules = [
        {"record": f"dashboard:query_{index}", "expr": expr} for index, (_, expr) in enumerate(queries(dashboard))
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
