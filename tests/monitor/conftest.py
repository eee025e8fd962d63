"""Real processes for the monitor's tests: `python -m monitor` and `python -m peer` on 127.0.0.1, killed at the end."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAX_LENGTH = 64
# The run's optimizer settings, given to peers and monitor alike; small enough for epochs of a few seconds.
OPTIM_FLAGS = [
    "--target_batch_size",
    "32",
    "--matchmaking_time",
    "2",
    "--averaging_timeout",
    "15",
    "--load_state_timeout",
    "15",
    "--learning_rate",
    "0.005",
    "--warmup_epochs",
    "0",
    "--total_epochs",
    "1000",
]
PEER_FLAGS = [
    "--host_maddrs",
    "/ip4/127.0.0.1/tcp/0",
    "--torch_threads",
    "1",
    "--model",
    "tiny",
    "--batch_size",
    "8",
    "--max_length",
    str(MAX_LENGTH),
    "--backup_every",
    "1",
    "--keep_backups",
    "1000",
    "--metrics_expiration",
    "10",
    *OPTIM_FLAGS,
]
MAXADDR = re.compile(r"/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+")


def wait_until(condition, timeout: float, message: str, poll: float = 0.5):
    """Poll `condition` until it returns something truthy (returned) or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {message}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env() -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("ALBERT_")}
    return dict(env, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


class Process:
    """A command in its own process group (so it and its hivemind children, p2pd included, can be signalled)."""

    def __init__(self, name: str, command: list[str], log_path: Path):
        self.name, self.log_path = name, log_path
        self.log = open(log_path, "a")  # noqa: SIM115 -- open while the process runs; close() closes it
        self.process = subprocess.Popen(
            command, cwd=REPO, env=child_env(), stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL to the whole group, like a machine dying."""
        self.signal_group(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.log.close()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; then SIGKILL whatever is left of the group. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.signal_group(signal.SIGKILL)
        code = self.process.wait(timeout=30)
        self.log.close()
        return code

    def group_alive(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        return True


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


def run_cli(args: list[str], timeout: float, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run a command to completion in its own process group; on timeout kill the whole group (hivemind children)."""
    process = subprocess.Popen(
        args,
        cwd=cwd,
        env=env or child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(args[:4])} ... timed out after {timeout} s:\n{stdout[-2000:]}\n{stderr[-3000:]}")
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever it left behind
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


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
