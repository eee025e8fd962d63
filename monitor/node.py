"""The monitor node: DHT bootstrap, the refresh loop (aggregate, record, checkpoint) and the HTTP server around it.

`Monitor(...)` starts the node and must be built in the main thread (hivemind's averager installs signal handlers);
the HTTP server runs in a background thread; `run()` loops in the main thread until `stop()` is called (e.g. by a signal handler).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Self

from hivemind.utils import get_dht_time

from monitor.access import Authority, monitor_access
from monitor.aggregate import MAX_EPOCH_LEAD, SwarmSnapshot, aggregate
from monitor.checkpoint import CheckpointStore, checkpoint_mode
from monitor.config import MonitorConfig
from monitor.contributor_store import ContributorStore
from monitor.contributors import update_contributors
from monitor.history import CheckpointEntry, History
from monitor.live import LiveState
from monitor.manifest_server import ManifestServer, run_manifest, tokenizer_dir
from monitor.metrics import make_registry
from monitor.outer_state import OuterStateKeeper
from monitor.records import monitor_validators, read_progress, read_suspects
from monitor.revocation import RevocationPolicy, RevocationStore, member_suspects
from monitor.server import ServerThread, create_app
from monitor.state import ModelMismatch, NonFiniteState, StateKeeper, build_run_model
from peer.hivemind_gaps.averager_guard import MembershipCheck
from peer.swarm.access import RunAccess
from peer.swarm.config import OptimConfig, SwarmConfig
from peer.swarm.dht import build_dht, visible_maddrs
from peer.swarm.join_string import JoinString
from peer.swarm.manifest import sign_manifest
from peer.swarm.run_key import RunKey
from peer.swarm.run_record import PROTOCOL_VERSION, RunRecord, publish_run_record
from peer.swarm.scores import ScoreRecord

logger = logging.getLogger(__name__)
RUN_RECORD_EXPIRATION = 60.0  # seconds; refreshed every refresh period, so a dead monitor's record soon vanishes
FETCH_BACKOFF = 15.0  # seconds between scheduled downloads after one found nothing newer (e.g. peers just died)
UNVOUCHED_FETCH_BACKOFF = 60.0  # seconds between downloads tried because a peer claims an epoch nobody vouches for
ERROR_LOG_INTERVAL = 60.0  # seconds between two tracebacks of failing refreshes (each failure is still counted)
MAX_REFUSED_LOGGED = 1024  # refused peers remembered so as to log each once; keys are free, so the set is capped


class RateLimitedLog:
    """Logs an error with its traceback at most once per `interval` seconds, saying how many were not logged."""

    def __init__(self, interval: float = ERROR_LOG_INTERVAL):
        self.interval, self.last, self.skipped = interval, -float("inf"), 0

    def error(self, message: str, error: BaseException) -> None:
        if time.monotonic() - self.last < self.interval:
            self.skipped += 1
            return
        also = f" ({self.skipped} more since the last report)" if self.skipped else ""
        logger.error(f"{message}{also}: {error!r}", exc_info=error)
        self.last, self.skipped = time.monotonic(), 0


class Monitor:
    """One monitor of one run.

    Args:
        swarm: network settings (the identity path defaults to one under the monitor's run dir).
        optim: the run's optimizer settings, to hold a state of the peers' layout.
        config: the monitor's own settings.
    """

    def __init__(self, swarm: SwarmConfig, optim: OptimConfig, config: MonitorConfig):
        """Load or build the model, join the DHT, announce the multiaddrs, open history and checkpoints, serve HTTP.

        Every part started is registered with ``self._resources`` as it starts, so a start that fails half-way
        releases what it took (in reverse order) and raises; ``shutdown`` releases a whole monitor the same way.
        """
        self.swarm, self.optim, self.config = swarm, optim, config
        self._stop = threading.Event()
        self._requests: queue.Queue[Future] = queue.Queue()
        self._refused_logged: set[str] = set()
        self._next_fetch = 0.0  # monotonic time before which scheduled downloads are skipped
        self._next_unvouched_fetch = 0.0  # the same, for downloads an unvouched epoch asks for
        self._errors = RateLimitedLog()
        self.revocations: RevocationStore | None = None  # closed runs
        self._policy: RevocationPolicy | None = None  # --revoke-above
        self._resources = contextlib.ExitStack()
        with self._resources:
            self._start()
            self._resources = self._resources.pop_all()  # started whole: kept until shutdown

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    def _start(self) -> None:
        cfg = self.config
        self.run_model = build_run_model(cfg.model, cfg.tokenizer, weights_from=cfg.resume_from)
        self.run_key = RunKey.load_or_create(cfg.run_key_path())
        identity = cfg.identity_path(self.swarm)
        identity.parent.mkdir(parents=True, exist_ok=True)
        self.swarm.identity_path = str(identity)
        self.authority, access = self._open_access(identity)
        self.dht = build_dht(
            self.swarm, monitor_validators(self.swarm.run_id), access.authorizer() if access else None
        )
        self._release_on_shutdown(self.dht.shutdown, "the DHT")
        if access is not None:
            access.publish_membership(self.dht)
            self._release_on_shutdown(access.close, "the member-list publisher")
        self.initial_peers = visible_maddrs(self.dht)
        self._write_peers_file(self.initial_peers)
        self._serve_manifest()
        membership = MembershipCheck(self.dht, self.swarm.run_id, self.authority.public_key) if access else None
        # local steps: the outer weights and momentum, served and checkpointed; else the synchronous training state
        keeper_class = OuterStateKeeper if self.optim.local_steps else StateKeeper
        self.keeper = keeper_class(self.dht, self.swarm, self.optim, self.run_model, membership=membership)
        self._release_on_shutdown(self.keeper.shutdown, "the state averager")
        if cfg.resume_from:
            self.keeper.resume(cfg.resume_from)
        self.history = History(cfg.db_path())
        self._release_on_shutdown(self.history.close, "the history database")
        self.contributors = ContributorStore(cfg.db_path())
        self._release_on_shutdown(self.contributors.close, "the contributors table")
        self._contributor_rows = self.contributors.load()
        self.store = CheckpointStore(
            cfg.checkpoint_path(), self.history, keep=cfg.keep, keep_every=cfg.keep_every, run_key=self.run_key
        )
        self.store.reconcile()
        self.live = LiveState(
            run_id=self.swarm.run_id,
            initial_peers=self.initial_peers,
            model={"name": cfg.model, "tokenizer": self.run_model.tokenizer_name, "hash": self.run_model.fingerprint},
            join=self.join_string,
            mode=training_mode(self.optim),
            snapshot=self._not_behind_held_state(self.history.last_snapshot()),  # a restart goes on from its history
            state_epoch=self.keeper.epoch,
        )
        self._serve_http()
        logger.info(f"Run key fingerprint (hand it out with the initial peers): {self.run_key.fingerprint}")
        print(f"--initial-peers {' '.join(self.initial_peers)}", flush=True)
        print(f"--run-key {self.run_key.fingerprint}", flush=True)
        print(f"--join {self.join_string}", flush=True)

    def _serve_manifest(self) -> None:
        """Sign the run manifest, serve it (and the tokenizer) over p2p, write and print the join string."""
        cfg = self.config
        self.manifest = run_manifest(self.swarm.run_id, self.optim, cfg, self.run_model)
        files = list(self.manifest["tokenizer"]["files"])
        document = sign_manifest(self.manifest, self.run_key)
        server = ManifestServer(self.dht, self.swarm.run_id, document, tokenizer_dir(cfg), files)
        self._release_on_shutdown(server.shutdown, "the manifest server")
        self.join_string = JoinString(self.swarm.run_id, self.run_key.fingerprint, tuple(self.initial_peers)).encode()
        write_atomically(cfg.join_file_path(), self.join_string + "\n")
        logger.info(f"Peers join with --join (or ALBERT_JOIN=) {self.join_string}; it is in {cfg.join_file_path()}")

    def _serve_http(self) -> None:
        cfg = self.config
        app = create_app(
            self.live,
            self.history,
            self.store,
            make_registry(self.live, self.store),
            contributors=self.contributors,
            admin_token=cfg.admin_token,
            request_checkpoint=self.request_checkpoint,
            authority=self.authority,
            refresh_period=cfg.refresh_period,
            # a refresh may block for a whole state download: that is slow, not unhealthy
            refresh_grace=self.optim.load_state_timeout,
        )
        server = ServerThread(app, cfg.http_host, cfg.http_port)
        server.start()
        self._release_on_shutdown(server.stop, "the HTTP server")
        self.dashboard_url = f"http://{cfg.http_host}:{server.port}/"
        write_atomically(cfg.url_file_path(), self.dashboard_url + "\n")  # how a launcher learns a port the OS chose
        logger.info(f"Dashboard, API and /metrics on {self.dashboard_url}")

    def _release_on_shutdown(self, close, what: str) -> None:
        """Register a part's release; one part failing to close must not leave the others open."""

        def release() -> None:
            try:
                close()
            except Exception as error:  # noqa: BLE001 -- logged; the remaining parts are still released
                logger.warning(f"Error while shutting down {what}: {error!r}")

        self._resources.callback(release)

    def _open_access(self, identity: Path) -> tuple[Authority | None, RunAccess | None]:
        """A closed run: load (or create) the authority key, read the secret / allowlist, issue our own token.

        An open run has neither (None, None).
        """
        cfg = self.config
        if not cfg.closed_run:
            return None, None
        # every closed run checks the revocations table (decisions outlive a restart without --revoke-above)
        self.revocations = RevocationStore(cfg.db_path())
        self._release_on_shutdown(self.revocations.close, "the revocations table")
        if cfg.revoke_above:
            self._policy = RevocationPolicy(cfg.revoke_above, cfg.revoke_after, cfg.revoke_quorum)
            logger.info(
                f"Revoking members whose suspicion stays above {cfg.revoke_above:g} for {cfg.revoke_after} refreshes, "
                f"voted by at least {cfg.revoke_quorum} members"
            )
        authority = Authority(
            cfg.authority_key_path(), cfg.token_ttl, cfg.run_secret_file, cfg.allowlist_file, self.revocations
        )
        access = monitor_access(authority, self.swarm.run_id, identity)
        files = [path for path in (cfg.run_secret_file, cfg.allowlist_file) if path]
        logger.info(f"Closed run {self.swarm.run_id!r}: peers join via POST /api/join with a credential of {files}")
        return authority, access

    def _write_peers_file(self, maddrs: list[str]) -> None:
        path = self.config.peers_file_path()
        write_atomically(path, "\n".join(maddrs) + "\n")
        logger.info(f"Multiaddrs of this monitor written to {path}")

    def run(self) -> None:
        """Refresh every refresh period until stopped; serve checkpoint requests as they come.

        Nothing a turn of the loop raises ends it: the failure is counted and logged, and the next turn goes on.
        """
        next_refresh = 0.0
        while not self._stop.is_set():
            try:
                next_refresh = self._turn(next_refresh)
            except Exception as error:  # noqa: BLE001 -- whatever a stranger's bytes cause, the monitor lives on
                self.live.refresh_errors += 1
                self._errors.error("The monitor's loop failed; it goes on", error)
                self._stop.wait(self.config.refresh_period)  # no busy loop if the failure repeats at once
                next_refresh = 0.0

    def _turn(self, next_refresh: float) -> float:
        """One turn of the loop: refresh if due, else serve a request or wait for one. Returns the next refresh time."""
        if time.monotonic() >= next_refresh:
            self.refresh()
            next_refresh = time.monotonic() + self.config.refresh_period
        try:
            request = self._requests.get(timeout=max(0.0, next_refresh - time.monotonic()))
        except queue.Empty:
            return next_refresh
        if request is not None:
            self._serve_request(request)
        return next_refresh

    def stop(self) -> None:
        self._stop.set()
        self._requests.put(None)  # wake the loop

    def refresh(self) -> None:
        """One cycle: announce the run, read and aggregate the records, keep the state fresh, checkpoint if due.

        A refresh that fails for any reason (the DHT timing out, SQLite, a bug) is counted in `refresh_errors` and
        logged with its traceback (at most once a minute); the next refresh tries again.
        """
        try:
            self._refresh()
        except Exception as error:  # noqa: BLE001 -- whatever a stranger's bytes cause, the monitor lives on
            self.live.refresh_errors += 1
            self._errors.error("A refresh of the monitor failed; the next one tries again", error)

    def _refresh(self) -> None:
        self._publish_run_record()
        known = {row.peer_id for row in self.live.snapshot.peers}
        read = read_progress(self.dht, self.swarm.run_id, self.run_model.fingerprint, known=known.__contains__)
        self._log_refused(read.refused)
        # before any write: a failed read fails the refresh whole
        suspects, score_records = read_suspects(self.dht, self.swarm.run_id, known=known.__contains__)
        snapshot = aggregate(
            read.reports,
            now=get_dht_time(),
            previous=self.live.snapshot,
            invalid_records=read.invalid,
            stale_after=self.config.stale_after,
            held_epoch=self.keeper.epoch,
            held_lead=self._held_lead(),
        )
        snapshot = self._not_behind_held_state(snapshot)
        if snapshot.refused:
            reasons = ", ".join(f"{count} {reason}" for reason, count in snapshot.refused.items())
            logger.warning(f"Refused {sum(snapshot.refused.values())} progress records while aggregating ({reasons})")
        by_reason = {**read.invalid_by_reason}
        for reason, count in snapshot.refused.items():
            by_reason[reason] = by_reason.get(reason, 0) + count
        self.history.record(snapshot)  # first: a refresh that cannot save its snapshot is not a successful one
        self._count_contributions(snapshot)
        self.live.update(snapshot, snapshot.invalid_records, read.refused, by_reason, read.refused_count)
        self.live.suspects = suspects
        self._revoke(score_records)
        self._keep_state(snapshot)

    def _revoke(self, score_records: dict[bytes, ScoreRecord]) -> None:
        """Closed runs with --revoke-above: revoke the members that members accused for --revoke-after refreshes in a
        row (monitor/revocation.py: only admitted members' records vote)."""
        if self.revocations is None:
            return
        if self._policy is not None:
            ballots = member_suspects(score_records, self.revocations, self._policy.threshold)
            for suspect, streak in self._policy.observe(ballots):
                if self.revocations.refusal(suspect.peer_id, b"") is not None:
                    continue  # decided before (by this monitor before a restart): no second decision or line
                evidence = self.revocations.member_records(score_records)
                decision = self.revocations.revoke(suspect, streak, self._policy.threshold, evidence)
                logger.warning(
                    f"Revoked member {decision.peer_id} of run {self.swarm.run_id!r}: no more access tokens; its "
                    f"current token ends within {self.config.token_ttl:.0f} s. Evidence: {decision.summary()}"
                )
        self.live.revocations, self.live.revoked_count = tuple(self.revocations.all()), self.revocations.count()
        self.live.contributor_of_peer = self.revocations.contributors_of_members()

    def _count_contributions(self, snapshot: SwarmSnapshot) -> None:
        """Fold the snapshot into the contributors table and save it (the table in memory follows only once saved)."""
        update = update_contributors(self._contributor_rows, snapshot, previous_time=self.live.snapshot.time)
        self.contributors.save(update)
        self._contributor_rows = update.contributors

    def _log_refused(self, refused: dict[str, str]) -> None:
        """Log each refused peer once; past MAX_REFUSED_LOGGED remembered peers, new ones are only counted."""
        for label in refused.keys() - self._refused_logged:
            if len(self._refused_logged) >= MAX_REFUSED_LOGGED:
                return
            logger.warning(f"Refusing the records of peer {label}: {refused[label]}")
            self._refused_logged.add(label)

    def _held_lead(self) -> int:
        """How far ahead of the held state a lone peer is believed: up to the epoch at which a download is due.

        Beyond it nobody vouches for a lone peer; within it, its epoch triggers the download that then vouches.
        """
        cfg = self.config
        return MAX_EPOCH_LEAD + (cfg.fetch_state_every or cfg.checkpoint_every)

    def _not_behind_held_state(self, snapshot: SwarmSnapshot) -> SwarmSnapshot:
        """The run is at least at the epoch of the state the monitor holds (resumed, or downloaded from a trainer)."""
        if self.keeper.epoch > snapshot.epoch:
            return replace(snapshot, epoch=self.keeper.epoch)
        return snapshot

    def _publish_run_record(self) -> None:
        record = RunRecord(
            model_hash=self.run_model.fingerprint,
            model=self.config.model,
            tokenizer=self.run_model.tokenizer_name,
            state_epoch=self.keeper.epoch,
            dashboard=self.dashboard_url[:256],
            time=get_dht_time(),
            protocol=PROTOCOL_VERSION,
            run_key=self.run_key.public_hex,
        ).signed_with(self.run_key)
        publish_run_record(self.dht, self.swarm.run_id, record, RUN_RECORD_EXPIRATION)

    def _keep_state(self, snapshot: SwarmSnapshot) -> None:
        """Download the state when it is `fetch_state_every` epochs old; checkpoint every `checkpoint_every` epochs."""
        cfg, held, swarm_epoch = self.config, self.keeper.epoch, snapshot.epoch
        # the first trained state is taken at once, so a run whose trainers all leave early can still resume
        stale = held < 0 or (cfg.fetch_state_every and swarm_epoch - held >= cfg.fetch_state_every)
        newest = self.store.list()
        last_checkpoint = newest[0].epoch if newest else 0
        checkpoint_due = (
            cfg.checkpoint_every and swarm_epoch // cfg.checkpoint_every > last_checkpoint // cfg.checkpoint_every
        )
        # Only trainers hold a newer state than the monitor's: with none alive, there is nothing to download.
        # Ghosts (future-dated records) and unvouched epochs are not alive peers, so they trigger no download.
        ahead = snapshot.alive_peers and swarm_epoch > max(held, 0)
        if ahead and (stale or checkpoint_due) and time.monotonic() >= self._next_fetch and not self._fetch():
            self._next_fetch = time.monotonic() + FETCH_BACKOFF
        # The one exception: nobody vouched for is alive, but someone claims an epoch nobody vouches for. It may be a
        # lone trainer that ran ahead of the held state (or the monitor holds none yet, after a restart with a fresh
        # run dir): only a download can tell, and its state's epoch then vouches. Rarely, so a lone stranger's claim
        # costs at most one download attempt per UNVOUCHED_FETCH_BACKOFF; among vouched peers it costs nothing.
        lone_claim = not snapshot.alive_peers and snapshot.unconfirmed_peers
        if lone_claim and time.monotonic() >= self._next_unvouched_fetch:
            self._next_unvouched_fetch = time.monotonic() + UNVOUCHED_FETCH_BACKOFF
            self._fetch()
        if checkpoint_due and self.keeper.epoch // cfg.checkpoint_every > last_checkpoint // cfg.checkpoint_every:
            try:
                self.checkpoint()
            except NonFiniteState as error:  # nothing written; the next good state is checkpointed instead
                logger.error(str(error))

    def _fetch(self) -> bool:
        try:
            fetched = self.keeper.fetch(timeout=self.optim.load_state_timeout, swarm_epoch=self.live.snapshot.epoch)
        except ModelMismatch as error:
            logger.error(str(error))
            return False
        self.live.state_epoch = self.keeper.epoch
        return fetched

    def checkpoint(self) -> CheckpointEntry:
        """Write the held state as a checkpoint (RuntimeError if the monitor holds none yet)."""
        if not self.keeper.has_state:
            raise RuntimeError("the monitor holds no training state yet (no peer has shared one)")
        snapshot = self.live.snapshot
        return self.store.write(
            self.keeper.epoch,
            self.keeper.write,
            run_id=self.swarm.run_id,
            loss=snapshot.loss,
            samples_total=snapshot.samples_total,
            model_fingerprint=self.run_model.fingerprint,
            **checkpoint_mode(self.optim, self.keeper.epoch),
        )

    def request_checkpoint(self, timeout: float = 600.0) -> CheckpointEntry:
        """From another thread (HTTP): fetch the newest state and checkpoint it in the main loop; wait for it."""
        request: Future = Future()
        self._requests.put(request)
        return request.result(timeout=timeout)

    def _serve_request(self, request: Future) -> None:
        if not request.set_running_or_notify_cancel():
            return
        try:
            self._fetch()
            request.set_result(self.checkpoint())
        except Exception as error:  # noqa: BLE001 -- any failure goes back to the HTTP caller, not the main loop
            request.set_exception(RuntimeError(str(error)))

    def shutdown(self) -> None:
        """Stop serving, stop sharing, leave the DHT, close the history (in reverse order of the start)."""
        self.stop()
        while not self._requests.empty():
            pending = self._requests.get_nowait()
            if pending is not None and pending.set_running_or_notify_cancel():
                pending.set_exception(RuntimeError("the monitor is shutting down"))
        self._resources.close()


def training_mode(optim: OptimConfig) -> dict:
    """The run's training mode as /api/status and the dashboard show it."""
    if optim.local_steps:
        label = f"local steps H={optim.local_steps} (an epoch is one outer step)"
        return {"name": optim.training_mode, "local_steps": optim.local_steps, "label": label}
    return {"name": optim.training_mode, "local_steps": 0, "label": "synchronous"}


def write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: a script polling for the file never reads half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
