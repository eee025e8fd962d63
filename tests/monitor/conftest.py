"""Real processes for the monitor's tests: `python -m monitor` and `python -m peer` on 127.0.0.1, killed at the end."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from peer.swarm.run_key import RunKey
from tests.harness import (
    LOOPBACK,
    TINY_OPTIM,
    TINY_PEER,
    GroupProcess,
    as_flags,
    child_env,
    free_port,
    run_cli,
    wait_until,
)

MAX_LENGTH = TINY_PEER["max_length"]
# The run's optimizer settings, given to peers and monitor alike: the harness's tiny swarm, with a lower learning rate.
OPTIM_FLAGS = as_flags({**TINY_OPTIM, "learning_rate": 0.005})
PEER_FLAGS = [*LOOPBACK, *as_flags(TINY_PEER), *OPTIM_FLAGS]
MAXADDR = re.compile(r"/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+")


class Process(GroupProcess):
    """A command in its own process group (so it and its hivemind children, p2pd included, can be signalled)."""


class MonitorProcess(Process):
    """`python -m monitor` on a fixed DHT port and HTTP port (a restart keeps its address)."""

    def __init__(self, workdir: Path, run_id: str, extra_flags=(), dht_port=None, http_port=None, name="monitor"):
        self.workdir, self.run_id = workdir, run_id
        self.dht_port, self.http_port = dht_port or free_port(), http_port or free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.peers_file = workdir / "initial_peers.txt"
        self.peers_file.unlink(missing_ok=True)
        command = [
            sys.executable,
            "-m",
            "monitor",
            "--run_id",
            run_id,
            "--run_dir",
            str(workdir),
            "--host_maddrs",
            f"/ip4/127.0.0.1/tcp/{self.dht_port}",
            "--http_host",
            "127.0.0.1",
            "--http_port",
            str(self.http_port),
            "--refresh_period",
            "1",
            *OPTIM_FLAGS,
            *extra_flags,
        ]
        super().__init__(name, command, workdir.parent / f"{name}.log")

    def wait_ready(self, timeout: float = 120.0) -> list[str]:
        def ready():
            if self.process.poll() is not None:
                pytest.fail(f"monitor exited with {self.process.returncode}:\n{self.log_text()[-3000:]}")
            return self.peers_file.is_file() and self.get("/healthz")

        wait_until(ready, timeout, f"the monitor at {self.url}")
        return self.initial_peers()

    def initial_peers(self) -> list[str]:
        return self.peers_file.read_text().split()

    def get(self, path: str):
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                body = response.read()
                return json.loads(body) if "json" in response.headers.get("content-type", "") else body
        except (urllib.error.URLError, OSError):
            return None

    def post(self, path: str, token: str):
        request = urllib.request.Request(self.url + path, method="POST", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())


class PeerProcess(Process):
    """A trainer peer started through its CLI."""

    def __init__(self, workdir: Path, name: str, run_id: str, initial_peers: list[str], extra_flags=()):
        self.backup_dir = workdir / name / "backups"
        self.backup_dir.parent.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "peer",
            "--run_id",
            run_id,
            "--initial_peers",
            *initial_peers,
            *PEER_FLAGS,
            "--backup_dir",
            str(self.backup_dir),
            *extra_flags,
        ]
        super().__init__(name, command, workdir / f"{name}.log")

    def backup_epochs(self) -> list[int]:
        return sorted(int(path.stem.split("-")[1]) for path in self.backup_dir.glob("epoch-*.pt"))

    def maddrs(self) -> list[str]:
        return MAXADDR.findall(self.log_text())


@pytest.fixture(scope="module")
def processes():
    """Every process a test module starts; all are stopped (and their groups killed) at the end of the module."""
    started: list[Process] = []
    yield started
    for process in reversed(started):
        if process.process.poll() is None or process.group_alive():
            process.stop(timeout=20)
    wait_until(lambda: not any(process.group_alive() for process in started), 30, "test processes to exit")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags for a root, offline, display-less machine: no sandbox, no GPU, and no background calls to Google's hosts.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=8000",
    "--window-size=1280,1600",
]


def chromium(url: str, tmp_path: Path, *flags: str) -> str:
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    result = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *flags, url],
        capture_output=True,
        text=True,
        check=False,  # the assertion below shows stderr on failure
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


# Loads the checkpoint in a fresh interpreter where the project's packages cannot be imported at all (even if the
# project is pip-installed), so only the code saved inside the checkpoint is used.
STANDALONE = """
import importlib.abc, sys, torch
class NoProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('model', 'data', 'peer', 'monitor'):
            raise ImportError(f'{name} must not be needed to load a checkpoint')
sys.meta_path.insert(0, NoProject())
from transformers import AutoModelForMaskedLM
model = AutoModelForMaskedLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.load(sys.argv[2])).logits, sys.argv[3])
"""


def logits_with_transformers_alone(checkpoint, tmp_path) -> torch.Tensor:
    env = dict(child_env(), HF_HOME=str(tmp_path / "hf-home"))
    env.pop("PYTHONPATH", None)
    result = run_cli(
        [
            sys.executable,
            "-I",
            "-c",
            STANDALONE,
            str(checkpoint),
            str(tmp_path / "input_ids.pt"),
            str(tmp_path / "logits.pt"),
        ],
        timeout=180,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "logits.pt", weights_only=True)


def run_key_of(monitor: MonitorProcess) -> str:
    """The fingerprint a downloader is handed: that of the run key the monitor keeps in its run dir."""
    return RunKey.load_or_create(monitor.workdir / "run_key.pem").fingerprint
