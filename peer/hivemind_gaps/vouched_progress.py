"""The swarm's progress as peers report it, minus the claims no donor vouches for and the counts no peer could reach.

hivemind 1.1.12's ProgressTracker takes the swarm's epoch as the largest epoch any progress entry in the DHT claims,
and the samples accumulated toward the next step as the sum of the entries' counts; an entry is any key's signed
record, so anyone can write one. One entry 1000 epochs ahead has every peer download the state at every step and
drop its work there (the donors are all at the real epoch, so the peer is still behind after each download): the
whole swarm stalls. One entry claiming 2**40 samples has every peer step at once on whatever it has accumulated.

``VouchedProgressTracker`` leaves out, each time it reads the entries:
- an entry claiming more than MAX_SAMPLES_FACTOR target batches accumulated (a peer reports at most about one target
  batch before it steps) or more than MAX_SAMPLES_PER_SECOND; an entry's time older than its expiration allows is
  read as that oldest time (hivemind extrapolates its samples by rate x age);
- for DISTRUST_SECONDS after the trainer called ``distrust_epochs_ahead()``, an entry more than ``lead`` epochs ahead
  of this peer's own epoch (the bound moves with the peer: the swarm's next steps still count). A trainer calls it
  when a state download left it behind the swarm's epoch: no donor vouched for that epoch. After the pause the
  entries count again, so a swarm really ahead is still joined, by a download a minute later at worst (the price when
  a slow donor served an older epoch just as the swarm stepped: a minute of work outside the rounds).

Still believed within those bounds, as counts and rates are self-reported: one entry claiming a full target batch at
the swarm's epoch, or a rate near MAX_SAMPLES_PER_SECOND (hivemind adds rate x age to the count and sums the rates into
its estimate of when the next step is due), still makes every peer step at once on what it has accumulated (smaller
batches, not a stall); keys are free in an open run, so such entries cost nothing there.
"""

from __future__ import annotations

import logging
import time

from hivemind.optim.progress_tracker import GlobalTrainingProgress, LocalTrainingProgress, ProgressTracker
from hivemind.utils import ValueWithExpiration, get_dht_time
from pydantic.v1 import ValidationError

logger = logging.getLogger(__name__)

MAX_SAMPLES_FACTOR = 4  # target batches one entry may claim accumulated
MAX_SAMPLES_PER_SECOND = 1e6  # far above any one peer of this project (a GPU peer of the tiny preset: ~1e3)
DISTRUST_SECONDS = 60.0  # one more download a minute is what an entry of an unvouched epoch can still cost


class VouchedProgressTracker(ProgressTracker):
    """hivemind's ProgressTracker that leaves out implausible entries and, for a while, epochs no donor vouched for.

    Args:
        lead: while distrusting, how far ahead of this peer's own epoch an entry may be and still count (1 for
            hivemind.Optimizer, which joins an epoch one ahead without a download; 0 for the local-steps mode, which
            downloads the state for it).
    """

    def __init__(self, *args, lead: int = 1, **kwargs):
        self.lead = lead
        self._distrust_until = 0.0  # monotonic time; one float, written and read whole
        self._last_metadata = None
        self.left_out_entries = 0  # entries left out so far
        super().__init__(*args, **kwargs)

    def distrust_epochs_ahead(self, seconds: float = DISTRUST_SECONDS) -> None:
        """For ``seconds``, leave out entries more than ``lead`` epochs ahead of this peer's own epoch (the bound moves
        with it: the swarm's next steps still count); the swarm's progress is recomputed at once."""
        self._distrust_until = time.monotonic() + seconds
        with self.lock_global_progress:
            self.global_progress = self._parse_swarm_progress_data(self._last_metadata)

    def _parse_swarm_progress_data(self, metadata) -> GlobalTrainingProgress:
        self._last_metadata = metadata
        if isinstance(metadata, dict):
            kept = {}
            for subkey, entry in metadata.items():
                bounded = self._bounded(entry)
                if bounded is not None:
                    kept[subkey] = bounded
            self.left_out_entries += len(metadata) - len(kept)
            metadata = kept
        return super()._parse_swarm_progress_data(metadata)

    def _bounded(self, entry):
        """The entry as hivemind may read it, or None to leave it out."""
        value = getattr(entry, "value", None)
        if value is None:
            return entry  # hivemind skips it itself
        try:
            progress = LocalTrainingProgress.parse_obj(value)
        except (ValidationError, TypeError):
            return None  # the DHT's schema refuses such entries; one that got through is not read
        if progress.samples_accumulated > MAX_SAMPLES_FACTOR * self.target_batch_size:
            return None
        if progress.samples_per_second > MAX_SAMPLES_PER_SECOND:
            return None
        if time.monotonic() < self._distrust_until and progress.epoch > self.local_progress.epoch + self.lead:
            return None
        # hivemind extrapolates an entry's samples by its rate since its time: an old time (0) would make that any
        # number; an honest entry is at most metadata_expiration old
        oldest = get_dht_time() - self.metadata_expiration
        if progress.time < oldest:
            value = dict(value, time=oldest)
            return ValueWithExpiration(value, entry.expiration_time)
        return entry


def distrust_unvouched_epoch(tracker: ProgressTracker, local_epoch: int) -> None:
    """After a state download: if this peer is still further behind the swarm's epoch than its tracker's lead allows,
    no donor vouched for that epoch; leave the entries so far ahead out for a while. (hivemind.Optimizer's download
    already joined an epoch one ahead, as after a round this peer missed the end of.)"""
    claimed = tracker.global_epoch
    if isinstance(tracker, VouchedProgressTracker) and claimed > local_epoch + tracker.lead:
        logger.warning(
            f"The swarm's epoch {claimed} is vouched for by no donor (the newest state is of epoch {local_epoch}): "
            f"leaving progress entries over {tracker.lead} epoch(s) ahead of this peer's out for "
            f"{DISTRUST_SECONDS:.0f} s"
        )
        tracker.distrust_epochs_ahead()
