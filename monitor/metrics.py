"""Prometheus exposition of the swarm: a collector that reads the live state at scrape time (no stale gauges)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from monitor.checkpoint import CheckpointStore
from monitor.live import LiveState

# The monitor's series labelled with a peer id. Not "albert_peer_": that prefix is each peer's own /metrics, where
# albert_peer_epoch means "my epoch"; one name keeps one meaning across the jobs a Prometheus scrapes.
PER_PEER_PREFIX = "albert_swarm_peer_"


class SwarmCollector(Collector):
    """Builds every metric family from `LiveState` and the checkpoint store when Prometheus scrapes.

    Args:
        live: the monitor's live state.
        store: the checkpoint store (for the newest checkpoint's age and epoch).
    """

    def __init__(self, live: LiveState, store: CheckpointStore):
        self.live, self.store = live, store

    def collect(self) -> Iterator[Metric]:
        snap, live = self.live.snapshot, self.live
        if live.mode:
            mode = {"mode": live.mode["name"], "local_steps": str(live.mode["local_steps"])}
            yield InfoMetricFamily("albert_swarm_training_mode", "How the run trains (its --local-steps)", value=mode)
        yield _gauge("albert_swarm_epoch", "Global epoch of the swarm (optimizer steps made together).", snap.epoch)
        loss = snap.loss if snap.loss is not None else math.nan
        yield _gauge("albert_swarm_loss", "Swarm MLM loss: sum of peers' losses over sum of their mini-steps.", loss)
        yield _gauge(
            "albert_swarm_samples_per_second",
            "Samples per second of all alive peers together.",
            snap.samples_per_second,
        )
        yield _gauge("albert_swarm_alive_peers", "Peers whose progress record is fresh.", snap.alive_peers)
        yield _counter("albert_swarm_samples", "Samples processed by the swarm over the run.", snap.samples_total)
        yield _counter(
            "albert_monitor_invalid_records", "Progress records that failed validation.", live.invalid_records_total
        )
        by_reason = CounterMetricFamily(
            "albert_monitor_invalid_records_by_reason",
            "Progress records refused, by reason (signature, size, schema, range, future, epoch, too_many, other).",
            labels=["reason"],
        )
        for reason, count in sorted(live.invalid_by_reason.items()):
            by_reason.add_metric([reason], count)
        yield by_reason
        yield _counter(
            "albert_monitor_refused_records",
            "Valid records from peers whose model does not match.",
            live.refused_records_total,
        )
        yield _counter(
            "albert_monitor_refresh_errors",
            "Refreshes (or loop turns) that failed, for any reason.",
            live.refresh_errors,
        )
        yield _gauge(
            "albert_monitor_state_epoch", "Epoch of the training state the monitor holds (-1: none).", live.state_epoch
        )
        yield _gauge(
            "albert_monitor_last_refresh_timestamp_seconds", "Unix time of the last refresh.", live.last_refresh
        )
        yield _gauge(
            "albert_swarm_suspicious_peers",
            "Senders whose median score from the robust reducers is above the suspicion threshold.",
            sum(suspect.suspicious for suspect in live.suspects),
        )
        yield _gauge(
            "albert_swarm_revoked_members",
            "Closed runs: members revoked for their robust-aggregation scores (--revoke-above).",
            live.revoked_count,
        )
        yield from self._checkpoint_metrics()
        yield from self._peer_metrics()

    def _checkpoint_metrics(self) -> Iterator[Metric]:
        entries = self.store.list()
        newest = entries[0] if entries else None
        age = time.time() - newest.created_at if newest else math.nan
        yield _gauge("albert_swarm_checkpoint_age_seconds", "Age of the newest verified checkpoint.", age)
        yield _gauge(
            "albert_swarm_checkpoint_epoch",
            "Epoch of the newest verified checkpoint (-1: none).",
            newest.epoch if newest else -1,
        )
        yield _gauge("albert_swarm_checkpoints", "Verified checkpoints available for download.", len(entries))
        yield _counter(
            "albert_monitor_corrupted_checkpoints", "Checkpoints found damaged and withheld.", self.store.corrupted
        )

    def _peer_metrics(self) -> Iterator[Metric]:
        speed = GaugeMetricFamily(
            PER_PEER_PREFIX + "samples_per_second",
            "Samples per second of one alive peer, from its progress record.",
            labels=["peer_id", "device"],
        )
        epoch = GaugeMetricFamily(
            PER_PEER_PREFIX + "epoch", "Local epoch of one alive peer, from its progress record.", labels=["peer_id"]
        )
        for row in self.live.snapshot.peers:
            if row.alive:
                speed.add_metric([row.peer_id, row.device], row.samples_per_second)
                epoch.add_metric([row.peer_id], row.epoch)
        yield speed
        yield epoch
        suspicion = GaugeMetricFamily(
            PER_PEER_PREFIX + "suspicion",
            "Median score the robust reducers gave one sender (libp2p peer id): honest about 1, attackers far above.",
            labels=["peer_id"],
        )
        for suspect in self.live.suspects:
            suspicion.add_metric([suspect.peer_id], suspect.suspicion)
        yield suspicion


class SwarmLevelView:
    """A registry's metrics without the per-peer series: what /metrics shows to anyone in a closed run.

    Peer ids and devices of a closed run are for its members (GET /api/peers with a token); the swarm-level series
    (epoch, loss, speed, peer count, checkpoints, refused records) stay public like the dashboard's summary.
    """

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        return (metric for metric in self.registry.collect() if not metric.name.startswith(PER_PEER_PREFIX))


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def make_registry(live: LiveState, store: CheckpointStore) -> CollectorRegistry:
    """A registry of its own, so two monitors in one process (tests) never collide in the global one."""
    registry = CollectorRegistry()
    registry.register(SwarmCollector(live, store))
    return registry
