"""`albert-swarm`, the embedded default: a monitor and two peers as real processes, stopped in order, resumed.

One module-scoped pair of runs in the same run directory: the first stops by itself after --duration, the second is
stopped with SIGINT (Ctrl-C). The assertions read what a user would see: exit codes, the monitor's SQLite history
and checkpoint directory, and the process table.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from monitor.history import History
from monitor.launcher import latest_checkpoint
from peer.swarm.join_string import JoinString
from peer.swarm.run_key import RunKey
from tests.harness import REPO, child_env, free_port, kill_group, wait_until

pytestmark = pytest.mark.slow
DURATION = 75


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention `text` (the run directory is on every child's command line)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline[:160]}")
    return found


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (hivemind's DHT processes and their p2pd daemons included)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(proc.name))
    found, stack = set(), [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid)}


def _wait_for_exit(pids: set[int], timeout: float) -> dict[int, str]:
    """Processes of `pids` still alive after `timeout` seconds, with their command lines (a real leak, not a race)."""
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    return {pid: _cmdline(pid) for pid in alive(pids)}


def _cmdline(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}") / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


def _state(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}") / "status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def launch(run_dir: Path, *flags: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "monitor.launcher",
        "--run_dir",
        str(run_dir),
        "--http_port",
        str(free_port()),
        "--target_batch_size",
        "32",
        *flags,
    ]
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("albert-swarm-run")
    first = launch(run_dir, "--duration", str(DURATION))
    try:
        first_output, _ = first.communicate(timeout=DURATION + 300)
    finally:
        if first.poll() is None:
            kill_group(first.pid)
    first_checkpoint = latest_checkpoint(run_dir / "monitor" / "checkpoints")
    leftovers_after_first = processes_mentioning(str(run_dir))
    backups_after_first = {
        peer_dir.name: [int(path.stem.split("-")[1]) for path in (peer_dir / "backups").glob("epoch-*.pt")]
        for peer_dir in sorted(run_dir.glob("peer-*"))
    }
    peer_logs_after_first = {
        path.stem: path.read_text(errors="replace") for path in (run_dir / "logs").glob("peer-*.log")
    }

    second_started = time.time()
    secret = run_dir / "run.secret"
    secret.write_text("a-secret-for-the-closed-second-run\n")
    second = launch(run_dir, "--run_secret_file", str(secret))  # closed: its peers must be admitted by the monitor
    try:
        # wait until its peers train (the monitor's history gains rows from this run), then press Ctrl-C
        wait_until(
            lambda: _rows_since(run_dir, second_started) >= 3 or second.poll() is not None,
            240,
            "the second run to record progress",
        )
        running = descendants(second.pid)  # the monitor, the peers, their DHT processes and p2pd daemons
        os.kill(second.pid, signal.SIGINT)
        second_output, _ = second.communicate(timeout=180)
    finally:
        if second.poll() is None:
            kill_group(second.pid)
    time.sleep(1)  # let the kernel reap the last children before looking at the process table
    yield {
        "run_dir": run_dir,
        "first": first,
        "first_output": first_output,
        "first_checkpoint": first_checkpoint,
        "leftovers_after_first": leftovers_after_first,
        "backups_after_first": backups_after_first,
        "peer_logs_after_first": peer_logs_after_first,
        "second": second,
        "second_output": second_output,
        "second_started": second_started,
        "survivors": _wait_for_exit(running, timeout=15),
        "children_seen": running,
        "leftovers": processes_mentioning(str(run_dir)),
    }


def _rows_since(run_dir: Path, since: float) -> int:
    history = History(run_dir / "monitor" / "history.sqlite")
    try:
        return sum(1 for row in history.series(since=since) if row["alive_peers"] > 0)
    finally:
        history.close()


def test_first_run_stops_by_itself_and_leaves_a_verified_checkpoint(two_runs):
    assert two_runs["first"].returncode == 0, two_runs["first_output"]
    assert "Dashboard: http://127.0.0.1:" in two_runs["first_output"]
    fingerprint = RunKey.load_or_create(two_runs["run_dir"] / "monitor" / "run_key.pem").fingerprint
    join = JoinString.decode(two_runs["first_output"].split("albert-peer --join ", 1)[1].split()[0])
    assert (join.run_id, join.run_key) == ("albert-swarm-local", fingerprint)
    assert join.initial_peers[0].startswith("/ip4/127.0.0.1/tcp/")
    peer_log = (two_runs["run_dir"] / "logs" / "peer-0.log").read_text()
    assert "Adopted the signed manifest of run 'albert-swarm-local'" in peer_log, "the peers joined by the string"
    assert f"--run-key {fingerprint}" in two_runs["first_output"]
    assert "albert-checkpoint download --from http://127.0.0.1:" in two_runs["first_output"]
    assert two_runs["first_checkpoint"] is not None, two_runs["first_output"]
    assert not two_runs["leftovers_after_first"], two_runs["leftovers_after_first"]


def test_every_peer_writes_a_backup_when_stopped(two_runs):
    """Peers stop first, each backing up the epoch it is at; the final checkpoint is no newer than the newest."""
    assert len(two_runs["backups_after_first"]) == 2
    for peer_name, epochs in two_runs["backups_after_first"].items():
        log = two_runs["peer_logs_after_first"][peer_name]
        assert "Received SIGTERM" in log, f"{peer_name} was not stopped by SIGTERM"
        after_stop = log.split("Received SIGTERM", 1)[1]
        written = re.findall(r"Backup of epoch (\d+) written", after_stop)
        assert written, f"{peer_name} wrote no backup after SIGTERM; its log ends:\n{log[-3000:]}"
        reached = [
            int(epoch) for epoch in re.findall(r"Transitioning to epoch (\d+)", log.split("Received SIGTERM")[0])
        ]
        # the epoch it was at when stopped: a peer that lagged (e.g. stopped while reloading) backs up an older epoch
        # than the final checkpoint's, which the newest backup below must still reach
        assert int(written[0]) >= (reached[-1] if reached else 0), (peer_name, written, reached[-5:])
        assert int(written[0]) in epochs, (peer_name, written, epochs)
    final_epoch = int(two_runs["first_checkpoint"].name.split("-")[1])
    newest = max(max(epochs) for epochs in two_runs["backups_after_first"].values())
    assert newest >= final_epoch, (two_runs["backups_after_first"], final_epoch)


def test_the_swarm_loss_falls(two_runs):
    history = History(two_runs["run_dir"] / "monitor" / "history.sqlite")
    try:
        epochs = [
            row for row in history.by_epoch() if row["loss"] is not None and row["time"] < two_runs["second_started"]
        ]
    finally:
        history.close()
    assert len(epochs) >= 4, f"too few epochs to judge the loss: {epochs}"
    early = sum(row["loss"] for row in epochs[:2]) / 2
    late = sum(row["loss"] for row in epochs[-2:]) / 2
    assert late < early - 0.05, f"loss did not fall: first epochs {early:.3f}, last epochs {late:.3f}"


def test_second_run_resumes_from_the_checkpoint_instead_of_starting_over(two_runs):
    resumed_epoch = int(two_runs["first_checkpoint"].name.split("-")[1])
    assert f"Resuming from checkpoint {two_runs['first_checkpoint']}" in two_runs["second_output"]
    history = History(two_runs["run_dir"] / "monitor" / "history.sqlite")
    try:
        rows = [row for row in history.series(since=two_runs["second_started"]) if row["alive_peers"] > 0]
    finally:
        history.close()
    assert rows, two_runs["second_output"]
    assert min(row["epoch"] for row in rows) >= resumed_epoch, (resumed_epoch, rows[:3])


def test_a_closed_run_admits_its_own_peers(two_runs):
    run_dir = two_runs["run_dir"]
    for index in (0, 1):
        log = (run_dir / "logs" / f"peer-{index}.log").read_text(errors="replace")
        assert "Admitted to closed run" in log, f"peer-{index} was never admitted:\n{log[-2000:]}"
    assert "Closed run" in (run_dir / "logs" / "monitor.log").read_text(errors="replace")


def test_ctrl_c_stops_everything_in_order_and_leaves_no_process(two_runs):
    output = two_runs["second_output"]
    assert two_runs["second"].returncode == 0, output
    order = [
        output.index(text) for text in ("Stopping the peers", "Writing the final checkpoint", "Stopping the monitor")
    ]
    assert order == sorted(order), output
    assert not two_runs["leftovers"], two_runs["leftovers"]
    assert len(two_runs["children_seen"]) >= 6, two_runs["children_seen"]  # monitor + 2 peers, each with a p2pd
    assert not two_runs["survivors"], f"processes of the run left running: {two_runs['survivors']}"
