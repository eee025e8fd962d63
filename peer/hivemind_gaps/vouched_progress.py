"""The swarm's progress as peers report it, minus the claims no donor vouches for and the counts no peer could reach.

hivemind 1.1.12's ProgressTracker takes the swarm's epoch as the largest epoch any progress entry in the DHT claims,
and the samples accumulated toward the next step as the sum of the entries' counts; an entry is any key's signed
record, so anyone can write one. One entry 1000 epochs ahead has every peer download the state at every step and
drop its work there (the donors are all at the real epoch, so the peer is still behind after each download): the
whole swarm stalls. One entry claiming 2**40 samples has every peer step at once on whatever it has accumulated.

``VouchedProgressTracker`` leaves out, each time it reads the entries:
- an entry claiming more than MAX_SAMPLES_FACTOR target batches accumulated (a peer reports at most about one target
  batch before it steps) or more than MAX_SAMPLES_PER_SECOND;
- for DISTRUST_SECONDS after the trainer called ``distrust_epochs_above(epoch)``, an entry ahead of that epoch. A
  trainer calls it when a state download left it behind the swarm's epoch: no donor vouched for that epoch. After the
  pause the entries count again, so a swarm really ahead is still joined, by a download a minute later at worst (the
  price when a slow donor served an older epoch just as the swarm stepped: a minute of work outside the rounds).

Still believed within those bounds: an entry's samples per second, from which hivemind estimates when the next step is
due, so a false rate can still make the swarm step early (smaller batches, not a stall).
"""

from __future__ import annotations

import logging
import threading
import time

from hivemind.optim.progress_tracker import GlobalTrainingProgress, LocalTrainingProgress, ProgressTracker
from pydantic.v1 import ValidationError

logger = logging.getLogger(__name__)

MAX_SAMPLES_FACTOR = 4  # target batches one entry may claim accumulated
MAX_SAMPLES_PER_SECOND = 1e6  # far above any one peer of this project (a GPU peer of the tiny preset: ~1e3)
DISTRUST_SECONDS = 60.0  # one more download a minute is what an entry of an unvouched epoch can still cost


class VouchedProgressTracker(ProgressTracker):
    """hivemind's ProgressTracker that leaves out implausible entries and, for a while, epochs no donor vouched for."""

    def __init__(self, *args, **kwargs):
        self._distrust_lock = threading.Lock()
        self._distrust_above: int | None = None
        self._distrust_until = 0.0
        self._last_metadata = None
        self.left_out_entries = 0  # entries left out so far
        super().__init__(*args, **kwargs)

    def distrust_epochs_above(self, epoch: int, seconds: float = DISTRUST_SECONDS) -> None:
        """Leave out entries ahead of ``epoch`` for ``seconds``; the swarm's progress is recomputed at once."""
        with self._distrust_lock:
            self._distrust_above, self._distrust_until = epoch, time.monotonic() + seconds
        with self.lock_global_progress:
            self.global_progress = self._parse_swarm_progress_data(self._last_metadata)

    def _parse_swarm_progress_data(self, metadata) -> GlobalTrainingProgress:
        self._last_metadata = metadata
        if isinstance(metadata, dict):
            kept = {subkey: entry for subkey, entry in metadata.items() if self._believable(entry)}
            self.left_out_entries += len(metadata) - len(kept)
            metadata = kept
        return super()._parse_swarm_progress_data(metadata)

    def _believable(self, entry) -> bool:
        value = getattr(entry, "value", None)
        if value is None:
            return True  # hivemind skips it itself
        try:
            progress = LocalTrainingProgress.parse_obj(value)
        except (ValidationError, TypeError):
            return False  # the DHT's schema refuses such entries; one that got through is not read
        if progress.samples_accumulated > MAX_SAMPLES_FACTOR * self.target_batch_size:
            return False
        if progress.samples_per_second > MAX_SAMPLES_PER_SECOND:
            return False
        with self._distrust_lock:
            distrusted = self._distrust_above is not None and time.monotonic() < self._distrust_until
            return not (distrusted and progress.epoch > self._distrust_above)


def distrust_unvouched_epoch(tracker: ProgressTracker, local_epoch: int) -> None:
    """After a state download: if this peer is still behind the swarm's epoch, no donor vouched for it; leave the
    entries ahead of this peer's epoch out for a while. (hivemind.Optimizer's download already joined an epoch one
    ahead, as after a round this peer missed the end of; the local-steps mode downloads for that case too.)"""
    claimed = tracker.global_epoch
    if isinstance(tracker, VouchedProgressTracker) and claimed > local_epoch:
        logger.warning(
            f"The swarm's epoch {claimed} is vouched for by no donor (the newest state is of epoch {local_epoch}): "
            f"leaving progress entries above epoch {local_epoch} out for {DISTRUST_SECONDS:.0f} s"
        )
        tracker.distrust_epochs_above(local_epoch)
