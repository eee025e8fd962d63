"""The swarm's processes for the chaos suite: peers, the monitor and relays, each in its node's namespace.

Every process is started through ``ip netns exec`` (which keeps the pid) in a session of its own, so the process and
everything it starts (the DHT process, p2pd) form one process group that a fault or the cleanup can signal at once.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from tests.chaos.netns import Node

REPO = Path(__file__).absolute().parents[2]  # not resolved: a symlinked copy of the suite runs its own tree
RUN_ID = "chaos-run"
# Shorter than the other swarm tests' 15 s averaging timeout: the liveness bound (tests/chaos/swarm.py) follows from
# these, and each scenario's window must outlast that bound, so they set the suite's length. A round takes ~2 s here.
# progress_expiration stays at the peer's default (10 s): hivemind refreshes a busy peer's entry only every 10 s.
MATCHMAKING_TIME, AVERAGING_TIMEOUT, PROGRESS_EXPIRATION, LOAD_STATE_TIMEOUT = 2.0, 8.0, 10.0, 15.0
# The run's optimizer settings, shared by peers and monitor: epochs of a few seconds on a loaded 2-core machine.
OPTIM_FLAGS = [
    "--target_batch_size", "32",
    "--matchmaking_time", str(MATCHMAKING_TIME),
    "--averaging_timeout", str(AVERAGING_TIMEOUT),
    "--load_state_timeout", str(LOAD_STATE_TIMEOUT),
    "--progress_expiration", str(PROGRESS_EXPIRATION),
    "--learning_rate", "0.05",
    "--warmup_epochs", "0",
    "--total_epochs", "1000",
    # uncompressed wire formats: after a state averaging round parameters agree up to float rounding
    "--grad_compression", "none",
    "--state_compression", "none",
    # a state round every epoch, not every 10 (the default): agreement after a fault is judged within a minute
    "--average_state_every", "1",
]  # fmt: skip
PEER_FLAGS = [
    "--torch_threads", "1",
    "--model", "tiny",
    "--batch_size", "8",
    "--max_length", "64",
    "--backup_every", "1",
    "--keep_backups", "40",  # ~20 MB each: enough history to compare peers, bounded disk use over a soak
    "--metrics_expiration", "10",
    *OPTIM_FLAGS,
]  # fmt: skip
MONITOR_FLAGS = [
    "--refresh_period", "1",
    "--stale_after", "12",
    "--checkpoint_every", "4",
    "--fetch_state_every", "2",
    "--keep", "3",
    *OPTIM_FLAGS,
]  # fmt: skip
JOIN_LINE = re.compile(r"others can join via: (\S+)")
EPOCH_LINE = re.compile(r"peer\.report: epoch (\d+) \| loss ([0-9.]+)")
_STARTED: list[ChaosProcess] = []


def child_env() -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("ALBERT_")}
    return dict(env, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


class ChaosProcess:
    """A command in a node's namespace, in its own process group, logging to a file.

    Args:
        node: the namespace to run in.
        name: name of the process (its log is ``<workdir>/<name>.log``).
        command: the command (without the ``ip netns exec`` prefix).
        workdir: directory of the log.
    """

    def __init__(self, node: Node, name: str, command: list[str], workdir: Path):
        self.node, self.name, self.log_path = node, name, workdir / f"{name}.log"
        self.log = open(self.log_path, "a")  # noqa: SIM115  (open for the process's lifetime, closed by stop)
        self.process = subprocess.Popen(
            [*node.exec_prefix(), *command],
            cwd=REPO,
            env=child_env(),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pgid = self.process.pid
        _STARTED.append(self)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.pgid, signum)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL to the process and everything it started, like a machine losing power."""
        self.signal_group(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (a clean leave), then SIGKILL to whatever is left of the group."""
        self.signal_group(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        self.log.close()

    def leftovers(self) -> list[int]:
        return group_members(self.pgid)


@atexit.register
def _kill_everything_started() -> None:
    """Last line of defence (e.g. the test run was interrupted): no process of ours outlives the session."""
    for process in _STARTED:
        process.signal_group(signal.SIGKILL)


class ChaosPeer(ChaosProcess):
    """A trainer peer (``python -m peer``) listening on its node's address.

    Args:
        node: its namespace.
        name: peer name (its backups go to ``<workdir>/<name>/backups``).
        workdir: run directory.
        initial_peers: multiaddrs to join through.
        extra_flags: more CLI flags.
    """

    def __init__(self, node: Node, name: str, workdir: Path, initial_peers: list[str], extra_flags=()):
        self.backup_dir = workdir / name / "backups"
        self.backup_dir.parent.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "peer",
            "--run_id", RUN_ID,
            "--initial_peers", *initial_peers,
            "--host_maddrs", f"/ip4/{node.address}/tcp/0",
            "--backup_dir", str(self.backup_dir),
            *PEER_FLAGS,
            *extra_flags,
        ]  # fmt: skip
        super().__init__(node, name, command, workdir)

    def backup_epochs(self) -> list[int]:
        return sorted(int(path.stem.split("-")[1]) for path in self.backup_dir.glob("epoch-*.pt"))

    def parameters(self, epoch: int) -> torch.Tensor | None:
        """All parameters of the backup of ``epoch``, flattened; None if it is gone (rotated) or half-written."""
        try:
            state = torch.load(self.backup_dir / f"epoch-{epoch:06d}.pt", weights_only=True)["model"]
        except (OSError, RuntimeError, EOFError, KeyError):
            return None
        return torch.cat([tensor.flatten().float() for tensor in state.values()])

    def maddrs(self) -> list[str]:
        found = JOIN_LINE.search(self.log_text())
        return found.group(1).split() if found else []

    def losses(self) -> dict[int, float]:
        """Mean training loss this peer logged for each epoch it finished."""
        return {int(epoch): float(loss) for epoch, loss in EPOCH_LINE.findall(self.log_text())}


class ChaosMonitor(ChaosProcess):
    """The monitor (``python -m monitor``) on fixed ports, so a restart keeps its multiaddr and URL.

    Args:
        node: its namespace.
        workdir: run directory (the monitor's own files go to ``<workdir>/monitor``).
        dht_port, http_port: fixed ports inside the namespace.
        name: process name (a restart gets a new log).
        extra_flags: more CLI flags.
    """

    def __init__(self, node: Node, workdir: Path, dht_port: int, http_port: int, name="monitor", extra_flags=()):
        self.run_dir, self.dht_port, self.http_port = workdir / "monitor", dht_port, http_port
        self.url = f"http://{node.address}:{http_port}"
        self.peers_file = self.run_dir / "initial_peers.txt"
        self.peers_file.unlink(missing_ok=True)
        command = [
            sys.executable, "-m", "monitor",
            "--run_id", RUN_ID,
            "--run_dir", str(self.run_dir),
            "--host_maddrs", f"/ip4/{node.address}/tcp/{dht_port}",
            "--http_host", "0.0.0.0",
            "--http_port", str(http_port),
            *MONITOR_FLAGS,
            *extra_flags,
        ]  # fmt: skip
        super().__init__(node, name, command, workdir)

    def initial_peers(self) -> list[str]:
        return self.peers_file.read_text().split() if self.peers_file.is_file() else []

    def get(self, path: str, timeout: float = 10.0):
        """GET a JSON endpoint; None while the monitor does not answer."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
        try:
            with opener.open(self.url + path, timeout=timeout) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def wait_ready(self, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"the monitor exited with {self.process.returncode}:\n{self.log_text()[-3000:]}")
            if self.initial_peers() and self.get("/healthz") is not None:
                return self.initial_peers()
            time.sleep(0.5)
        raise TimeoutError(f"the monitor at {self.url} was not ready in {timeout:.0f} s:\n{self.log_text()[-3000:]}")


class Relay(ChaosProcess):
    """The delaying relay of ``tests.chaos.relay`` inside a node, with the node's TCP redirected through it."""

    def __init__(self, node: Node, workdir: Path, port: int, delay_ms: float):
        command = [sys.executable, "-m", "tests.chaos.relay", "--port", str(port), "--delay-ms", str(delay_ms)]
        super().__init__(node, f"relay-{node.name}", command, workdir)
        deadline = time.monotonic() + 30
        while "relay listening" not in self.log_text():
            if not self.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the relay did not start:\n{self.log_text()}")
            time.sleep(0.1)
        node.redirect_tcp_to(port)
