"""The swarm's processes for the chaos suite: peers, the monitor and relays, each in its node's namespace.

Every process is started through ``ip netns exec`` (which keeps the pid) in a session of its own, so the process and
everything it starts (the DHT process, p2pd) form one process group that a fault or the cleanup can signal at once.
"""

from __future__ import annotations

import atexit
import json
import re
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from tests.chaos.netns import Node
from tests.harness import TINY_OPTIM, TINY_PEER, GroupProcess, as_flags

RUN_ID = "chaos-run"
# Shorter than the other swarm tests' 15 s averaging timeout: the liveness bound (tests/chaos/swarm.py) follows from
# these, and each scenario's window must outlast that bound, so they set the suite's length. A round takes ~2 s here.
# presence_expiration stays at the peer's default (10 s): hivemind refreshes a busy peer's entry only every 10 s.
MATCHMAKING_TIME, AVERAGING_TIMEOUT, PRESENCE_EXPIRATION, LOAD_STATE_TIMEOUT = 2.0, 8.0, 10.0, 15.0
# The run's optimizer settings, shared by peers and monitor: the harness's tiny swarm (epochs of a few seconds on a
# loaded 2-core machine) with the timeouts above.
OPTIM_FLAGS = as_flags(
    {
        **TINY_OPTIM,
        "matchmaking_time": MATCHMAKING_TIME,
        "averaging_timeout": AVERAGING_TIMEOUT,
        "load_state_timeout": LOAD_STATE_TIMEOUT,
        "presence_expiration": PRESENCE_EXPIRATION,
        # uncompressed wire formats: after a state averaging round parameters agree up to float rounding
        "grad_compression": "none",
        "state_compression": "none",
        # a state round every epoch, not every 10 (the default): agreement after a fault is judged within a minute
        "average_state_every": 1,
    }
)
# ~20 MB a backup: 40 are enough history to compare peers, bounded disk use over a soak
PEER_FLAGS = [*as_flags({**TINY_PEER, "keep_backups": 40}), *OPTIM_FLAGS]
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


class ChaosProcess(GroupProcess):
    """A command in a node's namespace, in its own process group, logging to a file.

    Args:
        node: the namespace to run in.
        name: name of the process (its log is ``<workdir>/<name>.log``).
        command: the command (without the ``ip netns exec`` prefix).
        workdir: directory of the log.
    """

    def __init__(self, node: Node, name: str, command: list[str], workdir: Path):
        self.node = node
        super().__init__(name, [*node.exec_prefix(), *command], workdir / f"{name}.log")
        _STARTED.append(self)

    def stop(self, timeout: float = 20.0) -> int:
        return super().stop(timeout)


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
