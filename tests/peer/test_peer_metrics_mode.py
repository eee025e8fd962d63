"""A peer's /metrics names its training mode (albert_peer_training_mode_info, with whether its outer rounds overlap)."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from peer.report import PeerMetrics
from peer.swarm.config import OptimConfig


@pytest.mark.parametrize(
    ("optim", "labels"),
    [
        (OptimConfig(), {"mode": "synchronous", "local_steps": "0", "overlap": "false"}),
        (OptimConfig(local_steps=8), {"mode": "local-steps", "local_steps": "8", "overlap": "false"}),
        (
            OptimConfig(local_steps=8, delay_optimizer_step=True),
            {"mode": "local-steps", "local_steps": "8", "overlap": "true"},
        ),
    ],
    ids=["synchronous", "local-steps", "overlapped"],
)
def test_a_peers_metrics_name_its_training_mode(optim, labels):
    metrics = PeerMetrics()
    metrics.show_mode(optim)
    text = generate_latest(metrics.registry).decode()
    found = [sample.labels for family in text_string_to_metric_families(text) for sample in family.samples]
    assert [each for each in found if "mode" in each] == [labels]
