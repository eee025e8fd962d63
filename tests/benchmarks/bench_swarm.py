"""Benchmark (run by hand): one peer alone vs two peers on loopback, each with one thread, per model preset.

Prints samples/s per peer, the fraction of wall time spent computing gradients (vs matchmaking and averaging), and
the bytes each peer sent per averaging round next to the bandwidth-optimal 2*P*b. Measures; never asserts.

    python tests/benchmarks/bench_swarm.py --presets tiny base --seconds 120
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.harness import free_port, process_group_members

WIRE_BYTES = {"none": 4, "fp16": 2, "scaled-fp16": 2}


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {name: float(value) for name, value in re.findall(r"^(albert_peer_\w+) ([0-9.e+-]+)$", text, re.MULTILINE)}


def bytes_sent(pgid: int) -> int:
    """TCP bytes sent by the p2pd daemons of one peer's process group (from ss -tinp)."""
    pids = {str(pid) for pid in process_group_members(pgid)}
    output = subprocess.run(["ss", "-tinpH"], check=False, capture_output=True, text=True).stdout
    total, owner = 0, None
    for line in output.splitlines():
        if not line.startswith(("\t", " ")):
            match = re.search(r'"p2pd",pid=(\d+)', line)
            owner = match.group(1) if match else None
        elif owner in pids:
            found = re.search(r"bytes_sent:(\d+)", line)
            total += int(found.group(1)) if found else 0
    return total


class BenchPeer:
    def __init__(self, name: str, workdir: Path, initial_peers: list[str], flags: list[str]):
        self.port, self.log_path = free_port(), workdir / f"{name}.log"
        command = [
            sys.executable,
            "-m",
            "peer",
            "--run_id",
            "bench",
            "--host_maddrs",
            "/ip4/127.0.0.1/tcp/0",
            "--torch_threads",
            "1",
            "--metrics_port",
            str(self.port),
            "--backup_dir",
            str(workdir / name),
            "--backup_every",
            "0",
            *flags,
        ]
        if initial_peers:
            command += ["--initial_peers", *initial_peers]
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            stdout=open(self.log_path, "w"),  # noqa: SIM115 (the child owns the log for its lifetime)
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )

    def maddrs(self, timeout: float = 300) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"others can join via: (.*)$", self.log_path.read_text(), re.MULTILINE)
            if found:
                return found.group(1).split()
            time.sleep(0.5)
        raise TimeoutError(f"peer did not start; see {self.log_path}")

    def metrics(self) -> dict[str, float]:
        return scrape(self.port)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        finally:
            for pid in process_group_members(self.process.pid):
                subprocess.run(["kill", "-9", str(pid)], check=False)


def wait_for_epoch(peer: BenchPeer, epoch: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if peer.metrics().get("albert_peer_epoch", 0) >= epoch:
                return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"no epoch {epoch} within {timeout} s; see {peer.log_path}")


def measure(preset: str, num_peers: int, seconds: float, flags: list[str], parameters: int, wire_bytes: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{preset}-{num_peers}-"))
    peers = [BenchPeer("p0", workdir, [], flags)]
    try:
        for index in range(1, num_peers):
            peers.append(BenchPeer(f"p{index}", workdir, peers[0].maddrs(), flags))
        for peer in peers:
            wait_for_epoch(peer, 1, timeout=600)  # start measuring once every peer trains in the swarm
        start = [(time.monotonic(), peer.metrics(), bytes_sent(peer.process.pid)) for peer in peers]
        time.sleep(seconds)
        for peer, (started, before, sent_before) in zip(peers, start):
            after, wall = peer.metrics(), time.monotonic() - started
            delta = {name: after.get(name, 0) - before.get(name, 0) for name in after}
            rounds = max(delta.get("albert_peer_epoch", 0), 1)
            sent = (bytes_sent(peer.process.pid) - sent_before) / rounds
            print(
                f"{preset:5s} peers={num_peers} {peer.log_path.stem}: "
                f"{delta['albert_peer_samples_total'] / wall:7.2f} samples/s | "
                f"computing {delta['albert_peer_compute_seconds_total'] / wall:6.1%} of wall time | "
                f"{delta.get('albert_peer_epoch', 0):.0f} epochs | sent {sent / 1e6:8.2f} MB/round "
                f"(2*P*b = {2 * parameters * wire_bytes / 1e6:.2f} MB)"
            )
    finally:
        for peer in peers:
            peer.stop()


def count_parameters(preset: str) -> int:
    from data import load_tokenizer, model_overrides_from_tokenizer
    from model import LeanAlbertForMaskedLM, load_config

    config = load_config(preset, **model_overrides_from_tokenizer(load_tokenizer(None)))
    return sum(param.numel() for param in LeanAlbertForMaskedLM(config).parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "base"])
    parser.add_argument("--seconds", type=float, default=120, help="measurement window per configuration")
    parser.add_argument("--target-batch-size", type=int, nargs="+", default=[256, 64], help="one per preset")
    parser.add_argument("--no-delay", action="store_true", help="measure without delayed averaging")
    args = parser.parse_args()
    for preset, target in zip(args.presets, args.target_batch_size * len(args.presets)):
        flags = [
            "--model",
            preset,
            "--target_batch_size",
            str(target),
            "--matchmaking_time",
            "5",
            "--batch_size",
            "8",
            "--max_length",
            "128",
        ]
        if not args.no_delay:
            flags += ["--delay_optimizer_step", "--delay_grad_averaging"]
        parameters = count_parameters(preset)
        print(f"{preset}: {parameters / 1e6:.1f} M parameters, target batch {target}, flags {' '.join(flags)}")
        for num_peers in (1, 2):
            measure(preset, num_peers, args.seconds, flags, parameters, WIRE_BYTES["scaled-fp16"])


if __name__ == "__main__":
    main()
