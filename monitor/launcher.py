"""`albert-swarm`: a whole training run on this machine — a monitor and N trainer peers as separate processes.

This is the project's embedded default: with no arguments it trains the `tiny` preset on the bundled corpus with two
peers on 127.0.0.1, prints the dashboard URL and the `--initial-peers` string a peer on another machine would use,
and shows one live status line. Ctrl-C (or SIGTERM) stops everything in order: peers first (each writes its
backup), then a final checkpoint, then the monitor. Started again in the same run directory, it resumes from the
newest verified checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from monitor.checkpoint import MANIFEST, verify_directory
from peer.swarm.field_docs import help_from_docstring
from peer.swarm.flags import parse_configs
from peer.swarm.run_key import RunKey

logger = logging.getLogger("albert-swarm")


@help_from_docstring
@dataclass
class LocalSwarmConfig:
    """A local run: where it lives, what it trains, and settings tuned for a few CPU cores on one machine.

    Args:
        run_dir: Directory of everything the run keeps (monitor history, checkpoints, peer backups, logs).
        peers: Number of trainer peers to start.
        model: Model preset or config.json path.
        corpus: Corpus file or directory (default: the bundled corpus).
        duration: Stop by itself after this many seconds (0: run until Ctrl-C).
        http_port: Port of the monitor's dashboard (0: any free port).
        run_id: Name of the run in the DHT.
        target_batch_size: Samples the swarm accumulates per optimizer step.
        batch_size: Samples per forward/backward pass of each peer.
        learning_rate: Peak learning rate.
        warmup_epochs: Epochs of learning-rate warm-up.
        checkpoint_every: The monitor writes a checkpoint every this many epochs.
        threads_per_peer: CPU threads each peer's torch uses.
        host: Address every process of the run listens on; 0.0.0.0 lets peers on other machines join.
        run_secret_file: Close the run: only peers presenting this secret join (see "Closed runs" in the README).
        local_steps: Train in low-communication (DiLoCo) mode: one outer step per local_steps x target_batch_size
            samples (0: synchronous, every target batch averages gradients); see --local-steps of albert-peer.
    """

    run_dir: str = "albert-swarm-run"
    peers: int = 2
    model: str = "tiny"
    corpus: str | None = None
    duration: float = 0.0
    http_port: int = 8080
    run_id: str = "albert-swarm-local"
    target_batch_size: int = 64
    batch_size: int = 8
    # high for LAMB: the tiny demo model should learn visibly within minutes on a laptop
    learning_rate: float = 0.02
    warmup_epochs: int = 5
    checkpoint_every: int = 20
    threads_per_peer: int = 1
    host: str = "127.0.0.1"
    run_secret_file: str | None = None
    local_steps: int = 0

    def __post_init__(self):
        for name in ("peers", "target_batch_size", "batch_size", "learning_rate", "checkpoint_every"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.host not in ("127.0.0.1", "0.0.0.0"):
            raise ValueError(
                f"host must be 127.0.0.1 (this machine only) or 0.0.0.0 (all interfaces), got {self.host}"
            )
        if self.local_steps < 0:
            raise ValueError(f"local_steps must be zero or positive, got {self.local_steps}")
        if self.duration < 0:
            raise ValueError(f"duration must be zero or positive, got {self.duration}")

    def optimizer_flags(self) -> list[str]:
        """Settings every process of the run must share; matchmaking is short because all peers are local."""
        return [
            "--run_id",
            self.run_id,
            "--target_batch_size",
            str(self.target_batch_size),
            "--learning_rate",
            str(self.learning_rate),
            "--warmup_epochs",
            str(self.warmup_epochs),
            "--matchmaking_time",
            "2",
            "--averaging_timeout",
            "30",
            "--load_state_timeout",
            "60",
            "--local_steps",
            str(self.local_steps),
        ]


class LocalSwarm:
    """Starts, watches and stops the processes of one local run."""

    def __init__(self, config: LocalSwarmConfig):
        self.config = config
        self.run_dir = Path(config.run_dir).resolve()
        self.logs = self.run_dir / "logs"
        self.admin_token = secrets.token_hex(16)  # lets this launcher ask the monitor for the final checkpoint
        self.monitor: subprocess.Popen | None = None
        self.peers: list[subprocess.Popen] = []
        self.url = ""
        self.run_key = ""  # the monitor's run key fingerprint, shown in the download command
        self.join = ""  # the monitor's join string: what every peer is started with

    def _spawn(self, name: str, module: str, flags: list[str]) -> subprocess.Popen:
        env = {**os.environ, "ALBERT_ADMIN_TOKEN": self.admin_token, "PYTHONUNBUFFERED": "1"}
        # a new session, so that Ctrl-C in the terminal reaches only this launcher, which then stops them in order;
        # the child keeps its own copy of the log's file descriptor, so ours is closed right away
        with open(self.logs / f"{name}.log", "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", module, *flags],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def start_monitor(self) -> list[str]:
        cfg = self.config
        monitor_dir = self.run_dir / "monitor"
        peers_file = monitor_dir / "initial_peers.txt"
        url_file = monitor_dir / "dashboard_url.txt"
        join_file = monitor_dir / "join.txt"
        for stale in (peers_file, url_file, join_file):  # left by an earlier run in this directory
            stale.unlink(missing_ok=True)
        flags = [
            *cfg.optimizer_flags(),
            "--model",
            cfg.model,
            "--run_dir",
            str(monitor_dir),
            "--host_maddrs",
            f"/ip4/{cfg.host}/tcp/0",
            "--http_host",
            cfg.host,
            "--http_port",
            str(cfg.http_port),
            "--checkpoint_every",
            str(cfg.checkpoint_every),
            "--fetch_state_every",
            "5",
            "--refresh_period",
            "2",
        ]
        if cfg.run_secret_file:
            flags += ["--run_secret_file", cfg.run_secret_file]
        if cfg.corpus:  # into the run manifest, so that the string's peers train on it too
            flags += ["--corpus", cfg.corpus]
        resume = latest_checkpoint(monitor_dir / "checkpoints")
        if resume is not None:
            print(f"Resuming from checkpoint {resume}")
            flags += ["--resume_from", str(resume)]
        self.monitor = self._spawn("monitor", "monitor", flags)
        initial_peers = self._wait_for_file(peers_file, 180.0).split()
        self.join = self._wait_for_file(join_file, 60.0).strip()
        self.url = self._wait_for_file(url_file, 60.0).strip()  # with --http-port 0 the OS chose the port
        # the monitor made (or loaded) its run key before writing the peers file, so this only reads it
        self.run_key = RunKey.load_or_create(monitor_dir / "run_key.pem").fingerprint
        return initial_peers

    def _wait_for_file(self, path: Path, timeout: float) -> str:
        """The monitor writes these files atomically once it is ready: poll for one, watching the monitor live."""
        deadline = time.monotonic() + timeout
        while not path.is_file():
            self._check_alive(self.monitor, "monitor")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the monitor wrote no {path} within {timeout:.0f} s; see {self.logs / 'monitor.log'}"
                )
            time.sleep(0.2)
        return path.read_text()

    def start_peers(self) -> None:
        """Each peer gets the join string as a volunteer would; the run's settings come from the monitor's manifest."""
        cfg = self.config
        for index in range(cfg.peers):
            peer_dir = self.run_dir / f"peer-{index}"
            flags = [
                "--join",
                self.join,
                "--host_maddrs",
                f"/ip4/{cfg.host}/tcp/0",
                "--identity_path",
                str(peer_dir / "identity.key"),
                "--backup_dir",
                str(peer_dir / "backups"),
                "--backup_every",
                "10",
                "--batch_size",
                str(cfg.batch_size),
                "--torch_threads",
                str(cfg.threads_per_peer),
                "--seed",
                str(index),
            ]
            if cfg.run_secret_file:  # a closed run: each peer proves the secret to the monitor for its access token
                flags += ["--run_secret_file", cfg.run_secret_file, "--join_url", self.url.rstrip("/")]
            peer_dir.mkdir(parents=True, exist_ok=True)
            self.peers.append(self._spawn(f"peer-{index}", "peer", flags))

    def _check_alive(self, process: subprocess.Popen | None, name: str) -> None:
        if process is not None and process.poll() is not None:
            tail = "\n".join((self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"{name} exited with code {process.returncode}; last lines of its log:\n{tail}")

    def status(self) -> dict | None:
        try:
            with urllib.request.urlopen(self.url + "api/status", timeout=5) as response:
                return json.load(response)
        except (OSError, ValueError):
            return None

    def final_checkpoint(self, timeout: float = 180.0) -> dict | None:
        request = urllib.request.Request(
            self.url + "api/checkpoints", method="POST", headers={"Authorization": f"Bearer {self.admin_token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            print(f"No final checkpoint: the monitor answered {error.code} {error.read().decode(errors='replace')}")
        except (OSError, ValueError) as error:
            print(f"No final checkpoint: {error}")
        return None

    def stop(self) -> None:
        """Peers first (each writes its backup on SIGTERM), then the final checkpoint, then the monitor."""
        print("\nStopping the peers (each writes a backup)...")
        stop_processes(self.peers, timeout=60.0)
        if self.monitor is not None and self.monitor.poll() is None and self.url:
            print("Writing the final checkpoint...")
            entry = self.final_checkpoint()
            if entry:
                print(f"Final checkpoint: epoch {entry.get('epoch')} ({entry.get('url', '')})")
                print(f"Download it with:\n  {download_command(self.url, self.run_key, entry.get('epoch'))}")
        print("Stopping the monitor...")
        stop_processes([self.monitor] if self.monitor else [], timeout=30.0)
        print(f"Stopped. Logs, history, checkpoints and backups are in {self.run_dir}")


def stop_processes(processes: list[subprocess.Popen], timeout: float) -> None:
    """SIGTERM every process, wait, then SIGKILL what is left of its session (p2pd included).

    The signal goes to the process alone, not its group: hivemind's DHT and averager processes would die of it at
    once, leaving the process's own orderly shutdown (cancel averaging, write a backup) waiting for them.
    """
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"process {process.pid} did not stop within {timeout:.0f} s: killing it")
        _signal_group(process, signal.SIGKILL)  # whatever is left of its session (e.g. an orphaned p2pd)
        process.wait()


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint directory under `root` whose files all match its manifest."""
    if not root.is_dir():
        return None
    for directory in sorted(root.glob("epoch-*"), reverse=True):
        if (directory / MANIFEST).is_file() and verify_directory(directory) is None:
            return directory
    return None


