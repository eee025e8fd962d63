"""The monitor's live view of its run: written by the refresh loop, read by the HTTP server and the metrics."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from monitor.aggregate import EMPTY_SNAPSHOT, SwarmSnapshot
from monitor.revocation import Revocation
from monitor.suspicion import Suspect

MAX_REFUSED_PEERS = 64  # refused peers shown (API); a stranger can make any number of keys, so the rest are counted


@dataclass
class LiveState:
    """Shared state of a running monitor; the refresh loop replaces `snapshot` whole, readers never see half of it.

    Args:
        run_id: the run this monitor serves.
        initial_peers: this monitor's multiaddrs, exactly as peers pass them to --initial-peers.
        model: what identifies the run's model (preset or path, fingerprint), shown on the dashboard.
        join: the join string peers start with (`--join` / ALBERT_JOIN), "" if none.
        mode: the run's training mode (name, local_steps H, a label for people), shown on the dashboard.
    """

    run_id: str
    initial_peers: Sequence[str] = ()
    model: dict = field(default_factory=dict)
    join: str = ""
    mode: dict = field(default_factory=dict)
    snapshot: SwarmSnapshot = EMPTY_SNAPSHOT
    invalid_records_total: int = 0  # records that failed validation, since this monitor started
    # the same, by reason (signature, size, schema, range, future, epoch, too_many, other)
    invalid_by_reason: Counter = field(default_factory=Counter)
    refused_records_total: int = 0  # valid records from peers whose model or protocol version differs from the run's
    refused_peers: dict = field(default_factory=dict)  # peer id -> why its records are not aggregated (capped)
    last_refresh: float = 0.0  # wall time of the last successful refresh (0: none yet)
    refresh_errors: int = 0  # refreshes (or run-loop turns) that failed for any reason, since this monitor started
    state_epoch: int = -1  # epoch of the training state this monitor holds and shares (-1: none)
    suspects: tuple[Suspect, ...] = ()  # senders the robust reducers scored, most suspicious first (bounded)
    revocations: tuple[Revocation, ...] = ()  # closed runs: members revoked for their scores, newest first
    revoked_count: int = 0  # every revocation decision (revocations holds the newest few)
    # closed runs: each admitted member's contributor id by libp2p peer id (the scores name peer ids, the contributors
    # table signing keys; the member's proven join ties the two)
    contributor_of_peer: dict[str, str] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def update(
        self,
        snapshot: SwarmSnapshot,
        invalid: int,
        refused: dict,
        invalid_by_reason: Mapping[str, int] | None = None,
        refused_count: int | None = None,
    ) -> None:
        """Publish a refresh: its snapshot, the records it refused (`refused_count` defaults to len(refused))."""
        with self.lock:
            self.snapshot = snapshot
            self.invalid_records_total += invalid
            self.invalid_by_reason.update(invalid_by_reason or {})
            self.refused_records_total += len(refused) if refused_count is None else refused_count
            self.refused_peers = dict(list(refused.items())[:MAX_REFUSED_PEERS])
            self.last_refresh = time.time()

    @property
    def initial_peers_string(self) -> str:
        return " ".join(self.initial_peers)
