"""What a peer tells the world: a live progress line, its Prometheus metrics and its signed DHT progress record."""

from __future__ import annotations

import logging
import time

import hivemind
import prometheus_client
from hivemind.utils import get_dht_time
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from tqdm import tqdm

from peer.contribution import Contribution
from peer.swarm.config import OptimConfig
from peer.swarm.progress import (
    MAX_MINI_STEP_LOSS,
    MAX_SAMPLES_PER_SECOND,
    PROTOCOL_VERSION,
    ProgressRecord,
    local_public_key,
    peer_label,
    publish_progress,
    software_version,
)
from peer.swarm.scores import ScoreWindow, publish_scores
from peer.training_mode import TrainingMode

logger = logging.getLogger(__name__)
FINAL_PUBLISH_TIMEOUT = 10.0  # seconds a leaving peer waits for its last record to be stored
FINAL_PUBLISH_TRIES = 3


class PeerMetrics:
    """This peer's Prometheus metrics, in a registry of their own (served on --metrics-port)."""

    def __init__(self):
        self.registry = prometheus_client.CollectorRegistry()
        gauge = lambda name, doc: prometheus_client.Gauge(name, doc, registry=self.registry)
        counter = lambda name, doc: prometheus_client.Counter(name, doc, registry=self.registry)
        self.epoch = gauge("albert_peer_epoch", "Swarm epoch this peer is at")
        self.loss = gauge("albert_peer_loss", "Mean masked-LM loss of this peer over its last epoch")
        self.samples_per_second = gauge("albert_peer_samples_per_second", "Samples/s this peer processed last epoch")
        self.swarm_peers = gauge("albert_peer_swarm_peers", "Peers in the swarm as seen by this peer")
        self.samples = counter("albert_peer_samples", "Samples this peer contributed to the swarm")
        self.compute_seconds = counter("albert_peer_compute_seconds", "Seconds spent in forward and backward")
        self.step_seconds = counter(
            "albert_peer_step_seconds", "Seconds spent in optimizer.step (matchmaking, averaging)"
        )
        self.skipped_batches = counter(
            "albert_peer_skipped_batches", "Batches skipped for a non-finite loss or gradient"
        )
        self.recoveries = counter("albert_peer_recoveries", "Times parameters were reloaded after becoming non-finite")
        self.aggregation_seconds = counter(
            "albert_peer_robust_aggregation_seconds", "Seconds this peer spent in CenteredClip on the parts it reduced"
        )

    def show_mode(self, optim: OptimConfig) -> None:
        """Export the training mode as albert_peer_training_mode_info{mode, local_steps, overlap}."""
        info = prometheus_client.Info("albert_peer_training_mode", "How this peer trains", registry=self.registry)
        overlap = bool(optim.local_steps and optim.delay_optimizer_step)
        info.info(
            {"mode": optim.training_mode, "local_steps": str(optim.local_steps), "overlap": str(overlap).lower()}
        )

    def watch_training(self, training: TrainingMode) -> None:
        """Export what the training mode's guards refused (read at each scrape: the counts live in the guards, which
        hivemind may update from its background threads)."""
        self.registry.register(GuardCollector(training))

    def serve(self, port: int) -> None:
        prometheus_client.start_http_server(port, registry=self.registry)
        logger.info(f"Prometheus metrics on http://0.0.0.0:{port}/metrics")


class GuardCollector:
    """Prometheus collector of the training mode's refusals: averaged gradients not applied, states refused."""

    def __init__(self, training: TrainingMode):
        self.training, self.update_guard = training, training.update_guard

    def collect(self):
        skipped = CounterMetricFamily(
            "albert_peer_skipped_updates",
            "Optimizer steps skipped because the swarm-averaged gradient was refused, by reason",
            labels=["reason"],
        )
        if self.update_guard is not None:
            for reason, count in self.update_guard.refused().items():
                skipped.add_metric([reason], count)
            last = GaugeMetricFamily("albert_peer_update_norm", "L2 norm of the last applied averaged gradient")
            last.add_metric([], self.update_guard.last_norm or 0.0)
            yield last
        yield skipped
        yield CounterMetricFamily(
            "albert_peer_refused_states",
            "Training states refused: downloaded from peers (non-finite or implausible epoch), or the non-finite mean "
            "of a state round",
            value=self.training.refused_states,
        )
        yield from byte_counter(
            "albert_peer_allreduce_bytes",
            "Payload bytes of tensor parts this peer's gradient (or, with --local-steps, pseudo-gradient) all-reduce "
            "sent and received (no framing)",
            self.training.averaged_bytes,
        )
        yield from byte_counter(
            "albert_peer_state_round_bytes",
            "Payload bytes of tensor parts this peer's state rounds (with --local-steps, the outer re-sync of weights "
            "and momentum) sent and received (no framing)",
            self.training.state_bytes,
        )
        inner_step_seconds = self.training.inner_step_seconds
        if inner_step_seconds is not None:
            yield CounterMetricFamily(
                "albert_peer_inner_step_seconds",
                "Seconds in this peer's inner optimizer steps (--local-steps): compute beside forward and backward",
                value=inner_step_seconds,
            )


