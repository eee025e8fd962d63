"""docker/compose.yaml, its GPU override and prometheus.yml: they parse and agree with the Dockerfile and the CLIs."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess

import pytest
from docker_files import DOCKER, MONITOR_ENV_VARS, PEER_ENV_VARS, load_yaml, stage_env

from peer.config import PeerConfig
from peer.swarm.config import OptimConfig, SwarmConfig
from peer.swarm.flags import env_var, field_scope

SERVICES = {"monitor", "peer", "prometheus", "grafana"}


def test_services_and_build_targets(compose, dockerfile):
    assert SERVICES <= set(compose["services"])
    stages = {instruction.stage for instruction in dockerfile}
    for name in ("monitor", "peer"):
        build = compose["services"][name]["build"]
        assert build["target"] in stages, f"{name} builds target {build['target']!r}, absent from the Dockerfile"
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == (DOCKER / "Dockerfile").resolve()
    dockerfile_base = next(i.arguments for i in dockerfile if i.keyword == "ARG" and i.arguments.startswith("BASE="))
    peer_base = compose["services"]["peer"]["build"]["args"]["BASE"]
    assert peer_base == f"${{PEER_BASE:-{dockerfile_base.split('=', 1)[1]}}}", "compose and Dockerfile disagree"
    for name in ("prometheus", "grafana"):
        image = compose["services"][name]["image"]
        assert re.search(r":v?\d+\.\d+\.\d+$", image) or "@sha256:" in image, f"{image} is not pinned"


def test_every_albert_variable_is_read_by_its_cli(compose):
    """A misspelt variable would be silently ignored by the CLI: every one passed must be a real setting."""
    for name, known in (("monitor", MONITOR_ENV_VARS), ("peer", PEER_ENV_VARS)):
        passed = {key for key in compose["services"][name]["environment"] if key.startswith("ALBERT_")}
        assert passed, f"{name} gets no ALBERT_* settings"
        assert passed <= known, f"{name} gets variables its CLI does not read: {sorted(passed - known)}"
    gpu = load_yaml("compose.gpu.yaml")
    assert set(gpu["services"]["peer"]["environment"]) <= PEER_ENV_VARS


def test_peers_join_with_the_join_string_the_monitor_writes(compose):
    monitor, peer = compose["services"]["monitor"], compose["services"]["peer"]
    monitor_volume = next(v.split(":")[0] for v in monitor["volumes"] if v.split(":")[1] == "/data")
    peer_mount = next(v for v in peer["volumes"] if v.startswith(f"{monitor_volume}:"))
    mount_point = peer_mount.split(":")[1]
    assert peer_mount.endswith(":ro"), "peers only read the monitor's files"
    script = " ".join(peer["entrypoint"])
    assert f"{mount_point}/join.txt" in script and "ALBERT_JOIN" in script
    assert "exec albert-peer" in script, "albert-peer must replace the shell to receive SIGTERM"
    assert peer["depends_on"]["monitor"]["condition"] == "service_healthy"


def test_peers_get_no_run_wide_setting_the_manifest_decides(compose):
    """A run-wide variable given to peers too could only agree with the manifest or stop every peer (exit 2)."""
    passed = [key for key in compose["services"]["peer"]["environment"] if key.startswith("ALBERT_")]
    run_wide = [key for key in passed if scope_of_variable(key) != "per-peer"]
    assert passed and run_wide == [], f"peers get run-wide settings: {run_wide}"


def scope_of_variable(name: str) -> str:
    scopes = {
        env_var(item.name): field_scope(kind, item.name)
        for kind in (SwarmConfig, OptimConfig, PeerConfig)
        for item in dataclasses.fields(kind)
    }
    return scopes[name]


def test_gpu_override_reserves_an_nvidia_gpu_per_peer():
    gpu = load_yaml("compose.gpu.yaml")
    devices = gpu["services"]["peer"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_prometheus_scrapes_the_ports_the_images_serve(compose, dockerfile):
    config = load_yaml("prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    monitor_env, peer_env = stage_env(dockerfile, "monitor"), stage_env(dockerfile, "peer")
    assert jobs["albert-monitor"]["static_configs"][0]["targets"] == [f"monitor:{monitor_env['ALBERT_HTTP_PORT']}"]
    peer_sd = jobs["albert-peer"]["dns_sd_configs"][0]
    assert peer_sd["names"] == ["peer"] and str(peer_sd["port"]) == peer_env["ALBERT_METRICS_PORT"]
    mounted = [v for v in compose["services"]["prometheus"]["volumes"] if v.startswith("./prometheus.yml:")]
    assert mounted, "compose does not mount prometheus.yml"


def test_files_mounted_by_compose_exist(compose):
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{source} is mounted but missing"


def test_docker_compose_accepts_the_files():
    """`docker-compose config` validates against the compose schema; it needs no engine."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    env = {**os.environ, "DOCKER_HOST": "unix:///nonexistent.sock"}  # proves no engine is contacted
    for files in (["compose.yaml"], ["compose.yaml", "compose.gpu.yaml"]):
        args = [binary] + [arg for name in files for arg in ("-f", str(DOCKER / name))] + ["config", "-q"]
        result = subprocess.run(args, check=False, capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 0, f"{files}: {result.stderr}"


def test_promtool_accepts_prometheus_yml():
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    result = subprocess.run(
        [binary, "check", "config", "--syntax-only", str(DOCKER / "prometheus.yml")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
