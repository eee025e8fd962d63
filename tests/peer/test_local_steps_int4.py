"""Local-steps mode with 4-bit pseudo-gradients through the CLI: two real peers make outer steps, their loss falls,
each round's log line and /metrics count the all-reduce's bytes, and the backups carry the error-feedback residual.

A module swarm of its own (test_local_steps.py's runs fp16), once per codec: two peers, --local_steps 2,
--grad_compression int4-block, then topk-int4 (int4-block sending 4 of every 128 values, deflated).
"""

from __future__ import annotations

import re
import urllib.request

import pytest
import torch

from tests.harness import allreduce_bytes, free_port, wait_until

pytestmark = [pytest.mark.slow]

FLAGS = ["--local_steps", "2", "--average_state_every", "2"]
# bits per value on the wire: int4-block's 4 + a float32 scale per 128; for topk-int4 a third of that, so that a
# round (up to two pseudo-gradients' worth, sent and received, with hivemind's uneven split) stays within two thirds
# of int4-block's one (measured here: 345 kB sent and received a round, against int4-block's 1.72 MB: 0.20)
MOST_BITS = {"int4-block": 4.25, "topk-int4": 4.25 / 3}
ROUND_LINE = re.compile(r"averaged pseudo-gradients with 2 peers, sent (\d+) B, received (\d+) B")


@pytest.fixture(scope="module", params=sorted(MOST_BITS))
def swarm(make_swarm, request):
    swarm = make_swarm()
    swarm.codec = request.param
    swarm.metrics_ports = {name: free_port() for name in ("a", "b")}
    for name, port in swarm.metrics_ports.items():
        swarm.start_peer(name, [*FLAGS, "--grad_compression", swarm.codec, "--metrics_port", str(port)])
    swarm.wait_for_epoch(8, peers=2, timeout=240)
    return swarm


@pytest.mark.timeout(300)
def test_int4_peers_make_outer_steps_and_their_loss_falls(swarm):
    early, late = swarm.early_and_late_loss()
    print(f"loss: early {early:.3f}, late {late:.3f}")
    assert late < early - 0.5, (early, late)


@pytest.mark.timeout(120)
def test_each_round_counts_at_most_an_eighth_of_fp32(swarm):
    """Two peers: each sends about half the pseudo-gradient to the other's reducer plus the deltas of the half it
    reduces, so about one pseudo-gradient's worth, at 4.25 bits a value (4 + a float32 scale per 128) in int4-block,
    at most a third of that in topk-int4."""
    peer = swarm.peers["a"]
    outer = torch.load(peer.backup_dir / f"epoch-{peer.backup_epochs()[-1]:06d}.pt", weights_only=True)["local_steps"]
    values = sum(tensor.numel() for tensor in outer["outer"])  # the pseudo-gradient's values
    bits = MOST_BITS[swarm.codec]
    # a sparse round's bytes depend on how the peers' supports overlap: no floor but hivemind's split for int4-block
    least = 0.25 * values * bits / 8 if swarm.codec == "int4-block" else 0
    for name, port in swarm.metrics_ports.items():
        rounds = [(int(sent), int(received)) for sent, received in ROUND_LINE.findall(swarm.peers[name].log_text())]
        assert rounds, f"peer {name} logged no 2-peer round"
        total_sent, total_received = (sum(column) for column in zip(*rounds))
        print(f"{swarm.codec} peer {name}: {len(rounds)} rounds, per round {rounds[:3]}..., fp32 {4 * values} B")
        # hivemind splits the vector in proportion to the peers' bandwidth, by whole parts: 25-75% each way
        for sent, received in rounds:
            assert least <= sent + received <= 2 * 1.01 * values * bits / 8, (sent, received)
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


@pytest.mark.timeout(60)
def test_the_outer_resync_bytes_are_counted_apart(swarm):
    """The re-sync of weights and momentum (every 2 outer steps here, uncompressed) has its own counter: as many
    bytes as values (x 4 bytes, x 2 tensors each) in one round of two, within hivemind's uneven split."""
    peer = swarm.peers["a"]
    outer = torch.load(peer.backup_dir / f"epoch-{peer.backup_epochs()[-1]:06d}.pt", weights_only=True)["local_steps"]
    values = sum(tensor.numel() for tensor in outer["outer"])
    for name, port in swarm.metrics_ports.items():
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        sent, received = (
            float(
                re.search(rf'^albert_peer_state_round_bytes_total{{direction="{way}"}} (\S+)$', text, re.MULTILINE)[1]
            )
            for way in ("sent", "received")
        )
        resyncs = len(re.findall(r"Re-synced the outer state with 2 peers", swarm.peers[name].log_text()))
        print(f"peer {name}: {resyncs} re-syncs, state-round bytes sent {sent:.0f}, received {received:.0f}")
        assert resyncs >= 1
        # each re-sync moves between a quarter and twice (weights + momentum) x 4 B each way, by the split
        assert resyncs * 0.25 * 8 * values <= sent + received, (sent, received, values)