def byte_counter(name: str, documentation: str, counts: tuple[int, int] | None):
    """A counter of (sent, received) bytes labelled by direction; nothing where the mode does not count them."""
    if counts is None:
        return
    counter = CounterMetricFamily(name, documentation, labels=["direction"])
    for direction, count in zip(("sent", "received"), counts):
        counter.add_metric([direction], count)
    yield counter


class Reporter:
    """Accumulates one epoch's statistics and publishes them: progress line, metrics, and the signed DHT record.

    Args:
        dht: the peer's DHT (records are stored through it).
        run_id: the run's name (the record's key is ``{run_id}_progress_records``).
        training: the peer's training mode (read for the swarm's progress and the guards' refusals).
        device: device name written into the record.
        model_hash: architecture fingerprint written into the record.
        record_expiration: seconds a record lives; it is re-published every third of that.
        metrics: this peer's Prometheus metrics.
        name: this peer's display name (--name), written into the record.
        contribution: this peer's lifetime totals, carried by every record and logged at each publication.
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        run_id: str,
        training: TrainingMode,
        device: str,
        model_hash: str,
        record_expiration: float,
        metrics: PeerMetrics,
        name: str = "",
        contribution: Contribution | None = None,
    ):
        self.dht, self.run_id, self.training, self.metrics = dht, run_id, training, metrics
        self.name, self.contribution = name, contribution or Contribution(None)
        self.label = peer_label(local_public_key())  # how the monitor names this peer (beside its display name)
        self.device, self.model_hash, self.record_expiration = device[:64], model_hash, record_expiration
        self.line = tqdm(bar_format="{desc}", disable=None, dynamic_ncols=True)  # no line when not on a terminal
        self.record: ProgressRecord | None = None
        self.last_published, self.last_status = -float("inf"), ""
        self.score_window = ScoreWindow()  # the sender scores of the last rounds this peer reduced robustly
        metrics.watch_training(training)
        self._start_epoch(training.epoch)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.epoch_started = epoch, time.perf_counter()
        self.loss_sum, self.mini_steps, self.samples = 0.0, 0, 0

    def status(self, message: str) -> None:
        """Show what the peer is doing right now (matchmaking, averaging, downloading state...)."""
        if message != self.last_status:
            self.last_status = message
            self.line.set_description_str(f"epoch {self.epoch} | {message}", refresh=True)
            if self.line.disable and message != "training":  # in logs, only the moments worth knowing about
                logger.info(message)

    def batch_done(self, loss: float, samples: int, compute_seconds: float, step_seconds: float) -> None:
        """Count one contribution to the swarm (a finite loss over ``samples`` samples)."""
        self.loss_sum, self.mini_steps, self.samples = (
            self.loss_sum + loss,
            self.mini_steps + 1,
            self.samples + samples,
        )
        self.contribution.add(samples, compute_seconds)
        self.metrics.samples.inc(samples)
        self.metrics.compute_seconds.inc(compute_seconds)
        self.metrics.step_seconds.inc(step_seconds)
        if not self.line.disable:
            self.line.set_description_str(self._summary(), refresh=False)
            self.line.update(0)
        if time.monotonic() - self.last_published > self.record_expiration / 3 and self.record is not None:
            self._publish(self.record)  # keep the record alive between epochs

    def batch_skipped(self, reason: str) -> None:
        self.metrics.skipped_batches.inc()
        logger.warning(f"Skipping this batch's contribution: {reason}")

    def epoch_done(self, new_epoch: int) -> None:
        """Publish the statistics of the epoch that just ended, then start counting the next one."""
        elapsed = max(time.perf_counter() - self.epoch_started, 1e-9)
        record = ProgressRecord(
            epoch=new_epoch,
            # clamped into the record's bounds: an epoch that ends within microseconds or a loss beyond
            # MAX_MINI_STEP_LOSS must not make this peer's own record invalid (nor crash it here)
            samples_per_second=min(float(self.samples / elapsed), MAX_SAMPLES_PER_SECOND),
            samples_accumulated=self.samples,
            loss_sum=min(float(self.loss_sum), MAX_MINI_STEP_LOSS * self.mini_steps),
            mini_steps=self.mini_steps,
            device=self.device,
            version=software_version(),
            time=float(get_dht_time()),
            model_hash=self.model_hash,
            protocol=PROTOCOL_VERSION,
            name=self.name,
            samples_total=self.contribution.samples,
            compute_seconds_total=self.contribution.compute_seconds,
        )
        self.metrics.epoch.set(new_epoch)
        self.metrics.samples_per_second.set(record.samples_per_second)
        self.metrics.swarm_peers.set(self.training.num_peers)
        if record.mean_loss is not None:
            self.metrics.loss.set(record.mean_loss)
        norm = getattr(self.training.update_guard, "last_norm", None)
        applied = f" | update norm {norm:.4g}" if norm is not None else ""  # of the averaged gradient last applied
        logger.info(self._summary() + applied + f" -> epoch {new_epoch}")
        self._claim(record)
        self._publish_scores(new_epoch)
        self._start_epoch(new_epoch)

    def _claim(self, record: ProgressRecord, last_words: bool = False) -> None:
        """Save the totals, log them, then publish them: what this peer logs it has contributed is on disk first, so
        a restart after any crash goes on from at least the last logged total (the monitor keeps the largest)."""
        try:
            self.contribution.save()
        except OSError as error:  # e.g. a full disk: the work was done all the same, and reporting never stops it
            logger.warning(f"Could not save the contribution totals to {self.contribution.path}: {error!r}")
        logger.info(
            f"Contributed {record.samples_total} samples in total ({record.compute_seconds_total:.1f} s of compute) "
            f"as {self.label}" + (f" ({self.name})" if self.name else "")
        )
        if last_words:
            self._publish_last_words(record)
        else:
            self._publish(record)

    def _summary(self) -> str:
        peers, target = self.training.num_peers, self.training.target_batch_size
        loss = f"{self.loss_sum / self.mini_steps:.3f}" if self.mini_steps else "-"
        rate = self.samples / max(time.perf_counter() - self.epoch_started, 1e-9)
        # The swarm's own counter is already reset when a new epoch begins: compare with the target instead.
        share = self.samples / max(target, 1)
        return (
            f"epoch {self.epoch} | loss {loss} | {rate:.1f} samples/s | swarm {peers} peers | "
            f"mine {self.samples} samples ({share:.0%} of the {target}-sample target)"
        )

    def _publish(self, record: ProgressRecord) -> None:
        """Store the record in the background: reporting must never hold up or stop training."""
        self.record, self.last_published = record, time.monotonic()
        try:
            stored = publish_progress(self.dht, self.run_id, record, self.record_expiration, wait=False)
            stored.add_done_callback(_warn_if_refused)
        except Exception as error:  # noqa: BLE001 -- reporting must never stop training
            logger.warning(f"Could not publish the progress record: {error!r}")

    def _publish_last_words(self, record: ProgressRecord) -> None:
        """Store a leaving peer's last record on another node, trying for up to FINAL_PUBLISH_TIMEOUT seconds.

        Its own node leaves with it: a record only that node held would be lost, and with it the samples of the
        unfinished epoch (a contributors test on a loaded CI machine once missed a leaving peer's last 24 samples).
        """
        self.record, self.last_published = record, time.monotonic()
        deadline = time.monotonic() + FINAL_PUBLISH_TIMEOUT
        problem = "no other node took it"
        for _ in range(FINAL_PUBLISH_TRIES):  # a few: a lone peer (no other node at all) must not wait long to leave
            try:
                stored = publish_progress(
                    self.dht, self.run_id, record, self.record_expiration, wait=False, elsewhere=True
                )
                if stored.result(timeout=max(deadline - time.monotonic(), 0.1)):
                    return
            except Exception as error:  # noqa: BLE001 -- a leave goes on whatever the DHT does
                problem = repr(error)
            if time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        logger.warning(
            f"Could not store the last progress record on another node in {FINAL_PUBLISH_TIMEOUT:.0f} s ({problem}): "
            f"the monitor may miss this peer's last samples (its total is {record.samples_total})"
        )

    def _publish_scores(self, epoch: int) -> None:
        """Publish the scores this peer gave the senders it reduced robustly (--aggregation centered-clip)."""
        rounds = self.training.take_round_scores()
        self.score_window.add(rounds)
        try:
            record = self.score_window.record(epoch)
        except ValueError as error:  # pydantic's ValidationError: scores out of bounds are not published
            logger.warning(f"Not publishing this epoch's sender scores: {error}")
            return
        if record is None or not rounds:
            return
        seconds = sum(round_scores.aggregation_seconds for round_scores in rounds)
        parts = sum(round_scores.parts for round_scores in rounds)
        self.metrics.aggregation_seconds.inc(seconds)
        worst = max(record.scores.items(), key=lambda item: item[1])
        logger.info(
            f"Robust aggregation: {parts} parts of {len(rounds)} round(s) in {seconds * 1e3:.1f} ms; "
            f"highest sender score {worst[1]:.3g} ({worst[0]})"
        )
        try:  # in the background, like the progress record
            publish_scores(self.dht, self.run_id, record, self.record_expiration, wait=False)
        except Exception as error:  # noqa: BLE001 -- reporting must never stop training
            logger.warning(f"Could not publish the sender scores: {error!r}")

    def close(self) -> None:
        """Publish the totals of the unfinished epoch (the last words of a clean leave), then close the line."""
        if self.record is not None and self.contribution.samples > self.record.samples_total:
            final = self.record.copy(
                update={
                    "samples_total": self.contribution.samples,
                    "compute_seconds_total": self.contribution.compute_seconds,
                    "time": float(get_dht_time()),
                }
            )
            self._claim(final, last_words=True)
        self.line.close()


def _warn_if_refused(stored) -> None:
    if stored.exception() is not None or not stored.result():
        logger.warning(f"The DHT did not store this peer's progress record ({stored.exception()!r})")
