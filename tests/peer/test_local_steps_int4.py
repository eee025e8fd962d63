"""Local-steps mode with 4-bit pseudo-gradients through the CLI: two real peers make outer steps, their loss falls,
each round's log line and /metrics count the all-reduce's bytes, and the backups carry the error-feedback residual.

A module swarm of its own (test_local_steps.py's runs fp16): two peers, --local_steps 2, --grad_compression
int4-block.
"""

from __future__ import annotations

import re
import urllib.request

import pytest
import torch

from tests.harness import allreduce_bytes, free_port, wait_until

pytestmark = [pytest.mark.slow]

FLAGS = ["--local_steps", "2", "--grad_compression", "int4-block", "--average_state_every", "2"]
ROUND_LINE = re.compile(r"averaged pseudo-gradients with 2 peers, sent (\d+) B, received (\d+) B")


@pytest.fixture(scope="module")
def swarm(make_swarm):
    swarm = make_swarm()
    swarm.metrics_ports = {name: free_port() for name in ("a", "b")}
    for name, port in swarm.metrics_ports.items():
        swarm.start_peer(name, [*FLAGS, "--metrics_port", str(port)])
    swarm.wait_for_epoch(8, peers=2, timeout=240)
    return swarm


@pytest.mark.timeout(300)
def test_int4_peers_make_outer_steps_and_their_loss_falls(swarm):
    early, late = swarm.early_and_late_loss()
    print(f"loss: early {early:.3f}, late {late:.3f}")
    assert late < early - 0.5, (early, late)


@pytest.mark.timeout(120)
def test_each_round_counts_about_an_eighth_of_fp32(swarm):
    """Two peers: each sends about half the pseudo-gradient to the other's reducer plus the deltas of the half it
    reduces, so about one pseudo-gradient's worth, at 4.25 bits a value (4 + a float32 scale per 128)."""
    peer = swarm.peers["a"]
    outer = torch.load(peer.backup_dir / f"epoch-{peer.backup_epochs()[-1]:06d}.pt", weights_only=True)["local_steps"]
    values = sum(tensor.numel() for tensor in outer["outer"])  # the pseudo-gradient's values
    for name, port in swarm.metrics_ports.items():
        rounds = [(int(sent), int(received)) for sent, received in ROUND_LINE.findall(swarm.peers[name].log_text())]
        assert rounds, f"peer {name} logged no 2-peer round"
        total_sent, total_received = (sum(column) for column in zip(*rounds))
        print(f"peer {name}: {len(rounds)} rounds, per round {rounds[:3]}..., fp32 would be {4 * values} B")
        # hivemind splits the vector in proportion to the peers' bandwidth, by whole parts: 25-75% each way
        for sent, received in rounds:
            assert 0.25 * values * 4.25 / 8 <= sent + received <= 2 * 1.01 * values * 4.25 / 8, (sent, received)
        # /metrics counts the same bytes (its totals include rounds after the log line was read, and 1-peer ones)
        wait_until(lambda: allreduce_bytes(port).get("sent", 0) >= total_sent, 30, "metrics to catch up")  # noqa: B023
        assert allreduce_bytes(port)["received"] >= total_received


@pytest.mark.timeout(60)
def test_backups_hold_the_error_feedback_residual(swarm):
    peer = swarm.peers["a"]
    state = torch.load(peer.backup_dir / f"epoch-{peer.backup_epochs()[-1]:06d}.pt", weights_only=True)
    residual, outer = state["local_steps"]["residual"], state["local_steps"]["outer"]
    assert [r.shape for r in residual] == [o.shape for o in outer]
    assert all(bool(torch.isfinite(r).all()) for r in residual)
    assert sum(float(r.abs().sum()) for r in residual) > 0  # 4-bit rounding left something to send next round


@pytest.mark.timeout(60)
def test_the_inner_steps_time_is_exported_beside_forward_and_backward(swarm):
    """/metrics counts the inner optimizer's seconds apart (bench_wan's utilisation adds them to forward and
    backward): more than nothing, less than the forward and backward of the same batches on this model."""
    for name, port in swarm.metrics_ports.items():
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        inner = float(re.search(r"^albert_peer_inner_step_seconds_total (\S+)$", text, re.MULTILINE).group(1))
        compute = float(re.search(r"^albert_peer_compute_seconds_total (\S+)$", text, re.MULTILINE).group(1))
        print(f"peer {name}: {inner:.2f} s in inner steps, {compute:.2f} s in forward and backward")
        assert 0 < inner < compute, (inner, compute)
