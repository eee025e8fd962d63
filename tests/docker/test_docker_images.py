"""The real images, built and run with podman by docker/test_images.sh (a monitor and two peers train together),
and that script's shellcheck lint.

Opt-in (ALBERT_DOCKER_E2E=1): it builds two images and trains for minutes, and needs root, podman and a base image
(see docker/test_images.sh for the settings and caches it uses).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from docker_files import DOCKER

BASE_IMAGE = os.environ.get("ALBERT_BASE_IMAGE", "localhost/bookworm-py:base")


def skip_reason() -> str | None:
    if os.environ.get("ALBERT_DOCKER_E2E") != "1":
        return "builds and runs the images for minutes: set ALBERT_DOCKER_E2E=1 to run it"
    if shutil.which("podman") is None:
        return "podman is not installed"
    if os.geteuid() != 0:
        return "podman here runs rootful: run as root"
    present = subprocess.run(["podman", "image", "exists", BASE_IMAGE], check=False, capture_output=True, timeout=60)
    if present.returncode != 0 and shutil.which("debootstrap") is None:
        return f"base image {BASE_IMAGE} is absent and debootstrap is not installed to make it"
    return None


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_monitor_and_two_peer_containers_train_together():
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    env = {"PYTHON": sys.executable, **os.environ}  # this venv's pip fills the wheelhouse, with its torch build
    result = subprocess.run(
        [str(DOCKER / "test_images.sh")], check=False, capture_output=True, text=True, timeout=1750, env=env
    )
    print(result.stdout[-6000:], result.stderr[-3000:])
    assert result.returncode == 0, f"docker/test_images.sh failed:\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
    assert "alive_peers 2" in result.stdout and "PASS" in result.stdout


def test_test_script_passes_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    script = DOCKER / "test_images.sh"
    assert os.access(script, os.X_OK), "docker/test_images.sh must be executable"
    result = subprocess.run([shellcheck, str(script)], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