def download_command(url: str, run_key: str, epoch: int | None = None) -> str:
    """The command that downloads a checkpoint of this run, verified against its run key."""
    epoch_flag = f" --epoch {epoch}" if epoch is not None else ""
    return f"albert-checkpoint download --from {url.rstrip('/')} --run-key {run_key}{epoch_flag} --out ./checkpoint"


def print_join_command(config: LocalSwarmConfig, join: str, run_key: str, url: str = "") -> None:
    """The line a peer pastes: the join string carries the monitor's addresses, the run id and the run key."""
    print(f"Peers join with:\n  albert-peer --join {join}")
    if config.host != "0.0.0.0":
        print(
            "(this run listens on 127.0.0.1 only: start albert-swarm with --host 0.0.0.0 to let other machines join)"
        )
    if url:
        print(f"The newest checkpoint downloads with:\n  {download_command(url, run_key)}")


def status_line(status: dict | None, started: float) -> str:
    elapsed = time.monotonic() - started
    if not status:
        return f"[{elapsed:6.0f}s] waiting for the monitor..."
    loss = status.get("loss")
    loss_text = f"{loss:.4f}" if isinstance(loss, (int, float)) else "-"
    return (
        f"[{elapsed:6.0f}s] epoch {status.get('epoch', 0)} | loss {loss_text} | "
        f"{status.get('samples_per_second', 0) or 0:.1f} samples/s | {status.get('alive_peers', 0)} peers"
    )


