"""Local-steps (DiLoCo) training: the second ``TrainingMode`` (peer/training_mode.py), chosen by ``--local-steps``.

Each peer steps its own inner optimizer (LAMB, as the synchronous mode) on every batch. One epoch is one outer step:
when the swarm has accumulated ``local_steps x target_batch_size`` samples (hivemind's ProgressTracker, as
hivemind.Optimizer counts its target batch), the peers all-reduce their pseudo-gradients (outer weights at the
round's start minus local weights), weighted by the samples behind each, and apply the average to the outer weights
with Nesterov SGD (peer/outer_step.py); the new outer weights become every peer's local weights.

Why a slow peer does not stall a fast one: the round starts on the swarm's sample count, not on each peer's step
count. A peer that misses a round (it was late, or its work was not finite) finds the swarm's epoch ahead of its own
at its next step, drops its local work (counted in ``dropped_samples``) and downloads the outer state.

What a joiner downloads: the outer weights, the outer momentum and the epoch (served by ``OuterAverager`` under the
DHT prefix ``{run_id}_outer`` at priority = the epoch, in peer/swarm/outer_state.py's format, checked per donor).
The inner optimizer starts fresh: its moments are private to each peer (DiLoCo never averages them), serving them
would triple the download, and a donor's moments follow its own batches, not the joiner's; LAMB's bias correction
makes a fresh start take full-sized steps at once. A backup holds all of it,
inner state included, so a restarted peer resumes its own trajectory.

Lossy codecs (--grad-compression fp16, int8-block, int4-block, topk-int4) carry an error feedback
(peer/error_feedback.py): the residual is this peer's, kept in its backups, and starts at zero for a joiner or a peer
that takes the swarm's state. The bytes of each outer all-reduce are counted (peer/hivemind_gaps/traffic.py), logged
per round and exported.

Every member of an outer round takes the same mean, to the bit (peer/hivemind_gaps/mean_replies.py), and makes the
same outer step from it, so peers that took part in the same whole rounds hold the same outer state. They drift apart
only where a round went partial for some peer (a reducer's part never came back: it keeps its own values there), a
peer stepped alone, or the swarm split into two groups. So the outer-state re-sync (a state round of weights and
momentum) runs only where needed: each peer gathers the fingerprint of its outer state with its pseudo-gradient in
the round before each check (peer/state_fingerprint.py), and at every --average-state-every epoch the members of
that round
re-sync if their fingerprints differed, and skip it (logged) if not. All members of a round read the same gathered
data, so they decide alike; a peer that stepped alone is found apart at a later check, in a round with the others.
Fingerprints are taken as a round starts, so a round that went partial shows at the check after the next: a drift
lasts up to --average-state-every + 1 epochs. The re-sync itself keeps hivemind's rounds (each member its own values
plus the rounded difference to the mean): in --state-compression fp16 a mean reply would round the weights to fp16.

With --delay-optimizer-step the outer all-reduce overlaps the next inner phase: the peer starts the round in the
background and goes on stepping from its local weights; when the mean lands (checked at each step), the outer step is
made and the inner steps taken meanwhile are carried onto the new outer weights (local = new outer + their change
since the round started), as Streaming DiLoCo's eager outer step does with a one-round-stale update. Samples trained
during the round count toward the next one. The outer-state re-sync (where needed, in --state-compression's format,
uncompressed by default: ~2x the model per peer, ~10 rounds' worth of bytes at int4) overlaps the inner steps too:
when its mean lands, the change it makes to the outer state is added to the outer weights, the momentum and the
local weights alike, so the inner steps taken meanwhile are kept and the next pseudo-gradient is unchanged. A joiner
served the state while a re-sync is under way takes it before that correction: the drift the re-sync undoes, which a
later check finds (its fingerprint differs) and re-syncs. (The monitor keeps, serves and checkpoints the outer state:
monitor/outer_state.py.)
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from functools import partial

import hivemind
import torch
from hivemind.optim.progress_tracker import ProgressTracker

from peer.error_feedback import ErrorFeedback
from peer.hivemind_gaps.averager_guard import MembershipCheck
from peer.hivemind_gaps.averagers import GuardedOuterAverager, OuterAverager
from peer.hivemind_gaps.state_check import EPOCH_MARGIN
from peer.hivemind_gaps.update_guard import UpdateGuard, WeightRelativeGuard
from peer.hivemind_gaps.vouched_progress import VouchedProgressTracker, distrust_unvouched_epoch
from peer.outer_step import nesterov_outer_step, pseudo_gradients
from peer.state_fingerprint import fingerprint, is_fingerprint, same_state
from peer.swarm.bounded_moves import Bounded, bound_moves
from peer.swarm.config import OptimConfig, SwarmConfig
from peer.swarm.finite import all_finite
from peer.swarm.optimizer import COMPRESSION_FACTORIES, guarded_step, make_optimizer, make_scheduler, param_groups
from peer.swarm.outer_state import STATE_FORMAT, copy_into, outer_prefix, outer_state_layout, trainable

logger = logging.getLogger(__name__)
SHUTDOWN_TIMEOUT = 5.0  # seconds for the tracker's thread to finish its last report
# The largest relative change one outer re-sync makes to this peer's outer weights or momentum (each apart):
# ||step|| / ||own||. Honest re-syncs only undo the codecs' rounding drift. Measured in two runs of tests/peer/
# test_local_steps.py (2-3 peers, fp16 pseudo-gradients, a re-sync every 2 epochs, ~35 re-syncs in all): weights
# 8e-6-2.1e-4, momentum 3.5e-5-1.5e-3; with no re-sync at all the weights drifted 1.2e-2 apart in 19 rounds (gap 14),
# so 0.05 leaves 4x over that. A mean farther away is not refused but approached by 0.05 per re-sync: a crafted state
# moves a peer at most that much per re-sync (as a state crafted to fall just inside the bound would), while peers
# that honestly came apart (two that each stepped alone on a failed round were 25-27% apart in CI, and a refusal kept
# them so for good) converge in a few re-syncs.
MAX_RESYNC_CHANGE = 0.05


@dataclass
class PendingRound:
    """An outer all-reduce under way: what it sends, and where the inner steps that overlap it began."""

    control: object | None  # hivemind's StepControl; None if the round could not even start
    pseudo: list[torch.Tensor]  # this peer's (error-fed) pseudo-gradient: the fallback if the round fails
    anchor: list[torch.Tensor] | None  # the local weights when an overlapped round started (None: not overlapped)
    traffic: tuple[int, int]  # bytes sent and received before it
    samples: int  # the samples behind the pseudo-gradient (its weight in the mean)
    started: float  # time.perf_counter(), the clock of hivemind's throughput estimate

    def done(self) -> bool:
        return self.control is None or self.control.done()


@dataclass
class PendingResync:
    """An overlapped outer-state re-sync under way: the state it sent, and that state's epoch."""

    control: object  # hivemind's StepControl
    epoch: int
    outer: list[torch.Tensor]
    momentum: list[torch.Tensor]


