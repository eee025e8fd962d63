"""The synchronous mode's gradient all-reduce is counted too: two real peers (CLI, default scaled-fp16 gradients)
export ``albert_peer_allreduce_bytes_total`` on /metrics, in the order of bytes their epochs' rounds must move."""

from __future__ import annotations

import pytest

from tests.harness import allreduce_bytes, free_port

pytestmark = [pytest.mark.slow]

EPOCHS = 4


@pytest.fixture(scope="module")
def swarm(make_swarm):
    swarm = make_swarm()
    swarm.metrics_ports = {name: free_port() for name in ("a", "b")}
    for name, port in swarm.metrics_ports.items():
        swarm.start_peer(name, ["--metrics_port", str(port)])
    swarm.wait_for_epoch(EPOCHS, peers=2, timeout=240)
    return swarm


@pytest.mark.timeout(120)
def test_gradient_allreduce_bytes_are_counted(swarm):
    peer = swarm.peers["a"]
    model = peer.parameters(peer.backup_epochs()[-1])
    # every floating tensor of the model's state dict: more than the trainable parameters (1.62 M values in tiny),
    # so an upper bound of one round's gradient; measured: 9,736,224 B each way by epoch 4, ~3 two-peer rounds
    fp16_bytes = 2 * sum(tensor.numel() for tensor in model.values() if tensor.is_floating_point())
    for name, port in swarm.metrics_ports.items():
        counted = allreduce_bytes(port)
        epoch = swarm.peers[name].backup_epochs()[-1]
        print(f"peer {name} at epoch {epoch}: {counted}, one fp16 gradient {fp16_bytes} B")
        # a 2-peer round moves about one gradient each way (a share of the parts plus the deltas of the other share);
        # at least two of the first EPOCHS rounds had both peers, and no round moves over two gradients each way
        for direction in ("sent", "received"):
            assert 0.5 * fp16_bytes <= counted[direction] <= (epoch + 2) * 2.05 * fp16_bytes, (direction, counted)
