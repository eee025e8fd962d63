"""Aggregate the swarm's validated progress reports into one snapshot: a pure function, no I/O, no clock.

The monitor calls `aggregate` every refresh period with the reports it just read from the DHT, the previous
snapshot (which carries the per-peer contribution ledger) and the current time.

Every report comes from a stranger who can sign anything, so before a report counts it must be:
- in range (the bounds of peer/swarm/progress.py: finite, so no sum overflows or turns to inf),
- not from the future beyond MAX_CLOCK_SKEW (a future-dated record would stay "alive" until its date: a ghost),
- at an epoch someone else vouches for. Epoch rule: a report's epoch E is accepted if
  E <= (highest epoch among the OTHER usable alive reports) + MAX_EPOCH_LEAD, or
  E <= (epoch of the state the monitor holds, 0 if none) + held_lead.
  One hostile peer among honest ones is vouched for by no one beyond MAX_EPOCH_LEAD over the honest peers, so it can
  raise the run's epoch by at most that much; a monitor restarted with a fresh run dir follows a swarm far ahead,
  because honest peers vouch for each other (and a lone peer is vouched for by the state the monitor downloads first).
  Limits: keys are free in an open run, so two colluding keys vouch for each other and can move the run's epoch
  (a closed run limits keys to credential holders); a lone stranger can reach held + held_lead; and when nobody
  vouched for is alive, an unvouched claim makes the monitor try a download (at most once a minute, monitor/node.py).
Refused reports are counted by reason ("range", "future", "epoch") in the snapshot.
Sums saturate at MAX_TOTAL and the peers table keeps at most `max_rows` rows (alive and biggest contributors first),
so neither a flood of keys nor a long run can make a value unstorable or a table unbounded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from peer.swarm.clock import MAX_CLOCK_SKEW
from peer.swarm.progress import MAX_COUNT, MAX_MINI_STEP_LOSS, MAX_SAMPLES_PER_SECOND

LAGGING_EPOCHS = 2  # a peer this many epochs behind the swarm is shown as recovering (it reloads state)
# How far ahead of every other alive peer a report's epoch may be. Honest peers share one global epoch; a peer's
# record lags by an epoch or two while it publishes or recovers, so 4 never refuses an honest leader.
MAX_EPOCH_LEAD = 4
MAX_TOTAL = 2**62  # cumulative sums saturate here: SQLite's INTEGER holds at most 2**63 - 1
MAX_PEER_ROWS = 1024  # rows of the peers table (and its SQLite copy); a key flood cannot grow it beyond this


@dataclass(frozen=True)
class PeerProgress:
    """One peer's progress for one epoch, as read from its signed DHT record.

    Args:
        peer_id: base58 id of the peer that signed the record.
        epoch: the peer's local epoch when it reported.
        samples_per_second: the peer's own throughput.
        samples_accumulated: samples this peer contributed to the reported epoch.
        loss_sum: sum of the mini-step losses over the reported epoch.
        mini_steps: number of mini-steps (forward/backward passes) summed in `loss_sum`.
        time: DHT time (seconds since the epoch) at which the record was made.
        device: device name, e.g. "cpu" or "NVIDIA A100".
        version: software version of the peer.
        name: the peer's display name ("" if none): shown, never trusted.
        samples_total: samples the peer says it contributed over its whole life under this key (its signed claim).
        compute_seconds_total: seconds of forward/backward the peer says it spent over the same life.
    """

    peer_id: str
    epoch: int
    samples_per_second: float
    samples_accumulated: int
    loss_sum: float
    mini_steps: int
    time: float
    device: str = ""
    version: str = ""
    name: str = ""
    samples_total: int = 0
    compute_seconds_total: float = 0.0


@dataclass(frozen=True)
class PeerRow:
    """A row of the peers table: the peer's latest report plus what the monitor has accumulated about it."""

    peer_id: str
    epoch: int
    samples_per_second: float
    loss: float | None
    device: str
    version: str
    last_seen: float
    contribution: int  # samples contributed over the whole run, as far as this monitor saw
    alive: bool
    status: str  # "training", "recovering" (lagging behind the swarm's epoch) or "gone"
    name: str = ""  # the latest report's display name
    samples_total: int = (
        0  # the latest report's lifetime totals (the peer's signed claim; see monitor/contributors.py)
    )
    compute_seconds_total: float = 0.0