class LocalStepsSwarm:
    """Inner steps on every batch, one outer step with the swarm per epoch (see the module docstring).

    Build it with ``build_local_steps`` (in the main thread: hivemind's averager sets signal handlers).

    Args:
        model: the model; its parameters are the local (inner) weights.
        optim: the run's optimizer settings.
        tracker: hivemind's progress tracker over ``local_steps x target_batch_size`` samples.
        make_averager: builds an averager over the given tensors, checking downloads against the given layout: with
            a state provider, the pseudo-gradients' (in --grad-compression, serving the outer state); without, the
            outer state's re-sync (in --state-compression).
    """

    def __init__(self, model: torch.nn.Module, optim: OptimConfig, tracker: ProgressTracker, make_averager):
        self.model, self.optim, self.tracker = model, optim, tracker
        self.parameters = trainable(model)
        self.outer = [parameter.detach().float().cpu().clone() for parameter in self.parameters]
        self.momentum = [torch.zeros_like(weight) for weight in self.outer]
        self._state_lock = threading.Lock()  # outer state and epoch change together; a joiner reads them together
        self._epoch, self._samples, self.dropped_samples = 0, 0, 0
        self.overlap = optim.delay_optimizer_step  # the outer all-reduce runs while the next inner steps go on
        self._pending: PendingRound | None = None
        self._pending_resync: PendingResync | None = None  # only with the overlap
        self._inner_step_seconds = 0.0  # in the inner optimizer's steps: compute, as forward and backward are
        self.refused_resyncs = 0  # re-syncs whose mean was not finite
        self.bounded_resyncs = 0  # re-syncs whose mean was over MAX_RESYNC_CHANGE away: approached by that much
        self.skipped_resyncs = 0  # re-sync epochs whose round showed the outer states the same: no state round
        # on the averaged pseudo-gradient, the swarm's input to every peer, judged against the outer weights (which
        # peers in agreement hold alike, so they refuse the same steps: WeightRelativeGuard)
        self.outer_guard = WeightRelativeGuard()
        self.inner, self.scheduler = self._fresh_inner_optimizer()
        self.feedback = ErrorFeedback(COMPRESSION_FACTORIES[optim.grad_compression](), self.outer)
        # what a donor's outer state must be like: checked per donor, in the averager's process, so that a refused
        # donor's state is never applied and the next donor is asked
        self.layout = outer_state_layout([*self.outer, *self.momentum])
        self.averager = make_averager(
            [torch.zeros_like(weight) for weight in self.outer], self.layout, self._served_state
        )
        self.averager.epoch_limit = lambda: self.tracker.global_epoch + EPOCH_MARGIN
        try:
            self.resync = make_averager(
                [torch.zeros_like(tensor) for tensor in (*self.outer, *self.momentum)], self.layout
            )
        except BaseException:
            self.averager.shutdown()
            raise

    def _fresh_inner_optimizer(self):
        inner = make_inner_optimizer(param_groups(self.model, self.optim.weight_decay), self.optim)
        scheduler = make_scheduler(inner, self.optim)
        set_schedule_epoch(scheduler, self._epoch)
        return inner, scheduler

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def is_averaging(self) -> bool:
        return self.tracker.ready_to_update_epoch

    @property
    def num_peers(self) -> int:
        return self.tracker.global_progress.num_peers

    @property
    def target_batch_size(self) -> int:
        return self.tracker.target_batch_size

    @property
    def presence_expiration(self) -> float:
        return self.tracker.metadata_expiration

    @property
    def update_guard(self) -> UpdateGuard:
        return self.outer_guard

    @property
    def refused_states(self) -> int:
        return self.averager.refused_states + self.refused_resyncs

    @property
    def averaged_bytes(self) -> tuple[int, int]:
        return self.averager.bytes_sent, self.averager.bytes_received

    @property
    def state_bytes(self) -> tuple[int, int]:
        return self.resync.bytes_sent, self.resync.bytes_received

    @property
    def inner_step_seconds(self) -> float:
        return self._inner_step_seconds

    def step(self, batch_size: int, scaler: torch.amp.GradScaler | None = None) -> None:
        self._apply_landed_resync()
        pending = self._pending  # read once: cancel() may clear it from the stop thread
        if pending is not None:
            if pending.done() and not self._finish_round():
                return  # dropped: this batch's gradients were computed on the discarded local weights
        elif self.tracker.global_epoch > self._epoch and self._caught_up():
            return  # this batch's gradients were computed on the stale local weights
        started = time.perf_counter()
        if scaler is None:
            self.inner.step()
        else:
            scaler.step(self.inner)
            scaler.update()
        self._inner_step_seconds += time.perf_counter() - started
        self._samples += batch_size
        if self._pending is not None:
            return  # counted toward the next round once this one lands
        self.tracker.report_local_progress(self._epoch, self._samples)
        if self.tracker.ready_to_update_epoch:
            self._start_round()
            if self._pending is not None and not self.overlap:
                self._finish_round()

    def take_round_scores(self) -> list:
        """[]: the outer all-reduce takes the mean (centered-clip is refused with --local-steps, OptimConfig)."""
        return []

    def zero_grad(self) -> None:
        self.inner.zero_grad(set_to_none=True)

    def _caught_up(self) -> bool:
        """The swarm made an outer step without this peer: take its outer state, dropping this round's work.

        If no peer can give it, this peer joins the swarm's epoch with its own outer weights (a later check finds
        them apart and re-syncs them) rather than train apart. True if it downloaded.
        """
        swarm_epoch = self.tracker.global_epoch
        logger.warning(f"The swarm is at epoch {swarm_epoch}, this peer at {self._epoch}: taking the swarm's state")
        if self.load_state_from_peers() is not None:
            # anyone can write a progress entry: a download that leaves this peer behind found no donor of that epoch
            distrust_unvouched_epoch(self.tracker, self._epoch)
            return True
        if swarm_epoch - self._epoch > EPOCH_MARGIN:  # anyone can write a progress entry: no jump to any epoch
            logger.warning(f"Not joining epoch {swarm_epoch} unvouched: over {EPOCH_MARGIN} epochs ahead of this one")
            distrust_unvouched_epoch(self.tracker, self._epoch)  # and no download at every step meanwhile
            return False
        logger.warning(f"Joining epoch {swarm_epoch} with this peer's own outer weights")
        with self._state_lock:
            self._epoch = max(self._epoch, swarm_epoch)
        self._offer_state_at_epoch()
        with self.tracker.pause_updates():
            self.tracker.update_epoch(self._epoch)
        set_schedule_epoch(self.scheduler, self._epoch)
        return False

    def _start_round(self) -> None:
        """Start the outer all-reduce of this round's pseudo-gradient, weighted by the samples behind it."""
        with self.tracker.pause_updates():
            if self.tracker.global_epoch > self._epoch:
                return  # caught up at the next step
            pseudo = pseudo_gradients(self.outer, self.parameters)
            if not all_finite(pseudo):
                logger.error("This peer's pseudo-gradient is not finite: it sits this round out and drops its work")
                self._restart_round()
                return
            pseudo = self.feedback.apply(pseudo)
            metadata = self._round_metadata()
            before = self.averaged_bytes
            with self.averager.get_tensors() as buffers:
                copy_into(buffers, pseudo)
            try:
                control = self.averager.step(
                    gather=metadata, weight=float(self._samples), timeout=self.optim.averaging_timeout, wait=False
                )
            except Exception as error:  # noqa: BLE001 - a shut-down averager: step with this peer's own
                logger.warning(f"Outer round not started ({error!r})")
                control = None
            # only an overlapped round has inner steps to carry; a blocking one needs no copy of the weights
            anchor = (
                [parameter.detach().float().cpu().clone() for parameter in self.parameters] if self.overlap else None
            )
            self._pending = PendingRound(control, pseudo, anchor, before, self._samples, time.perf_counter())
            self._samples = 0

    def _round_metadata(self) -> dict:
        """What this peer gathers with its pseudo-gradient: its epoch, and the fingerprint of its outer state in the
        round that ends at a re-sync check (an --average-state-every epoch: the only round whose fingerprints are
        read, and every member at this epoch knows which it is). None in the others, and while a re-sync is under
        way: the state it has is about to change, and would read as drift."""
        checked = (self._epoch + 1) % self.optim.average_state_every == 0
        if self._pending_resync is not None or not checked:
            return {"epoch": self._epoch, "fingerprint": None}
        with self._state_lock:
            return {"epoch": self._epoch, "fingerprint": fingerprint(self.outer, self.momentum)}

    def _finish_round(self) -> bool:
        """Apply the round's mean (waiting for it) with the outer optimizer and move to the next epoch; False if the
        round was dropped (cancelled meanwhile, or this peer was behind the swarm: its next step downloads)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return False
        averaged, peers, agreed = self._round_result(pending)
        if averaged is None:
            self.dropped_samples += pending.samples
            self.feedback.reset()  # the residual belonged to the dropped pseudo-gradient
            self._restart_round()
            return False
        sent, received = (now - then for now, then in zip(self.averaged_bytes, pending.traffic))
        # the next epoch's state is made apart and published whole: a joiner served "epoch E" while the re-sync
        # of E is under way would otherwise hold E's pre-re-sync weights, which no other peer has
        with self._state_lock:
            outer, momentum = [t.clone() for t in self.outer], [t.clone() for t in self.momentum]
        if self.outer_guard.admit_for(averaged, outer):
            nesterov_outer_step(outer, averaged, momentum, self.optim.outer_learning_rate, self.optim.outer_momentum)
        epoch = self._epoch + 1
        check = epoch % self.optim.average_state_every == 0
        resync_now = check and agreed is False
        if check and agreed:
            self.skipped_resyncs += 1
            logger.info(f"No re-sync at epoch {epoch}: the outer states of the round's {peers} peers agreed")
        if resync_now and not self.overlap:
            outer, momentum = self._resynced(outer, momentum, epoch)
        with self._state_lock:
            copy_into([*self.outer, *self.momentum], [*outer, *momentum])
            self._epoch = epoch
        self._offer_state_at_epoch()
        self._carry_inner_steps(pending.anchor)
        if resync_now and self.overlap:
            self._start_overlapped_resync(outer, momentum, epoch)
        set_schedule_epoch(self.scheduler, self._epoch)
        with self.tracker.pause_updates():
            self.tracker.update_epoch(self._epoch)
        if self._samples:  # trained while the round was under way: they count toward this epoch's round
            # over the time they took (leaving the pause restarted hivemind's throughput clock: counted from now,
            # they would read as trained in no time, and the swarm's estimate would call rounds early)
            self.tracker.performance_ema.timestamp = pending.started
            self.tracker.report_local_progress(self._epoch, self._samples)
        overlapped = f" in {time.perf_counter() - pending.started:.1f} s, overlapped" if self.overlap else ""
        logger.info(
            f"Outer step to epoch {self._epoch}: averaged pseudo-gradients with {peers} peers{overlapped}, "
            f"sent {sent} B, received {received} B"
        )
        return True

    def _carry_inner_steps(self, anchor: list[torch.Tensor] | None) -> None:
        """Local weights = the new outer weights plus the inner steps taken since the round started (none unless
        the round overlapped them)."""
        if anchor is None:
            copy_into(self.parameters, self.outer)
            return
        with torch.no_grad():
            local = [
                weight + (parameter.detach().float().cpu() - start)
                for weight, parameter, start in zip(self.outer, self.parameters, anchor)
            ]
        copy_into(self.parameters, local)

    def _resynced(self, outer: list[torch.Tensor], momentum: list[torch.Tensor], epoch: int):
        """The swarm's mean of the outer weights and momentum of ``epoch`` (in --state-compression's format); this
        peer's own if the round fails. Run where the round before showed the peers' outer states apart (module doc):
        this round brings them back together.
        """
        control = self._start_resync(outer, momentum, epoch)
        return (outer, momentum) if control is None else self._resync_result(control, outer, momentum, epoch)

    def _start_resync(self, outer: list[torch.Tensor], momentum: list[torch.Tensor], epoch: int):
        """Start the re-sync round of ``epoch`` with this state (hivemind's StepControl; None if it did not start)."""
        with self.resync.get_tensors() as buffers:
            copy_into(buffers, [*outer, *momentum])
        try:
            return self.resync.step(gather=epoch, weight=1.0, timeout=self.optim.averaging_timeout, wait=False)
        except Exception as error:  # noqa: BLE001 - a shut-down averager
            logger.warning(f"Outer state not re-synced ({error!r}): keeping this peer's own")
            return None

    def _resync_result(self, control, outer: list[torch.Tensor], momentum: list[torch.Tensor], epoch: int):
        """The re-sync's checked mean of (outer, momentum) sent at ``epoch`` (waiting for it), or those as they are."""
        try:
            gathered = control.result()
        except (Exception, asyncio.CancelledError) as error:  # noqa: BLE001 - a cancel (a stop), any failed round
            logger.warning(f"Outer state not re-synced ({error!r}): keeping this peer's own")
            return outer, momentum
        if not gathered:
            return outer, momentum
        # hivemind groups by prefix only: a peer that is behind (it catches up at its next step) can land in the
        # group, and the mean of two epochs' states is no epoch's
        others = sorted({str(value)[:20] for value in gathered.values() if value != epoch})
        if others:
            logger.warning(f"Outer state not re-synced at epoch {epoch}: the group held epochs {others}")
            return outer, momentum
        with self.resync.get_tensors() as buffers:
            averaged = [buffer.clone() for buffer in buffers]
        count = len(outer)
        mean_outer, mean_momentum = averaged[:count], averaged[count:]
        if not all_finite(averaged):
            self.refused_resyncs += 1
            logger.error(f"Refused the re-sync at epoch {epoch} (the mean is not finite): keeping this peer's own")
            return outer, momentum
        weights, moments = toward(outer, mean_outer), toward(momentum, mean_momentum)
        if weights.bounded or moments.bounded:
            self.bounded_resyncs += 1
            logger.warning(
                f"The swarm's mean outer state at epoch {epoch} is far from this peer's (relative change: weights "
                f"{weights.change:.2e}, momentum {moments.change:.2e}): moving at most {MAX_RESYNC_CHANGE} toward it"
            )
            return weights.moved(outer, mean_outer), moments.moved(momentum, mean_momentum)
        logger.info(
            f"Re-synced the outer state with {len(gathered)} peers at epoch {epoch} "
            f"(relative change: weights {weights.change:.2e}, momentum {moments.change:.2e})"
        )
        return mean_outer, mean_momentum

    def _start_overlapped_resync(self, outer: list[torch.Tensor], momentum: list[torch.Tensor], epoch: int) -> None:
        """Start the re-sync of ``epoch``'s outer state (copies, kept apart) and train on; applied when it lands."""
        if self._pending_resync is not None:
            logger.warning(f"The re-sync of epoch {self._pending_resync.epoch} is still under way: none at {epoch}")
            return
        control = self._start_resync(outer, momentum, epoch)
        if control is not None:
            self._pending_resync = PendingResync(control, epoch, outer, momentum)

    def _apply_landed_resync(self) -> None:
        """Once an overlapped re-sync has landed, add what it changed to the outer state and to the local weights.

        Shifting outer and local weights alike keeps the inner steps taken meanwhile and the next pseudo-gradient
        (outer minus local); an outer step made meanwhile is kept too (every peer made the same one). A round under
        way carries its inner steps from an anchor, which is shifted the same, so the change is not counted twice.
        """
        resync = self._pending_resync
        if resync is None or not resync.control.done():
            return
        self._pending_resync = None
        outer, momentum = self._resync_result(resync.control, resync.outer, resync.momentum, resync.epoch)
        if outer is resync.outer and momentum is resync.momentum:
            return  # kept its own: nothing to change
        with torch.no_grad():
            outer_change = [new - old for new, old in zip(outer, resync.outer, strict=True)]
            momentum_change = [new - old for new, old in zip(momentum, resync.momentum, strict=True)]
            with self._state_lock:
                for tensor, change in zip([*self.outer, *self.momentum], [*outer_change, *momentum_change]):
                    tensor.add_(change)
            local = [
                parameter.detach().float().cpu() + change for parameter, change in zip(self.parameters, outer_change)
            ]
            copy_into(self.parameters, local)
            pending = self._pending
            if pending is not None and pending.anchor is not None:
                for start, change in zip(pending.anchor, outer_change):
                    start.add_(change)

    def _restart_round(self) -> None:
        """Drop this round's local work: back to the outer weights (the epoch is unchanged)."""
        self.dropped_samples += self._samples
        self._samples = 0
        copy_into(self.parameters, self.outer)
        self.tracker.report_local_progress(self._epoch, 0, update_global_samples=False)

    def _round_result(self, pending: PendingRound) -> tuple[list[torch.Tensor] | None, int, bool | None]:
        """The swarm's sample-weighted mean of the pseudo-gradients (this peer's own if no round succeeded, None if
        the round showed this peer behind the swarm), the peers it averaged with, and whether the outer states of the
        members at this peer's epoch agreed when the round started (None where nothing was compared: this peer
        stepped alone, or no other member at its epoch sent a fingerprint; there is nobody to re-sync with).

        hivemind groups by prefix only, so a peer whose tracker had not yet seen the swarm's step can land in a round
        of the next epoch: the mean of pseudo-gradients taken from newer outer weights, applied to its older ones,
        would be no peer's state. Members' gathered epochs are their word, so a peer drops its round only when its
        tracker agrees that the swarm is ahead. (Members one round behind in a round of this peer's epoch add a
        pseudo-gradient one round stale, as an overlapped round's is.)
        """
        if pending.control is None:
            return pending.pseudo, 1, None
        try:
            gathered = pending.control.result()
        except (Exception, asyncio.CancelledError) as error:  # noqa: BLE001 - a cancel (a stop), any failed round
            logger.warning(f"Outer round failed ({error!r}): stepping with this peer's own pseudo-gradient")
            return pending.pseudo, 1, None
        if not gathered:
            return pending.pseudo, 1, None
        epochs = [gathered_epoch(value) for value in gathered.values()]
        ahead = sorted({epoch for epoch in epochs if epoch is not None and epoch > self._epoch})
        if ahead and self.tracker.global_epoch > self._epoch:
            logger.warning(
                f"Outer round of epoch {self._epoch} grouped with peers at epochs {ahead[:5]}: this peer is behind "
                "the swarm; dropping the round's work to take the swarm's state"
            )
            return None, len(gathered), None
        # members of another epoch hold another epoch's state: their fingerprints say nothing of drift
        alike = states_agree([value for value in gathered.values() if gathered_epoch(value) == self._epoch])
        with self.averager.get_tensors() as buffers:
            return [buffer.clone() for buffer in buffers], len(gathered), alike

    def _served_state(self):
        with self._state_lock:
            metadata = {"epoch": self._epoch, "format": STATE_FORMAT}
            return metadata, [tensor.clone() for tensor in (*self.outer, *self.momentum)], None

    def state_dict(self) -> dict:
        with self._state_lock:
            outer = {"outer": [t.clone() for t in self.outer], "momentum": [t.clone() for t in self.momentum]}
        inner = {"inner": self.inner.state_dict(), "scheduler": self.scheduler.state_dict()}
        return {"local_steps": {**outer, **inner, "residual": [t.clone() for t in self.feedback.residual]}}

    def backup_problem(self, state: dict) -> str | None:
        if "local_steps" not in state:
            return "it holds no local-steps state (written in synchronous mode?)"
        if "residual" in state["local_steps"]:  # checked before anything is loaded (Backups.restore asks first)
            return self.feedback.problem(state["local_steps"]["residual"])
        return None

    def load_state_dict(self, state: dict) -> None:
        problem = self.backup_problem(state)
        if problem:
            raise ValueError(f"the backup is not restored: {problem}")
        saved = state["local_steps"]
        self._drop_pending_round()
        if "residual" in saved:  # a backup of before error feedback has none
            self.feedback.load(saved["residual"])
        self._take_outer_state(state["epoch"], saved["outer"], saved["momentum"])
        self.inner.load_state_dict(saved["inner"])
        self.scheduler.load_state_dict(saved["scheduler"])
        # the backup's model holds the local weights of its moment (not necessarily the outer ones): keep them
        self._samples = 0

    def load_state_from_peers(self) -> int | None:
        self._drop_pending_round()
        try:  # the donor loop runs in the averager's process; slow or fake donors can outlast the wait
            loaded = self.averager.load_state_from_peers(timeout=self.optim.load_state_timeout)
        except (TimeoutError, RuntimeError, OSError) as error:
            logger.warning(f"The download of the swarm's outer state failed: {error!r}")
            loaded = None
        if loaded is None:
            logger.warning("Could not download the swarm's outer state; going on with the local state")
            return None
        metadata, tensors = loaded  # its format, layout, values and epoch were checked per donor (self.layout)
        count = len(self.outer)
        self._take_outer_state(metadata["epoch"], tensors[:count], tensors[count:])
        self.dropped_samples += self._samples
        self._samples = 0
        copy_into(self.parameters, self.outer)
        self.inner, self.scheduler = self._fresh_inner_optimizer()
        self.feedback.reset()  # the residual belonged to the work just dropped
        logger.info(f"Took the swarm's outer state of epoch {self._epoch}")
        return self._epoch

    def _drop_pending_round(self) -> None:
        """Give up a round and a re-sync under way (their results would apply to a state this peer is replacing)."""
        resync, self._pending_resync = self._pending_resync, None
        if resync is not None:
            resync.control.cancel()
        pending, self._pending = self._pending, None
        if pending is None:
            return
        self.dropped_samples += pending.samples
        if pending.control is not None:
            pending.control.cancel()

    def _take_outer_state(self, epoch: int, outer, momentum) -> None:
        """Replace the outer weights, momentum and epoch (ValueError, nothing changed, if a shape differs)."""
        with self._state_lock:
            copy_into([*self.outer, *self.momentum], [*outer, *momentum])
            self._epoch = epoch
        self._offer_state_at_epoch()
        with self.tracker.pause_updates():
            self.tracker.update_epoch(epoch)

    def _offer_state_at_epoch(self) -> None:
        """Serve the outer state at priority = its epoch: a joiner asks donors by priority, so it takes the newest
        state first (at the default 0, a donor epochs behind was as likely as the newest, and the joiner, behind at
        once, downloaded again at its next step)."""
        if self.averager.allow_state_sharing:  # never in client mode (hivemind raises there)
            self.averager.state_sharing_priority = float(self._epoch)

    def cancel(self) -> None:
        self._drop_pending_round()
        self.averager.cancel_averaging()
        self.resync.cancel_averaging()

    def shutdown(self) -> None:
        self.tracker.shutdown(timeout=SHUTDOWN_TIMEOUT)
        self.averager.shutdown()
        self.resync.shutdown()


class ClippedAdamW(torch.optim.AdamW):
    """AdamW (DiLoCo's inner optimizer) that refuses non-finite or absurd gradients and clips them first.

    Args:
        params: parameters or parameter groups.
        max_grad_norm: L2 norm to clip to; 0 disables clipping.
        guard: admits or refuses each step.
        kwargs: passed to ``torch.optim.AdamW``.
    """

    def __init__(self, params, max_grad_norm: float, guard: UpdateGuard, **kwargs):
        super().__init__(params, **kwargs)
        self.max_grad_norm, self.guard = max_grad_norm, guard

    @torch.no_grad()
    def step(self, closure=None):
        return guarded_step(self, self.guard, self.max_grad_norm, super().step, closure)


def make_inner_optimizer(params, optim: OptimConfig) -> torch.optim.Optimizer:
    """The inner optimizer: LAMB as the synchronous mode's, or AdamW (DiLoCo's, with its paper's betas)."""
    # no relative bound on local gradients (one batch's, noisier than a swarm average): finite and the absolute cap
    # only; the averaged pseudo-gradient has its own guard
    guard = UpdateGuard(factor=float("inf"))
    if optim.inner_optimizer == "adamw":
        return ClippedAdamW(
            params,
            optim.max_grad_norm,
            guard,
            lr=optim.learning_rate,
            betas=(0.9, 0.95),
            weight_decay=optim.weight_decay,
        )
    return make_optimizer(params, optim, guard)


@torch.no_grad()
def toward(own: list[torch.Tensor], target: list[torch.Tensor]) -> Bounded:
    """How far ``own`` may move toward ``target`` in one re-sync: MAX_RESYNC_CHANGE of the set's norm. Not each
    tensor's (peer/swarm/bounded_moves.py): peers that came apart met too slowly so, and re-synced again and again."""
    return bound_moves([b - a for a, b in zip(own, target, strict=True)], own, MAX_RESYNC_CHANGE, per_tensor=False)


def set_schedule_epoch(scheduler: torch.optim.lr_scheduler.LambdaLR, epoch: int) -> None:
    """Set the inner learning rates to the schedule's value at ``epoch`` (the schedule counts outer steps)."""
    scheduler.last_epoch = epoch
    rates = [base * factor(epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates


def build_local_steps(
    dht: hivemind.DHT,
    model: torch.nn.Module,
    swarm: SwarmConfig,
    optim: OptimConfig,
    membership: MembershipCheck | None = None,
) -> LocalStepsSwarm:
    """The local-steps mode of a peer (call in the main thread); in a closed run its averager serves members only."""
    tracker = VouchedProgressTracker(
        dht,
        # its own key, {run_id}_outer_progress: a round's samples are not a synchronous epoch's, and a peer started
        # in the other mode by mistake must not count toward them (at this branch's base, {run_id}_progress also
        # held the run's ProgressRecords, which hivemind's tracker cannot parse: its thread died on them)
        prefix=f"{swarm.run_id}_outer",
        target_batch_size=optim.local_steps * optim.target_batch_size,
        lead=0,  # an epoch ahead means a round this peer missed: it downloads the outer state for it
        client_mode=dht.client_mode,
        metadata_expiration=optim.presence_expiration,
        start=True,
    )
    averager_class = OuterAverager if membership is None else partial(GuardedOuterAverager, membership=membership)

    def make_averager(buffers, layout, state_provider=None):
        pseudo_gradients = state_provider is not None
        return averager_class(
            buffers,
            dht,
            state_provider=state_provider or serves_nothing,
            state_layout=layout,
            allow_state_sharing=not dht.client_mode and pseudo_gradients,
            start=True,
            prefix=outer_prefix(swarm.run_id) if pseudo_gradients else f"{swarm.run_id}_outer_sync",
            min_matchmaking_time=optim.matchmaking_time,
            request_timeout=min(3.0, optim.matchmaking_time / 2),
            allreduce_timeout=optim.averaging_timeout,
            next_chunk_timeout=optim.chunk_timeout,  # a silent member is dropped soon (hivemind.Optimizer's rule)
            # the re-sync is a state round: weights and momentum in --state-compression's format (none by default),
            # in hivemind's rounds (each member keeps its own values plus a rounded change: with mean replies an fp16
            # re-sync would round every member's weights to fp16)
            mean_replies=pseudo_gradients,
            compression=COMPRESSION_FACTORIES[
                optim.grad_compression if pseudo_gradients else optim.state_compression
            ](),
            state_compression=COMPRESSION_FACTORIES[optim.state_compression](),
            bandwidth=optim.bandwidth,
            client_mode=dht.client_mode,
        )

    try:
        return LocalStepsSwarm(model, optim, tracker, make_averager)
    except BaseException:
        tracker.shutdown()
        raise


def gathered_epoch(value) -> int | None:
    """The epoch a member of an outer round declared (``_round_metadata``), None if it declared none."""
    epoch = value.get("epoch") if isinstance(value, dict) else value
    return epoch if type(epoch) is int else None


def states_agree(gathered) -> bool | None:
    """Whether the members of an outer round (at one epoch) started it from the same outer state, by the fingerprints
    they gathered; None if fewer than two could be compared. A member with a re-sync under way (fingerprint None or
    missing) is left out; a malformed fingerprint counts as apart: a member can ask for a re-sync this way, as it could
    by sending drifted weights (it costs the group a state round's bytes, at most every --average-state-every epochs)."""
    fingerprints = [value.get("fingerprint") if isinstance(value, dict) else "none" for value in gathered]
    known = [entry for entry in fingerprints if entry is not None]
    if not all(is_fingerprint(entry) for entry in known):
        return False
    if len(known) < 2:
        return None
    return all(same_state(known[0], entry) for entry in known[1:])


def serves_nothing():
    """The state of an averager that shares none (hivemind asks only when sharing is allowed)."""
    return None, [], None
