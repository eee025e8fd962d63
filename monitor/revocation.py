"""Closed runs: revoking members the robust reducers keep accusing (opt-in, ``--revoke_above SCORE``).

A score record is signed by a key, and keys are free: one member could sign records with many and frame anyone. So
only members vote: a record counts if its key is one the authority issued a token for (a peer joins with the key it
signs its records with), one vote per join credential (the join key in allowlisted runs, else the RSA key), the lowest
score when a credential reports under several keys, and never on the accused's own credential. Each refresh the votes
give a sender's suspicion, their lower median: above ``--revoke_above`` only when more than half the votes are. A
sender scored by at least ``--revoke_quorum`` votes whose suspicion stays above ``--revoke_above`` for
``--revoke_after`` refreshes in a row is revoked: the decision, with its evidence (each voting member's score of it,
the epoch and rounds of each record), is logged and saved in the monitor's SQLite file, and from then on the
authority (monitor/access.py) issues no token to that peer id, nor to the RSA key or join key it last joined with.
Its current token is not recalled (tokens are signed, not looked up), so it drops out of the run when that token
expires: within ``--token_ttl`` seconds, when the other members' averagers and DHT nodes stop accepting it and its own
peer leaves (peer/swarm/access.py).

Limits: with a shared run secret, a revoked member can come back under a new identity and key (its old ones stay
refused), and one holder of the secret can join under several keys and cast several votes; an allowlist of join keys
makes a revocation stick, since its join key is denied too, and makes one vote per allowlisted key. Members vote only
once this monitor admitted them: after a monitor restart, as their tokens are renewed (within half ``--token_ttl``).
Decisions stay until an operator deletes the row (``DELETE FROM revocations WHERE peer_id = '...'`` in the monitor's
SQLite file): each check reads the table, so the pardon applies at once.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import statistics
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

from monitor.suspicion import MAX_SUSPECTS, Suspect
from peer.swarm.progress import peer_label
from peer.swarm.scores import ScoreRecord

MAX_EVIDENCE = 32  # reporters kept in a decision's evidence (highest scores first): bounded whatever the DHT holds
MAX_SHOWN = 64  # decisions the API and dashboard show (newest first); the table keeps them all
MAX_REMEMBERED = 4096  # peer ids whose last join credential the authority remembers (to deny their keys, to vote)
OWNER_PREFIX, OWNER_SUFFIX = b"[owner:", b"]"  # how hivemind's RSASignatureValidator marks a key in a record's subkey

SCHEMA = """
CREATE TABLE IF NOT EXISTS revocations (
    peer_id TEXT PRIMARY KEY, time REAL NOT NULL, suspicion REAL NOT NULL, reporters INTEGER NOT NULL,
    refreshes INTEGER NOT NULL, threshold REAL NOT NULL, public_key TEXT NOT NULL, join_key TEXT NOT NULL,
    evidence TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Revocation:
    """One decision: who, when, on what suspicion (the median over `reporters`), after how many refreshes above
    `threshold`, and the evidence (each reporter's record: who reported, its epoch, rounds and score of the peer).
    `public_key` and `join_key` are what the peer last joined with ("" if unknown or none): denied too."""

    peer_id: str
    time: float
    suspicion: float
    reporters: int
    refreshes: int
    threshold: float
    public_key: str
    join_key: str
    evidence: tuple[dict, ...]

    def as_dict(self) -> dict:
        """The decision for the API (the keys themselves left out: their fingerprints say which)."""
        found = asdict(self)
        found["evidence"] = list(self.evidence)
        for name in ("public_key", "join_key"):
            found[name] = fingerprint(found[name].encode()) if found[name] else ""
        return found

    def summary(self) -> str:
        """The log line's evidence: each reporter's score, at which epoch."""
        reports = ", ".join(
            f"{item['reporter']} scored {item['score']:.3g} at epoch {item['epoch']}" for item in self.evidence
        )
        return (
            f"suspicion {self.suspicion:.3g} (lower median of {self.reporters} members' votes) above "
            f"{self.threshold:g} for {self.refreshes} refreshes; {reports}"
        )


@dataclass(frozen=True)
class Voter:
    """A reporter this monitor admitted: its peer id and the credential it votes as (a fingerprint)."""

    peer_id: str
    credential: str


def fingerprint(key: bytes) -> str:
    """A short stable name of a public key (reporters are keyed by theirs)."""
    return hashlib.sha256(key).hexdigest()[:16]


def evidence(records: dict[bytes, ScoreRecord], peer_id: str) -> tuple[dict, ...]:
    """Every reporter's claim about `peer_id`, highest score first (at most MAX_EVIDENCE)."""
    claims = [
        {
            "reporter": fingerprint(owner),
            "epoch": record.epoch,
            "rounds": record.rounds,
            "score": record.scores[peer_id],
        }
        for owner, record in records.items()
        if peer_id in record.scores
    ]
    claims.sort(key=lambda claim: -claim["score"])
    return tuple(claims[:MAX_EVIDENCE])


def member_votes(records: dict[bytes, ScoreRecord], store: RevocationStore) -> dict[str, dict[str, float]]:
    """Per scored sender, one score per member credential: the lowest when a credential reports under several keys.
    Records of keys the authority did not admit (or of revoked members) count for nothing, nor a vote on oneself."""
    votes: dict[str, dict[str, float]] = {}
    for owner, record in records.items():
        voter = store.voter(owner)
        if voter is None:
            continue
        for sender, score in record.scores.items():
            if sender == voter.peer_id or store.credential(sender) == voter.credential:
                continue
            ballot = votes.setdefault(sender, {})
            ballot[voter.credential] = min(score, ballot.get(voter.credential, score))
    return votes


def member_suspects(
    records: dict[bytes, ScoreRecord], store: RevocationStore, threshold: float
) -> tuple[Suspect, ...]:
    """Every sender members voted on, highest suspicion first (at most MAX_SUSPECTS): its suspicion is the lower
    median of the votes, above ``threshold`` only when more than half of them are; ``reporters`` counts the votes."""
    rows = []
    for sender, ballot in member_votes(records, store).items():
        suspicion = statistics.median_low(ballot.values())
        rows.append(Suspect(sender, suspicion, len(ballot), suspicion > threshold))
    rows.sort(key=lambda row: (-row.suspicion, row.peer_id))
    return tuple(rows[:MAX_SUSPECTS])


class RevocationPolicy:
    """Counts, per sender, the refreshes in a row its suspicion was above the threshold with a quorum of votes; says
    whom to revoke.

    Args:
        threshold: the suspicion above which a refresh counts (``--revoke_above``).
        refreshes: how many in a row revoke (``--revoke_after``).
        quorum: the fewest votes a refresh counts with (``--revoke_quorum``).
    """

    def __init__(self, threshold: float, refreshes: int, quorum: int):
        self.threshold, self.refreshes, self.quorum = threshold, refreshes, quorum
        self._streaks: dict[str, int] = {}

    def observe(self, suspects: tuple[Suspect, ...]) -> list[tuple[Suspect, int]]:
        """One refresh's suspects (member_suspects) -> those whose streak reached `refreshes` now (with the streak).
        A sender missing from a refresh, scored by fewer than `quorum` votes, or at or below the threshold starts
        again from zero."""
        above = {
            suspect.peer_id: suspect
            for suspect in suspects
            if suspect.suspicion > self.threshold and suspect.reporters >= self.quorum
        }
        self._streaks = {peer_id: self._streaks.get(peer_id, 0) + 1 for peer_id in above}  # bounded like suspects
        return [(above[peer_id], streak) for peer_id, streak in self._streaks.items() if streak == self.refreshes]


class RevocationStore:
    """The revocations table in the monitor's SQLite file (its own connections, like the other tables).

    Args:
        path: the monitor's database file.
    """

    def __init__(self, path: str | Path):
        self._lock = threading.Lock()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)
        self._credentials: OrderedDict[str, tuple[bytes, bytes]] = OrderedDict()
        self._peer_of_key: dict[bytes, str] = {}  # the key each remembered peer id last joined with -> that peer id

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def joined(self, peer_id: str, public_key: bytes, join_key: bytes) -> None:
        """Remember the credential a peer id last joined with (the newest MAX_REMEMBERED peer ids)."""
        with self._lock:
            previous_key, _ = self._credentials.get(peer_id, (b"", b""))
            self._forget_key(previous_key, peer_id)
            self._credentials[peer_id] = (public_key, join_key)
            self._credentials.move_to_end(peer_id)
            self._peer_of_key[public_key] = peer_id
            while len(self._credentials) > MAX_REMEMBERED:
                forgotten_id, (forgotten_key, _) = self._credentials.popitem(last=False)
                self._forget_key(forgotten_key, forgotten_id)

    def _forget_key(self, key: bytes, peer_id: str) -> None:
        """Drop ``key``'s vote for ``peer_id`` (not the vote of another peer id that joined with it since)."""
        if self._peer_of_key.get(key) == peer_id:
            del self._peer_of_key[key]

    def credential(self, peer_id: str) -> str | None:
        """The fingerprint a remembered peer id votes as (its join key, else its RSA key), or None."""
        with self._lock:
            public_key, join_key = self._credentials.get(peer_id, (b"", b""))
        chosen = join_key or public_key
        return fingerprint(chosen) if chosen else None

    def contributors_of_members(self) -> dict[str, str]:
        """The contributor id (peer/swarm/progress.py ``peer_label``) of each remembered member's peer id: its records
        are signed by the RSA key it joined with, which its join request proved it holds (peer/swarm/peer_identity.py)."""
        with self._lock:
            keys = {peer_id: public_key for peer_id, (public_key, _) in self._credentials.items()}
        return {peer_id: peer_label(OWNER_PREFIX + key + OWNER_SUFFIX) for peer_id, key in keys.items() if key}

    def voter(self, owner: bytes) -> Voter | None:
        """The member a record's owner (its DHT subkey) is, or None: a key this authority admitted no peer with, one
        its peer id has since replaced by another, or a revoked member's."""
        if not (owner.startswith(OWNER_PREFIX) and owner.endswith(OWNER_SUFFIX)):
            return None
        with self._lock:
            peer_id = self._peer_of_key.get(owner[len(OWNER_PREFIX) : -len(OWNER_SUFFIX)])
        if peer_id is None or self.refusal(peer_id, b"") is not None:
            return None
        return Voter(peer_id, self.credential(peer_id))

    def member_records(self, records: dict[bytes, ScoreRecord]) -> dict[bytes, ScoreRecord]:
        """The records that vote (see member_votes): a decision's evidence."""
        return {owner: record for owner, record in records.items() if self.voter(owner) is not None}

    def revoke(self, suspect: Suspect, streak: int, threshold: float, records: dict[bytes, ScoreRecord]) -> Revocation:
        """Save the decision (a peer already revoked keeps its first decision) and return it."""
        with self._lock:
            public_key, join_key = self._credentials.get(suspect.peer_id, (b"", b""))
        decision = Revocation(
            peer_id=suspect.peer_id,
            time=time.time(),
            suspicion=suspect.suspicion,
            reporters=suspect.reporters,
            refreshes=streak,
            threshold=threshold,
            public_key=public_key.decode(errors="replace"),
            join_key=join_key.decode(errors="replace"),
            evidence=evidence(records, suspect.peer_id),
        )
        row = asdict(decision)
        row["evidence"] = json.dumps(list(decision.evidence))
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO revocations VALUES (:peer_id, :time, :suspicion, :reporters, :refreshes, "
                ":threshold, :public_key, :join_key, :evidence)",
                row,
            )
        return decision

    def refusal(self, peer_id: str, public_key: bytes, join_key: bytes = b"") -> str | None:
        """Why this join must be refused (its peer id, key or join key was revoked), or None."""
        keys = [key.decode(errors="replace") for key in (public_key, join_key) if key]
        query = "SELECT peer_id, time FROM revocations WHERE peer_id = ?"
        if keys:
            marks = ", ".join("?" * len(keys))
            query += f" OR public_key IN ({marks}) OR join_key IN ({marks})"
        with self._lock:
            row = self._db.execute(query, [peer_id, *keys, *keys]).fetchone()
        if row is None:
            return None
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(row["time"]))
        return f"revoked from this run at {when} (peer {row['peer_id']}): its robust reducers' scores accused it"

    def count(self) -> int:
        """Every decision in the table (all() shows the newest MAX_SHOWN)."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM revocations").fetchone()[0])

    def all(self, limit: int = MAX_SHOWN) -> list[Revocation]:
        """The newest `limit` decisions, newest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM revocations ORDER BY time DESC LIMIT ?", (limit,)).fetchall()
        return [Revocation(**{**dict(row), "evidence": tuple(json.loads(row["evidence"]))}) for row in rows]