@dataclass(frozen=True)
class SwarmSnapshot:
    """The state of the run at one moment, as shown on the dashboard and exported as metrics."""

    time: float
    epoch: int
    loss: float | None
    samples_per_second: float
    alive_peers: int
    samples_total: int
    invalid_records: int
    peers: tuple[PeerRow, ...] = ()
    # per peer, the (epoch, samples) already counted into its contribution, so a record read twice counts once
    counted: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    # reports refused in this aggregation, by reason ("range", "future", "epoch"); included in invalid_records
    refused: Mapping[str, int] = field(default_factory=dict)
    # alive, in-range reports whose epoch nobody vouched for: with no state held, they may show where to download one
    unconfirmed_peers: int = 0


EMPTY_SNAPSHOT = SwarmSnapshot(
    time=0.0, epoch=0, loss=None, samples_per_second=0.0, alive_peers=0, samples_total=0, invalid_records=0
)


def is_sane(report: PeerProgress) -> bool:
    """Whether every number is within the bounds of peer/swarm/progress.py (NaN and infinities fail them too).

    The schema checks the same bounds; this keeps aggregation safe whatever built the report.
    """
    return (
        0 <= report.epoch <= MAX_COUNT
        and 0 <= report.samples_accumulated <= MAX_COUNT
        and 0 <= report.mini_steps <= MAX_COUNT
        and 0.0 <= report.samples_per_second <= MAX_SAMPLES_PER_SECOND
        and 0.0 <= report.loss_sum <= MAX_MINI_STEP_LOSS * report.mini_steps
        and 0.0 <= report.time <= MAX_COUNT
        and 0 <= report.samples_total <= MAX_COUNT
        and 0.0 <= report.compute_seconds_total <= MAX_COUNT
    )


def refusal(report: PeerProgress, now: float) -> str | None:
    """Why a report cannot count at all ("range" or "future"), or None."""
    if not is_sane(report):
        return "range"
    if report.time - now > MAX_CLOCK_SKEW:
        return "future"
    return None


def vouched(alive: Mapping[str, PeerProgress], held_epoch: int, held_lead: int) -> tuple[set[str], set[str]]:
    """Split alive peers into those whose epoch is vouched for (see the module's epoch rule) and those not."""
    epochs = sorted(((r.epoch, pid) for pid, r in alive.items()), reverse=True)
    accepted, unconfirmed = set(), set()
    for pid, report in alive.items():
        # the highest epoch of any OTHER peer: the top one, or the runner-up for the top peer itself
        others = next((epoch for epoch, other in epochs if other != pid), None)
        by_peers = others is not None and report.epoch <= others + MAX_EPOCH_LEAD
        # a monitor holding no state yet stands at epoch 0, where every run starts
        by_state = report.epoch <= max(held_epoch, 0) + held_lead
        (accepted if by_peers or by_state else unconfirmed).add(pid)
    return accepted, unconfirmed


