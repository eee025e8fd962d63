"""The monitor's live view of its run: written by the refresh loop, read by the HTTP server and the metrics."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from monitor.aggregate import EMPTY_SNAPSHOT, SwarmSnapshot


@dataclass
class LiveState:
    """Shared state of a running monitor; the refresh loop replaces `snapshot` whole, readers never see half of it.

    Args:
        run_id: the run this monitor serves.
        initial_peers: this monitor's multiaddrs, exactly as peers pass them to --initial-peers.
        model: what identifies the run's model (preset or path, fingerprint), shown on the dashboard.
    """

    run_id: str
    initial_peers: Sequence[str] = ()
    model: dict = field(default_factory=dict)
    snapshot: SwarmSnapshot = EMPTY_SNAPSHOT
    invalid_records_total: int = 0  # records that failed validation, since this monitor started
    refused_records_total: int = 0  # valid records from peers whose model does not match the run
    refused_peers: dict = field(default_factory=dict)  # peer id -> why its records are not aggregated
    last_refresh: float = 0.0  # wall time of the last successful refresh (0: none yet)
    refresh_errors: int = 0
    state_epoch: int = -1  # epoch of the training state this monitor holds and shares (-1: none)
    started_at: float = field(default_factory=time.time)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def update(self, snapshot: SwarmSnapshot, invalid: int, refused: dict) -> None:
        with self.lock:
            self.snapshot = snapshot
            self.invalid_records_total += invalid
            self.refused_records_total += len(refused)
            self.refused_peers = dict(refused)
            self.last_refresh = time.time()

    @property
    def initial_peers_string(self) -> str:
        return " ".join(self.initial_peers)
