"""Real peers as separate `python -m peer` processes on 127.0.0.1, an observer DHT, and leak checks for p2pd."""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from pathlib import Path

import hivemind
import pytest
import torch

from peer.swarm.progress import fetch_progress, make_validators
from tests.harness import (
    LOOPBACK,
    TINY_OPTIM,
    TINY_PEER,
    GroupProcess,
    as_flags,
    child_env,
    command_name,
    process_group_members,
    wait_until,
)

RUN_ID = "test-run"
# The harness's tiny swarm on loopback: epochs of a few seconds with one thread per peer on a shared 2-core machine.
PEER_FLAGS = [*LOOPBACK, *as_flags({**TINY_PEER, **TINY_OPTIM})]


class PeerProcess(GroupProcess):
    """One trainer peer started through the CLI in its own process group (so it and its p2pd can be killed)."""

    def __init__(
        self, name: str, workdir: Path, initial_peers: list[str], extra_flags=(), extra_env=None, module: str = "peer"
    ):
        self.backup_dir = workdir / name / "backups"
        self.backup_dir.parent.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            module,  # "peer", or a test-only variant of it (tests/peer/faulty_peer.py)
            "--run_id",
            RUN_ID,
            "--initial_peers",
            *initial_peers,
            *PEER_FLAGS,
            "--backup_dir",
            str(self.backup_dir),
            *extra_flags,
        ]
        # a fresh log: a test reads it for lines this process wrote
        super().__init__(name, command, workdir / f"{name}.log", env=child_env(extra_env), log_mode="w")

    def epoch_times(self) -> dict[int, float]:
        """When this peer reached each epoch (the modification time of the backup it writes at each epoch)."""
        return {int(path.stem.split("-")[1]): path.stat().st_mtime for path in self.backup_dir.glob("epoch-*.pt")}

    def backup_epochs(self) -> list[int]:
        return sorted(int(path.stem.split("-")[1]) for path in self.backup_dir.glob("epoch-*.pt"))

    def parameters(self, epoch: int) -> dict[str, torch.Tensor]:
        return torch.load(self.backup_dir / f"epoch-{epoch:06d}.pt", weights_only=True)["model"]

    def close(self) -> None:
        """SIGTERM, 20 s to leave cleanly, then SIGKILL to whatever is left of the group, p2pd included."""
        self.stop(timeout=20)


class Swarm:
    """An observer DHT (the bootstrap peer, like the monitor) plus trainer peers, and the records they published."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.dht = hivemind.DHT(
            start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=make_validators(RUN_ID)
        )
        self.initial_peers = [str(maddr) for maddr in self.dht.get_visible_maddrs()]
        self.peers: dict[str, PeerProcess] = {}
        self.history: dict[bytes, dict[int, object]] = defaultdict(dict)  # owner -> epoch -> ProgressRecord

    def start_peer(self, name: str, extra_flags=(), extra_env=None, module: str = "peer") -> PeerProcess:
        self.peers[name] = PeerProcess(name, self.workdir, self.initial_peers, extra_flags, extra_env, module)
        return self.peers[name]

    def poll(self) -> dict:
        """Fetch the live records, remember them by (owner, epoch), return the live ones."""
        records = fetch_progress(self.dht, RUN_ID)
        for owner, record in records.items():
            self.history[owner][record.epoch] = record
        return records

    def epochs(self) -> list[int]:
        """The epoch each live peer reports (one entry per live record)."""
        return sorted(record.epoch for record in self.poll().values())

    def mean_loss(self, epochs) -> float:
        """Mean of the peers' per-epoch mean losses over `epochs`, from the records polled so far."""
        losses = [
            record.mean_loss
            for records in self.history.values()
            for epoch, record in records.items()
            if epoch in epochs and record.mini_steps
        ]
        return sum(losses) / len(losses)

    def early_and_late_loss(self) -> tuple[float, float]:
        """Mean loss of the first two and of the last two epochs the polled records cover."""
        epochs = sorted({epoch for records in self.history.values() for epoch, r in records.items() if r.mini_steps})
        return self.mean_loss(epochs[:2]), self.mean_loss(epochs[-2:])

    def wait_for_epoch(self, epoch: int, peers: int, timeout: float) -> list[int]:
        def reached():
            epochs = self.epochs()
            return len(epochs) >= peers and min(epochs[-peers:]) >= epoch and epochs

        return wait_until(
            reached,
            timeout,
            f"{peers} peers reporting epoch >= {epoch}; logs in {self.workdir}",
        )

    def close(self) -> None:
        for peer in self.peers.values():
            peer.close()
        self.dht.shutdown()


def assert_no_p2pd_left(swarm: Swarm) -> None:
    leftovers = [pid for peer in swarm.peers.values() for pid in process_group_members(peer.pgid)]
    from peer.hivemind_gaps.reaping import descendants

    leftovers += [pid for pid in descendants(os.getpid()) if command_name(pid) == "p2pd"]
    assert not leftovers, f"processes left behind: {[(pid, command_name(pid)) for pid in leftovers]}"


@pytest.fixture(scope="module")
def make_swarm(tmp_path_factory):
    """Start observer DHTs on demand; at teardown stop every peer and check that no p2pd or peer process is left."""
    swarms = []

    def factory() -> Swarm:
        swarms.append(Swarm(tmp_path_factory.mktemp("swarm")))
        return swarms[-1]

    yield factory
    for swarm in swarms:
        swarm.close()
    for swarm in swarms:
        wait_until(lambda swarm=swarm: not _leftovers(swarm), 30, "peer processes and p2pd to exit")
        assert_no_p2pd_left(swarm)


def _leftovers(swarm: Swarm) -> bool:
    try:
        assert_no_p2pd_left(swarm)
    except AssertionError:
        return True
    return False
