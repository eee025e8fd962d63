"""Which members the robust reducers accuse: the score records of the run (peer/swarm/scores.py) combined per sender.

Every reducer scores the senders of the parts it reduced (distance to the robust centre over the median distance:
honest about 1, a sign flipper x1000 about 1000). A record is its owner's claim only, so a sender's suspicion is the
median of the scores the reporters gave it: an attacker scoring itself 0 or framing an honest peer moves the median
only when reporters like it are half of those that scored the sender. A pure function, no I/O; its output is bounded
(MAX_SUSPECTS rows) however many keys the DHT holds.

A record names senders by libp2p peer id while progress records are keyed by their signing key: in a closed run the
members' proven joins tie the two (RevocationStore.contributors_of_members), so the dashboard shows a member's
suspicion in its contributor row; in an open run nothing ties them. Limits: keys are free, so colluding reporters (or one
member signing under many keys) can frame or clear anyone they outnumber here. This table only informs: a revocation
counts admitted members' votes alone (monitor/revocation.py).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from peer.swarm.scores import ScoreRecord

# Honest senders score about 1 (measured on the tiny preset: up to 3.4 with 4-5 peers, 9.3 with 8, where sparse
# embedding gradients differ most); the attacks of tests/peer/byzantine.py score 100-1000. 10 separates them.
SUSPICION_THRESHOLD = 10.0
MAX_SUSPECTS = 64  # rows kept (highest suspicion first); a flood of keys cannot grow the table


@dataclass(frozen=True)
class Suspect:
    """One sender as the reducers see it: the median of their scores, how many scored it, and whether it is
    above SUSPICION_THRESHOLD."""

    peer_id: str
    suspicion: float
    reporters: int
    suspicious: bool

    def as_dict(self) -> dict:
        return {
            "peer_id": self.peer_id,
            "suspicion": self.suspicion,
            "reporters": self.reporters,
            "suspicious": self.suspicious,
        }


def suspects(records: Iterable[ScoreRecord], threshold: float = SUSPICION_THRESHOLD) -> list[Suspect]:
    """Every scored sender, highest suspicion first (at most MAX_SUSPECTS)."""
    claims: dict[str, list[float]] = {}
    for record in records:
        for peer_id, score in record.scores.items():
            claims.setdefault(peer_id, []).append(score)
    rows = [
        Suspect(peer_id, statistics.median(scores), len(scores), statistics.median(scores) > threshold)
        for peer_id, scores in claims.items()
    ]
    rows.sort(key=lambda row: (-row.suspicion, row.peer_id))
    return rows[:MAX_SUSPECTS]