def aggregate(
    reports: Iterable[PeerProgress],
    now: float,
    previous: SwarmSnapshot = EMPTY_SNAPSHOT,
    invalid_records: int = 0,
    stale_after: float = 60.0,
    forget_after: float = 3600.0,
    held_epoch: int | None = None,
    held_lead: int = MAX_EPOCH_LEAD,
    max_rows: int = MAX_PEER_ROWS,
) -> SwarmSnapshot:
    """Fold the latest reports into a new snapshot.

    Args:
        reports: reports that passed schema and signature validation (at most one per peer is used: the newest).
        now: current DHT time.
        previous: the last snapshot; its ledger makes contributions and the sample total cumulative, and its epoch
            is the new one's floor (the run's epoch is the highest vouched epoch any alive peer ever reported).
        invalid_records: records rejected by validation during this refresh (shown and exported, not aggregated).
        stale_after: a peer whose newest report is older than this is not alive.
        forget_after: a peer not seen for this long is dropped from the table (its contribution stays counted).
        held_epoch: epoch of the state the monitor holds (-1: none); the monitor always passes it. None (tools and
            tests of other rules) leaves the epoch rule out: every in-range report's epoch is accepted.
        held_lead: how far above `held_epoch` a report's epoch is vouched for by the held state.
        max_rows: most rows kept in the peers table.
    """
    refused: Counter[str] = Counter()
    newest: dict[str, PeerProgress] = {}
    for report in reports:
        reason = refusal(report, now)
        if reason is not None:
            refused[reason] += 1
            continue
        if report.peer_id not in newest or report.time > newest[report.peer_id].time:
            newest[report.peer_id] = report

    alive = {pid: r for pid, r in newest.items() if now - r.time <= stale_after}
    accepted, unconfirmed = set(alive), set()
    if held_epoch is not None:
        accepted, unconfirmed = vouched(alive, held_epoch, held_lead)
    refused["epoch"] += len(unconfirmed)
    alive = {pid: r for pid, r in alive.items() if pid in accepted}
    newest = {pid: r for pid, r in newest.items() if pid not in unconfirmed}
    # the run's epoch never goes back: when the peer that was ahead stops counting as alive, the others catch up
    epoch = max([previous.epoch, *(r.epoch for r in alive.values())])

    counted = dict(previous.counted)
    contributions = {row.peer_id: row.contribution for row in previous.peers}
    samples_total = previous.samples_total
    for pid, report in newest.items():
        added = _new_samples(report, counted.get(pid))
        if added is not None:
            already = counted[pid][1] if pid in counted and counted[pid][0] == report.epoch else 0
            counted[pid] = (report.epoch, max(already, report.samples_accumulated))
            contributions[pid] = min(MAX_TOTAL, contributions.get(pid, 0) + added)
            samples_total = min(MAX_TOTAL, samples_total + added)

    rows = {row.peer_id: replace(row, alive=False, status="gone") for row in previous.peers}
    for pid, report in newest.items():
        rows[pid] = _row(report, contributions[pid], pid in alive, epoch)
    rows = {pid: row for pid, row in rows.items() if row.alive or now - row.last_seen <= forget_after}
    kept = sorted(rows.values(), key=lambda row: (not row.alive, -row.contribution, row.peer_id))[:max_rows]
    counted = {row.peer_id: counted[row.peer_id] for row in kept if row.peer_id in counted}

    loss_sum = sum(r.loss_sum for r in alive.values())
    mini_steps = sum(r.mini_steps for r in alive.values())
    return SwarmSnapshot(
        time=now,
        epoch=epoch,
        loss=loss_sum / mini_steps if mini_steps > 0 else None,
        samples_per_second=sum(r.samples_per_second for r in alive.values()),
        alive_peers=len(alive),
        samples_total=samples_total,
        invalid_records=invalid_records + sum(refused.values()),
        peers=tuple(kept),
        counted=counted,
        refused={reason: count for reason, count in refused.items() if count},
        unconfirmed_peers=len(unconfirmed),
    )


def _new_samples(report: PeerProgress, counted: tuple[int, int] | None) -> int | None:
    """Samples of this report not yet counted, or None if the report is older than what was counted."""
    if counted is None or report.epoch > counted[0]:
        return report.samples_accumulated
    if report.epoch == counted[0]:  # the same epoch re-reported with more samples: count the growth only
        return max(0, report.samples_accumulated - counted[1])
    return None


def _row(report: PeerProgress, contribution: int, alive: bool, swarm_epoch: int) -> PeerRow:
    if not alive:
        status = "gone"
    elif report.epoch <= swarm_epoch - LAGGING_EPOCHS:
        status = "recovering"
    else:
        status = "training"
    return PeerRow(
        peer_id=report.peer_id,
        epoch=report.epoch,
        samples_per_second=report.samples_per_second,
        loss=report.loss_sum / report.mini_steps if report.mini_steps > 0 else None,
        device=report.device,
        version=report.version,
        last_seen=report.time,
        contribution=contribution,
        alive=alive,
        status=status,
        name=report.name,
        samples_total=report.samples_total,
        compute_seconds_total=report.compute_seconds_total,
    )
