"""The one process harness of the test suites: polling, ports, child environments, process groups, tiny-swarm flags.

Peers, monitors and relays run as real processes, each in a session (process group) of its own, so that the process
and everything it starts (hivemind's DHT process, p2pd) can be signalled, killed and checked for leftovers at once.
tests/peer, tests/monitor and tests/chaos build their process classes on `GroupProcess` and their command lines on
the flag lists below; what differs between the suites (learning rate, timeouts, retention) stays in their modules.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

# not resolved: a symlinked copy of the suite (the chaos suite's, see tests/chaos/README.md) runs its own tree
REPO = Path(__file__).absolute().parents[1]


def wait_until_or_none(condition, timeout: float, poll: float = 0.5):
    """Poll `condition` until it returns something truthy (returned), or return None after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(poll)
    return None


def wait_until(condition, timeout: float, message: str, poll: float = 0.5):
    """Poll `condition` until it returns something truthy (returned) or fail after `timeout` seconds."""
    result = wait_until_or_none(condition, timeout, poll)
    if not result:
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {message}")
    return result


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a process that must keep its address across a restart)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(extra: dict | None = None) -> dict:
    """The environment of a started process: the test's own, less any ALBERT_* setting not asked for in `extra`.

    ALBERT_* variables configure peers and monitors (and enable test-only faults): one leaking in from the shell that
    runs the tests would change what every child does. One thread per process, unbuffered logs, no Hugging Face hub.
    """
    extra = extra or {}
    env = {key: value for key, value in os.environ.items() if not key.startswith("ALBERT_")}
    base = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return dict(env, **base, **extra)


def kill_group(pgid: int, signum: int = signal.SIGKILL) -> None:
    """Signal a whole process group; a group that is already gone is fine."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def process_group_members(pgid: int) -> list[int]:
    """Pids of live (non-zombie) processes in a process group, read from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class GroupProcess:
    """A command in its own process group (session), its output appended to a log file.

    Args:
        name: name of the process.
        command: the command line.
        log_path: where stdout and stderr go.
        env: its environment (default `child_env()`).
        log_mode: "a" appends (a restart under the same name keeps the earlier log), "w" starts the log afresh.
    """

    def __init__(self, name: str, command: list[str], log_path: Path, env: dict | None = None, log_mode: str = "a"):
        self.name, self.log_path = name, log_path
        self.log = open(log_path, log_mode)  # noqa: SIM115  (open for the process's lifetime, closed by kill/stop)
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env or child_env(),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pgid = self.process.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal_group(self, signum: int) -> None:
        kill_group(self.pgid, signum)

    def kill(self) -> None:
        """SIGKILL to the process and everything it started, like a machine losing power."""
        self.signal_group(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.log.close()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (a clean leave) and wait; then SIGKILL whatever is left of the group. Returns the exit code."""
        self.signal_group(signal.SIGCONT)  # a stopped (SIGSTOPped) process cannot handle SIGTERM
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return self.process.returncode

    def group_alive(self) -> bool:
        return group_alive(self.pgid)

    def leftovers(self) -> list[int]:
        return process_group_members(self.pgid)


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
        kill_group(process.pid)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(args[:4])} ... timed out after {timeout} s:\n{stdout[-2000:]}\n{stderr[-3000:]}")
    finally:
        kill_group(process.pid)  # whatever it left behind
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def as_flags(settings: dict) -> list[str]:
    """{"batch_size": 8} -> ["--batch_size", "8"]: a command line from settings, in their order."""
    return [item for name, value in settings.items() for item in (f"--{name}", str(value))]


# A tiny swarm: epochs of a few seconds with one thread per process on a shared 2-core machine. Each suite starts
# from these and overrides what it needs (its learning rate, its timeouts, how many backups a peer keeps).
TINY_OPTIM = {
    "target_batch_size": 32,
    "matchmaking_time": 2,
    "averaging_timeout": 15,
    "load_state_timeout": 15,
    "learning_rate": 0.05,
    "warmup_epochs": 0,
    "total_epochs": 1000,
}
TINY_PEER = {
    "torch_threads": 1,
    "model": "tiny",
    "batch_size": 8,
    "max_length": 64,
    "backup_every": 1,
    "keep_backups": 1000,
    "record_expiration": 10,
}
LOOPBACK = ["--host_maddrs", "/ip4/127.0.0.1/tcp/0"]


def allreduce_bytes(port: int, counter: str = "albert_peer_allreduce_bytes_total") -> dict[str, float]:
    """A peer's all-reduce byte counters by direction ("sent", "received"), read from its /metrics on ``port``
    (``counter``: or another byte counter, albert_peer_state_round_bytes_total)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = re.findall(rf'^{counter}\{{direction="(\w+)"\}} (\S+)$', text, re.MULTILINE)
    return {direction: float(count) for direction, count in found}
