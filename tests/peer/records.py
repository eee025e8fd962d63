"""Honest-looking progress records for the peer tests (a test changes the fields it is about)."""

from __future__ import annotations

from hivemind.utils import get_dht_time

from peer.swarm.progress import ProgressRecord


def record(epoch: int = 3, **changes) -> ProgressRecord:
    values = {
        "epoch": epoch,
        "samples_per_second": 12.5,
        "samples_accumulated": 64,
        "loss_sum": 18.0,
        "mini_steps": 2,
        "device": "cpu",
        "version": "dev",
        "time": float(get_dht_time()),
        "model_hash": "0123456789abcdef",
    }
    return ProgressRecord(**{**values, **changes})