def watch(swarm: LocalSwarm, duration: float, stop_requested) -> None:
    """Print one live status line until the duration is over or a stop is requested; fail if a process dies."""
    started = time.monotonic()
    interactive = sys.stdout.isatty()
    last_printed = 0.0
    while not stop_requested() and not (duration and time.monotonic() - started >= duration):
        swarm._check_alive(swarm.monitor, "monitor")
        for index, peer in enumerate(swarm.peers):
            swarm._check_alive(peer, f"peer-{index}")
        line = status_line(swarm.status(), started)
        if interactive:
            print("\r" + line.ljust(100), end="", flush=True)
        elif time.monotonic() - last_printed >= 10:  # a log file gets a line every 10 s, not a carriage-return soup
            print(line, flush=True)
            last_printed = time.monotonic()
        time.sleep(2)
    print()


def main(args: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (config,) = parse_configs(LocalSwarmConfig, args=args)
    swarm = LocalSwarm(config)
    swarm.logs.mkdir(parents=True, exist_ok=True)
    stopping = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.append(True))
    exit_code = 0
    try:
        print(f"Starting the monitor (logs in {swarm.logs})...")
        swarm.start_monitor()
        swarm.start_peers()
        print(f"Dashboard: {swarm.url}")
        print_join_command(config, swarm.join, swarm.run_key, swarm.url)
        print(f"{config.peers} peers training the '{config.model}' preset; Ctrl-C stops the run.")
        watch(swarm, config.duration, lambda: bool(stopping))
    except RuntimeError as error:
        print(f"\nalbert-swarm: {error}", file=sys.stderr)
        exit_code = 1
    finally:
        swarm.stop()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
