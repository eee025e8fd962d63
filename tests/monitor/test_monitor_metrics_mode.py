"""/metrics names the run's training mode (albert_swarm_training_mode_info), as /api/status and the dashboard do."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor.checkpoint import CheckpointStore
from monitor.history import History
from monitor.live import LiveState
from monitor.metrics import make_registry
from monitor.node import training_mode
from monitor.server import ServerThread, create_app
from peer.swarm.config import OptimConfig
from peer.swarm.run_key import RunKey


def info_labels(text: str, name: str) -> list[dict]:
    return [
        sample.labels
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and sample.value == 1.0
    ]


@pytest.mark.parametrize(
    ("optim", "labels"),
    [
        (OptimConfig(), {"mode": "synchronous", "local_steps": "0"}),
        (OptimConfig(local_steps=32), {"mode": "local-steps", "local_steps": "32"}),
    ],
    ids=["synchronous", "local-steps"],
)
def test_the_monitors_metrics_over_http_name_the_training_mode(tmp_path, optim, labels):
    history = History(tmp_path / "history.sqlite")
    store = CheckpointStore(tmp_path / "checkpoints", history, keep=2, run_key=RunKey.load_or_create(tmp_path / "k"))
    live = LiveState(run_id="mode-run", mode=training_mode(optim))
    thread = ServerThread(create_app(live, history, store, make_registry(live, store)), "127.0.0.1", 0)
    thread.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{thread.port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        thread.stop()
        history.close()
    assert info_labels(text, "albert_swarm_training_mode_info") == [labels]
