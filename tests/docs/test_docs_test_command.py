"""The README's test command (tests/run-all.sh): CI runs it verbatim, it stops at once naming a missing tool, and its
dry run shows the README's set-up steps in order. The script really runs, with PATH trimmed to the tools a fresh
machine would lack, and as an unprivileged user when the tests run as root."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "run-all.sh"
# what the script itself needs; everything the tests drive (jq, chromium, promtool, ip, ...) is left out on purpose
BASICS = ("bash", "env", "id", "dirname", "cut", "sort", "tr", "sed", "grep", "cat", "python3", "apt-get", "openssl")


def readme_test_command() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"Run every test[^\n]*\n\n```bash\n(.+?)\n```", readme)
    assert match, "README.md lost its 'Run every test' block"
    return match.group(1).strip()


def trimmed_path(tmp_path: Path) -> Path:
    """A bin directory holding only BASICS: a fresh machine without the tools the tests drive."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(mode=0o755)
    for tool in BASICS:
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    return bin_dir


def run_script(venv: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    # not under pytest's tmp_path: that sits in a 0700 directory of root's, which an unprivileged user cannot enter
    with tempfile.TemporaryDirectory(prefix="albert-run-all-") as scratch:
        home = Path(scratch)
        home.chmod(0o755)
        bin_dir = trimmed_path(home)
        environment = {"PATH": str(bin_dir), "HOME": str(home), "ALBERT_VENV": str(venv), **env}
        command = [shutil.which("bash"), str(SCRIPT), *args]
        if os.geteuid() == 0 and shutil.which("setpriv"):  # root would install: run as nobody, with no sudo on PATH
            command = [shutil.which("setpriv"), "--reuid=65534", "--regid=65534", "--clear-groups", *command]
        return subprocess.run(command, check=False, capture_output=True, text=True, timeout=60, env=environment)


def test_ci_runs_the_readme_test_command_verbatim():
    command = readme_test_command()
    assert command == "tests/run-all.sh"
    ci_lines = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert command in ci_lines, ".ci/run must run the README's test command, verbatim, on a line of its own"
    assert os.access(SCRIPT, os.X_OK), "tests/run-all.sh must be executable"


def test_a_missing_tool_stops_the_run_at_once_naming_it_and_its_install_command(tmp_path):
    started = time.monotonic()
    result = run_script(tmp_path / "venv", "-m", "not slow")
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 30
    for named in ("jq (jq)", "xxd (xxd)", "prometheus (promtool)", "chromium (chromium)", "iptables (iptables)"):
        assert named in result.stderr, f"{named} not named:\n{result.stderr}"
    assert "openssl (openssl)" not in result.stderr  # present on the trimmed PATH, so not missing
    install = [line for line in result.stderr.splitlines() if "apt-get install" in line]
    assert len(install) == 1 and install[0].strip().startswith("sudo apt-get install -y --no-install-recommends")
    assert {"jq", "xxd", "prometheus", "chromium", "iproute2", "shellcheck"} <= set(install[0].split())
    assert not (tmp_path / "venv").exists(), "nothing may be set up before the tools are there"
    assert "pytest" not in result.stderr


def test_dry_run_with_skips_allowed_prints_the_readme_steps_in_order(tmp_path):
    result = run_script(tmp_path / "venv", "--dry-run", "-m", "not slow", ALBERT_ALLOW_SKIPS="1")
    assert result.returncode == 0, result.stderr
    steps = [line.split("+ ", 1)[1].strip() for line in result.stderr.splitlines() if ": + " in line]
    venv = tmp_path / "venv"
    assert steps == [
        f"python3 -m venv {venv}",
        f". {venv}/bin/activate",
        "pip install torch==2.13.0",
        "pip install -e .\\[test\\]",
        "python -m pytest -m not\\ slow",
    ], result.stderr
    assert "ALBERT_ALLOW_SKIPS=1: going on" in result.stderr
    assert not venv.exists(), "a dry run makes nothing"
